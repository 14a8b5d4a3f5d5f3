import os, time
def tr(*a):
    with open("/tmp/trace_pin.log", "a") as f:
        f.write(f"{time.time():.3f} {os.getpid()} " + " ".join(str(x) for x in a) + "\n")

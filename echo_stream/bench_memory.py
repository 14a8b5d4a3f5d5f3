"""``echo-stream bench memory``: does ``generate``'s memory stay flat however long the audio is?

Runs ``generate`` (local Ray, the bundled portrait, the bundled speech repeated
to each length) once per length, each in a fresh process, and samples the
driver's resident memory every half second. Writes
``bench/results/generate_memory.json`` (machine, versions, config, the RSS
series and peaks per length, the ratio of the longest run's peak to the
shortest's) and ``generate_memory.png``.

The bound, by design: the driver keeps nothing per frame. Rendered frames go to
the encoder and motion rows to the Parquet file (row groups of 1,500 frames)
as they arrive, both copied out of their packets, so no Arrow buffer of a
finished packet stays alive.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

_CHILD = r"""
import json, os, resource, sys, threading, time
samples = []
stop = threading.Event()
page = os.sysconf("SC_PAGE_SIZE")
t0 = time.perf_counter()
def sample():
    while not stop.is_set():
        with open("/proc/self/statm") as f:
            samples.append((round(time.perf_counter() - t0, 2), int(f.read().split()[1]) * page / 2**20))
        stop.wait(0.5)
threading.Thread(target=sample, daemon=True).start()
from echo_stream.generate import GenerateRequest, generate
req = GenerateRequest(**json.loads(sys.argv[1]))
stats = generate(req, progress=False, num_cpus=int(sys.argv[2]) if sys.argv[2] != "0" else None)
stop.set()
print(json.dumps({"audio_s": stats["audio_s"], "processing_s": stats["processing_s"], "frames": stats["frames"],
                  "rss_mb": samples, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _speech(seconds: float, path: str) -> None:
    """The bundled sample speech repeated to ``seconds``, as a 16 kHz wav."""
    import numpy as np
    import soundfile as sf

    from . import media
    from .samples import ASSETS_DIR as ASSETS

    y = media.decode_audio(str(ASSETS / "sample" / "avatar_speech.ogg"))
    n = int(round(seconds * 16000))
    sf.write(path, np.resize(y, n), 16000, subtype="PCM_16")


def run(args) -> int:
    from . import atomic
    from .machine import environment

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in args.seconds:
            wav = os.path.join(tmp, f"speech-{seconds:g}.wav")
            _speech(seconds, wav)
            from .samples import ASSETS_DIR as ASSETS

            req = {"portrait": str(ASSETS / "portrait.jpg"), "avatar_audio": wav, "size": args.size,
                   "out": os.path.join(tmp, f"out-{seconds:g}.mp4"),
                   "motion_out": os.path.join(tmp, f"motion-{seconds:g}.parquet")}
            print(f"generate {seconds:g} s of audio ...", flush=True)
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(req), str(args.num_cpus)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr[-2000:], file=sys.stderr)
                return 1
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res["seconds"] = seconds
            res["wall_s"] = time.perf_counter() - t
            runs.append(res)
            print(f"  peak driver RSS {res['peak_rss_mb']:.0f} MB, {res['processing_s']:.0f} s processing", flush=True)
    ratio = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    result = {"benchmark": "generate_memory", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "environment": environment(),
              "config": {"size": args.size, "num_cpus": args.num_cpus or os.cpu_count(), "runner": "ray",
                         "seconds": args.seconds},
              "peak_ratio_longest_to_shortest": ratio, "runs": runs}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "generate_memory.json")
    atomic.write_text(path, json.dumps(result, indent=1))
    _plot(result, os.path.join(args.out, "generate_memory.png"))
    print(f"peak RSS ratio {ratio:.2f} ({runs[-1]['seconds']:g} s vs {runs[0]['seconds']:g} s); wrote {path}")
    return 0


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for r in result["runs"]:
        t = [s[0] for s in r["rss_mb"]]
        ax.plot(t, [s[1] for s in r["rss_mb"]], label=f"{r['seconds']:g} s of audio")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("driver RSS (MB)")
    ax.set_title("echo-stream generate: driver memory over time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

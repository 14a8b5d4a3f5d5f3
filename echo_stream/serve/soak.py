"""``echo-stream bench soak``: sessions opened and closed for an hour; does anything grow?

A server runs in this process (the gRPC ingress and the Ray driver, on local
Ray, as ``echo-stream serve`` runs them). A client process keeps
``--concurrency`` sessions going, one after another, for ``--minutes``: each
streams 2-10 s of a test signal in real time, video (fMP4) or motion only at
random, and one in five is dropped mid-stream (the client disconnects without
ending it, as a closed browser tab does). Beside them one video session lasts
the whole soak (an hour-long session). Every ``--every`` seconds the
benchmark reads ``/proc`` for

* the ingress (this process),
* each stage actor's worker process (pids from the actors themselves, asked again
  each time: a restarted actor is a new process),
* Ray's own processes (GCS, raylet, agents, idle workers: every other descendant of
  this process),

their resident memory, open descriptors and threads, and the server's open
sessions. The JSON (machine, versions, config, the series, per-process growth
over the second half as MB per hour, client tallies) and a plot go to
``bench/results/soak.json`` / ``soak.png``. A benchmark, not a test: it takes
as long as you ask it to.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- /proc readings

def _proc(pid: int) -> dict | None:
    """RSS (MB), threads, open descriptors and name of one process; None when it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * _PAGE / 2**20
        with open(f"/proc/{pid}/status") as f:
            threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, StopIteration, ValueError):
        return None
    return {"rss_mb": rss, "threads": threads, "fds": fds, "cmd": cmd[:120]}


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _sum(procs: list[dict]) -> dict:
    return {k: sum(p[k] for p in procs) for k in ("rss_mb", "threads", "fds")} | {"processes": len(procs)}


# --------------------------------------------------------------------------- the client process

async def _client_loop(target: str, minutes: float, concurrency: int, size: int, seed: int) -> dict:
    import grpc

    from .. import render
    from .client import AvatarClient, Inputs, stream_inputs, test_signal

    rng = random.Random(seed)
    portrait = render.SAMPLE_PORTRAIT.read_bytes()
    tally = {"completed": 0, "dropped": 0, "refused": 0, "errors": {}, "frames": 0, "gap_frames": 0}
    stop_at = time.monotonic() + minutes * 60

    async def one(c: AvatarClient, k: int) -> None:
        seconds = rng.uniform(2.0, 10.0)
        video = rng.random() < 0.5
        drop = rng.random() < 0.2
        run = stream_inputs(c, Inputs(test_signal(seconds, seed=k)), portrait=portrait if video else None,
                            output="video" if video else "motion", size=size, seed=k, realtime=True)
        try:
            if drop:
                await asyncio.wait_for(run, timeout=seconds * rng.uniform(0.2, 0.8))
            else:
                res = await run
                tally["completed"] += 1
                if res.stats is not None:
                    tally["frames"] += int(res.stats.frames)
                    tally["gap_frames"] += int(res.stats.gap_frames)
        except asyncio.TimeoutError:
            tally["dropped"] += 1
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                tally["refused"] += 1
                await asyncio.sleep(0.5)
            else:
                key = e.code().name
                tally["errors"][key] = tally["errors"].get(key, 0) + 1

    async def lane(c: AvatarClient, lane_id: int) -> None:
        k = lane_id * 1_000_000
        while time.monotonic() < stop_at:
            await one(c, k)
            k += 1

    async def long_session(c: AvatarClient) -> None:
        """One session that lasts the whole soak: its own memory must not grow with its length either."""
        seconds = max(5.0, minutes * 60 - 20.0)
        try:
            res = await stream_inputs(c, Inputs(test_signal(seconds, seed=7)), portrait=portrait, output="video",
                                      size=size, seed=7, realtime=True)
            st = res.stats
            tally["long_session"] = {"audio_s": seconds, "frames": int(st.frames) if st else None,
                                     "expected_frames": int(round(seconds * 25)),
                                     "gap_frames": int(st.gap_frames) if st else None,
                                     "latency_p99_s": st.latency_p99_s if st else None}
        except grpc.aio.AioRpcError as e:
            tally["long_session"] = {"error": f"{e.code().name}: {e.details()}"}

    async with AvatarClient(target) as c:
        await asyncio.gather(long_session(c), *(lane(c, i) for i in range(concurrency)))
    return tally


def _client_main(argv: list[str]) -> int:
    target, minutes, concurrency, size = argv[0], float(argv[1]), int(argv[2]), int(argv[3])
    tally = asyncio.run(_client_loop(target, minutes, concurrency, size, seed=0))
    print(json.dumps(tally))
    return 0


# --------------------------------------------------------------------------- the benchmark

def _stage_pids(backend) -> dict[str, int]:
    import ray

    out = {}
    for stage, actor in backend.runner.actors.items():
        try:
            out[stage] = int(ray.get(actor.stats.remote(), timeout=10)["pid"])
        except Exception:  # noqa: BLE001 - restarting: read it next time
            pass
    return out


def _growth_mb_per_hour(t: list[float], v: list[float]) -> float | None:
    """Least-squares slope over the second half of the run (after warm-up), in MB per hour."""
    import numpy as np

    n = len(t)
    if n < 4:
        return None
    tt, vv = np.asarray(t[n // 2:]), np.asarray(v[n // 2:])
    if np.ptp(tt) <= 0:
        return None
    return float(np.polyfit(tt, vv, 1)[0] * 3600)


def run(args) -> int:
    from ..machine import environment
    from ..pipeline import PipelineOptions
    from .backend import RayBackend
    from ..cluster import start_ray
    from .server import ServeOptions, ServerThread

    start_ray(None, args.num_cpus)
    backend = RayBackend.start(PipelineOptions(size=(args.size, args.size)), num_cpus=args.num_cpus)
    server = ServerThread(backend, ServeOptions.for_model(None, port=0, max_sessions=args.concurrency + 3))
    target = f"127.0.0.1:{server.start()}"
    client = subprocess.Popen([sys.executable, "-m", "echo_stream.serve.soak", "--client", target,
                               str(args.minutes), str(args.concurrency), str(args.size)],
                              stdout=subprocess.PIPE, text=True)
    me = os.getpid()
    samples = []
    t0 = time.monotonic()
    try:
        from tqdm import tqdm

        with tqdm(total=round(args.minutes * 60), unit="s", desc="soak") as bar:
            while client.poll() is None:
                stages = _stage_pids(backend)
                ray_pids = _descendants(me) - set(stages.values()) - {client.pid} - _descendants(client.pid)
                ray_procs = [p for p in (_proc(x) for x in sorted(ray_pids)) if p is not None]
                sample = {"t_s": round(time.monotonic() - t0, 1), "ingress": _proc(me),
                          "stages": {s: _proc(pid) for s, pid in stages.items()}, "ray": _sum(ray_procs),
                          "sessions_open": len(server.server.sessions)}
                samples.append(sample)
                bar.update(min(max(0, round(sample["t_s"]) - bar.n), bar.total - bar.n))
                time.sleep(args.every)
        out, _ = client.communicate(timeout=60)
        tally = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": "client printed nothing"}
    finally:
        if client.poll() is None:
            client.kill()
        server.stop()
        backend.shutdown()
    t = [s["t_s"] for s in samples]
    series = {"ingress": [s["ingress"]["rss_mb"] for s in samples], "ray": [s["ray"]["rss_mb"] for s in samples]}
    for stage in samples[0]["stages"] if samples else ():
        series[stage] = [(s["stages"].get(stage) or {}).get("rss_mb", float("nan")) for s in samples]
    result = {
        "benchmark": "soak", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment(),
        "config": {"minutes": args.minutes, "concurrency": args.concurrency, "size": args.size,
                   "every_s": args.every, "num_cpus": args.num_cpus or os.cpu_count(),
                   "sessions": "2-10 s test signal in real time; half video (fMP4), half motion only; "
                               "1 in 5 dropped mid-stream by the client"},
        "client": tally,
        "rss_growth_mb_per_hour_second_half": {k: _growth_mb_per_hour(t, v) for k, v in series.items()},
        "first_last": {k: [v[0], v[-1]] for k, v in series.items() if v},
        "samples": samples,
    }
    os.makedirs(args.out, exist_ok=True)
    from .. import atomic

    path = os.path.join(args.out, "soak.json")
    atomic.write_text(path, json.dumps(result, indent=1, default=str))
    _plot(result, os.path.join(args.out, "soak.png"))
    print(f"client: {tally}; RSS growth (MB/h, second half): "
          + ", ".join(f"{k} {v:+.1f}" for k, v in result["rss_growth_mb_per_hour_second_half"].items()
                      if v is not None) + f"; wrote {path}")
    return 0


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    if not s:
        return
    t = [x["t_s"] / 60 for x in s]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in ["ingress"] + list(s[0]["stages"]):
        get = (lambda x, n=name: x["ingress"]) if name == "ingress" else (lambda x, n=name: x["stages"].get(n) or {})
        for ax, key in zip(axes, ("rss_mb", "fds", "threads")):
            ax.plot(t, [get(x).get(key, float("nan")) for x in s], label=name)
    for ax, key in zip(axes, ("rss_mb", "fds", "threads")):
        ax.plot(t, [x["ray"][key] for x in s], label="Ray's own (sum)", linestyle="--")
        ax.set_xlabel("minutes")
        ax.set_title({"rss_mb": "resident memory (MB)", "fds": "open descriptors", "threads": "threads"}[key])
    axes[0].legend(fontsize=7)
    fig.suptitle(f"echo-stream soak: {result['config']['concurrency']} sessions in flight, opened and closed for "
                 f"{result['config']['minutes']:g} min")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":      # the soak's client process; the benchmark itself is `echo-stream bench soak`
    if sys.argv[1:2] != ["--client"]:
        sys.exit("run the soak as: echo-stream bench soak [--minutes M] ...")
    sys.exit(_client_main(sys.argv[2:]))

"""``echo-stream bench preprocess``: preprocessing throughput on Ray Data against the plain sequential loop.

For each corpus size it runs, every run in a fresh subprocess writing into an empty OUTPUT:

* ``sequential``: :func:`echo_stream.preprocess.preprocess` with ``executor="local"`` (the same
  :func:`~echo_stream.preprocess.process_input` in a plain loop in one process; no Ray);
* ``ray`` with ``num_cpus`` = each value of ``--cpus`` (local Ray started by the run).

Figures per run: wall-clock seconds end to end (Ray start-up and actor warm-up included) and
without Ray's start-up (from when ``ray.init`` returned; actor start and warm-up still included), files/s, media hours per wall-clock hour,
speed-up over the sequential loop, and peak memory: the peak summed proportional set size (PSS,
shared pages split between processes) of the run's whole process tree (driver, Ray's own
processes, workers), sampled every 0.2 s, plus the driver's peak RSS. The input is the synthetic
corpus (``echo-stream corpus``; generated into ``--work`` when absent) or ``--corpus``. One JSON
file (machine, versions, config, figures) goes to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", metavar="DIR|MANIFEST",
                   help="inputs (a manifest or corpus directory); default: a synthetic corpus in --work")
    p.add_argument("--sizes", default="16,48", help="corpus sizes in conversations, comma-separated (default 16,48)")
    p.add_argument("--cpus", default="1,2", help="num_cpus values for the Ray runs (default 1,2)")
    p.add_argument("--minutes", type=float, default=1.0, help="minutes per generated conversation (default 1)")
    p.add_argument("--no-video", action="store_true", help="generated corpus with audio-only user side")
    p.add_argument("--work", default="out/bench_preprocess", help="corpus cache and scratch directory")
    p.add_argument("--no-sequential", action="store_true", help="skip the sequential baseline")
    p.add_argument("--out", default="bench/results", help="directory for the JSON (default bench/results)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run, JSON on stdout


# ============================================================================ memory sampling

def _tree_pids(root: int) -> list[int]:
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [root], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler:
    """Peak summed PSS (MiB) of a process tree, sampled on a thread."""

    def __init__(self, root: int | None = None, every_s: float = 0.2):
        self.root = root or os.getpid()
        self.every = every_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            total = sum(_pss_kb(p) for p in _tree_pids(self.root)) / 1024
            self.peak_mb = max(self.peak_mb, total)
            self._stop.wait(self.every)

    def __enter__(self) -> "MemorySampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


# ============================================================================ one run (subprocess)

def _one(spec: dict) -> dict:
    import resource

    from .preprocess import RayOptions, preprocess

    t0 = time.perf_counter()
    with MemorySampler() as mem:
        info = preprocess(spec["manifest"], spec["output"], executor=spec["executor"], fresh=True, progress=False,
                          ray_options=RayOptions(num_cpus=spec.get("num_cpus")))
    wall = time.perf_counter() - t0
    r = info["run"]
    return {"wall_s": wall, "processing_s": r["processing_s"], "startup_s": wall - r["processing_s"],
            "done": r["done"], "quarantined": r["quarantined_now"], "media_s": r["media_s"],
            "peak_tree_pss_mb": round(mem.peak_mb, 1),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "shards": len(info["shards"]), "frames": info["total"]["frames"]}


def _spawn(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "echo_stream.bench_preprocess", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark run {spec} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ============================================================================ the benchmark

def _corpus(args) -> Path:
    if args.corpus:
        p = Path(args.corpus)
        return p if p.is_file() else p / "manifest.jsonl"
    from . import corpus

    sizes = [int(s) for s in args.sizes.split(",")]
    d = Path(args.work) / f"corpus_{'audio' if args.no_video else 'video'}_{args.minutes:g}min"
    print(f"generating / completing the synthetic corpus in {d} ({max(sizes)} conversations)", file=sys.stderr)
    return Path(corpus.generate_corpus(d, n_conversations=max(sizes), minutes=args.minutes, seed=0,
                                       render_video=not args.no_video, progress=True))


def _subset(manifest: Path, n: int, dest: Path) -> Path:
    from .preprocess import PATH_FIELDS, read_inputs

    rows, root = read_inputs(manifest)
    if len(rows) < n:
        raise SystemExit(f"{manifest} has {len(rows)} conversations, fewer than the size {n} asked for")
    lines = []
    for r in rows[:n]:
        r = dict(r)
        for k in PATH_FIELDS:
            if r.get(k):
                r[k] = str((Path(root) / r[k]).resolve())
        lines.append(json.dumps(r))
    dest.write_text("\n".join(lines) + "\n")
    return dest


def run(args) -> int:
    from .bench_pipeline import environment

    if args.one:
        print(json.dumps(_one(json.loads(args.one))))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    cpus = [int(c) for c in args.cpus.split(",")]
    manifest = _corpus(args)
    load_start = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(dir=args.work if Path(args.work).is_dir() else None) as tmp:
        for n in sizes:
            sub = _subset(manifest, n, Path(tmp) / f"manifest_{n}.jsonl")
            configs = ([] if args.no_sequential else [("sequential", None)]) + [("ray", c) for c in cpus]
            for executor, c in configs:
                spec = {"manifest": str(sub), "output": str(Path(tmp) / f"out_{n}_{executor}_{c}"),
                        "executor": "local" if executor == "sequential" else "ray", "num_cpus": c}
                label = executor if c is None else f"ray num_cpus={c}"
                print(f"[{n} conversations] {label} ...", file=sys.stderr, flush=True)
                r = _spawn(spec)
                r.update(conversations=n, executor=executor, num_cpus=c)
                r["files_per_s"] = r["done"] / r["wall_s"]
                r["media_h_per_h"] = r["media_s"] / r["wall_s"]
                r["media_h_per_h_processing"] = r["media_s"] / max(r["processing_s"], 1e-9)
                results.append(r)
                print(f"  {r['wall_s']:.1f} s ({r['startup_s']:.1f} s start-up), {r['files_per_s']:.3f} files/s, "
                      f"{r['media_h_per_h']:.1f} media-h/h, peak tree PSS {r['peak_tree_pss_mb']:.0f} MiB",
                      file=sys.stderr, flush=True)
    for r in results:
        base = next((b for b in results if b["executor"] == "sequential" and b["conversations"] == r["conversations"]),
                    None)
        if base is not None:
            r["speedup_vs_sequential"] = round(base["wall_s"] / r["wall_s"], 3)
            r["speedup_vs_sequential_processing"] = round(base["processing_s"] / r["processing_s"], 3)
    env = environment()
    env["load_average_at_start"], env["load_average_at_end"] = load_start, os.getloadavg()
    result = {"benchmark": "preprocess", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": env,
              "config": {"corpus": str(manifest), "sizes": sizes, "cpus": cpus, "minutes": args.minutes,
                         "user_video": not args.no_video},
              "runs": results}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"preprocess_{os.cpu_count()}cpu.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {path}", file=sys.stderr)
    for r in results:
        print(f"{r['conversations']:>4} conv  {r['executor']:<10} cpus={r['num_cpus'] or '-'}  "
              f"{r['wall_s']:7.1f} s  {r['files_per_s']:.3f} files/s  {r['media_h_per_h']:6.1f} media-h/h  "
              f"x{r.get('speedup_vs_sequential', float('nan')):.2f}  peak {r['peak_tree_pss_mb']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(run(argparse.Namespace(one=sys.argv[1])))

"""``echo-stream bench preprocess``: preprocessing throughput on Ray Data against the plain sequential loop.

For each corpus size it runs, every run in a fresh subprocess writing into an empty OUTPUT:

* ``sequential``, two baselines, both :func:`echo_stream.preprocess.preprocess` with ``executor="local"``
  (the same :func:`~echo_stream.preprocess.process_input` in a plain loop in one process; no Ray):

  - ``library_threads=1``: the process's libraries pinned to one thread each, exactly as a Ray
    featuriser actor pins its own (``OMP_NUM_THREADS=1`` for BLAS, as Ray sets it for a 1-CPU actor,
    plus :func:`~echo_stream.preprocess.one_thread_per_library`: OpenCV's pool, FFmpeg's decoder
    threads). One process on one core: the baseline a parallel speed-up is measured against.
  - ``library_threads=default``: every library at its default (OpenCV's face detector and BLAS use
    every core, FFmpeg its own decoder threads): the loop as a user would run it without Ray. It
    already uses part of the second core, so it is reported too but is not the scaling baseline.

* ``ray`` with ``num_cpus`` = each value of ``--cpus`` (local Ray started by the run).
* ``ideal-split`` (unless ``--no-ideal``): ``num_cpus`` (the largest ``--cpus``) plain processes, each the
  single-threaded sequential loop over its share of the inputs into its own OUTPUT, started together:
  what a perfect parallel executor without any overhead would get from this machine (it does not
  write one dataset, so it is a ceiling, not an alternative).

Figures per run: wall-clock seconds end to end (Ray start-up and actor warm-up included) and
without Ray's start-up (from when ``ray.init`` returned; actor start and warm-up still included),
files/s, media hours per wall-clock hour, speed-up over both sequential baselines, seconds from the
start to the first finished conversation, the featurisers' utilisation (Ray), peak memory (the peak summed proportional set size (PSS, shared pages split between
processes) of the run's whole process tree: driver, Ray's own processes, workers; plus the driver's
peak RSS) and CPU seconds per kind of process (driver, featurisers, Ray's helpers). Memory and CPU
are sampled from the benchmark's parent process, on a thread at the lowest priority, so that the
sampling takes as little as possible from the run.

With ``--repeat N`` every runner runs once per round, N rounds one after the other, and speed-ups are
taken within a round (each against the baselines of its own round, minutes apart) and summarised by
their median, every round's figure kept: on a shared machine the conditions drift over minutes.

The machine's parallel capacity is probed before the first run and after every run (``--no-probe``
skips it): two copies of a single-threaded CPU-bound loop run together for 2 s, against one copy
alone; ``2.0`` means two full cores, less means that the cores were shared with something else (on
a virtual machine, other guests on the host). A speed-up over the single-threaded loop cannot
exceed it.

The input is the synthetic corpus (``echo-stream corpus``; generated into ``--work`` when absent) or
``--corpus``. One JSON file (machine, versions, load average, config, figures) goes to ``--out``, and
a PNG beside it: throughput per runner and corpus size, with the speed-up over the single-threaded
loop on each bar, and peak memory. ``--plot JSON`` redraws the figure of an earlier result.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .arguments.bench import add_preprocess_bench_arguments as add_arguments  # noqa: F401 (the command's arguments)

# ============================================================================ process tree sampling

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _proc_table() -> dict[int, tuple[int, float, int]]:
    """``{pid: (parent pid, CPU seconds so far (user + system, all threads), RSS KiB)}`` of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK,
                               int(fields[21]) * _PAGE_KB)
            except (OSError, IndexError, ValueError):
                pass
    return out


def _tree(table: dict, root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in table:
            out.append(p)
        todo += kids.get(p, [])
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


def _name(pid: int) -> str | None:
    """What a process is: Ray's process title (``ray::IDLE``, ``ray::MapWorker(...)``), else its script."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if not argv:
        return None
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    script = next((a for a in argv[1:] if a.endswith(".py")), None)
    return os.path.basename(script or argv[0])


def _cpu_kind(name: str) -> str:
    if name == "driver":
        return "driver"
    if "MapWorker" in name or "Featurizer" in name:
        return "featurisers"
    if name == "sequential loop":
        return "sequential loops"
    if name.startswith("ray::") and name not in ("ray::DashboardAgent", "ray::RuntimeEnvAgent"):
        return "ray helper workers"      # idle workers, Ray Data's stats / location / autoscaling actors
    return "ray system"                  # gcs_server, raylet, agents, monitors, ...


class TreeSampler:
    """Peak summed PSS (MiB) of a process tree and the CPU seconds each of its processes used.

    Runs on a thread of the benchmark's parent process at the lowest priority (nice 19: it yields to
    the measured run). Every ``every_s`` it reads ``/proc/PID/stat`` of every process (CPU, RSS,
    parent: cheap). A process's PSS (``smaps_rollup``, which walks its page tables: milliseconds for a
    large process) is read again only when its RSS moved by more than 2 % (or 4 MiB) since the last
    read, and for every process at least every ``pss_every_s`` (sharing changes when processes come
    and go); the tree's PSS is the sum of the latest readings. A process's CPU is its last sample (the
    last < ``every_s`` of one that exits is missed; the driver reports its own exactly).
    """

    def __init__(self, root: int, every_s: float = 0.5, pss_every_s: float = 5.0):
        self.root = root
        self.every = every_s
        self.pss_every = pss_every_s
        self.peak_mb = 0.0
        self.pss_reads = 0
        self.own_cpu_s = 0.0
        self._pss: dict[int, tuple[int, int]] = {}   # pid -> (RSS KiB when read, PSS KiB)
        self._last_full = 0.0
        self._cpu: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        try:  # Linux: the nice value of this thread only
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        c0 = time.thread_time()
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)
        self.own_cpu_s = time.thread_time() - c0

    def _sample(self) -> None:
        table = _proc_table()
        pids = _tree(table, self.root)
        now = time.monotonic()
        full = now - self._last_full >= self.pss_every
        if full:
            self._last_full = now
        total = 0
        for p in pids:
            self._cpu[p] = table[p][1]
            rss = table[p][2]
            seen = self._pss.get(p)
            if full or seen is None or abs(rss - seen[0]) > max(0.02 * seen[0], 4096):
                seen = (rss, _pss_kb(p))
                self._pss[p] = seen
                self.pss_reads += 1
                self._names[p] = _name(p) or self._names.get(p, "?")   # Ray renames workers
            total += seen[1]
        self.peak_mb = max(self.peak_mb, total / 1024)

    def cpu_by_name(self, driver_cpu_s: float | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, cpu in self._cpu.items():
            name = "driver" if pid == self.root else self._names.get(pid, "?")
            if pid == self.root and driver_cpu_s is not None:
                cpu = driver_cpu_s
            out[name] = round(out.get(name, 0.0) + cpu, 2)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def __enter__(self) -> "TreeSampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def _by_kind(by_name: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, cpu in by_name.items():
        k = _cpu_kind(name)
        out[k] = round(out.get(k, 0.0) + cpu, 2)
    return out


# ============================================================================ parallel-capacity probe

_SPIN = ("import time\nt = time.perf_counter() + {s}\nn = 0\n"
         "while time.perf_counter() < t:\n    for _ in range(10000):\n        n += 1\nprint(n)")


def _spin(copies: int, seconds: float) -> list[int]:
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN.format(s=seconds)], stdout=subprocess.PIPE, text=True)
             for _ in range(copies)]
    return [int(p.communicate()[0]) for p in procs]


def parallel_capacity(seconds: float = 2.0) -> float:
    """Work two copies of a single-threaded CPU-bound loop do together, over what one copy does alone
    (one alone before and after, averaged): about 2.0 on two free cores."""
    a = _spin(1, seconds)[0]
    two = sum(_spin(2, seconds))
    b = _spin(1, seconds)[0]
    return round(two / max((a + b) / 2, 1), 2)


# ============================================================================ one run (subprocess)

#: what pins a process's libraries to one thread each, as Ray does for a 1-CPU actor (OMP_NUM_THREADS=1,
#: which numpy's OpenBLAS follows); the rest (OpenCV, FFmpeg) is ``preprocess.one_thread_per_library``
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _one(spec: dict) -> dict:
    import resource

    if spec["executor"] == "split":
        return _one_split(spec)
    from .preprocess import RayOptions, one_thread_per_library, preprocess

    if spec.get("one_thread"):
        one_thread_per_library()
    t0 = time.perf_counter()
    info = preprocess(spec["manifest"], spec["output"], executor=spec["executor"], fresh=True, progress=False,
                      ray_options=RayOptions(num_cpus=spec.get("num_cpus")))
    wall = time.perf_counter() - t0
    r = info["run"]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": wall, "processing_s": r["processing_s"], "startup_s": wall - r["processing_s"],
            "done": r["done"], "quarantined": r["quarantined_now"], "media_s": r["media_s"],
            "driver_peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "driver_cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "shards": len(info["shards"]), "frames": info["total"]["frames"],
            "featurise_s": round(r["featurise_s"], 2), "workers": r.get("workers"),
            "first_result_s": None if r["first_result_s"] is None else round(wall - r["processing_s"]
                                                                             + r["first_result_s"], 2)}


def _one_split(spec: dict) -> dict:
    """The ideal split: ``num_cpus`` single-threaded sequential loops over shares of the inputs, together."""
    import resource

    lines = Path(spec["manifest"]).read_text().splitlines()
    n = spec["num_cpus"]
    t0 = time.perf_counter()
    procs = []
    for k in range(n):
        part = Path(spec["output"] + f"_part{k}.jsonl")
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text("\n".join(lines[k::n]) + "\n")
        sub = {"manifest": str(part), "output": spec["output"] + f"_part{k}", "executor": "local", "one_thread": True}
        procs.append(subprocess.Popen([sys.executable, "-m", "echo_stream.bench_preprocess", json.dumps(sub)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=dict(os.environ, **ONE_THREAD_ENV)))
    outputs = [p.communicate() for p in procs]        # every part ends before any is judged
    for k, (p, (_, err)) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            raise RuntimeError(f"ideal-split part {k} of {n} failed (exit {p.returncode}):\n{err[-3000:]}")
    parts = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": wall, "processing_s": wall, "startup_s": 0.0,
            "done": sum(p["done"] for p in parts), "quarantined": sum(p["quarantined"] for p in parts),
            "media_s": sum(p["media_s"] for p in parts), "driver_peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
            "driver_cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "shards": sum(p["shards"] for p in parts),
            "frames": sum(p["frames"] for p in parts), "featurise_s": round(sum(p["featurise_s"] for p in parts), 2),
            "first_result_s": min(p["first_result_s"] for p in parts), "part_wall_s": [round(p["wall_s"], 2)
                                                                                       for p in parts]}


def _spawn(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "echo_stream.bench_preprocess", json.dumps(spec)]
    env = dict(os.environ, **(ONE_THREAD_ENV if spec.get("one_thread") else {}))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        with TreeSampler(proc.pid) as mem:
            rc = proc.wait()
        out.seek(0)
        err.seek(0)
        if rc != 0:
            raise RuntimeError(f"benchmark run {spec} failed:\n{err.read()[-3000:]}")
        r = json.loads(out.read().strip().splitlines()[-1])
    names = mem.cpu_by_name(driver_cpu_s=r.pop("driver_cpu_s"))   # the driver's own figure is exact
    if spec["executor"] == "split":                                # its children are the loops
        names = {("sequential loop" if k != "driver" else k): v for k, v in names.items()}
    total = sum(names.values())
    r.update(peak_tree_pss_mb=round(mem.peak_mb, 1), pss_reads=mem.pss_reads,
             sampler_cpu_s=round(mem.own_cpu_s, 2), cpu_s=round(total, 2), cores_used=round(total / r["wall_s"], 3),
             cpu_s_by_kind=_by_kind(names), cpu_s_by_process=names)
    return r


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


def _label(r: dict) -> str:
    if r["executor"] == "sequential":   # results written before the 1-thread baseline existed ran at the default
        return f"sequential, library threads {r.get('library_threads', 'default')}"
    if r["executor"] == "ideal-split":
        return f"ideal split, {r['num_cpus']} processes"
    return f"ray num_cpus={r['num_cpus']}"


def _speedups(results: list[dict]) -> None:
    """Speed-ups over the baselines of the same size and the same round (run minutes apart, under the
    same conditions of a shared machine)."""
    for r in results:
        for threads in ("1", "default"):
            base = next((b for b in results if b["executor"] == "sequential" and b["library_threads"] == threads
                         and b["conversations"] == r["conversations"] and b["round"] == r["round"]), None)
            if base is not None:
                key = "1thread" if threads == "1" else "default_threads"
                r[f"speedup_vs_sequential_{key}"] = round(base["wall_s"] / r["wall_s"], 3)
                r[f"speedup_vs_sequential_{key}_processing"] = round(base["processing_s"] / r["processing_s"], 3)


def _summary(results: list[dict]) -> list[dict]:
    """Per size and runner over the rounds: median wall time and speed-ups (every round's value listed
    too), the largest peak memory."""
    out = []
    for key in dict.fromkeys((r["conversations"], _label(r)) for r in results):
        runs = [r for r in results if (r["conversations"], _label(r)) == key]
        s = {"conversations": key[0], "runner": key[1], "rounds": len(runs),
             "wall_s_median": round(statistics.median([r["wall_s"] for r in runs]), 1),
             "wall_s": [round(r["wall_s"], 1) for r in runs],
             "peak_tree_pss_mb_max": max(r["peak_tree_pss_mb"] for r in runs)}
        for k in ("speedup_vs_sequential_1thread", "speedup_vs_sequential_default_threads"):
            vals = [r[k] for r in runs if k in r]
            if vals:
                s[k + "_median"] = round(statistics.median(vals), 3)
                s[k] = vals
        out.append(s)
    return out


def _positive_ints(flag: str, text: str) -> list[int]:
    """``"16,48"`` -> ``[16, 48]``; anything else is refused with the flag named."""
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise SystemExit(f"{flag}: comma-separated whole numbers >= 1, e.g. 16,48; got {text!r}")
    return vals


def run(args) -> int:
    from .machine import environment

    if args.one:
        print(json.dumps(_one(json.loads(args.one))))
        return 0
    if args.plot:
        src = Path(args.plot)
        if not src.is_file():
            raise SystemExit(f"--plot: {src} is not a file (give a JSON written by `echo-stream bench preprocess`)")
        try:
            result = json.loads(src.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SystemExit(f"--plot: {src} is not JSON ({e})") from None
        if not isinstance(result, dict) or result.get("benchmark") != "preprocess" or not result.get("runs"):
            raise SystemExit(f"--plot: {src} is not a preprocess benchmark result (no 'runs')")
        png = src.with_suffix(".png")
        write_plot(png, result)
        print(f"wrote {png}", file=sys.stderr)
        _print_table(result["runs"])
        return 0
    sizes = _positive_ints("--sizes", args.sizes)
    cpus = _positive_ints("--cpus", args.cpus)
    if args.repeat < 1:
        raise SystemExit(f"--repeat: at least 1 round, got {args.repeat}")
    baselines = [] if args.no_sequential else [b.strip() for b in args.baselines.split(",") if b.strip()]
    if any(b not in ("1", "default") for b in baselines):
        raise SystemExit(f"--baselines: '1' and/or 'default', got {args.baselines!r}")
    manifest = _corpus(args)
    load_start = os.getloadavg()
    probes = []

    def probe() -> float | None:
        if args.no_probe:
            return None
        c = parallel_capacity()
        probes.append({"time": time.strftime("%H:%M:%S"), "capacity": c, "load_average": os.getloadavg()[0]})
        print(f"  parallel capacity {c:.2f} (2.00 = two free cores)", file=sys.stderr, flush=True)
        return c

    results = []
    capacity = probe()
    with tempfile.TemporaryDirectory(dir=args.work if Path(args.work).is_dir() else None) as tmp:
        for n in sizes:
            sub = _subset(manifest, n, Path(tmp) / f"manifest_{n}.jsonl")
            configs = ([{"executor": "sequential", "library_threads": b, "num_cpus": None} for b in baselines]
                       + [{"executor": "ray", "library_threads": "1 per actor", "num_cpus": c} for c in cpus]
                       + ([] if args.no_ideal else
                          [{"executor": "ideal-split", "library_threads": "1", "num_cpus": max(cpus)}]))
            for rnd, cfg in [(k, c) for k in range(args.repeat) for c in configs]:   # rounds interleaved
                spec = {"manifest": str(sub), "num_cpus": cfg["num_cpus"],
                        "output": str(Path(tmp) / f"out_{n}_{cfg['executor']}_{cfg['library_threads']}_"
                                                  f"{cfg['num_cpus']}".replace(" ", "")),
                        "executor": {"sequential": "local", "ray": "ray", "ideal-split": "split"}[cfg["executor"]],
                        "one_thread": cfg["executor"] == "sequential" and cfg["library_threads"] == "1"}
                r = dict(cfg, conversations=n, round=rnd)
                print(f"[{n} conversations, round {rnd + 1}/{args.repeat}] {_label(r)} ...", file=sys.stderr,
                      flush=True)
                r.update(_spawn(spec))
                r["capacity_before"] = capacity
                capacity = probe()
                r["capacity_after"] = capacity
                r["files_per_s"] = r["done"] / r["wall_s"]
                r["media_h_per_h"] = r["media_s"] / r["wall_s"]
                r["media_h_per_h_processing"] = r["media_s"] / max(r["processing_s"], 1e-9)
                results.append(r)
                print(f"  {r['wall_s']:.1f} s ({r['startup_s']:.1f} s start-up), {r['files_per_s']:.3f} files/s, "
                      f"{r['media_h_per_h']:.1f} media-h/h, peak tree PSS {r['peak_tree_pss_mb']:.0f} MiB, "
                      f"{r['cores_used']:.2f} cores", file=sys.stderr, flush=True)
    _speedups(results)
    env = environment()
    env["load_average_at_start"], env["load_average_at_end"] = load_start, os.getloadavg()
    result = {"benchmark": "preprocess", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": env,
              "command": "echo-stream bench preprocess " + " ".join(
                  a for a in (f"--sizes {args.sizes}", f"--cpus {args.cpus}",
                              f"--baselines {args.baselines}" if args.baselines != "1,default" else "",
                              f"--repeat {args.repeat}" if args.repeat != 1 else "",
                              "--no-ideal" if args.no_ideal else "", "--no-probe" if args.no_probe else "",
                              f"--tag {args.tag}" if args.tag else "") if a),
              "config": {"corpus": str(manifest), "sizes": sizes, "cpus": cpus, "minutes": args.minutes,
                         "user_video": not args.no_video, "baselines": baselines, "repeat": args.repeat},
              "floor_baseline": "sequential, library_threads=1 (see the module docstring)",
              "parallel_capacity_probes": probes, "summary": _summary(results), "runs": results}
    os.makedirs(args.out, exist_ok=True)
    name = f"preprocess_{os.cpu_count()}cpu" + (f"_{args.tag}" if args.tag else "") + ".json"
    path = os.path.join(args.out, name)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {path}", file=sys.stderr)
    png = Path(path).with_suffix(".png")
    write_plot(png, result)
    print(f"wrote {png}", file=sys.stderr)
    _print_table(results)
    return 0


def _print_table(results: list[dict]) -> None:
    for r in results:
        print(f"{r['conversations']:>4} conv  r{r.get('round', 0) + 1}  {_label(r):<38} {r['wall_s']:7.1f} s  "
              f"{r['files_per_s']:.3f} files/s  "
              f"x{r.get('speedup_vs_sequential_1thread', float('nan')):.2f} (1 thread)  "
              f"x{r.get('speedup_vs_sequential_default_threads', r.get('speedup_vs_sequential', float('nan'))):.2f}"
              f" (default threads)  "
              f"peak {r['peak_tree_pss_mb']:.0f} MiB")


def write_plot(path: Path, result: dict) -> None:
    """Two panels per result: throughput (media hours per wall-clock hour; the speed-up over the
    single-threaded sequential loop written on each bar) and peak memory (process-tree PSS), one group
    of bars per corpus size; medians over the rounds, each round's figure as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    sizes = list(dict.fromkeys(r["conversations"] for r in runs))
    labels = list(dict.fromkeys(_label(r) for r in runs))
    fig, (ax_tp, ax_mem) = plt.subplots(1, 2, figsize=(max(9.0, 2.2 * len(sizes) * len(labels) / 2 + 4), 4.8))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        xs, tp, mem = [], [], []
        for j, n in enumerate(sizes):
            mine = [r for r in runs if r["conversations"] == n and _label(r) == label]
            if not mine:
                continue
            x = j + (i - (len(labels) - 1) / 2) * width
            xs.append(x)
            tp.append(statistics.median([r["media_h_per_h"] for r in mine]))
            mem.append(max(r["peak_tree_pss_mb"] for r in mine))
            ax_tp.scatter([x] * len(mine), [r["media_h_per_h"] for r in mine], s=8, color="black", zorder=3)
            ups = [r["speedup_vs_sequential_1thread"] for r in mine if "speedup_vs_sequential_1thread" in r]
            if ups:
                ax_tp.annotate(f"x{statistics.median(ups):.2f}", (x, tp[-1]), ha="center", va="bottom", fontsize="small",
                               xytext=(0, 2), textcoords="offset points")
        ax_tp.bar(xs, tp, width=width, label=label)
        ax_mem.bar(xs, mem, width=width, label=label)
    for ax in (ax_tp, ax_mem):
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels([f"{n} conversations" for n in sizes])
    ax_tp.set_ylabel("media hours per wall-clock hour")
    ax_tp.set_title("throughput (x: speed-up over the 1-thread loop)", fontsize="medium")
    ax_mem.set_ylabel("peak memory, process tree PSS (MiB)")
    ax_mem.set_title("peak memory", fontsize="medium")
    handles, names = ax_tp.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize="small", frameon=False)
    env = result.get("environment", {})
    fig.suptitle(f"echo-stream bench preprocess: {env.get('cpu_count')} CPUs, ray {env.get('ray')}, "
                 f"av {env.get('av')}, {result.get('time', '')[:10]}", fontsize="medium")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(run(argparse.Namespace(one=sys.argv[1])))

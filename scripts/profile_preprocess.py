"""Per-stage time of ``preprocess.process_input`` over a manifest, in one process.

    python scripts/profile_preprocess.py MANIFEST [--n 8] [--threads 1|default] [--json OUT]

Wraps the functions ``process_input`` calls (decode, audio features, user video decode and face tracking
features, motion track, transcript, chunk rows / Arrow table, moments) plus the driver's parquet
commit and the Ray path's Arrow IPC round trip, and reports per stage the wall seconds, the CPU
seconds of the whole process (user + sys, all threads) and their ratio: the cores that stage used.

``--threads 1`` pins the libraries as a Ray featuriser actor does (OMP/BLAS via the environment,
OpenCV's pool, FFmpeg's threads); ``--threads default`` leaves every library at its default. Must be
chosen before numpy is imported, so it is read from the command line first thing.
"""
from __future__ import annotations

import argparse
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument("manifest")
ap.add_argument("--n", type=int, default=8)
ap.add_argument("--skip", type=int, default=0, help="skip the first N rows")
ap.add_argument("--threads", choices=("1", "default"), default="default")
ap.add_argument("--json")
args = ap.parse_args()
if args.threads == "1":
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[k] = "1"

import contextlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

from echo_stream import features, media, preprocess, shards, tracks, transcript  # noqa: E402
from echo_stream.face import tracker as face_tracker  # noqa: E402
from echo_stream.preprocess import conversation, runners  # noqa: E402

if args.threads == "1":
    preprocess.one_thread_per_library()   # OpenCV's pool and FFmpeg's decoder threads, as a Ray featuriser

T = defaultdict(lambda: [0.0, 0.0, 0])   # stage -> [wall, cpu, calls]
_stack: list[str] = []


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@contextlib.contextmanager
def _stage(name):
    """Charge the wall and CPU time of the block to ``name``; a nested stage's time is taken off the outer one."""
    _stack.append(name)
    t, c = time.perf_counter(), _cpu()
    try:
        yield
    finally:
        dt, dc = time.perf_counter() - t, _cpu() - c
        _stack.pop()
        T[name][0] += dt
        T[name][1] += dc
        T[name][2] += 1
        if _stack:
            T[_stack[-1]][0] -= dt
            T[_stack[-1]][1] -= dc


def timed(name, fn):
    def w(*a, **k):
        with _stage(name):
            return fn(*a, **k)
    return w


def timed_gen(name, fn):
    """Each step of the generator is charged to ``name`` (not the consumer's work between steps)."""
    def w(*a, **k):
        it = fn(*a, **k)
        while True:
            with _stage(name):
                try:
                    x = next(it)
                except StopIteration:
                    return
            yield x
    return w


media.decode_audio = timed("decode audio (PyAV)", media.decode_audio)
media.probe = timed("probe (PyAV)", media.probe)
media.iter_video_frames = timed_gen("decode user video (PyAV, resize, rgb)", media.iter_video_frames)
features.offline_audio_features = timed("audio features (log-mel + YIN)", features.offline_audio_features)
face_tracker.FaceTracker.process = timed("user face tracking (LiteRT mesh + eyes)", face_tracker.FaceTracker.process)
face_tracker.FaceModels.__init__ = timed("face models load", face_tracker.FaceModels.__init__)
tracks.load_track = timed("motion track read", tracks.load_track)
tracks.resample_to_grid = timed("motion track resample", tracks.resample_to_grid)
transcript.load = timed("transcript", transcript.load)
shards.chunk_rows = timed("chunk rows", shards.chunk_rows)
shards.rows_to_table = timed("arrow table", shards.rows_to_table)
conversation._moments = timed("moments", conversation._moments)            # where process_input looks them up
conversation.check_quality = timed("quality checks", conversation.check_quality)

rows, root = preprocess.read_inputs(args.manifest)
items, _ = preprocess.make_items(rows[args.skip:args.skip + args.n], root)
w0 = features.warmup()
results = []
t_all, c_all = time.perf_counter(), _cpu()
for it in items:
    t, c = time.perf_counter(), _cpu()
    _stack.append("process_input (rest)")
    r = preprocess.process_input(it, preprocess.Settings())
    _stack.pop()
    dt, dc = time.perf_counter() - t, _cpu() - c
    T["process_input (rest)"][0] += dt
    T["process_input (rest)"][1] += dc
    T["process_input (rest)"][2] += 1
    T["== process_input total"][0] += dt
    T["== process_input total"][1] += dc
    T["== process_input total"][2] += 1
    assert r["status"] == "done", r["reason"]
    # the Ray path's IPC round trip of the table
    t, c = time.perf_counter(), _cpu()
    blob = runners._ipc(r["table"])
    runners._from_ipc(blob)
    T["arrow IPC round trip (ray only)"][0] += time.perf_counter() - t
    T["arrow IPC round trip (ray only)"][1] += _cpu() - c
    T["arrow IPC round trip (ray only)"][2] += 1
    results.append(r)
with tempfile.TemporaryDirectory() as tmp:
    out = preprocess.OutputDir(tmp).open(preprocess.Settings())
    t, c = time.perf_counter(), _cpu()
    for k in range(0, len(results), 4):
        out.commit("train", results[k:k + 4], 4)
    T["parquet commit (driver)"][0] += time.perf_counter() - t
    T["parquet commit (driver)"][1] += _cpu() - c
    T["parquet commit (driver)"][2] += 1
    out.close()
wall_all, cpu_all = time.perf_counter() - t_all, _cpu() - c_all
n = len(items)
print(f"threads={args.threads}  {n} conversations  warm-up {w0:.2f} s  wall {wall_all:.1f} s  "
      f"cpu {cpu_all:.1f} s  cores used {cpu_all / wall_all:.2f}")
print(f"{'stage':<42} {'wall s/conv':>11} {'cpu s/conv':>11} {'cores':>6} {'share':>6}")
tot = T["== process_input total"][0]
rep = {}
for k, (w, c, calls) in sorted(T.items(), key=lambda kv: -kv[1][0]):
    print(f"{k:<42} {w / n:11.3f} {c / n:11.3f} {c / max(w, 1e-9):6.2f} {100 * w / tot:5.1f}%")
    rep[k] = {"wall_s_per_conv": w / n, "cpu_s_per_conv": c / n, "calls": calls}
if args.json:
    with open(args.json, "w") as f:
        json.dump({"threads": args.threads, "n": n, "wall_s": wall_all, "cpu_s": cpu_all, "stages": rep}, f, indent=1)

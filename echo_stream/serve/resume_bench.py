"""``echo-stream bench resume``: what the cluster's resume store takes, to size ``--resume-shards``.

On a local Ray, ``--sessions`` records are created, then every session sends ``--updates`` updates as a
running session's `RecordWriter` does (the motion of 16 frames out, an LCU
checkpoint every second update), all sessions at once from this process's event loop, for each shard count of
``--shards``; then each record is claimed once (a resume). Reported per shard count: updates per second, the
update round trip (p50/p99) and the claim round trip. A running session sends about one update per generation
window (~1.6/s at stride 16; never two at once). JSON out.
"""
from __future__ import annotations

import asyncio
import json
import os
import time

import numpy as np

from .. import atomic
from ..errors import InputError


def _ms(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": int(ms.size)}


async def _measure(shards: int, sessions: int, updates: int, checkpoint_kb: int) -> dict:
    import ray

    from ..actors.resume import ResumeStore
    from .resume import Shards, Update

    handles = [ray.remote(ResumeStore).options(num_cpus=0).remote(120.0, sessions) for _ in range(shards)]
    store = Shards(handles)
    rows = [(f, np.random.default_rng(f).random(58).astype(np.float32)) for f in range(16)]
    ck = bytes(checkpoint_kb * 1024)
    ids = [f"bench-{i:06d}" for i in range(sessions)]
    await asyncio.gather(*(store.of(s).create.remote(s, "bench", "digest") for s in ids))
    lat: list[float] = []

    async def session(sid: str) -> None:
        h = store.of(sid)
        for k in range(updates):
            t = time.perf_counter()
            ok = await h.update.remote(sid, 0, Update(16 * (k + 1), rows, ck if k % 2 == 0 else None))
            lat.append(time.perf_counter() - t)
            if not ok:
                raise RuntimeError(f"the store refused an update of {sid}")
    t0 = time.perf_counter()
    await asyncio.gather(*(session(s) for s in ids))
    took = time.perf_counter() - t0
    claims: list[float] = []
    for sid in ids[: min(200, sessions)]:
        t = time.perf_counter()
        got = await store.of(sid).claim.remote(sid, "bench", "digest")
        claims.append(time.perf_counter() - t)
        assert "record" in got and got["record"].produced == 16 * updates
    for h in handles:
        ray.kill(h)
    return {"shards": shards, "sessions": sessions, "updates": sessions * updates, "seconds": took,
            "updates_per_s": sessions * updates / took, "update": _ms(lat), "claim": _ms(claims)}


def run(args) -> int:
    try:
        shard_counts = [int(x) for x in str(args.shards).split(",") if x.strip()]
    except ValueError:
        shard_counts = []
    if not shard_counts or any(not 1 <= n <= 256 for n in shard_counts):
        raise InputError("--shards", f"{args.shards!r}: whole numbers in 1..256, comma-separated (e.g. 1,2,4)")
    for flag, v in (("--sessions", args.sessions), ("--updates", args.updates)):
        if v < 1:
            raise InputError(flag, f"{v}: at least 1")
    if args.num_cpus is not None and args.num_cpus < 1:
        raise InputError("--num-cpus", f"{args.num_cpus}: at least 1")
    out_dir = atomic.output_dir(args.out, "--out")
    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        rows = []
        for n in shard_counts:
            r = asyncio.run(_measure(n, args.sessions, args.updates, args.checkpoint_kb))
            rows.append(r)
            print(f"{n} shard(s): {r['updates_per_s']:.0f} updates/s, update p50 {r['update']['p50_ms']:.1f} ms "
                  f"p99 {r['update']['p99_ms']:.1f} ms, claim p50 {r['claim']['p50_ms']:.1f} ms")
    finally:
        ray.shutdown()
    from ..machine import environment

    cpus = args.num_cpus or os.cpu_count()
    doc = {"benchmark": "resume store", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment(),
           "config": {"num_cpus": args.num_cpus, "ray": ray.__version__, "sessions": args.sessions,
                      "updates_per_session": args.updates, "checkpoint_kb": args.checkpoint_kb,
                      "rows_per_update": 16, "caller": "one asyncio loop (one ingress) sending every update"},
           "results": rows}
    path = os.path.join(out_dir, args.name or f"resume_store_{cpus}cpu.json")
    atomic.write_text(path, json.dumps(doc, indent=2))
    print(f"wrote {path}")
    return 0

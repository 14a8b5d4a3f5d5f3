"""``echo-stream bench hop``: what one pipeline hop costs on each engine, with the same payload.

A stand-in stage that returns its input (:class:`EchoStage`) is hosted the way each engine hosts a real stage:
a stage actor (``actors.StageActor``: the actor engine) and a Serve deployment of
:class:`~echo_stream.serve.serve_engine.StageReplica` (the Serve engine), the latter called both with the
engine's pin (:class:`~echo_stream.serve.serve_engine.PinnedRouter` + the replica's call order) and plainly
(Serve's default router). Timed from an asyncio loop, as the ingress calls:

* ``call``: one call and its result back here, one at a time (round trip per hop);
* ``chain``: ``--hops`` calls, each taking the previous one's output as its argument (an object ref, or a
  ``DeploymentResponse``, so the data goes replica to replica), the last one awaited here — the pipeline's
  shape; reported per hop.

Payloads of several sizes (a motion window is ~1 KB, 16 rendered 256² frames ~3 MB). JSON out.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid

import numpy as np

from .. import atomic
from ..errors import InputError
from ..stages import Stage


class EchoStage(Stage):
    """A stage that hands its input back (no compute: the hop is all that is timed)."""

    name = "echo"
    resources = {"num_cpus": 0.5}

    def process(self, x):
        return x


def _stats(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "n": len(ms)}


async def _time(call, payload, repeat: int, hops: int) -> dict:
    """``call(x)`` -> an awaitable handle whose argument may be a handle. Warm-up, then ``repeat`` single
    round trips and ``repeat`` chains of ``hops``."""
    for _ in range(5):
        await call(payload)
    single, chain = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        await call(payload)
        single.append(time.perf_counter() - t)
    for _ in range(max(1, repeat // hops)):
        t = time.perf_counter()
        h = payload
        for _ in range(hops):
            h = call(h)
        await h
        chain.append((time.perf_counter() - t) / hops)
    return {"call": _stats(single), "chain_per_hop": _stats(chain)}


def _sizes(text: str) -> list[int]:
    """``--sizes-kb`` as payload sizes in bytes (each > 0), or an InputError naming the bad item."""
    out = []
    for item in str(text).split(","):
        if not item.strip():
            continue
        try:
            kb = float(item)
        except ValueError:
            kb = float("nan")
        if not kb > 0 or kb == float("inf"):
            raise InputError("--sizes-kb", f"{item.strip()!r} is not a positive size in KiB: give e.g. 1,100,3072")
        out.append(max(1, int(kb * 1024)))
    if not out:
        raise InputError("--sizes-kb", "no sizes: give e.g. 1,100,3072")
    return out


def run(args) -> int:
    import ray
    from ray import cloudpickle, serve
    from ray.serve.config import RequestRouterConfig

    from ..actors import StageActor
    from ..cluster import ensure_ray
    from ..machine import environment
    from .pinning import PIN_KW, Pin
    from .serve_engine import QUIET, PinnedRouter, StageReplica

    sizes = _sizes(args.sizes_kb)
    for flag, value in (("--repeat", args.repeat), ("--hops", args.hops)):
        if value < 1:
            raise InputError(flag, f"{value}: give 1 or more")
    if args.num_cpus is not None and args.num_cpus < 1:
        raise InputError("--num-cpus", f"{args.num_cpus}: give 1 or more CPUs (or leave it out: all)")
    atomic.output_dir(args.out)          # before the minutes of measuring, not after
    ensure_ray("local", num_cpus=args.num_cpus, object_store_memory=256 * 1024 * 1024)
    serve.start(proxy_location="Disabled")
    try:
        actor = StageActor.options(num_cpus=0.5, max_concurrency=1).remote(lambda: EchoStage())
        ray.get(actor.setup.remote())
        blob = cloudpickle.dumps(EchoStage())
        common = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 1000,
                  "logging_config": QUIET}
        pinned = serve.run(serve.deployment(StageReplica).options(
            name="echo_pinned", request_router_config=RequestRouterConfig(request_router_class=PinnedRouter),
            **common).bind(blob), name="hop-pinned", route_prefix=None)
        plain = serve.run(serve.deployment(StageReplica).options(name="echo_plain", **common).bind(blob),
                          name="hop-plain", route_prefix=None)
        target = [n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
                  if n["name"].startswith("SERVE_REPLICA::hop-pinned#")][0].rsplit("#", 1)[1]
        caller, seq = uuid.uuid4().hex, iter(range(10 ** 9))

        engines = {
            "actor": lambda x: actor.call.remote("process", x),
            "serve_pinned": lambda x: pinned.call.remote("process", x, **{PIN_KW: Pin(caller, target, next(seq))}),
            "serve_default_router": lambda x: plain.call.remote("process", x),
        }

        async def measure():
            out = []
            for size in sizes:
                payload = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
                row = {"payload_bytes": size}
                for name, call in engines.items():
                    row[name] = await _time(call, payload, args.repeat, args.hops)
                for k in ("call", "chain_per_hop"):
                    row[f"serve_added_{k}_p50_ms"] = row["serve_pinned"][k]["p50_ms"] - row["actor"][k]["p50_ms"]
                out.append(row)
                print(f"{size / 1024:8.1f} KB: " + ", ".join(
                    f"{n} call p50 {row[n]['call']['p50_ms']:.2f} ms / chain {row[n]['chain_per_hop']['p50_ms']:.2f}"
                    " ms per hop" for n in engines), flush=True)
            return out
        rows = asyncio.run(measure())
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"benchmark": "hop", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment(),
              "config": {"num_cpus": args.num_cpus, "repeat": args.repeat, "hops": args.hops,
                         "ray": ray.__version__, "caller": "asyncio loop of the driver (as the ingress)",
                         "stage": "EchoStage (returns its input) hosted as each engine hosts a stage"},
              "definitions": {"call": "one call, result back here, one at a time",
                              "chain_per_hop": "hops calls each taking the previous output, last awaited; / hops",
                              "serve_added": "serve_pinned minus actor, p50"},
              "results": rows}
    path = os.path.join(args.out, args.name or f"hop_{args.num_cpus or os.cpu_count()}cpu.json")
    atomic.write_text(path, json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0

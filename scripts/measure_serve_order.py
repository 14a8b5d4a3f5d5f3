"""Two figures of the Serve engine's call order and transfers (docs/serving.md, "The Ray Serve engine").

    .venv/bin/python scripts/measure_serve_order.py

1. The stall after a crashed upstream replica: on a local Ray Serve, a chain ``up -> down`` (``StageReplica``
   deployments, pinned as the engine pins them) whose ``up`` call exits its process; then the session's next
   call on ``down`` is timed, and ``down``'s ``order_skipped`` / ``order_released`` read. Runs on the code
   before the per-session numbering and the release too (it then numbers per caller), for the before figure.
2. What reading ``decode.push``'s ``info`` fetched before and after: the pickled bytes of its packet and its
   info for one 8-frame chunk (the server's default ``chunk_frames``), with user audio only and with a raw
   user-video frame per frame.

One run each, printed; nothing is asserted (``tests/test_serve_serveapp.py`` asserts the behaviour).
"""
from __future__ import annotations

import asyncio
import os
import pickle
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from echo_stream.stages import Stage  # noqa: E402


class Crashy(Stage):
    """Returns its input; ``"crash"`` ends its process (a crash, not an error)."""

    name = "crashy"
    resources = {"num_cpus": 0.1}

    def process(self, x):
        if x == "crash":
            os._exit(1)
        return x


def stall_after_crash() -> None:
    import ray
    from ray import cloudpickle, serve
    from ray.serve.config import RequestRouterConfig

    from echo_stream.serve.serve_engine import QUIET, PinnedRouter, ServeBackend, StageReplica

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=96 * 1024 * 1024)
    try:
        serve.start(proxy_location="Disabled")
        opts = dict(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=100,
                    logging_config=QUIET,
                    request_router_config=RequestRouterConfig(request_router_class=PinnedRouter))
        b = object.__new__(ServeBackend)
        per_session = hasattr(ServeBackend, "_start_order")
        if per_session:
            b._start_order()
        else:                                    # the code before: one order per caller
            b.caller, b._seq = uuid.uuid4().hex, {}
        b.ray, b.handles, b.slots = ray, {}, {}
        blob = cloudpickle.dumps(Crashy())
        for name in ("up", "down"):
            b.handles[name] = serve.run(serve.deployment(StageReplica).options(name=name, **opts).bind(blob),
                                        name=f"order-{name}", route_prefix=None)
            (actor,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                        if a["name"].startswith(f"SERVE_REPLICA::order-{name}#")]
            b.slots[name] = [actor.rsplit("#", 1)[1]]
        kw = {"session": "s"} if per_session else {}

        async def run():
            await b.get(b.call("down", "process", "warm", **kw))
            t = time.perf_counter()
            await b.get(b.call("down", "process", "warm", **kw))
            plain = time.perf_counter() - t
            try:
                await b.get(b.call("down", "process", b.call("up", "process", "crash", **kw), **kw))
            except Exception as e:  # noqa: BLE001 - the crash, as the ingress sees it
                error = type(e).__name__
            t = time.perf_counter()
            await b.get(b.call("down", "process", "next", **kw))
            return plain, error, time.perf_counter() - t, await b.get(b.call("down", "stats", ordered=False))
        plain, error, took, stats = asyncio.run(run())
        print(f"stall: {'per-session numbers + release' if per_session else 'per-caller numbers (before)'}: "
              f"a call on down took {plain * 1000:.1f} ms; after the upstream crash ({error}) the next one took "
              f"{took * 1000:.1f} ms; order_skipped {stats.get('order_skipped')}, "
              f"order_released {stats.get('order_released', '-')}")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def push_sizes() -> None:
    from echo_stream.pipeline import PipelineOptions, build_stages
    from echo_stream.stages import warmup

    dec = build_stages(PipelineOptions())["decode"]
    dec.setup()
    for video in (False, True):
        items = [i for i in warmup.pushed_inputs(8) if video or i[0] != "user_video"]
        dec.open_stream("s/0")
        packet, info = dec.push("s/0", items, False)
        dec.close_session("s/0")
        print(f"decode.push, 8 frames, user video {'yes' if video else 'no'}: packet "
              f"{len(pickle.dumps(packet, 5)) / 1024:.1f} KiB, info {len(pickle.dumps(info, 5)) / 1024:.1f} KiB")


if __name__ == "__main__":
    push_sizes()
    stall_after_crash()

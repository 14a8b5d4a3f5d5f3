"""The stage actors on a local Ray, and a gRPC server on them, as the Ray-backed serving tests use them.

Each test module holds its own (module-scoped fixtures): modules that start Ray differently (clusters,
preprocessing) run between them.
"""
from __future__ import annotations

import asyncio
import contextlib

from echo_stream.pipeline import PipelineOptions

SIZE = 96


def init_local_ray(**kw) -> None:
    """``ray.init`` of a new local Ray, tried a second time when its raylet did not register within Ray's 30 s
    (seen once on the loaded 2-core machine, a whole module's tests lost to it; Ray's own error says it
    happens when "the GCS has become overloaded")."""
    import ray

    kw = dict(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False, **kw)
    try:
        ray.init(**kw)
    except Exception as e:  # noqa: BLE001
        if "timed out during startup" not in str(e):
            raise
        ray.shutdown()
        ray.init(**kw)


@contextlib.contextmanager
def ray_backend(size: int = SIZE, replicas: dict | None = None, max_replicas: dict | None = None,
                engine: str = "actors", autoscale: dict | None = None, stage_idle_s: float | None = None):
    """Local Ray (4 CPUs, a small object store) with the warmed-up stage actors at ``size`` px (``replicas``:
    actors per stage, as ``--replicas``; ``max_replicas``: the most an autoscaled stage may reach); ``engine``
    "serve": the stages as a Ray Serve application instead (``serve --engine serve``; ``autoscale``: its
    autoscaled stages, ``{stage: ScaleSpec}``); ``stage_idle_s``: as ``--stage-idle-timeout`` (None: never)."""
    import ray

    from echo_stream.serve.backend import RayBackend
    from echo_stream.serve.serve_engine import ServeBackend

    init_local_ray(num_cpus=4, object_store_memory=160 * 1024 * 1024)
    try:
        engine_cls = {"actors": RayBackend, "serve": ServeBackend}[engine]
        backend = engine_cls.start(PipelineOptions(size=(size, size), replicas=dict(replicas or {}),
                                                   max_replicas=dict(max_replicas or {}),
                                                   autoscale=dict(autoscale or {}), stage_idle_s=stage_idle_s),
                                   max_restarts=-1)
        try:
            yield backend
        finally:
            backend.shutdown()
    finally:
        ray.shutdown()


@contextlib.contextmanager
def two_node_cluster(head_cpus: int = 4, worker_cpus: int = 2, system_config: dict | None = None):
    """A ``ray.cluster_utils.Cluster`` on this machine (a head and one worker node, small object stores), with
    this process connected to it: yields ``(cluster, worker node)``. ``system_config``: Ray's ``_system_config``
    for the head (e.g. faster node-death detection). The nodes' workers import the repository's
    ``actors`` through PYTHONPATH, as on a real cluster's image."""
    import os
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster

    mb = 1024 * 1024
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + (os.pathsep + old if old else "")
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False,
                                                            "object_store_memory": 128 * mb,
                                                            **({"_system_config": system_config}
                                                               if system_config else {})})
    worker = cluster.add_node(num_cpus=worker_cpus, object_store_memory=96 * mb)
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        cluster.wait_for_nodes()
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@contextlib.contextmanager
def server_thread(backend, **opts):
    """An AvatarServer on ``backend`` in a background thread: yields ``(ServerThread, "127.0.0.1:PORT")``."""
    from echo_stream.serve.server import ServeOptions, ServerThread

    st = ServerThread(backend, ServeOptions(port=0, **opts))
    port = st.start()
    try:
        yield st, f"127.0.0.1:{port}"
    finally:
        st.stop()


@contextlib.contextmanager
def served(size: int = SIZE, **opts):
    """Both: yields ``(ServerThread, target, backend)``."""
    with ray_backend(size) as backend, server_thread(backend, **opts) as (st, target):
        yield st, target, backend


async def stream_around(s, res, before, after, mid, chunk: int = 1280, pace_s: float = 0.02):
    """Send ``before`` (16 kHz samples) to session ``s``, read until 10 motion frames are in ``res``, await
    ``mid()`` (the fault, or a rendezvous), send ``after`` paced, end and read the rest into ``res``."""
    for k in range(0, len(before), chunk):
        await s.send_avatar_audio(before[k:k + chunk])
    it = s.messages().__aiter__()
    while len(res.motion_frames) < 10:
        res.add(await it.__anext__())
    await mid()
    for k in range(0, len(after), chunk):
        await s.send_avatar_audio(after[k:k + chunk])
        await asyncio.sleep(pace_s)
    await s.end()
    async for m in it:
        res.add(m)
    return res

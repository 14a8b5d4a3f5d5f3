"""Starting or joining Ray with the project's options (a leaf module: Ray is imported when called)."""
from __future__ import annotations

import logging
import os

#: object store of a local Ray instance that runs the stage actors (they pass small Arrow batches)
PIPELINE_OBJECT_STORE = 256 * 1024 * 1024


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
               object_store_memory: int | None = None) -> bool:
    """Initialise Ray in this process unless it is already: join the cluster at ``address``, or, without
    one (or with ``"local"``), start a local instance with the given resources (``None``: Ray's default).
    Always without the dashboard, with worker logs shown here and Ray's own logging at WARNING.
    Returns True when this call initialised Ray (so the caller owns it and shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    kw = {"include_dashboard": False, "log_to_driver": True, "logging_level": logging.WARNING}
    if address:
        kw["address"] = address
    if not address or address == "local":
        local = {"num_cpus": num_cpus, "num_gpus": num_gpus, "object_store_memory": object_store_memory}
        kw.update({k: v for k, v in local.items() if v is not None})
    ray.init(**kw)
    return True


def ensure_pipeline_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """:func:`ensure_ray` for the stage actors: a local instance gets ``num_cpus`` CPUs (default: all of
    them) and :data:`PIPELINE_OBJECT_STORE`."""
    return ensure_ray(address, num_cpus=num_cpus or os.cpu_count(), object_store_memory=PIPELINE_OBJECT_STORE)


def start_ray(address: str | None, num_cpus: int | None):
    """The server's Ray: the cluster at ``address``, or a new local instance even when ``RAY_ADDRESS`` names
    a cluster (:func:`ensure_pipeline_ray`); returns the ``ray`` module."""
    import ray

    ensure_pipeline_ray(address or "local", num_cpus)
    return ray

"""Starting or joining Ray with the project's options (a leaf module: Ray is imported when called)."""
from __future__ import annotations

import logging
import os


def start_ray(address: str | None, num_cpus: int | None):
    """Join the Ray cluster at ``address``, or start a local instance with ``num_cpus`` CPUs (default: all),
    unless Ray is initialised in this process already; returns the ``ray`` module."""
    import ray

    if not ray.is_initialized():
        kw = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(),
                     object_store_memory=256 * 1024 * 1024, **kw)
    return ray

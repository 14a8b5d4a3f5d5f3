"""Ray actors of the pipeline: thin wrappers that host one plain stage each.

The stage classes (``echo_stream.stages``) hold all the logic and run without
Ray; an actor here only gives a stage its own process, its declared resources
(``Stage.resources``), restart policy and a name, and exposes
``setup`` / ``call(method, *args)`` / ``stats`` through
:class:`echo_stream.pipeline.StageHost`.
"""
from __future__ import annotations

import ray

from echo_stream.stages.host import StageHost
from echo_stream.stages import Stage

#: The remote class every stage actor is an instance of.
StageActor = ray.remote(StageHost)


def make_stage_actor(stage: Stage, name: str | None = None, max_restarts: int = 0, **options):
    """Start an actor hosting ``stage`` with the resources the stage declares."""
    opts = {"num_cpus": stage.resources.get("num_cpus", 0.5),
            "num_gpus": stage.resources.get("num_gpus", 0),
            "max_restarts": max_restarts, "max_concurrency": 1}
    if name:
        opts["name"] = name
    opts.update(options)
    return StageActor.options(**opts).remote(lambda: stage)

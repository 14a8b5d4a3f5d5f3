"""A stage actor answers a ping while it works (its own concurrency group), on real Ray: an ingress asking which
replicas answer (``serve.backend.best_answer``, 0.25 s grace) must not take a busy replica for a lost one."""
from __future__ import annotations

import time

import pytest

from echo_stream.stages import Stage

from .served import init_local_ray


class _Slow(Stage):
    name = "slow"

    def work(self, seconds: float) -> str:
        time.sleep(seconds)
        return "done"


@pytest.mark.ray
def test_a_busy_stage_actor_still_answers_a_ping_at_once():
    import ray

    from echo_stream.actors import make_stage_actor
    from echo_stream.pipeline import RayRunner

    init_local_ray(num_cpus=2, object_store_memory=80 * 1024 * 1024)
    try:
        actor = make_stage_actor(_Slow())
        assert ray.get(actor.call.remote("ping"), timeout=60)      # started
        runner = object.__new__(RayRunner)
        runner.replicas = {"slow": [actor]}
        busy = actor.call.remote("work", 3.0)
        time.sleep(0.3)                                             # the work is running now
        node = ray.get(runner.call("slow", "ping"), timeout=10)
        assert node == ray.get_runtime_context().get_node_id()      # the answer is the actor's node
        done, _ = ray.wait([busy], timeout=0)
        assert not done, "the ping was answered only after the work it should not queue behind"
        queued = actor.call.remote("ping")                          # through the stage's own queue: behind it
        assert ray.get(busy, timeout=30) == "done" and ray.get(queued, timeout=30)
    finally:
        ray.shutdown()

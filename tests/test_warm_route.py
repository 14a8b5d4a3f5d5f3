"""The warm-up session an ingress pushes through its replicas at start (``serve.backend.warm_route``), without
Ray: the ingresses of one deployment start together and warm the same replicas at once."""
from __future__ import annotations

from echo_stream.pipeline import InlineRunner, PipelineOptions
from echo_stream.serve.backend import warm_route
from echo_stream.stages import warmup


def test_two_ingresses_warming_the_same_replicas_at_once_do_not_collide():
    """A second ingress's whole warm-up runs between the first one's open and its push (the interleaving
    that failed a deploy of two ingresses: the second's close ended the first's session). Both complete, and
    neither leaves a session behind."""
    runner = InlineRunner(PipelineOptions(size=(64, 64)))
    runner.setup()
    other = []

    def first(stage, method, *args, num_returns=1):
        if method == "push" and not other:
            other.append(stage)
            warm_route(runner.call, runner.get, warmup)        # the other ingress, start to end, meanwhile
        return runner.call(stage, method, *args, num_returns=num_returns)

    warm_route(first, runner.get, warmup)
    assert other == ["decode"]
    assert all(h.stage.sessions() == 0 for h in runner.hosts.values()), \
        {n: h.stage.session_ids() for n, h in runner.hosts.items()}

"""Ray actors of the pipeline: thin wrappers that host one plain stage each.

The stage classes (``echo_stream.stages``) hold all the logic and run without
Ray; an actor here only gives a stage its own process, its declared resources
(``Stage.resources``), restart policy and a name, and exposes
``setup`` / ``call(method, *args)`` / ``stats`` through
:class:`echo_stream.pipeline.StageHost`.
"""
from __future__ import annotations

import time

import ray

from echo_stream.stages.host import StageHost
from echo_stream.stages import Stage

class MeteredStageHost(StageHost):
    """StageHost that also reports each call to Ray's metrics (``ray.util.metrics``, exported by Ray's
    metrics agent): call latency per stage and method (seconds) and errors, and the sessions closed because
    they sat idle (:meth:`StageHost.sweep`). No per-session labels."""

    _metrics = None

    def __init__(self, factory, idle_close_s: float | None = None):
        super().__init__(factory, idle_close_s)
        import warnings

        try:
            with warnings.catch_warnings():   # Ray 2.60's property uses its own deprecated actor_id inside
                warnings.simplefilter("ignore")
                restarted = ray.get_runtime_context().was_current_actor_reconstructed
        except Exception:  # noqa: BLE001 - not inside an actor
            restarted = False
        try:   # a ping answers with it: an ingress resuming a session avoids the node its lost ingress was on
            self.node = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - not connected to Ray
            self.node = None
        if restarted:
            # Ray restarted this actor (max_restarts): set the stage up before it takes its first call, as the
            # runner did at start. Until then it does not answer, so a session of a stage with other replicas
            # moves to a warm one (serve.backend.wait_ready) instead of paying the cold start on its next frame.
            try:
                self.setup()
            except Exception:  # noqa: BLE001 - the stage sets itself up on first use instead
                import logging
                logging.getLogger(__name__).exception("set-up of the restarted %s actor failed", self.stage.name)

    @classmethod
    def _get_metrics(cls):
        if cls._metrics is None:
            from ray.util import metrics

            keys = ("stage", "method")
            cls._metrics = (
                metrics.Histogram("echo_stream_actor_call_seconds", "stage actor call latency (seconds)",
                                  boundaries=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
                                  tag_keys=keys),
                metrics.Counter("echo_stream_actor_errors_total", "stage actor calls that raised", tag_keys=keys),
                metrics.Counter("echo_stream_stage_sessions_reclaimed_total",
                                "sessions whose state a stage closed because they had no call for its idle time "
                                "(their ingress was lost)", tag_keys=("stage",)))
        return cls._metrics

    def sweep(self) -> list[str]:
        idle = super().sweep()
        if idle:
            try:
                self._get_metrics()[2].inc(len(idle), {"stage": self.stage.name})
            except Exception:  # noqa: BLE001 - metrics never break a call
                pass
        return idle

    @ray.method(concurrency_group="ping")
    def ping(self) -> str:
        """The answer to an ingress's ping (its Ray node id), on a thread of its own: not queued behind the
        stage's work, so a busy replica is not taken for a lost one (``serve.backend.best_answer`` waits
        ``ANSWER_GRACE_S`` for it). Like every method it runs only after the constructor, which sets a restarted
        actor up first."""
        return self.node or self.stage.name

    def call(self, method: str, *args, **kwargs):
        if method == "ping":                         # (the Serve engine's replicas ask through here)
            return self.ping()
        t = time.perf_counter()
        tags = {"stage": self.stage.name, "method": method}
        try:
            return super().call(method, *args, **kwargs)
        except BaseException:
            try:
                self._get_metrics()[1].inc(1, tags)
            except Exception:  # noqa: BLE001 - metrics never break a call
                pass
            raise
        finally:
            try:
                self._get_metrics()[0].observe(time.perf_counter() - t, tags)
            except Exception:  # noqa: BLE001
                pass

    def placement(self) -> dict:
        """Where Ray put this actor: its node, the GPU ids Ray assigned it and the ``CUDA_VISIBLE_DEVICES`` it
        set for them (what torch's ``cuda:0`` is here), and its process id."""
        import os

        return {"stage": self.stage.name, "node_id": ray.get_runtime_context().get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
                "incarnation": self.incarnation}


#: The remote class every stage actor is an instance of.
StageActor = ray.remote(concurrency_groups={"ping": 1})(MeteredStageHost)


def make_stage_actor(stage: Stage, name: str | None = None, max_restarts: int = 0,
                     idle_close_s: float | None = None, **options):
    """Start an actor hosting ``stage`` with the resources the stage declares (``idle_close_s``: see
    :class:`StageHost`)."""
    opts = {"num_cpus": stage.resources.get("num_cpus", 0.5),
            "num_gpus": stage.resources.get("num_gpus", 0),
            "max_restarts": max_restarts, "max_concurrency": 1}
    if name:
        opts["name"] = name
    opts.update(options)
    return StageActor.options(**opts).remote(lambda: stage, idle_close_s)

"""Serve's autoscaler, told about sessions: ``echo-stream serve --engine serve --autoscale STAGE=MIN:MAX``.

A stage replica carries sessions, not requests: each session's state (decoder, LCU memory, previous motion,
the placed portrait) lives on one replica of each stage, and its calls are pinned there. Serve's default
policy (``target_ongoing_requests``) would count calls in flight, which says little about that load. So:

* every :class:`~echo_stream.serve.serve_engine.StageReplica` reports ``sessions`` — the session states its
  stage holds (:meth:`echo_stream.stages.Stage.sessions`) — through Serve's custom autoscaling metrics
  (``record_autoscaling_stats``, every ``metrics_interval_s``);
* :class:`SessionsPolicy` wants ``ceil(sessions / target)`` replicas (``--scale-target``, default 4);
* Serve applies the rest of the deployment's ``autoscaling_config`` (:func:`autoscaling_config`): MIN..MAX,
  ``upscale_delay_s`` / ``downscale_delay_s`` (``--scale-up-delay`` / ``--scale-down-delay``).

What Serve decides that the actor engine's autoscaler (:mod:`.autoscale`) decides itself: **which** replica
goes when it scales down (Serve's choice, not the emptiest one), and when. A session on a removed replica is
moved as after a replica loss (a GAP event, no frame lost, its state re-opened from its checkpoint on a replica
that answers); the ingress learns of new replicas from Ray's named actors and gives each a slot of its router
table (and, for diffusion, a batcher); a removed replica's slot stays empty (drained) until a later replica
takes it.
"""
from __future__ import annotations

import math

#: the metric each stage replica reports
METRIC = "sessions"


class SessionsPolicy:
    """Replicas wanted for the sessions a stage's replicas hold: ``ceil(sessions / target)`` (Serve clamps it to
    MIN..MAX and applies the delays)."""

    def __init__(self, target: float = 4.0):
        self.target = float(target)

    def __call__(self, ctx) -> tuple[int, dict]:
        per_replica = (ctx.aggregated_metrics or {}).get(METRIC, {})
        sessions = sum(per_replica.values())
        return wanted(sessions, self.target, ctx.capacity_adjusted_min_replicas), {}


def wanted(sessions: float, target: float, minimum: int) -> int:
    """``ceil(sessions / target)``, at least ``minimum``."""
    return max(int(minimum), math.ceil(sessions / target - 1e-9) if sessions > 0 else 0)


def autoscaling_config(spec) -> dict:
    """A stage deployment's ``autoscaling_config`` for an :class:`~.autoscale.ScaleSpec`."""
    return {"min_replicas": spec.min, "max_replicas": spec.max, "initial_replicas": spec.min,
            "upscale_delay_s": spec.up_delay_s, "downscale_delay_s": spec.down_delay_s,
            "metrics_interval_s": 0.5, "look_back_period_s": 2.0,
            "policy": {"policy_function": f"{__name__}:SessionsPolicy", "policy_kwargs": {"target": spec.target}}}

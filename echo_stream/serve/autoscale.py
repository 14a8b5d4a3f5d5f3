"""Autoscaling of stage replicas: ``serve --autoscale diffusion=1:4`` (``STAGE=MIN:MAX,...``).

The policy (:class:`StageScaler`) looks at one number per stage, the **sessions per replica** (what the
:class:`~echo_stream.serve.routing.Router` has routed there; a session's state lives on its replica, so
sessions, not requests, are what a replica carries). It wants ``ceil(sessions / target)`` replicas,
clamped to ``MIN..MAX``; it adds one after the want has stayed above the current count for
``up_delay_s`` and takes one away after it has stayed below for ``down_delay_s`` (a short burst of opens
or ends does not flap the replicas).

Scaling up starts a new actor (its ``setup`` loads and warms its models, off the event loop); it joins the
router when it answers, and new sessions go to it first (it is the least loaded); sessions already
running stay where their state is, unless ``--rebalance-interval`` moves some there (:mod:`.rebalance`).
Scaling down **drains** the stage's last replica: the router stops sending new sessions there (and
recovering sessions do not move there); when its last session has ended it is removed (its actor killed,
its batcher stopped). Without ``--rebalance-interval`` running sessions are never moved, so no session gets
a GAP for it, and a replica with long sessions stays until they end (a load rise meanwhile takes the drain
back); with it, the drained replica's sessions move off and it goes at once. Only the last replica is ever
removed, so replica numbers stay dense.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..chain import stage_items
from ..errors import InputError


@dataclass(frozen=True)
class ScaleSpec:
    """One stage's autoscaling: replicas between ``min`` and ``max``, ``target`` sessions per replica."""

    min: int
    max: int
    target: float = 4.0
    up_delay_s: float = 2.0
    down_delay_s: float = 10.0


def parse_autoscale(text: str | None, target: float = 4.0, up_delay_s: float = 2.0, down_delay_s: float = 10.0,
                    flag: str = "--autoscale") -> dict[str, ScaleSpec]:
    """``"diffusion=1:4,render=1:2"`` -> ``{stage: ScaleSpec}``; InputError naming ``flag`` and the problem."""
    if not target > 0 or not math.isfinite(target):
        raise InputError("--scale-target", f"{target}: sessions per replica must be a number > 0")
    for name, v in (("--scale-up-delay", up_delay_s), ("--scale-down-delay", down_delay_s)):
        if not v >= 0 or not math.isfinite(v):
            raise InputError(name, f"{v}: seconds must be a number >= 0")
    out: dict[str, ScaleSpec] = {}
    for name, rng in stage_items(text, flag, "STAGE=MIN:MAX", "diffusion=1:4"):
        item = f"{name}={rng}"
        lo, colon, hi = rng.partition(":")
        if not colon:
            raise InputError(flag, f"{item!r} is not STAGE=MIN:MAX: give e.g. {flag} diffusion=1:4")
        try:
            lo_n, hi_n = int(lo), int(hi)
        except ValueError:
            raise InputError(flag, f"{item}: MIN and MAX must be whole numbers, 1 <= MIN <= MAX") from None
        if not 1 <= lo_n <= hi_n:
            raise InputError(flag, f"{item}: need 1 <= MIN <= MAX (every stage keeps at least one replica)")
        out[name] = ScaleSpec(lo_n, hi_n, float(target), float(up_delay_s), float(down_delay_s))
    return out


class StageScaler:
    """The policy of one stage: :meth:`decide` says +1, -1 or 0 replicas, given the time and the load."""

    def __init__(self, spec: ScaleSpec):
        self.spec = spec
        self._above: float | None = None     # since when the want has been above the replica count
        self._below: float | None = None

    def wanted(self, sessions: int) -> int:
        s = self.spec
        return min(s.max, max(s.min, math.ceil(sessions / s.target)))

    def decide(self, now: float, sessions: int, replicas: int) -> int:
        want = self.wanted(sessions)
        if want > replicas:
            self._below = None
            self._above = now if self._above is None else self._above
            if now - self._above >= self.spec.up_delay_s:
                self._above = None
                return +1
        elif want < replicas:
            self._above = None
            self._below = now if self._below is None else self._below
            if now - self._below >= self.spec.down_delay_s:
                self._below = None
                return -1
        else:
            self._above = self._below = None
        return 0

"""Moving running sessions between replicas of a stage: ``echo-stream serve --rebalance-interval S``.

A session's state lives on one replica of each stage, chosen when it opens (:class:`~.routing.Router`: the
least loaded). Without moves, a replica added by the autoscaler, or one that came back after a fault, gets new
sessions only, while the long sessions stay crowded on the others; and a replica drained to scale down stays
until its last session ends. With ``--rebalance-interval S``, every S seconds the ingress plans a few moves
(:func:`plan_moves`) and each moved session re-opens on its new replica exactly as after a replica loss
(:meth:`~echo_stream.serve.session.epochs.EpochSwitching.move`): a new epoch from its LCU checkpoint and previous
motion, the input in flight replayed — no frame lost or repeated, one GAP event that says why; the re-open
took 0.01–0.03 s on local Ray (2 cores), and the window in flight is computed again.

The plan, per stage with at least two replicas:

1. sessions on a **draining** replica (autoscaling down) move to the least loaded replica that takes
   sessions — so the drained replica goes as soon as its sessions have moved, not when they end;
2. otherwise, while the most loaded replica holds at least ``spread`` (2) sessions more than the least
   loaded one, one of its sessions moves there (a difference of 1 cannot be evened out).

At most ``per_stage`` moves per stage and round. Nothing moves for balance while the stage's autoscaler
wants fewer replicas than it has (the session would move back when the replica drains). A session moves
once it has sent a frame, and not within ``rebalance_cooldown_s`` of its last epoch switch (a move, a
recovery, a resume) — the server's part (``AvatarServer._rebalance``); the session itself re-checks the
plan under its lock and asks its targets before it drops anything (``Session.move``). The loads are this
ingress's router table: with several ingresses, each balances its own sessions (as when it opens them).

Off by default (``S`` = 0): a move costs its session a short stall, which a deployment with fixed replica
counts does not need.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..chain import STAGES


@dataclass(frozen=True)
class Move:
    """Session ``session`` moves from replica ``source`` of ``stage`` to replica ``target``; ``why`` is for
    its GAP event and the metric (``"balance: ..."``, ``"drain: ..."``)."""

    session: str
    stage: str
    source: int
    target: int
    why: str


def plan_moves(router, routes: dict[str, dict], movable, per_stage: int = 1, spread: int = 2,
               surplus=None) -> list[Move]:
    """The moves of one round: ``router`` (its ``load`` and ``draining``), each running session's route
    (``{session id: {stage: replica}}``) and ``movable(session id)`` (may it move now). The loads are updated
    as if the moves were done, so one round never moves a session back and forth. ``surplus(stage, sessions,
    replicas)``: True when the stage's autoscaler will soon take a replica away — then nothing is moved for
    balance (it would be moved back when that replica drains), only off a drained replica."""
    moves: list[Move] = []
    moved: set[str] = set()
    for stage in STAGES:
        load = list(router.load.get(stage, ()))     # (its length, not counts: a replica being added in a thread)
        n = len(load)
        if n < 2:
            continue
        balance = surplus is None or not surplus(stage, sum(load), n)
        open_ = [i for i in range(n) if i not in router.draining.get(stage, ())]
        if not open_:
            continue
        on = {i: sorted(sid for sid, r in routes.items() if r.get(stage) == i and sid not in moved
                        and movable(sid)) for i in range(n)}
        for _ in range(per_stage):
            target = min(open_, key=lambda i: (load[i], i))
            draining = [i for i in range(n) if i not in open_ and on[i]]
            if draining:
                source = draining[0]
                why = f"drain: {stage} replica {source} is drained to scale down"
            else:
                source = max(open_, key=lambda i: (load[i], -i))
                if not balance or load[source] - load[target] < spread or not on[source]:
                    break
                why = (f"balance: {stage} replica {source} held {load[source]} sessions, replica {target} "
                       f"{load[target]}")
            sid = on[source].pop(0)
            moves.append(Move(sid, stage, source, target, why))
            moved.add(sid)
            load[source] -= 1
            load[target] += 1
    return moves

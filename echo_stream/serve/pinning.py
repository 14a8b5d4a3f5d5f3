"""Session pinning on Ray Serve, without Ray: what a pinned stage call carries, and the per-caller order a
replica keeps.

Every call of the Serve engine (:mod:`.serve_engine`) names the replica that must run it (the one our
:class:`~echo_stream.serve.routing.Router` table gave the session) and, for calls that must keep their
order, a sequence number per (caller, replica) — what a Ray actor gives for free (calls from one caller
run in submission order) and a Serve replica does not (requests are routed, resolved and run
concurrently). :class:`CallOrder` restores it inside the replica.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: the keyword argument of a pinned call that holds its :class:`Pin`
PIN_KW = "_pin"


class ReplicaGone(RuntimeError):
    """A pinned call reached a replica other than the one it names (that one is gone or not yet routable):
    the session's state is not here. The engine counts it as a stage fault (the session recovers)."""


class Failed:
    """A stage call's error, returned as its value instead of raised: a call that takes it as an argument
    still reaches its replica (Ray would fail a call whose argument is an error before the replica sees it,
    leaving a hole in the caller's order there: every later call of the caller stalled ``skip_after_s``), takes
    its turn, runs nothing and hands it on. The caller raises :attr:`error` when it reads the value."""

    __slots__ = ("error", "where")

    def __init__(self, error: BaseException, where: str = ""):
        self.error, self.where = error, where

    def __reduce__(self):
        return (Failed, (self.error, self.where))

    def raise_(self):
        if self.where:
            try:
                self.error.add_note(self.where)
            except AttributeError:      # pragma: no cover - Python < 3.11
                pass
        raise self.error


def failed_argument(args: tuple) -> "Failed | None":
    """The first :class:`Failed` among a call's arguments (None: none failed)."""
    return next((a for a in args if isinstance(a, Failed)), None)


@dataclass(frozen=True)
class Pin:
    #: the calling process (one id per backend: each ingress keeps its own order)
    caller: str
    #: the replica that must run the call (``ReplicaID.unique_id``)
    target: str
    #: position in the caller's calls to ``target`` (None: runs at once, unordered — health probes)
    seq: int | None = None
    #: ``{argument index: element}``: take that element of the argument's value (an output of a call that
    #: returned a tuple, passed on whole so that it travels replica to replica)
    picks: tuple = ()

    def args(self, args: tuple) -> tuple:
        if not self.picks:
            return args
        out = list(args)
        for i, k in self.picks:
            out[i] = out[i][k]
        return tuple(out)


class CallOrder:
    """Runs each caller's sequenced calls in sequence order (``seq`` 0, 1, 2 ... per caller).

    A call whose predecessor has not arrived waits for it — at most ``skip_after_s``: a predecessor that never
    comes (it was refused elsewhere) must not stall the caller for ever; then the order moves on past it.

    :meth:`done` marks one call finished (it ran, or it gave up: cancelled while waiting); the order moves on
    only over an unbroken run of finished calls, so a call that gives up before its turn does not let its
    successors overtake the calls still due before it."""

    def __init__(self, skip_after_s: float = 10.0):
        self.skip_after_s = float(skip_after_s)
        self._next: dict[str, int] = {}
        #: per caller: calls at or past ``_next`` that finished out of turn (given up while waiting)
        self._finished: dict[str, set[int]] = {}
        self._changed: asyncio.Condition | None = None
        self.skipped = 0

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def turn(self, caller: str, seq: int) -> None:
        """Returns when ``seq`` is the caller's next call; the caller then calls :meth:`done` (also when this
        is cancelled)."""
        if self._next.setdefault(caller, 0) >= seq:   # every caller numbers its calls to a replica from 0
            return                                     # in order (the usual case): no waiting, no lock
        cond = self._cond()
        async with cond:
            try:
                await asyncio.wait_for(cond.wait_for(lambda: self._next[caller] >= seq), self.skip_after_s)
            except asyncio.TimeoutError:
                self.skipped += 1
                log.warning("call order: caller %s waited %g s for its calls %d..%d on this replica; running call "
                            "%d without them (a late one runs out of order)", caller[:8], self.skip_after_s,
                            self._next[caller], seq - 1, seq)
                self._advance(caller, seq)             # past the calls that never came

    def _advance(self, caller: str, to: int) -> None:
        nxt = max(self._next.get(caller, 0), to)
        fin = self._finished.get(caller, set())
        while nxt in fin:
            nxt += 1
        self._next[caller] = nxt
        fin = {s for s in fin if s > nxt}
        if fin:
            self._finished[caller] = fin
        else:
            self._finished.pop(caller, None)

    async def done(self, caller: str, seq: int) -> None:
        if seq < self._next.get(caller, 0):            # late (the order moved past it) or already counted
            return
        self._finished.setdefault(caller, set()).add(seq)
        self._advance(caller, self._next.get(caller, 0))
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()


def rebind_slots(slots: dict[str, list], live: dict[str, set]) -> list[tuple]:
    """Re-bind (in place) each slot of the router table whose replica is no longer ``live`` to a live replica of
    its stage that no slot holds (the one Serve started in its place); returns ``(stage, slot)`` of each slot
    re-bound. A slot with no such replica yet keeps its old id: calls to it are refused (a fault), so its
    sessions wait for the replacement or move to another slot."""
    moved = []
    for stage, ids in slots.items():
        spare = sorted(set(live.get(stage, ())) - set(ids))
        for i, rid in enumerate(ids):
            if rid not in live.get(stage, ()) and spare:
                ids[i] = spare.pop(0)
                moved.append((stage, i))
    return moved


class StuckCheck:
    """A replica's health beyond "the process answers": a stage call that has run for longer than
    ``after_s`` (a wedged model call, a deadlock) makes :meth:`check` raise, so Serve's health check fails and
    Serve replaces the replica (its sessions recover elsewhere from their checkpoints)."""

    def __init__(self, after_s: float = 120.0, clock=None):
        import time

        self.after_s = float(after_s)
        self.clock = clock or time.monotonic
        self.since: float | None = None

    def run(self, fn):
        """``fn()`` timed as the running call (one at a time: the replica's worker thread)."""
        self.since = self.clock()
        try:
            return fn()
        finally:
            self.since = None

    def check(self, what: str) -> None:
        if self.since is not None and self.clock() - self.since > self.after_s:
            raise RuntimeError(f"{what}: a call has been running for {self.clock() - self.since:.0f} s "
                               f"(more than {self.after_s:g} s): the replica is stuck")

"""Session pinning on Ray Serve, without Ray: what a pinned stage call carries, and the per-session order a
replica keeps.

Every call of the Serve engine (:mod:`.serve_engine`) names the replica that must run it (the one our
:class:`~echo_stream.serve.routing.Router` table gave the session) and, for calls that must keep their
order, a sequence number in its *stream* on that replica: one session's calls from one ingress (or the
ingress's own calls, e.g. its warm-up). A Ray actor runs one caller's calls in submission order for free; a
Serve replica does not (requests are routed, resolved and run concurrently). :class:`CallOrder` restores the
order inside the replica, per stream, so that one session's calls never wait behind another session's.
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
    leaving a hole in its stream's order there: every later call of the stream stalled ``skip_after_s``), takes
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
    #: the ordered stream the call belongs to: ``<ingress id>/<session id>.<n>`` (a session's calls from one
    #: ingress), or ``<ingress id>`` (the ingress's own calls: warm-up, probes)
    stream: str
    #: the replica that must run the call (``ReplicaID.unique_id``)
    target: str
    #: position in the stream's calls to ``target`` (None: runs at once, unordered — health probes)
    seq: int | None = None
    #: further ``(stream, seq)`` turns the call takes: a batched diffusion call carries windows of several
    #: sessions and runs when it is next in the stream of every one of them
    more: tuple = ()
    #: the stage method returns a tuple of this many results (0: one result). The call answers with the first
    #: (``decode.push``'s packet, what the next stage takes); the replica keeps the others for the ``part``
    #: calls that follow it in its stream, each answered with one (the small ``info``): a Serve call has one
    #: answer, and reading a result must not fetch the others
    parts: int = 0

    def turns(self) -> tuple:
        """Every ``(stream, seq)`` turn the call takes (none: an unordered call)."""
        return () if self.seq is None else ((self.stream, self.seq),) + self.more


class CallOrder:
    """Runs each stream's sequenced calls in sequence order (``seq`` 0, 1, 2 ... per stream) — one session's
    calls from one ingress form a stream, so sessions do not wait on each other.

    A call whose predecessor has not arrived waits for it — at most ``skip_after_s``: a predecessor that never
    comes must not stall the stream for ever; then the order moves on past it (``skipped``). The ingress says
    so sooner when it knows: :meth:`release` gives up numbers whose calls failed before they reached this
    replica (an upstream replica crashed, or the call was refused elsewhere), so that nothing waits for them
    (``released``).

    :meth:`done` marks one call finished (it ran, or it gave up: cancelled while waiting); the order moves on
    only over an unbroken run of finished calls, so a call that gives up before its turn does not let its
    successors overtake the calls still due before it. :meth:`forget` drops a stream that has ended."""

    def __init__(self, skip_after_s: float = 10.0):
        self.skip_after_s = float(skip_after_s)
        self._next: dict[str, int] = {}
        #: per stream: numbers at or past ``_next`` that finished out of turn (given up while waiting, released)
        self._finished: dict[str, set[int]] = {}
        self._changed: asyncio.Condition | None = None
        #: numbers given up after waiting ``skip_after_s`` for them
        self.skipped = 0
        #: numbers the ingress released (:meth:`release`) before anything waited ``skip_after_s`` for them
        self.released = 0

    @property
    def streams(self) -> int:
        """Streams this replica keeps an order for (each ended one is forgotten)."""
        return len(self._next)

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def turn(self, stream: str, seq: int) -> None:
        """Returns when ``seq`` is the stream's next call; the caller then calls :meth:`done` (also when this
        is cancelled)."""
        if self._next.setdefault(stream, 0) >= seq:   # every stream numbers its calls to a replica from 0
            return                                     # in order (the usual case): no waiting, no lock
        cond = self._cond()
        async with cond:
            try:
                await asyncio.wait_for(cond.wait_for(lambda: self._next.get(stream, 0) >= seq), self.skip_after_s)
            except asyncio.TimeoutError:
                self.skipped += 1
                log.warning("call order: stream %s waited %g s for its calls %d..%d on this replica; running call "
                            "%d without them (a late one runs out of order)", stream[:41], self.skip_after_s,
                            self._next.get(stream, 0), seq - 1, seq)
                self._advance(stream, seq)             # past the calls that never came

    def _advance(self, stream: str, to: int) -> None:
        nxt = max(self._next.get(stream, 0), to)
        fin = self._finished.get(stream, set())
        while nxt in fin:
            nxt += 1
        self._next[stream] = nxt
        fin = {s for s in fin if s > nxt}
        if fin:
            self._finished[stream] = fin
        else:
            self._finished.pop(stream, None)

    async def _notify(self) -> None:
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    async def done(self, stream: str, seq: int) -> None:
        if seq < self._next.get(stream, 0):            # late (the order moved past it) or already counted
            return
        self._finished.setdefault(stream, set()).add(seq)
        self._advance(stream, self._next.get(stream, 0))
        await self._notify()

    async def release(self, turns) -> int:
        """``turns``: ``(stream, seq)`` pairs whose calls will never arrive here (the ingress saw them fail
        before they ran); the order moves on past them now instead of after ``skip_after_s``. Numbers that
        already took their turn (or were given up) are left alone. Returns how many were released."""
        n = 0
        for stream, seq in turns:
            if seq < self._next.get(stream, 0) or seq in self._finished.get(stream, ()):
                continue
            self._finished.setdefault(stream, set()).add(seq)
            self._advance(stream, self._next.get(stream, 0))
            n += 1
        self.released += n
        if n:
            log.info("call order: %d call(s) released by the ingress (they failed before reaching this replica)", n)
            await self._notify()
        return n

    def forget(self, stream: str) -> None:
        """Drop the order of a stream that has ended (its last call took its turn: the session closed)."""
        self._next.pop(stream, None)
        self._finished.pop(stream, None)


def rebind_slots(slots: dict[str, list], live: dict[str, set],
                 grow: dict[str, int] | None = None) -> tuple[list[tuple], list[tuple]]:
    """Re-bind (in place) each slot of the router table whose replica is no longer ``live`` to a live replica of
    its stage that no slot holds (the one Serve started in its place); for a stage in ``grow`` (autoscaled: its
    most replicas), a live replica left over (Serve's autoscaler added one) gets a new slot at the end, up to
    that many slots. Returns ``(moved, added)``: ``(stage, slot)`` of each slot re-bound, and of each slot
    added. A slot with no such replica keeps its old id: calls to it are refused (a fault), so its sessions move
    to another slot (or wait for the replacement); after a scale-down it stays empty (drained) until a later
    replica takes it. A stage not in ``grow`` never gets a slot more: a replacement that shows up while the
    replica it replaces is still listed waits, unbound, for that slot."""
    moved, added = [], []
    for stage, ids in slots.items():
        spare = sorted(set(live.get(stage, ())) - set(ids))
        for i, rid in enumerate(ids):
            if rid not in live.get(stage, ()) and spare:
                ids[i] = spare.pop(0)
                moved.append((stage, i))
        while spare and len(ids) < (grow or {}).get(stage, 0):
            ids.append(spare.pop(0))
            added.append((stage, len(ids) - 1))
    return moved, added


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

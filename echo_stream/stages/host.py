"""StageHost: runs one stage, by method name, with time accounting, and closes sessions left idle.

Kept free of heavy imports (no torch, no librosa): an actor process imports
only what its own stage needs when the stage object is unpickled there.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from collections import defaultdict
from typing import Callable

from . import Packet, Stage

log = logging.getLogger(__name__)


def session_ids_of(args: tuple) -> list[str]:
    """The sessions a stage call is for, from its arguments: a session id first (``open_stream``,
    ``close_session``, ``set_seed`` ...), a :class:`Packet`, a list of them (a batched diffusion or render
    call), or a batch with a ``session_id`` column (``add_transcript``)."""
    if not args:
        return []
    a = args[0]
    if isinstance(a, str):
        return [a]
    if isinstance(a, Packet):
        return [a.session_id]
    if isinstance(a, (list, tuple)):
        return [p.session_id for p in a if isinstance(p, Packet)]
    if "session_id" in (getattr(a, "column_names", None) or ()):
        return [str(v) for v in a.column("session_id").to_pylist()]
    return []


class StageHost:
    """Hosts one stage: calls its methods by name and accounts the time spent in each.

    A Ray actor is this class made remote (``echo_stream.actors``); the inline
    runner uses it directly, so both paths share the accounting.

    ``idle_close_s`` (None: never): the state of a session that had no call for this long is closed. An
    ingress closes its sessions' state when they end, but one that is lost abruptly (its process or node
    died) closes nothing, and its sessions' decoders, LCU memory and previous motion would stay until this
    process restarts (a resumed session opens its stages under a new id, so it never needs them again). The
    host notes the time of each session's last call and, on a call at most every ``sweep_every_s``, closes
    the sessions idle for longer (:meth:`sweep`): a host with no call at all keeps its garbage until one
    comes, which costs nothing meanwhile. A running session calls its stages with every chunk; an ingress
    also calls :meth:`keep` for its sessions, so one whose client is silent for long keeps its state.
    """

    def __init__(self, factory: Callable[[], Stage], idle_close_s: float | None = None, clock=time.monotonic):
        if idle_close_s is not None and not idle_close_s > 0:
            raise ValueError(f"idle_close_s: {idle_close_s}: seconds > 0, or None (never)")
        self.stage = factory()
        self.busy: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        #: seconds of each method's first call (cold-start costs the stage's setup did not absorb)
        self.first_s: dict[str, float] = {}
        self.setup_s = 0.0
        #: differs after every (re)start of the process hosting the stage: a restarted actor lost its sessions
        self.incarnation = uuid.uuid4().hex
        self.idle_close_s, self.clock = idle_close_s, clock
        #: how often at most the sessions are looked at (a set of ids per sweep: cheap at this rate)
        self.sweep_every_s = None if idle_close_s is None else max(1.0, idle_close_s / 10)
        self._last_call: dict[str, float] = {}        # session id -> clock() of its last call
        self._next_sweep = 0.0 if idle_close_s is None else clock() + self.sweep_every_s
        self.reclaimed = 0                            # sessions closed because they sat idle

    def incarnation_id(self) -> str:
        return self.incarnation

    def setup(self) -> float:
        t = time.perf_counter()
        self.stage.setup()
        self.setup_s = time.perf_counter() - t
        return self.setup_s

    def call(self, method: str, *args, **kwargs):
        t = time.perf_counter()
        try:
            return getattr(self.stage, method)(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t
            self.busy[method] += dt
            self.calls[method] += 1
            self.first_s.setdefault(method, dt)
            # a ping is for no session, and the Serve engine answers it off the stage's thread: no sweep there
            if self.idle_close_s is not None and method != "ping":
                if method == "close_session":
                    self._last_call.pop(args[0] if args else None, None)
                else:
                    self.keep(session_ids_of(args))
                self.sweep()

    def keep(self, session_ids) -> None:
        """Note a call for ``session_ids`` now (an ingress keeps its running sessions' state this way too,
        between their calls)."""
        now = self.clock()
        for sid in session_ids:
            self._last_call[sid] = now

    def sweep(self) -> list[str]:
        """Close the sessions that had no call for ``idle_close_s`` (at most once every ``sweep_every_s``;
        otherwise nothing); returns the ids of those closed (one whose close raised is tried again next time). A session whose state was made by no call this host saw counts
        from the first sweep that finds it. Runs where the stage's calls run (the actor, the replica's worker
        thread): closing never races a call of the stage."""
        now = self.clock()
        if self.idle_close_s is None or now < self._next_sweep:
            return []
        self._next_sweep = now + self.sweep_every_s
        held = set(self.stage.session_ids())
        for sid in [s for s in self._last_call if s not in held]:   # closed, or called without state here
            del self._last_call[sid]
        closed = []
        for sid in [sid for sid in held if now - self._last_call.setdefault(sid, now) >= self.idle_close_s]:
            try:
                self.stage.close_session(sid)
            except Exception:  # noqa: BLE001 - the next sweep tries again
                log.exception("%s: closing idle session %s failed", self.stage.name, sid)
                continue
            del self._last_call[sid]
            closed.append(sid)
        self.reclaimed += len(closed)
        if closed:
            log.warning("%s: closed the state of %d session(s) with no call for %g s or more (left by an ingress "
                        "lost without closing them): %s", self.stage.name, len(closed), self.idle_close_s,
                        ", ".join(sorted(closed)[:8]) + (" ..." if len(closed) > 8 else ""))
        return closed

    def stats(self) -> dict:
        import resource

        return {"stage": self.stage.name, "setup_s": self.setup_s, "busy_s": dict(self.busy),
                "calls": dict(self.calls), "first_call_s": dict(self.first_s), "pid": os.getpid(),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "reclaimed_sessions": self.reclaimed}

"""Ingest: a session's client input, before the stages see it.

* :class:`Pacer` owns the lead rule: avatar audio may run at most ``max_lead_s`` ahead of real time; a
  faster sender is made to wait, and the wait backs up into gRPC flow control.
* :class:`Chunker` owns the input gathered for the next chain and the rule of when to hand it to the
  pipeline (:meth:`Chunker.due`): as soon as a generation window can be cut, else every ``chunk_s`` of
  avatar audio.
* :class:`Arrivals` owns when each piece of avatar audio arrived (session-timeline seconds -> monotonic
  time): the origin of each frame's latency.

No asyncio and no stages here: the session's feed task drives these.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ... import config
from ...geometry import WindowGeometry

FPS = config.FPS


@dataclass
class Pacer:
    """Avatar audio received against the wall clock since its first piece."""

    max_lead_s: float
    t_first: float | None = None    # monotonic time the first avatar audio came in
    received_s: float = 0.0         # avatar audio received, seconds

    def wait_s(self, now: float) -> float:
        """How long avatar audio arriving at ``now`` must wait before it is taken (0: at once). The first
        call starts the clock."""
        if self.t_first is None:
            self.t_first = now
        lead = self.received_s - (now - self.t_first)
        return lead - self.max_lead_s if lead > self.max_lead_s else 0.0

    def received(self, seconds: float) -> None:
        self.received_s += seconds

    def restart(self, now: float) -> None:
        """After an interrupt: the dropped audio no longer counts; the lead starts again from zero."""
        if self.t_first is not None:
            self.received_s = now - self.t_first


class Chunker:
    """The input gathered for the next chain: ``items`` ((kind, item), in arrival order) holding ``seconds``
    of avatar audio."""

    MAX_ITEMS = 256

    def __init__(self, geometry: WindowGeometry, stride: int, chunk_s: float):
        self.geometry, self.stride, self.chunk_s = geometry, stride, chunk_s
        self.items: list = []
        self.seconds = 0.0

    def add(self, kind: str, item: dict) -> None:
        self.items.append((kind, item))
        if kind == "avatar_audio":
            self.seconds += item["seconds"]

    def due(self, pushed_s: float) -> bool:
        """Whether to hand the chunk over now, ``pushed_s`` seconds of avatar audio of this epoch already
        handed over: when it completes the audio the next generation window needs (its S' new frames, the
        L lookahead frames and the features' 10 ms), so that no frame waits for a chunk; else when it holds
        ``chunk_s`` of audio or ``MAX_ITEMS`` items."""
        local = pushed_s + self.seconds
        ready = self.geometry.ready_s(self.stride, local)
        crossed = pushed_s < ready <= local
        return crossed or self.seconds >= self.chunk_s - 1e-9 or len(self.items) >= self.MAX_ITEMS

    def take(self) -> tuple[list, float]:
        """The chunk's items and seconds; the chunker starts empty again."""
        items, seconds = self.items, self.seconds
        self.items, self.seconds = [], 0.0
        return items, seconds

    def prepend(self, items: list, seconds: float) -> None:
        """Input replayed after a fault goes before what arrived meanwhile."""
        self.items = items + self.items
        self.seconds += seconds

    def clear(self) -> None:
        self.items, self.seconds = [], 0.0


@dataclass
class Arrival:
    """Avatar audio [start_s, end_s) of the session timeline, arrived at monotonic time ``t``."""

    start_s: float
    end_s: float
    t: float


class Arrivals:
    """When the avatar audio of each stretch of the session timeline arrived (oldest first)."""

    def __init__(self):
        self._q: deque[Arrival] = deque()

    def add(self, start_s: float, seconds: float, t: float) -> None:
        self._q.append(Arrival(start_s, start_s + seconds, t))

    def origin(self, frame: int) -> float | None:
        """The arrival time of the audio frame ``frame`` starts in (None: unknown); forgets what lies
        before it (frames are asked for in order), keeping the newest."""
        t = frame / FPS
        q = self._q
        while q and q[0].end_s <= t + 1e-9 and len(q) > 1:
            q.popleft()
        if q and q[0].start_s <= t + 1e-9:
            return q[0].t
        return None

    def keep_after(self, s: float) -> None:
        """Forget the audio ending at or before ``s`` seconds (its frames will never come)."""
        self._q = deque(a for a in self._q if a.end_s > s)

    def clear(self) -> None:
        self._q.clear()

    def __len__(self) -> int:
        return len(self._q)

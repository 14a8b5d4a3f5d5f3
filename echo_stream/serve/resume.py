"""Sessions that outlive their stream: resume records, and where a resumed session starts again.

A session's state lives in the stage replicas and in its ingress (the :class:`~.session.Session`). When the
*ingress* is lost (its node died, it was drained, or only the client's connection broke), the client reconnects
through the load balancer — usually to another ingress — with ``SessionConfig.resume`` (session id + the first
frame it has not received). That ingress needs what a stage fault already uses, kept where every ingress
reaches it: a **resume record** per session.

* :class:`ResumeRecords` owns the records (plain data; the Ray actor in :mod:`echo_stream.actors.resume`
  hosts one per cluster): who owns the session (principal), which config it was opened with (a digest), the
  frames out, the motion of the last frames out, the last LCU memory checkpoint and the clock of its avatar
  audio. Every record has a *generation*: a resume claims the record under the next one, and updates from an
  older generation (the lost ingress, if it is only partitioned and still running) are refused from then on,
  so two ingresses never both write a session. Records expire ``ttl_s`` after their last update (the ingress
  refreshes its running sessions' records), and there are at most ``max_records``.
* :func:`resume_point` decides, from a record and the client's ``next_frame``, where generation restarts
  (``ResumePoint``): at ``next_frame`` when the motion of the ``overlap`` frames before it is in the record,
  else at the newest frame whose previous motion is, else at ``next_frame`` without previous motion.
* :class:`InputCut` cuts the input the client sends again so that it starts at the resume point's time.

* :class:`RecordWriter` is a running session's side: it sends the record's updates to the store (at most one
  call in flight per session; what changed meanwhile goes in the next one) and notices when a resume elsewhere
  took the session over.

Only :class:`RecordWriter` calls the store (through the actor handle it is given); the rest is plain data.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
import zlib
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from .. import config
from .session.ledger import cut_pcm

log = logging.getLogger(__name__)

FPS = config.FPS
#: the Ray actor that hosts the cluster's records (detached: it outlives the ingress that started it)
STORE_NAME = "echo_stream_resume_records"
STORE_NAMESPACE = "echo_stream"


class ResumeRefused(Exception):
    """A resume that cannot be granted: ``code`` is the gRPC status name, ``message`` says what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def config_digest(config_bytes: bytes) -> str:
    """What identifies a session's SessionConfig (without its ``resume`` field): a resume must send the same."""
    return hashlib.sha256(config_bytes).hexdigest()


@dataclass
class ResumeRecord:
    principal: str
    digest: str
    generation: int = 0
    produced: int = 0                      # frames out of the egress (handed to the stream)
    rows: deque = field(default_factory=lambda: deque(maxlen=64))   # (frame, motion row) of the last frames out
    checkpoint: bytes | None = None        # the last LCU memory checkpoint taken
    t_first_wall: float | None = None      # wall-clock time of the first avatar audio (the lead rule's clock)
    touched: float = 0.0                   # monotonic time of the last update
    node: str = ""                         # Ray node id of the ingress holding the session ("" unknown); a
    #                                        claim hands back the previous holder's (a resume avoids that node)


@dataclass
class Update:
    """What an ingress adds to a record: frames out up to ``produced`` with the motion ``rows`` of the newest
    ((frame, row) pairs), a new ``checkpoint`` (None: unchanged), the audio clock (None: unchanged)."""

    produced: int
    rows: list
    checkpoint: bytes | None = None
    t_first_wall: float | None = None


class ResumeRecords:
    """The records of one cluster (see the module's docstring)."""

    def __init__(self, ttl_s: float = 120.0, max_records: int = 100_000, keep: int = 64, clock=time.monotonic):
        self.ttl_s, self.max_records, self.keep, self.clock = ttl_s, max_records, keep, clock
        self._records: dict[str, ResumeRecord] = {}

    def __len__(self) -> int:
        return len(self._records)

    def create(self, session_id: str, principal: str, digest: str, node: str = "") -> int:
        """A new session's record; returns its generation (0). Refused (RESOURCE_EXHAUSTED) when the store is
        full of live records."""
        self.expire()
        if len(self._records) >= self.max_records:
            raise ResumeRefused("RESOURCE_EXHAUSTED", f"the resume store holds {self.max_records} sessions: "
                                                      "retry later")
        self._records[session_id] = ResumeRecord(principal, digest, touched=self.clock(),
                                                 rows=deque(maxlen=self.keep), node=node)
        return 0

    def update(self, session_id: str, generation: int, u: Update) -> bool:
        """Apply ``u`` from the writer of ``generation``; False when the record is gone or was claimed by a newer
        generation (the writer no longer owns the session)."""
        r = self._records.get(session_id)
        if r is None or r.generation != generation:
            return False
        last = r.rows[-1][0] if r.rows else -1
        r.rows.extend((f, row) for f, row in u.rows if f > last)      # frames in order, each once
        r.produced = max(r.produced, u.produced)
        if u.checkpoint is not None:
            r.checkpoint = u.checkpoint
        if u.t_first_wall is not None:
            r.t_first_wall = u.t_first_wall
        r.touched = self.clock()
        return True

    def touch(self, owned: list[tuple[str, int]]) -> list[str]:
        """Keep running sessions' records alive ((session id, generation) pairs); returns the ids no longer owned
        by that generation (their stream was taken over by a resume elsewhere)."""
        now, lost = self.clock(), []
        for sid, gen in owned:
            r = self._records.get(sid)
            if r is None or r.generation != gen:
                lost.append(sid)
            else:
                r.touched = now
        return lost

    def claim(self, session_id: str, principal: str, digest: str, node: str = "") -> tuple[int, ResumeRecord]:
        """Take the session over for a resume (from an ingress on ``node``): ``(generation, record)``, the
        record's ``node`` that of the previous holder; the previous writer's updates are refused from now on.
        Raises :class:`ResumeRefused` (NOT_FOUND, PERMISSION_DENIED, INVALID_ARGUMENT)."""
        self.expire()
        r = self._records.get(session_id)
        if r is None:
            raise ResumeRefused("NOT_FOUND", "no resumable session with this id (it ended, its resume record "
                                             f"expired {self.ttl_s:g} s after its last frame, or it never existed): "
                                             "open a new session")
        if not secrets.compare_digest(r.principal.encode(), principal.encode()):
            raise ResumeRefused("PERMISSION_DENIED", "this session belongs to another principal")
        if not secrets.compare_digest(r.digest.encode(), digest.encode()):
            raise ResumeRefused("INVALID_ARGUMENT", "config: differs from the SessionConfig the session was "
                                                    "opened with; send the same one, with resume set")
        r.generation += 1
        r.touched = self.clock()
        previous, r.node = r.node, node
        return r.generation, replace(r, node=previous)

    def drop(self, session_id: str, generation: int) -> None:
        """The session ended (or failed on its input): nothing to resume. Only its current writer drops it."""
        r = self._records.get(session_id)
        if r is not None and r.generation == generation:
            del self._records[session_id]

    def expire(self) -> int:
        """Forget the records not updated for ``ttl_s``; returns how many."""
        now = self.clock()
        old = [sid for sid, r in self._records.items() if now - r.touched > self.ttl_s]
        for sid in old:
            del self._records[sid]
        return len(old)


@dataclass
class ResumePoint:
    """Where a resumed session starts: generation restarts at ``frame`` (its input is sent again from
    ``frame / FPS``), frames before ``next_frame`` are not sent again; ``prev_motion`` (the ``overlap`` frames
    before ``frame``, or None) and ``checkpoint`` restore the stages."""

    frame: int
    next_frame: int
    prev_motion: np.ndarray | None
    checkpoint: bytes | None

    @property
    def pts(self) -> float:
        return self.frame / FPS


def resume_point(record: ResumeRecord, next_frame: int, overlap: int) -> ResumePoint:
    """Where to restart a session whose client has every frame before ``next_frame`` (see the module)."""
    rows = {f: row for f, row in record.rows}

    def prev(at: int) -> np.ndarray | None:
        """The motion of the ``overlap`` frames before ``at``, when the record has all of it."""
        want = [rows.get(f) for f in range(at - overlap, at)]
        return np.stack(want) if want and all(r is not None for r in want) else None

    for at in [next_frame] + sorted((f + 1 for f in rows if f + 1 < next_frame), reverse=True):
        p = prev(at)
        if p is not None:
            return ResumePoint(at, next_frame, p, record.checkpoint)
    return ResumePoint(next_frame, next_frame, None, record.checkpoint)


class InputCut:
    """The input a resuming client sends again, cut to start at ``start_s`` on the session timeline.

    Audio is cut by sample count from the first message of each track (its pts says where it starts; encoded
    audio is cut after the ingress decoded it), so a client may start again anywhere at or before ``start_s``.
    A track that starts again *after* ``start_s`` is padded with silence (``padded_s`` says how much: the
    avatar's words in that stretch are lost, its frames are generated from silence). Video frames, blendshapes
    and transcript segments before ``start_s`` are dropped.
    """

    def __init__(self, start_s: float):
        self.start_s = start_s
        self._todo: dict[str, float | None] = {"avatar_audio": None, "user_audio": None}   # seconds still to cut
        self.padded_s = 0.0

    def cut(self, kind: str, item: dict) -> list[dict]:
        """The part of ``item`` (a validated input; audio as PCM) at or after ``start_s``: [], [item], or, for
        a track that starts late, [silence, item]."""
        if kind in self._todo:
            todo = self._todo[kind]
            if todo is None:                                 # the track's first message: where it starts
                todo = self.start_s - item.get("pts", self.start_s)
                if todo < -0.5 / FPS:
                    self._todo[kind] = 0.0
                    if kind == "avatar_audio":
                        self.padded_s += -todo
                    return [_silence(item, -todo), item]
                todo = max(todo, 0.0)
            if todo <= 0:
                self._todo[kind] = 0.0
                return [item]
            rest, left = cut_pcm(item, todo)
            self._todo[kind] = left
            return [] if rest is None else [rest]
        if kind in ("user_video", "blendshapes"):
            return [] if item.get("pts", math.inf) < self.start_s - 0.5 / FPS else [item]
        if kind == "transcript":
            return [] if item["pts"] < self.start_s - 1e-6 else [item]
        return [item]


def _silence(like: dict, seconds: float) -> dict:
    """``seconds`` of silence in ``like``'s PCM format."""
    n = int(round(seconds * like["rate"]))
    width = (2 if like["format"] == "s16le" else 4) * like["channels"]
    return dict(like, pcm=bytes(n * width), seconds=n / like["rate"], pts=like.get("pts", 0.0) - seconds)


class Shards:
    """The store's actors (``handles``); a session's record lives on shard ``crc32(id) % len(handles)``."""

    def __init__(self, handles: list):
        self.handles = list(handles)

    def of(self, session_id: str):
        return self.handles[zlib.crc32(session_id.encode()) % len(self.handles)]

    async def touch(self, owned: list[tuple[str, int]]) -> set[str]:
        """:meth:`ResumeRecords.touch` on every shard holding one of ``owned``; the ids no longer owned."""
        by: dict[int, list] = {}
        for sid, gen in owned:
            by.setdefault(zlib.crc32(sid.encode()) % len(self.handles), []).append((sid, gen))
        lost = await asyncio.gather(*(self.handles[i].touch.remote(o) for i, o in by.items()))
        return {sid for ids in lost for sid in ids}


class RecordWriter:
    """A running session's resume record, kept up to date in the store (``store``: the actor handle).

    :meth:`frames_out` and :meth:`checkpoint` note what changed and start a send when none is in flight (and at
    most one every ``min_interval_s``, default 0: a record that lags the frames out makes a resume restart
    earlier, and the frames made again differ from those delivered — a visible step in the head pose where the
    new ones begin, measured 0.025 against a largest natural step of 0.0025); one send carries everything noted
    since the last one (frames out, the motion of the newest ``keep`` frames, the
    newest checkpoint). An update the store refuses means a resume elsewhere took the session over:
    ``on_taken_over`` is called once. A store that does not answer costs the session nothing but its
    resumability (logged once) until it answers again: what the failed update carried is put back, to go in
    the next one, which is tried again after ``retry_after_s`` (doubling up to ``retry_max_s`` while the store
    keeps failing, so a dead store is not called in a loop) — a dropped update would leave the record without
    those frames' motion and that checkpoint, and a later resume would restart earlier or without previous
    motion.
    """

    def __init__(self, store, session_id: str, generation: int, keep: int = 64, on_taken_over=None,
                 created=None, min_interval_s: float = 0.0, retry_after_s: float = 0.25,
                 retry_max_s: float = 5.0):
        if not 0 < retry_after_s <= retry_max_s:
            raise ValueError(f"retry_after_s ({retry_after_s}) must be > 0 and <= retry_max_s ({retry_max_s})")
        self.store, self.session_id, self.generation = store, session_id, generation
        self.min_interval_s = min_interval_s      # at most one update per this long (the store's load)
        self.retry_after_s, self.retry_max_s = retry_after_s, retry_max_s
        self.on_taken_over = on_taken_over
        self._created = created            # the store's answer to the record's creation (None: it exists)
        self._rows: deque = deque(maxlen=keep)
        self._produced = 0
        self._checkpoint: bytes | None = None
        self._clock: float | None = None
        self._dirty = False
        self._task: asyncio.Task | None = None
        self._failed = False
        self._last = -math.inf             # monotonic time of the last update sent
        self._closed = False
        self._wake = asyncio.Event()       # set by close(): a send waiting to retry goes at once
        self.sent = 0                      # updates the store accepted
        self.failures = 0                  # updates that did not reach the store (put back and retried)

    def frames_out(self, produced: int, rows) -> None:
        """Frames before ``produced`` are out; ``rows``: (frame, motion row) of those that just left."""
        self._rows.extend(rows)
        self._produced = produced
        self._changed()

    def checkpoint(self, data: bytes) -> None:
        self._checkpoint = data
        self._changed()

    def audio_clock(self, t_first_wall: float) -> None:
        """The wall-clock time of the session's first avatar audio (the lead rule's clock)."""
        self._clock = t_first_wall
        self._changed()

    def _changed(self) -> None:
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._send(), name=f"record-{self.session_id[:8]}")

    def _put_back(self, u: Update) -> None:
        """``u`` did not reach the store: note it again under what was noted since (newer rows after its rows,
        the newest ``keep`` kept; a checkpoint or clock noted meanwhile is newer than its)."""
        newer = list(self._rows)
        self._rows.clear()
        self._rows.extend(u.rows)
        self._rows.extend(newer)
        if self._checkpoint is None:
            self._checkpoint = u.checkpoint
        if self._clock is None:
            self._clock = u.t_first_wall
        self._dirty = True

    async def _send(self) -> None:
        if self._created is not None:
            created, self._created = self._created, None
            try:
                got = await created
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                got = {"refused": type(e).__name__, "message": "the store did not answer"}
            if "refused" in got:
                log.warning("session %s has no resume record (%s): it cannot be resumed on another stream",
                            self.session_id[:8], got["message"])
                self.store = None
        backoff = self.retry_after_s
        while self._dirty and self.store is not None:
            wait = self._last + self.min_interval_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last = time.monotonic()
            self._dirty = False
            u = Update(self._produced, list(self._rows), self._checkpoint, self._clock)
            self._rows.clear()
            self._checkpoint = self._clock = None
            try:
                accepted = await self.store.update.remote(self.session_id, self.generation, u)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the store restarting: this session is not resumable meanwhile
                if not self._failed:
                    log.warning("session %s: its resume record was not updated (%s): it cannot be resumed until "
                                "the store answers again", self.session_id[:8], type(e).__name__)
                self._failed = True
                self.failures += 1
                self._put_back(u)
                try:                           # close() cuts this wait short once: its last try goes at once
                    await asyncio.wait_for(self._wake.wait(), backoff)
                except asyncio.TimeoutError:
                    pass
                self._wake.clear()
                backoff = min(2 * backoff, self.retry_max_s)
                continue
            if not accepted:
                self._dirty = False
                if self.on_taken_over is not None:
                    self.on_taken_over()
                    self.on_taken_over = None
                return
            self.sent += 1
            self._failed = False
            backoff = self.retry_after_s

    async def close(self, drop: bool) -> None:
        """The session's stream ended: send what is left (``drop``: the session ended, forget the record). Once;
        later calls do nothing. A send still failing after 5 s is given up (the writer retries no more)."""
        if self.store is None or self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5.0)
            except (Exception, asyncio.CancelledError):  # noqa: BLE001
                pass
            finally:
                if not self._task.done():      # a store that keeps failing: stop retrying it
                    self._task.cancel()
        if drop and self.store is not None:
            try:
                await asyncio.wait_for(self.store.drop.remote(self.session_id, self.generation), 5.0)
            except Exception:  # noqa: BLE001 - it expires
                pass

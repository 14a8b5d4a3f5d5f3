"""The Session: one served session's three tasks, its epochs (interrupt, fault recovery) and its lifecycle.

Three tasks per session, joined by bounded queues (backpressure all the way to gRPC flow control: when a
queue is full its producer waits, the RPC stops reading, and the client's sends block):

* **feed** — validated client inputs (``inbox``) are gathered by the :class:`~.ingest.Chunker` and submitted
  as one chain ``decode.push -> features.process -> memory.process (+ memory.export_state)``; at most
  ``max_inflight`` chains are in flight (``inflight``);
* **generate** — in order, each chain's generation windows go to the
  :class:`~echo_stream.serve.batching.WindowBatcher` (diffusion, batched across sessions), then to
  ``render.process`` (``render_q``);
* **egress** — in order, render results become protobuf messages in ``outbox`` (:class:`~.output.Egress`).

The epoch changes on **interrupt** (buffered work dropped, output resumes at the playback position) and on
**fault recovery** (a stage replica died: the session re-opens under a new epoch, on a replica that answers,
from :class:`~.ledger.ResumeState`; the input in flight is replayed from the :class:`~.ledger.ReplayLedger`,
or the frames lost with it are announced in one GAP event). Results of an older epoch are dropped, so
every frame leaves at most once, in frame order.

What the parts own: :class:`~.ingest.Pacer` (lead over real time), :class:`~.ingest.Chunker`,
:class:`~.ingest.Arrivals` (latency origins), :class:`~.edge.EdgeDecoders` (encoded input),
:class:`~.stages.StageLink` (route, epoch id, opening / closing epochs), :class:`~.ledger.ReplayLedger`
and :class:`~.ledger.ResumeState`, :class:`~.output.Egress` (``produced``, fMP4). The Session owns the
queues, the tasks, the lock that orders epoch switches, and the failure.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from ... import config, schemas
from ...geometry import WindowGeometry, default_geometry
from ...pipeline import BATCHED, run_chain, stage_after, stage_before, transcript_batch
from ...protos import echo_stream_pb2 as pb
from ...transcript import Segment
from .. import metrics
from ..backend import STAGE_CALL_DEADLINE_S, answered
from ..egress import Outgoing
from ..wire import Limits, SessionSpec
from .edge import EdgeDecoders
from .epochs import EpochSwitching
from .failures import SessionFailed, failure_from, redactions
from .ingest import Arrivals, Chunker, Pacer
from .ledger import ChainInFlight, ReplayLedger, Restore, ResumeState, WindowInRender
from .output import Egress, SessionStats
from .stages import StageLink

FPS = config.FPS
#: a session's chain: decode -> ... -> _BEFORE_BATCH (windows, fetched here), the batcher (BATCHED), then
#: _AFTER_BATCH -> ... -> the last stage; the LCU memory checkpoint comes from _BEFORE_BATCH
_BEFORE_BATCH, _AFTER_BATCH = stage_before(BATCHED), stage_after(BATCHED)


class Session(EpochSwitching):
    """One served session (see the module's docstring); :class:`~.epochs.EpochSwitching` adds interrupt and
    fault recovery."""

    def __init__(self, session_id: str, principal: str, spec: SessionSpec, backend, batcher,
                 limits: Limits = Limits(), chunk_frames: int = 8, max_inflight: int = 4, outbox_size: int = 48,
                 inbox_size: int = 64, recovery_timeout_s: float = 30.0, stride: int = 16,
                 geometry: WindowGeometry | None = None, generation: int = 0,
                 call_deadline_s: float = STAGE_CALL_DEADLINE_S):
        self.id = session_id
        self.generation = generation     # the how-manieth stream of the session (0: opened; +1 per resume)
        self.principal = principal
        self.spec = spec
        self.backend = backend
        self.limits = limits
        self.recovery_timeout_s = recovery_timeout_s
        self.call_deadline_s = call_deadline_s   # a stage result not back by then is a fault (the session recovers)
        self.geometry = geometry = geometry or default_geometry()
        self.stride = geometry.stride(stride, "stride_frames")   # S' new frames per window
        self.overlap = geometry.known(stride)                   # K' = W - S' known frames
        #: server-side strings never shown to the client -> what is shown instead
        self.redact: dict[str, str] = redactions(spec)
        self.link = StageLink(session_id, spec, backend, batcher, self.redact, generation)
        self.pacer = Pacer(limits.max_lead_s)
        self.chunker = Chunker(geometry, self.stride, chunk_frames / FPS)
        self.arrivals = Arrivals()
        self.edge = EdgeDecoders()
        self.ledger = ReplayLedger()
        self.resume = ResumeState()
        self.inbox: asyncio.Queue = asyncio.Queue(inbox_size)
        self.inflight: asyncio.Queue = asyncio.Queue(max_inflight)
        self.render_q: asyncio.Queue = asyncio.Queue(max_inflight)
        self.outbox: asyncio.Queue = asyncio.Queue(outbox_size)
        self.stats = SessionStats()
        self.out = Egress(spec, self.outbox, self.stats, self.arrivals, self.resume, self.ledger)
        self.ready = asyncio.Event()     # cleared while an epoch is being switched
        self.ready.set()
        self.lock = asyncio.Lock()       # one epoch switch at a time
        self.failure: SessionFailed | None = None
        self.done = asyncio.Event()      # the outbox got its last message
        self.end_pushed = False          # END reached the pipeline (re-sent into a new epoch)
        self.closed = False
        self._tasks: list[asyncio.Task] = []
        self._recovery_task = None
        #: when the session last switched epochs after a fault or a move (or was resumed): monotonic seconds
        self.last_switch = -math.inf
        #: the latest transcript segments sent (session timeline), for a new epoch
        self.transcript_sent: deque = deque(maxlen=64)
        #: the session's resume record in the cluster's store (:class:`~echo_stream.serve.resume.RecordWriter`;
        #: None: not resumable) and, for a resumed stream, the cut of the input sent again
        self.record = None
        self.cut = None

    # ------------------------------------------------------------------ what the server reads
    @property
    def route(self) -> dict:
        """This session's replica of each stage."""
        return self.link.route

    @property
    def epoch(self) -> int:
        return self.link.epoch

    @property
    def iid(self) -> str:
        """The stages' id of the session's current epoch."""
        return self.link.iid

    @property
    def produced(self) -> int:
        """The next global frame to leave (frames before it are out): the playback position."""
        return self.out.produced

    @property
    def t_first_audio(self) -> float | None:
        """Monotonic time of the first avatar audio (None before it)."""
        return self.pacer.t_first

    def call(self, stage: str, method: str, *args, num_returns: int = 1):
        """A call on this session's replica of ``stage`` (:meth:`~.stages.StageLink.call`)."""
        return self.link.call(stage, method, *args, num_returns=num_returns)

    # ------------------------------------------------------------------ lifecycle
    async def open(self, point=None, record=None) -> None:
        """Prepare every stage for the session (raises SessionFailed for a bad portrait). A resumed session
        (``point``: :class:`~echo_stream.serve.resume.ResumePoint`, from its resume ``record``) starts at the
        point's frame, restored from the record; the input sent again is cut to start there, and the frames
        before the client's ``next_frame`` are dropped as they come out again (:meth:`announce_resume` says so)."""
        if point is None:
            await self.link.open_epoch(self.stride, None)
            return
        from ..resume import InputCut

        self.ledger.restart(point.frame)
        self.out.produced = point.next_frame
        for f, row in record.rows:
            if f < point.next_frame:
                self.resume.sent(f, row)
        self.resume.checkpoint = point.checkpoint
        self.cut = InputCut(point.pts)
        if record.t_first_wall is not None:          # the lead rule goes on with the session's audio clock
            self.pacer.t_first = time.monotonic() - max(0.0, time.time() - record.t_first_wall)
            self.pacer.received_s = point.pts
        await self.link.open_epoch(self.stride, Restore(point.checkpoint, point.prev_motion))
        self.last_switch = time.monotonic()

    async def announce_resume(self, point, took_s: float, steps: dict | None = None) -> None:
        """The GAP event that starts a resumed stream (``took_s``: from the stream's first message to the stages
        opened; ``steps``: where that time went, seconds by step)."""
        self.stats.recoveries += 1
        how = (f"generation restarts at frame {point.frame} (frames {point.frame}..{point.next_frame - 1} are "
               "made again and not sent)" if point.frame < point.next_frame else
               f"generation restarts at frame {point.frame}")
        await self.outbox.put(Outgoing(pb.ServerMessage(pts=point.next_frame / FPS, event=pb.Event(
            kind=pb.Event.GAP, first_frame=point.next_frame, frames=0,
            message=f"the session was resumed on a new stream in {took_s:.2f} s"
                    + (" (" + ", ".join(f"{k} {v:.2f} s" for k, v in steps.items()) + ")" if steps else "")
                    + " from its record (LCU checkpoint, "
                    f"{'previous motion' if point.prev_motion is not None else 'no previous motion'}); {how}; "
                    f"send the input again from {point.pts:.2f} s"))))

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._guard(self._feed()), name=f"feed-{self.id[:8]}"),
                       loop.create_task(self._guard(self._generate()), name=f"generate-{self.id[:8]}"),
                       loop.create_task(self._guard(self._egress()), name=f"egress-{self.id[:8]}")]

    async def _guard(self, coro) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug must end this session only
            self._fail(self.failure_from(e, f"session {self.id[:8]}"))

    def failure_from(self, exc: BaseException, during: str) -> SessionFailed:
        """:func:`failure_from` with this session's redactions (a registered avatar's server path)."""
        return failure_from(exc, during, self.redact)

    def _fail(self, e: SessionFailed) -> None:
        if self.failure is None and not self.done.is_set():
            self.failure = e
            self.done.set()
            try:
                self.outbox.put_nowait(None)
            except asyncio.QueueFull:
                pass

    async def close(self) -> None:
        """Stop the tasks and drop the session's state in every stage (best effort)."""
        if self.closed:
            return
        self.closed = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self.link.discard(self._drop_queued())
        self.link.close()
        await self.out.close()

    # ------------------------------------------------------------------ input (called by the RPC reader)
    async def decode_encoded(self, kind: str, item: dict) -> dict | None:
        """Encoded avatar / user audio decoded at the ingress to a PCM item (see :mod:`.edge`); None while the
        decoder has produced nothing yet."""
        return await self.edge.decode(kind, item)

    async def finish_encoded(self) -> list[tuple[str, dict]]:
        """At END: what the ingress decoders still hold, as PCM items."""
        return await self.edge.finish()

    async def put_input(self, kind: str, item: dict) -> None:
        """Queue a validated input (waits while the inbox is full: flow control, or while the avatar audio
        leads real time by more than ``max_lead_s``: pacing)."""
        if self.cut is not None and kind != "control":      # a resumed stream: the input sent again, cut
            for piece in self.cut.cut(kind, item):
                await self._queue_input(kind, piece)
            return
        await self._queue_input(kind, item)

    async def _queue_input(self, kind: str, item: dict) -> None:
        if kind == "avatar_audio":
            first = self.pacer.t_first is None
            wait = self.pacer.wait_s(time.monotonic())
            if first and self.record is not None:
                self.record.audio_clock(time.time())
            if wait > 0:                               # faster than real time: slow the sender down
                await asyncio.sleep(wait)
            self.pacer.received(item.get("seconds", 0.0))
        await self.inbox.put((kind, item, time.monotonic()))
        metrics.QUEUE_DEPTH.labels("input").inc()

    # ------------------------------------------------------------------ feed
    async def _feed(self) -> None:
        while True:
            kind, item, t_arrival = await self.inbox.get()
            metrics.QUEUE_DEPTH.labels("input").dec()
            if kind == "transcript":
                await self.ready.wait()
                self.transcript_sent.append(item)        # (sent again into a new epoch after a fault or a move)
                t0 = self.ledger.epoch_t0                # stage times are relative to the epoch's frame 0
                self.call("memory", "add_transcript", transcript_batch(self.iid, [
                    Segment(max(0.0, item["pts"] - t0), max(0.0, item["end_pts"] - t0), item["speaker"],
                            item["text"])]))
                continue
            if kind == "control":
                if item["kind"] == "flush":
                    await self._push(end=False)
                    continue
                if item["kind"] == "interrupt":     # in-band interrupts are handled by the reader at once
                    continue
                await self._push(end=True)
                return
            if kind == "avatar_audio":
                self.arrivals.add(self.ledger.pushed_s + self.chunker.seconds, item["seconds"], t_arrival)
            self.chunker.add(kind, item)
            if self.chunker.due(self.ledger.epoch_pushed_s):
                await self._push(end=False)

    async def _push(self, end: bool) -> None:
        """Hand the chunk (and ``end``) to the pipeline as one chain."""
        await self.ready.wait()
        items, seconds = self.chunker.take()
        if not items and not end:
            return
        call, iid, epoch = self.call, self.iid, self.epoch
        self.end_pushed = self.end_pushed or end
        pk, info = call("decode", "push", iid, items, end, num_returns=2)
        wins = run_chain(call, pk, last=_BEFORE_BATCH)       # decode's packet up to the windows
        ck = None if end else call(_BEFORE_BATCH, "export_state", iid)   # the LCU memory checkpoint
        offset = self.ledger.frame_offset
        self.ledger.record(items, seconds)
        await self.inflight.put(ChainInFlight(epoch, offset, info, wins, ck, time.perf_counter()))
        metrics.QUEUE_DEPTH.labels("inflight").inc()

    # ------------------------------------------------------------------ generate
    async def _generate(self) -> None:
        while True:
            c: ChainInFlight = await self.inflight.get()
            metrics.QUEUE_DEPTH.labels("inflight").dec()
            if c.epoch != self.epoch:
                continue
            try:
                info = await answered(self.backend, c.info, self.call_deadline_s)
                self.out.add_audio(c.offset, info)
                wins = await answered(self.backend, c.windows, self.call_deadline_s)
                metrics.STAGE_LATENCY.labels(_BEFORE_BATCH).observe(time.perf_counter() - c.t0)
                if c.checkpoint is not None:
                    ck = await answered(self.backend, c.checkpoint, self.call_deadline_s)
                    if c.epoch == self.epoch and ck is not None:   # None: the stage no longer holds it
                        self.resume.checkpoint = ck
                        if self.record is not None:
                            self.record.checkpoint(ck)
                if c.epoch != self.epoch:                   # switched meanwhile: the batcher is the new replica's
                    continue
                for w in wins:
                    out = await self.link.batcher.submit(w, self.link.iid_of(c.epoch))
                    if c.epoch != self.epoch:
                        break
                    r = run_chain(self.call, out, first=_AFTER_BATCH)
                    await self.render_q.put(WindowInRender(c.epoch, c.offset, r, time.perf_counter()))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                self.link.discard([c.windows, c.checkpoint])   # the chain's other results: fetched, not logged
                await self._on_error(c.epoch, e)

    # ------------------------------------------------------------------ egress
    async def _egress(self) -> None:
        while True:
            w: WindowInRender = await self.render_q.get()
            if w.epoch != self.epoch:
                continue
            try:
                packets = await answered(self.backend, w.frames, self.call_deadline_s)
                metrics.STAGE_LATENCY.labels("render").observe(time.perf_counter() - w.t0)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                await self._on_error(w.epoch, e)
                continue
            if w.epoch != self.epoch:
                continue
            for p in packets:
                mw = p.get(schemas.MOTION_WINDOW)
                if mw is not None and mw.num_rows:
                    rf = p.get(schemas.RENDERED_FRAMES)
                    before = self.produced
                    await self.out.emit(schemas.column(mw, "frame") + w.offset, schemas.column(mw, "motion"),
                                        schemas.column(rf, "image") if rf is not None else None)
                    if self.record is not None and self.produced > before:
                        self.record.frames_out(self.produced, self.resume.since(before))
                if p.end:
                    await self.out.finish()
                    self.done.set()
                    return

"""One served session: ingest -> the shared stage pipeline -> egress, with epochs for interrupt and faults.

Three tasks per session, joined by bounded queues (backpressure all the way to
gRPC flow control: when a queue is full its producer waits, the RPC stops
reading, and the client's sends block):

* **feed** — validated client inputs (``inbox``) are grouped into chunks of
  avatar audio (``chunk_frames`` frames) and submitted as one chain
  ``decode.push -> features.process -> memory.process (+ memory.export_state)``;
  at most ``max_inflight`` chains are in flight (``inflight``);
* **generate** — in order, each chain's generation windows go to the
  :class:`~echo_stream.serve.batching.WindowBatcher` (diffusion, batched across
  sessions), then to ``render.process`` (``render_q``);
* **egress** — in order, render results become protobuf messages (motion
  frames, raw or H.264/fMP4 video with the avatar audio) in ``outbox``.

Stage state lives under an *internal* id ``<session id>/<epoch>``; the epoch
changes on **interrupt** (buffered work dropped, output resumes at the playback
position) and on **fault recovery** (a stage actor died: it is restarted by
Ray, the session re-opens under a new epoch with its LCU memory restored from
the last checkpoint and its previous motion from the frames already sent, and
the frames lost with the in-flight work are announced in one GAP event).
Results of an older epoch are dropped, so every frame leaves at most once, in
frame order.

**Replicas**: a stage may run as several actors. The session gets one replica
of each stage when it is created (``route``, from the backend's
:class:`~echo_stream.serve.routing.Router`: session affinity) and addresses
every call with it (:meth:`Session.call`); its windows go to that diffusion
replica's batcher. A restarted replica concerns only the sessions routed to it;
a replica that no longer answers after a fault is replaced in the route by one
that does, and the new epoch opens there from the checkpoint.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .. import config, schemas
from ..geometry import WindowGeometry, default_geometry
from ..errors import EchoStreamError, InputError, one_line, unwrap_remote_error
from ..pipeline import BATCHED, STAGES, run_chain, stage_after, stage_before, transcript_batch
from ..stages.decode import PushedAudio
from ..protos import echo_stream_pb2 as pb
from . import metrics
from .egress import Fmp4Track, Outgoing
from .wire import Limits, SessionSpec

log = logging.getLogger(__name__)

FPS = config.FPS
SPF = config.SAMPLES_PER_FRAME
#: a session's chain: decode -> ... -> _BEFORE_BATCH (windows, fetched here), the batcher (BATCHED), then
#: _AFTER_BATCH -> ... -> the last stage; the LCU memory checkpoint comes from _BEFORE_BATCH
_BEFORE_BATCH, _AFTER_BATCH = stage_before(BATCHED), stage_after(BATCHED)
#: the fMP4 encoder runs here, off the event loop
_ENCODE_POOL = cf.ThreadPoolExecutor(2, thread_name_prefix="fmp4")
#: encoded client audio is decoded here, off the event loop (see Session.decode_encoded)
_DECODE_POOL = cf.ThreadPoolExecutor(2, thread_name_prefix="edge-decode")


def _pcm_item(y: np.ndarray, pts: float) -> dict:
    """A decoded piece of audio as the PCM item the decode stage takes (16 kHz mono float32)."""
    return {"pcm": np.asarray(y, "<f4").tobytes(), "format": "f32le", "rate": config.SAMPLE_RATE, "channels": 1,
            "seconds": len(y) / config.SAMPLE_RATE, "pts": float(pts)}


def warm_up_encoder() -> None:
    """Open, use and close one fMP4 encoder (the first one in a process is the slow one)."""
    from ..media import FragmentedMp4Encoder

    enc = FragmentedMp4Encoder(64, 64, FPS, with_audio=True)
    enc.encode(np.zeros((3, 64, 64, 3), np.uint8), np.zeros(6 * SPF, np.float32))
    enc.close()


def _portrait_key(spec) -> str | None:
    """What identifies a video session's portrait for the render replicas' caches (None: no portrait)."""
    if not spec.wants_video or spec.portrait is None:
        return None
    p = spec.portrait
    if isinstance(p, (bytes, bytearray)):
        import hashlib
        return hashlib.sha1(p).hexdigest()
    return getattr(p, "digest", None) or str(p)


class SessionFailed(Exception):
    """The session cannot continue; ``code`` is the gRPC status for the client, ``message`` its one line."""

    def __init__(self, code, message: str):
        self.code = code
        self.message = one_line(message)
        self.input_error: EchoStreamError | None = None    # the input's own error, when that is what it was
        super().__init__(self.message)


def failure_from(exc: BaseException, during: str, redact: dict[str, str] | None = None) -> SessionFailed:
    """What the client is told about an exception: the ONE mapping every error of a session goes through.

    * :class:`SessionFailed` stays as it is;
    * an :class:`~echo_stream.errors.EchoStreamError` (raised here or inside a stage actor; Ray's wrapper is
      looked through) is the client's input problem: INVALID_ARGUMENT with its one-line message
      (``redact`` replaces server-side strings in it, e.g. a registered avatar's path by its id);
    * anything else is a server fault: INTERNAL with a generic line and an error id; the full exception
      (Ray's, with the remote traceback) goes to the server's log under that id, never to the client.
    """
    if isinstance(exc, SessionFailed):
        return exc
    inner = unwrap_remote_error(exc)
    if isinstance(inner, EchoStreamError):
        text = str(inner)
        for secret, label in (redact or {}).items():
            text = text.replace(secret, label)
        failed = SessionFailed("INVALID_ARGUMENT", text)
        failed.input_error = inner
        return failed
    return SessionFailed("INTERNAL", f"internal server error during {during} (error id {log_error(exc, during)}; "
                                     "the server's log has the details)")


def log_error(exc: BaseException, during: str) -> str:
    """Log ``exc`` with its traceback under a new error id; returns the id (what the client is told)."""
    eid = secrets.token_hex(6)
    log.error("error id %s during %s: %s: %s", eid, during, type(exc).__name__, exc,
              exc_info=(type(exc), exc, exc.__traceback__))
    return eid


@dataclass
class SessionStats:
    frames: int = 0
    gap_frames: int = 0
    interrupts: int = 0
    recoveries: int = 0
    first_frame_latency_s: float | None = None
    latencies: deque = field(default_factory=lambda: deque(maxlen=20000))

    def proto(self) -> pb.SessionStats:
        lat = np.asarray(self.latencies, np.float64)
        return pb.SessionStats(
            frames=self.frames, gap_frames=self.gap_frames, interrupts=self.interrupts, recoveries=self.recoveries,
            first_frame_latency_s=self.first_frame_latency_s or 0.0,
            latency_p50_s=float(np.percentile(lat, 50)) if lat.size else 0.0,
            latency_p99_s=float(np.percentile(lat, 99)) if lat.size else 0.0)


@dataclass
class _Chain:
    """One chain in flight (``inflight``): decode's push through the stage before the batched one."""

    epoch: int
    offset: int               # global frame of the epoch's frame 0
    info: object              # handle: what decode found (first frame, the avatar audio)
    windows: object           # handle: the generation windows
    checkpoint: object        # handle: the LCU memory after this chain (None at the end)
    t0: float

    def handles(self) -> list:
        return [h for h in (self.info, self.windows, self.checkpoint) if h is not None]


@dataclass
class _Rendering:
    """One window being rendered (``render_q``)."""

    epoch: int
    offset: int
    frames: object            # handle: the stages' output packets from the batched stage on
    t0: float

    def handles(self) -> list:
        return [self.frames]


class Session:
    def __init__(self, session_id: str, principal: str, spec: SessionSpec, backend, batcher,
                 limits: Limits = Limits(), chunk_frames: int = 8, max_inflight: int = 4, outbox_size: int = 48,
                 inbox_size: int = 64, recovery_timeout_s: float = 30.0, stride: int = 16,
                 geometry: WindowGeometry | None = None):
        self.id = session_id
        self.principal = principal
        self.spec = spec
        self.backend = backend
        #: the batcher of each diffusion replica (a single batcher: replica 0's); the server's own list, which
        #: grows and shrinks with autoscaling
        self.batchers = batcher if isinstance(batcher, list) else list(batcher) if isinstance(batcher, tuple) \
            else [batcher]
        #: this session's replica of each stage (session affinity; changes only when a replica is lost)
        self.route = backend.assign(session_id, warm={"render": _portrait_key(spec)})
        self._released = False
        self.limits = limits
        self.chunk_s = chunk_frames / FPS
        # a generation window (S new frames) can be cut once the audio of S + L frames (+ the 10 ms the
        # features look ahead) is in: the feed hands audio over exactly then, so no frame waits for a chunk
        self.geometry = geometry = geometry or default_geometry()
        self.stride = geometry.stride(stride, "stride_frames")   # S' new frames per window
        self.overlap = geometry.known(stride)                   # K' = W - S' known frames
        self.recovery_timeout_s = recovery_timeout_s
        self.inbox: asyncio.Queue = asyncio.Queue(inbox_size)
        self.inflight: asyncio.Queue = asyncio.Queue(max_inflight)
        self.render_q: asyncio.Queue = asyncio.Queue(max_inflight)
        self.outbox: asyncio.Queue = asyncio.Queue(outbox_size)
        self.epoch = 0
        self.iid = f"{session_id}/0"
        self.frame_offset = 0          # global frame of the current epoch's frame 0
        self.produced = 0              # next global frame the egress will produce (frames < it are out)
        self.pushed_s = 0.0            # avatar audio handed to the pipeline, seconds on the session timeline
        self.group: list = []
        self.group_s = 0.0
        self.arrivals: deque = deque()  # (start_s, end_s, arrival time) of avatar audio, session timeline
        #: the H.264/fMP4 output (fmp4 video sessions; None otherwise)
        self.fmp4 = Fmp4Track(spec.width, spec.height) if spec.wants_video and spec.codec == "fmp4" else None
        self.recent_motion: deque = deque(maxlen=64)   # (frame, row) produced
        self.ckpt: bytes | None = None
        self.ready = asyncio.Event()
        self.ready.set()
        self.lock = asyncio.Lock()
        self.failure: SessionFailed | None = None
        self.done = asyncio.Event()    # the outbox got its last message
        self.stats = SessionStats()
        self.t_first_audio: float | None = None
        self.received_s = 0.0          # avatar audio received (pacing)
        self._tasks: list[asyncio.Task] = []
        self.closed = False
        self.incarnations: dict = {}
        self.end_pushed = False          # END reached the pipeline (re-sent into a new epoch)
        self.replay_log: deque = deque()  # (start_s, end_s, items) of chains of this epoch not yet all out
        self._recovery_task = None
        #: decoders of encoded avatar / user audio, at the ingress (see :meth:`decode_encoded`)
        self.edge_audio: dict[str, PushedAudio] = {}
        self._portrait_ref = None
        #: server-side strings never shown to the client -> what is shown instead
        self.redact: dict[str, str] = {}
        if isinstance(spec.portrait, str) and spec.avatar_id is not None:
            self.redact[spec.portrait] = f"avatar {spec.avatar_id!r}"

    @property
    def batcher(self):
        """The batcher of the diffusion replica that holds this session's state."""
        return self.batchers[self.route[BATCHED] % len(self.batchers)]

    def call(self, stage: str, method: str, *args, num_returns: int = 1):
        """``backend.call`` on this session's replica of ``stage`` (every call of the session goes through here)."""
        return self.backend.call(stage, method, *args, num_returns=num_returns, replica=self.route[stage])

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        """Prepare every stage for the session (raises SessionFailed for a bad portrait)."""
        await self._open_epoch(restore=False)

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
        self._discard(self._drop_queued())
        for stage in STAGES:
            try:
                self.call(stage, "close_session", self.iid)
            except Exception:  # noqa: BLE001
                pass
        if not self._released:
            self._released = True
            self.backend.release(self.route)
        if self.fmp4 is not None:
            try:  # in the encoder's pool, under its lock: an encode of this session may still be running there
                await asyncio.get_running_loop().run_in_executor(_ENCODE_POOL, self.fmp4.close)
            except Exception:  # noqa: BLE001
                pass

    async def _open_epoch(self, restore: bool) -> None:
        b, iid, call = self.backend, self.iid, self.call
        hs = [call("memory", "set_stride", iid, self.stride),       # before import_state: same actor, in order
              call("decode", "open_stream", iid), call("diffusion", "set_seed", iid, self.spec.seed)]
        if restore:
            if self.ckpt is not None:
                hs.append(call("memory", "import_state", iid, self.ckpt))
            prev = [row for f, row in self.recent_motion if f < self.produced][-self.overlap:]
            if len(prev) == self.overlap:
                hs.append(call("diffusion", "import_state", iid, {"prev": np.stack(prev)}))
        if self.spec.wants_video:
            if self._portrait_ref is None:         # stored once (an edge-decoded image is up to 12 MB), not per epoch
                self._portrait_ref = b.put(self.spec.portrait)
            hs.append(call("render", "open_session", iid, self._portrait_ref, (self.spec.width, self.spec.height)))
        for h in hs:
            try:
                await b.get(h)
            except Exception as e:
                if b.is_fault(e):
                    raise
                raise self.failure_from(e, "session open") from None
        # which process of each stage holds this epoch's state (asked after the opens: same actor order)
        self.incarnations = await b.incarnations(route=self.route)

    # ------------------------------------------------------------------ input (called by the RPC reader)
    async def decode_encoded(self, kind: str, item: dict) -> dict | None:
        """Encoded avatar / user audio (mp3, aac, opus, flac ... pieces) decoded here, at the ingress, to 16 kHz
        PCM: its duration is then known before it is queued, so it is paced by ``max_lead`` exactly like PCM,
        it can be replayed after a stage fault, and bytes that are not what their codec says fail this session
        (INVALID_ARGUMENT) before a shared stage sees them. Decoding runs in a small thread pool, off the
        event loop; the pacing bounds how much of it a session can ask for. Returns the PCM item, or None
        while the decoder has produced nothing yet."""
        dec = self.edge_audio.get(kind)
        if dec is None:
            dec = self.edge_audio[kind] = PushedAudio(kind)
        y = await self._edge_decode(kind, dec.convert, item)
        return _pcm_item(y, item.get("pts", 0.0)) if len(y) else None

    async def _edge_decode(self, kind: str, fn, *args):
        """``fn(*args)`` of an ingress decoder in the decode pool; what FFmpeg raises is the input's problem."""
        import av

        try:
            return await asyncio.get_running_loop().run_in_executor(_DECODE_POOL, fn, *args)
        except EchoStreamError:
            raise
        except av.FFmpegError as e:
            raise InputError(f"{kind}.encoded", f"not decodable ({type(e).__name__})") from None

    async def finish_encoded(self) -> list[tuple[str, dict]]:
        """At END: what the ingress decoders still hold, as PCM items (raises InputError for a track whose
        bytes decoded to no audio at all)."""
        out = []
        for kind, dec in list(self.edge_audio.items()):
            y = await self._edge_decode(kind, dec.finish)
            if len(y):
                out.append((kind, _pcm_item(y, 0.0)))
        self.edge_audio = {}
        return out

    async def put_input(self, kind: str, item: dict) -> None:
        """Queue a validated input (waits while the inbox is full: flow control)."""
        if kind == "avatar_audio":
            now = time.monotonic()
            if self.t_first_audio is None:
                self.t_first_audio = now
            lead = self.received_s - (now - self.t_first_audio)
            if lead > self.limits.max_lead_s:           # faster than real time: slow the sender down
                await asyncio.sleep(lead - self.limits.max_lead_s)
            self.received_s += item.get("seconds", 0.0)
        await self.inbox.put((kind, item, time.monotonic()))
        metrics.QUEUE_DEPTH.labels("input").inc()

    # ------------------------------------------------------------------ feed
    async def _feed(self) -> None:
        while True:
            kind, item, t_arrival = await self.inbox.get()
            metrics.QUEUE_DEPTH.labels("input").dec()
            if kind == "transcript":
                await self.ready.wait()
                t0 = self._epoch_t0()                # stage times are relative to the epoch's frame 0
                self.call("memory", "add_transcript", transcript_batch(self.iid, [
                    _Segment(max(0.0, item["pts"] - t0), max(0.0, item["end_pts"] - t0), item["speaker"],
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
            self.group.append((kind, item))
            if kind == "avatar_audio":
                start = self.pushed_s + self.group_s
                sec = item["seconds"]
                self.arrivals.append((start, start + sec, t_arrival))
                self.group_s += sec
            local = self.pushed_s - self.frame_offset / FPS + self.group_s   # epoch-local audio seconds
            next_window_ready = self.geometry.ready_s(self.stride, local)
            crossed = self.pushed_s - self.frame_offset / FPS < next_window_ready <= local
            if crossed or self.group_s >= self.chunk_s - 1e-9 or len(self.group) >= 256:
                await self._push(end=False)

    def _epoch_t0(self) -> float:
        """Session-timeline seconds of the current epoch's frame 0 (transcript times are epoch-relative)."""
        return self.frame_offset / FPS

    async def _push(self, end: bool) -> None:
        await self.ready.wait()
        items, sec = self.group, self.group_s
        self.group, self.group_s = [], 0.0
        if not items and not end:
            return
        call, iid, epoch = self.call, self.iid, self.epoch
        self.end_pushed = self.end_pushed or end
        pk, info = call("decode", "push", iid, items, end, num_returns=2)
        wins = run_chain(call, pk, last=_BEFORE_BATCH)       # decode's packet up to the windows
        ck = None if end else call(_BEFORE_BATCH, "export_state", iid)   # the LCU memory checkpoint
        self.replay_log.append((self.pushed_s, self.pushed_s + sec, items))
        self.pushed_s += sec
        await self.inflight.put(_Chain(epoch, self.frame_offset, info, wins, ck, time.perf_counter()))
        metrics.QUEUE_DEPTH.labels("inflight").inc()

    # ------------------------------------------------------------------ generate
    async def _generate(self) -> None:
        while True:
            c = await self.inflight.get()
            epoch, offset, info_h, wins_h, ck_h, t0 = c.epoch, c.offset, c.info, c.windows, c.checkpoint, c.t0
            metrics.QUEUE_DEPTH.labels("inflight").dec()
            if epoch != self.epoch:
                continue
            try:
                info = await self.backend.get(info_h)
                if self.fmp4 is not None:   # muxed into the video
                    self.fmp4.audio.add(offset + info["first_frame"], info["avatar_audio"])
                wins = await self.backend.get(wins_h)
                metrics.STAGE_LATENCY.labels(_BEFORE_BATCH).observe(time.perf_counter() - t0)
                if ck_h is not None:
                    ck = await self.backend.get(ck_h)
                    if epoch == self.epoch and ck is not None:   # None: the stage no longer holds it
                        self.ckpt = ck
                for w in wins:
                    out = await self.batcher.submit(w)
                    if epoch != self.epoch:
                        break
                    r = run_chain(self.call, out, first=_AFTER_BATCH)
                    await self.render_q.put(_Rendering(epoch, offset, r, time.perf_counter()))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                self._discard([wins_h, ck_h])     # the chain's other results: fetched, so Ray does not log them
                await self._on_error(epoch, e)

    # ------------------------------------------------------------------ egress
    async def _egress(self) -> None:
        while True:
            rq = await self.render_q.get()
            epoch, offset, r_h, t0 = rq.epoch, rq.offset, rq.frames, rq.t0
            if epoch != self.epoch:
                continue
            try:
                packets = await self.backend.get(r_h)
                metrics.STAGE_LATENCY.labels("render").observe(time.perf_counter() - t0)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                await self._on_error(epoch, e)
                continue
            if epoch != self.epoch:
                continue
            for p in packets:
                mw = p.get(schemas.MOTION_WINDOW)
                if mw is not None and mw.num_rows:
                    rf = p.get(schemas.RENDERED_FRAMES)
                    await self._emit(schemas.column(mw, "frame") + offset, schemas.column(mw, "motion"),
                                     schemas.column(rf, "image") if rf is not None else None)
                if p.end:
                    await self._finish()
                    return

    def _latency_origin(self, frame: int) -> float | None:
        t = frame / FPS
        while self.arrivals and self.arrivals[0][1] <= t + 1e-9 and len(self.arrivals) > 1:
            self.arrivals.popleft()
        if self.arrivals and self.arrivals[0][0] <= t + 1e-9:
            return self.arrivals[0][2]
        return None

    async def _emit(self, frames: np.ndarray, motion: np.ndarray, images: np.ndarray | None) -> None:
        keep = frames >= self.produced           # exactly once: never a frame twice, never out of order
        frames, motion = frames[keep], motion[keep]
        images = images[keep] if images is not None else None
        if not len(frames):
            return
        origins = []
        for f, row in zip(frames.tolist(), motion):
            self.recent_motion.append((f, row))
            origin = self._latency_origin(f)
            origins.append(origin)
            if self.spec.wants_motion:
                await self.outbox.put(Outgoing(pb.ServerMessage(pts=f / FPS, motion=pb.MotionFrame(
                    frame=f, values=row.tolist())), f + 1, [origin], "motion"))
            if self.spec.wants_video and self.spec.codec == "raw" and images is not None:
                i = f - int(frames[0])
                counted = not self.spec.wants_motion          # else the motion message counted the frame
                await self.outbox.put(Outgoing(pb.ServerMessage(pts=f / FPS, video=pb.VideoChunk(
                    data=images[i].tobytes(), first_frame=f, frames=1)),
                    f + 1 if counted else None, [origin] if counted else [], "video"))
        self.produced = int(frames[-1]) + 1
        while self.replay_log and self.replay_log[0][1] <= self.produced / FPS + 1e-9:
            self.replay_log.popleft()
        if self.fmp4 is not None and images is not None:
            audio = self.fmp4.audio_for(int(frames[0]), int(frames[-1]) + 1)
            data = await asyncio.get_running_loop().run_in_executor(_ENCODE_POOL, self.fmp4.encode, images, audio)
            covered = self.fmp4.encoded(frames.tolist(), origins)
            if data:
                await self.outbox.put(self.fmp4.chunk(data, covered, self.produced, not self.spec.wants_motion))

    async def _finish(self) -> None:
        if self.fmp4 is not None and self.fmp4.started:
            data = await asyncio.get_running_loop().run_in_executor(_ENCODE_POOL, self.fmp4.close)
            await self.outbox.put(self.fmp4.chunk(data, self.fmp4.all_encoded(), self.produced,
                                                  not self.spec.wants_motion))
        await self.outbox.put(Outgoing(pb.ServerMessage(pts=self.produced / FPS, event=pb.Event(
            kind=pb.Event.ENDED, message="end of session", first_frame=self.produced,
            stats=self.stats.proto()))))
        await self.outbox.put(None)
        self.done.set()

    # ------------------------------------------------------------------ errors, faults, interrupt
    async def _on_error(self, epoch: int, e: BaseException) -> None:
        if epoch != self.epoch:
            return                                   # work of a dropped epoch: its failure does not matter
        if self.backend.is_fault(e):
            self._recovery_task = asyncio.get_running_loop().create_task(self._recover_soon(epoch, e))
            return
        raise self.failure_from(e, "the pipeline")

    def _discard(self, handles) -> None:
        """Fetch results nobody will use, quietly, in the background: Ray logs every failed result that is never
        fetched ("Unhandled error", with its traceback), and the chains of a session that failed on its input
        (or was interrupted) would otherwise fill the server's log with the client's mistake."""
        handles = [h for h in handles if h is not None]
        if not handles:
            return

        async def fetch():
            for h in handles:
                try:
                    await asyncio.wait_for(self.backend.get(h), 120)
                except (Exception, asyncio.CancelledError):  # noqa: BLE001 - consuming the error is the point
                    pass                                     # (a cancelled handle raises CancelledError)
        asyncio.get_running_loop().create_task(fetch(), name=f"discard-{self.id[:8]}")

    def _drop_queued(self) -> list:
        """Empty the in-flight queues (their work belongs to the old epoch); returns their handles."""
        handles = []
        for q in (self.inflight, self.render_q):
            while not q.empty():
                item = q.get_nowait()
                handles += item.handles()
                if q is self.inflight:
                    metrics.QUEUE_DEPTH.labels("inflight").dec()
        return handles

    def _new_epoch(self) -> str:
        old = self.iid
        self.epoch += 1
        self.iid = f"{self.id}/{self.epoch}"
        self.ready.clear()
        for stage in STAGES:                         # after the old epoch's queued calls (per-actor order)
            try:
                self.call(stage, "close_session", old)
            except Exception:  # noqa: BLE001
                pass
        return old

    def _replay_items(self) -> tuple[int, list, float] | None:
        """Input to re-push after a fault so that no frame is lost: ``(first frame, items, seconds)``.

        The chains not yet fully turned into frames are in ``replay_log``; the replay starts at the first
        frame boundary of the oldest one (frames before ``produced`` come out again and are dropped by the
        egress). None when that is impossible. (Encoded audio was decoded at the ingress: every avatar audio
        item here is PCM, which can be cut at a frame.)
        """
        p_s = self.produced / FPS
        chains = [c for c in self.replay_log if c[1] > p_s + 1e-9]
        if not chains or chains[0][0] > p_s + 1e-9:
            return None
        start = chains[0][0]
        first = math.ceil(start * FPS - 1e-6)
        cut = first / FPS - start                      # seconds of avatar audio before the frame boundary
        items, seconds = [], 0.0
        for _, _, chain_items in chains:
            for kind, it in chain_items:
                if kind == "avatar_audio" and cut > 1e-9:
                    width = (2 if it["format"] == "s16le" else 4) * it["channels"]
                    n = len(it["pcm"]) // width
                    k = min(n, int(round(cut * it["rate"])))
                    cut -= k / it["rate"]
                    if k >= n:
                        continue
                    it = dict(it, pcm=it["pcm"][k * width:], seconds=(n - k) / it["rate"])
                if kind == "avatar_audio":
                    seconds += it.get("seconds", 0.0)
                items.append((kind, it))
        return first, items, seconds

    async def _recover(self, epoch: int, e: BaseException, still_needed=None) -> None:
        async with self.lock:
            if epoch != self.epoch or (still_needed is not None and not still_needed()):
                return
            log.warning("session %s: stage failure (%s: %s); recovering", self.id[:8], type(e).__name__,
                        str(e).splitlines()[0][:120] if str(e) else "")
            t = time.perf_counter()
            self._new_epoch()
            self._discard(self._drop_queued())
            self.stats.recoveries += 1
            metrics.RECOVERIES.inc()
            replay = self._replay_items()
            self.replay_log.clear()
            if self.fmp4 is not None:
                self.fmp4.audio.clear()
            stalled_at = self.produced
            if replay is not None:
                resume, items, seconds = replay
                gap = 0
            else:
                resume = max(self.produced, math.ceil(self.pushed_s * FPS - 1e-6))
                items, seconds = [], 0.0
                gap = resume - self.produced
                self.arrivals = deque(a for a in self.arrivals if a[1] > self.pushed_s)
            self.frame_offset = resume
            self.pushed_s = resume / FPS
            before = dict(self.route)
            try:
                # the session's replicas; one that does not answer (lost with its node) is replaced by one that
                # does: the new epoch opens there from the checkpoint
                await self.backend.wait_ready(self.recovery_timeout_s, route=self.route)
                await self._open_epoch(restore=True)
            except SessionFailed:
                raise
            except Exception as e2:  # noqa: BLE001
                raise SessionFailed("UNAVAILABLE", "a pipeline stage failed and did not recover within "
                                                   f"{self.recovery_timeout_s:g} s (error id "
                                                   f"{log_error(e2, 'recovery')}): retry the session") from None
            took = time.perf_counter() - t
            moved = [f"{s} replica {before[s]} -> {i}" for s, i in self.route.items() if before[s] != i]
            if replay is not None:
                what = "no frame was lost: the input in flight was replayed"
            elif gap:
                self.stats.gap_frames += gap
                metrics.GAPS.inc(gap)
                self.produced = resume
                what = (f"frames {stalled_at}..{resume - 1} are lost (their input could not be replayed); "
                        "output continues")
            else:
                what = "no input was in flight: no frame lost"
            await self.outbox.put(Outgoing(pb.ServerMessage(pts=stalled_at / FPS, event=pb.Event(
                kind=pb.Event.GAP, first_frame=stalled_at, frames=gap,
                message=(f"a pipeline stage replica was lost; the session continued on another one "
                         f"({', '.join(moved)})" if moved else "a pipeline stage failed and was restarted")
                + f"; output stalled {took:.2f} s at frame {stalled_at}; {what}")), resume if gap else None))
            self.group = items + self.group
            self.group_s += seconds
            self.ready.set()
            if self.group or self.end_pushed:        # replayed input (+ the end the old epoch took with it)
                await self._push(end=self.end_pushed)
            log.warning("session %s: recovered in %.2f s (epoch %d, %d frames replayed from %d, %d lost)",
                        self.id[:8], took, self.epoch, max(0, stalled_at - resume) if gap == 0 else 0, resume, gap)

    async def _recover_soon(self, epoch: int, e: BaseException) -> None:
        """Recover in its own task: the caller (generate / egress) keeps draining its queue meanwhile."""
        try:
            await self._recover(epoch, e)
        except Exception as f:  # noqa: BLE001
            self._fail(self.failure_from(f, "recovery"))

    async def stage_restarted(self, stage: str, incarnation: str, replica: int = 0) -> None:
        """Replica ``replica`` of a stage was restarted (its state of this session is gone): recover under a new
        epoch, unless the session already re-opened on the new process (a failed call recovered it first) or
        no longer uses that replica (it moved to another one)."""
        from .backend import StageFault

        def still_needed() -> bool:
            return self.route[stage] == replica and self.incarnations.get((stage, replica)) != incarnation

        if not self.done.is_set() and self.route[stage] == replica:
            try:   # checked under the session's lock: a recovery in progress may already have re-opened there
                await self._recover(self.epoch, StageFault(f"stage {stage} replica {replica} restarted"),
                                    still_needed=still_needed)
            except SessionFailed as e:
                self._fail(e)

    async def interrupt(self) -> int:
        """Drop every stage's buffered work of the session; returns the playback position (frames out)."""
        async with self.lock:
            self._new_epoch()
            dropped = self._drop_queued()
            self.backend.cancel(dropped)
            self._discard(dropped)
            kept = []
            while not self.inbox.empty():             # buffered media are dropped; transcript / end stay
                kind, item, t = self.inbox.get_nowait()
                metrics.QUEUE_DEPTH.labels("input").dec()
                if kind in ("transcript", "control"):
                    kept.append((kind, item, t))
            for k in kept:
                self.inbox.put_nowait(k)
                metrics.QUEUE_DEPTH.labels("input").inc()
            self.group, self.group_s = [], 0.0
            self.replay_log.clear()
            self.edge_audio = {}                      # a new reply is a new encoded stream
            playback = self.produced
            self.frame_offset = playback
            self.pushed_s = playback / FPS
            self.arrivals.clear()
            if self.fmp4 is not None:
                self.fmp4.audio.clear()
            if self.t_first_audio is not None:
                self.received_s = time.monotonic() - self.t_first_audio
            self.stats.interrupts += 1
            metrics.INTERRUPTS.inc()
            try:
                await self._open_epoch(restore=True)
            except Exception as e:  # noqa: BLE001
                if self.backend.is_fault(e):
                    raise SessionFailed("UNAVAILABLE", "a pipeline stage failed during the interrupt (error id "
                                                       f"{log_error(e, 'interrupt')}): retry the session") from None
                raise self.failure_from(e, "interrupt") from None
            self.ready.set()
            if self.end_pushed:
                await self._push(end=True)
            await self.outbox.put(Outgoing(pb.ServerMessage(pts=playback / FPS, event=pb.Event(
                kind=pb.Event.INTERRUPTED, first_frame=playback,
                message=f"interrupted at frame {playback} ({playback / FPS:.2f} s)"))))
            return playback


@dataclass
class _Segment:
    start: float
    end: float
    speaker: str
    text: str

"""A live avatar: speech in as it is synthesised, the user's camera and microphone in, frames out in real time.

This is the one piece the browser demo (``echo-stream web``) and the voice-agent adapters
(:mod:`echo_stream.integrations.pipecat`, :mod:`echo_stream.integrations.livekit`) share. It wraps one
``echo-stream serve`` session (gRPC, raw frames) and keeps the avatar's timeline running on the wall clock:

* **the avatar's audio clock never stops.** Every tick (two frames, 80 ms) the pump sends the next
  frames' worth of avatar audio: queued speech (:meth:`LiveAvatar.push_speech`) or, when there is none,
  silence, during which the avatar *listens* to the user media sent beside it;
* **frames come back paired with their audio.** Frame ``f`` covers the avatar audio the pump sent for
  slot ``f``; each :class:`AvatarFrame` carries that audio, so a player that outputs the frame and its
  audio together keeps them in sync by construction;
* **interrupt** drops the queued speech here and every buffered window on the server (``Control
  INTERRUPT`` in-band); the server answers with the playback position, from which new slots are counted;
* **the user's media** (:meth:`push_user_audio`, :meth:`push_user_frame`) are stamped on the same session
  clock as they arrive and sent with the next tick.

Usage::

    async with LiveAvatar("localhost:50051", portrait=jpeg_bytes, sample_rate=24000) as avatar:
        avatar.push_speech(tts_pcm)              # float32 or int16, sample_rate Hz, mono
        avatar.end_speech()                      # the utterance is complete (AvatarFrame.utterance_end)
        async for frame in avatar.frames():      # real time, paired with its audio
            show(frame.rgb); play(frame.audio)
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import config
from .errors import InputError

log = logging.getLogger(__name__)

FPS = config.FPS
#: longest side of the user's camera frames sent to the server (the face tracker works at this scale)
USER_FRAME_SIDE = 320
#: most frames of audio in one message to the server (0.4 s: 77 kB of float32 at 48 kHz, within its limits)
MESSAGE_FRAMES = 10


@dataclass
class AvatarFrame:
    """One frame of the avatar with the audio it is shown with."""

    index: int                       # frame number on the session timeline (25 fps)
    audio: np.ndarray                # float32, ``sample_rate / 25`` samples: the avatar audio of this frame
    rgb: np.ndarray | None = None    # (H, W, 3) uint8 (video output); None for a gap frame or motion-only
    motion: np.ndarray | None = None  # (58,) ARKit blendshapes + head pose (motion output)
    speech: bool = False             # the audio holds queued speech (not the pump's filler silence)
    utterance: int | None = None     # id of the utterance whose audio this frame plays (push_speech)
    utterance_end: bool = False      # the last frame of that utterance (end_speech was called)
    gap: bool = False                # the server announced this frame lost (a stage fault): no picture
    sent_at: float = 0.0             # time.time() when its audio left for the server
    latency_s: float = 0.0           # from sent_at to the frame's arrival here


@dataclass
class _Slot:
    audio: np.ndarray
    speech: bool
    utterance: int | None
    utterance_end: bool
    sent_at: float


@dataclass
class _Segment:
    """Slots sent between two interrupts; ``base`` is the frame number of the first one (None: not known yet)."""

    base: int | None
    slots: deque = field(default_factory=deque)


@dataclass
class LiveStats:
    frames: int = 0
    speech_frames: int = 0
    gap_frames: int = 0
    interrupts: int = 0
    user_frames_sent: int = 0
    user_audio_s: float = 0.0
    latencies: deque = field(default_factory=lambda: deque(maxlen=250))  # the last 10 s

    def latency(self, q: float = 0.5) -> float:
        return float(np.quantile(np.asarray(self.latencies), q)) if self.latencies else float("nan")


def as_float_pcm(samples) -> np.ndarray:
    """Mono float32 in [-1, 1] from float or int16 samples (numpy array, bytes of int16, or a list)."""
    if isinstance(samples, (bytes, bytearray, memoryview)):
        return np.frombuffer(samples, "<i2").astype(np.float32) / 32768.0
    x = np.asarray(samples)
    if x.dtype == np.int16:
        return x.reshape(-1).astype(np.float32) / 32768.0
    x = x.astype(np.float32).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise InputError("speech", "audio samples must be finite")
    return x


class _Resampler:
    """Streaming mono resampler (PyAV's, stateful across chunks) from ``rate`` to ``to``."""

    def __init__(self, rate: int, to: int):
        import av

        self._av = av
        self.rate, self.to = rate, to
        self._r = av.AudioResampler(format="flt", layout="mono", rate=to)
        self._pts = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.rate == self.to:
            return x
        frame = self._av.AudioFrame.from_ndarray(x.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._pts
        self._pts += len(x)
        out = [f.to_ndarray().reshape(-1) for f in self._r.resample(frame)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def fit_user_frame(rgb: np.ndarray, side: int = USER_FRAME_SIDE) -> np.ndarray:
    """The user's camera frame reduced (by whole-pixel striding) so that its longer side is at most ``side``."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InputError("user frame", f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    k = max(1, -(-max(rgb.shape[:2]) // side))
    out = rgb[::k, ::k]
    h, w = out.shape[:2]
    return np.ascontiguousarray(out[: h - h % 2, : w - w % 2])


class LiveAvatar:
    """One live avatar session on an ``echo-stream serve`` server (see the module docstring).

    ``target``: ``host:port`` of the server, or an open :class:`~echo_stream.serve.client.AvatarClient`.
    ``output``: ``video`` (frames as RGB), ``motion`` (58 blendshape/pose values per frame) or ``both``.
    ``sample_rate``: the rate of the speech this avatar is given and of the audio its frames carry.
    """

    def __init__(self, target, *, token: str | None = None, portrait: bytes | None = None,
                 avatar_id: str | None = None, output: str = "video", size: int = 256, seed: int | None = None,
                 stride: int | None = None, sample_rate: int = config.SAMPLE_RATE, tick_frames: int = 2,
                 lead_frames: int = 1, max_queued_frames: int = 250):
        if output not in ("video", "motion", "both"):
            raise InputError("output", f"expected video, motion or both, got {output!r}")
        if sample_rate % FPS:
            raise InputError("sample_rate", f"must be a multiple of {FPS} Hz (one frame = sample_rate / {FPS})")
        self.target, self.token = target, token
        self.portrait, self.avatar_id = portrait, avatar_id
        self.output, self.size, self.seed, self.stride = output, size, seed, stride
        self.sample_rate = sample_rate
        self.spf = sample_rate // FPS
        self.tick_frames, self.lead_frames = tick_frames, lead_frames
        self.stats = LiveStats()
        self.session_id = ""
        self._client = None
        self._own_client = False
        self._session = None
        self._speech: deque = deque()             # (samples, utterance id) pieces queued for the pump
        self._speech_pending = np.zeros(0, np.float32)
        self._pending_utt: int | None = None
        self._utterance = 0                       # id of the current utterance; 0: none open
        self._utterance_open = False
        self._utterance_ids = 0
        self._user_audio: list = []               # (pts, samples at 16 kHz)
        self._user_frames: deque = deque(maxlen=2 * tick_frames)   # camera frames not yet sent: (pts, rgb)
        self._user_audio_end = 0.0                # session time where the user audio sent so far ends
        self._user_resampler = None
        self._segments: deque[_Segment] = deque([_Segment(0)])
        self._pending: dict[int, dict] = {}       # frame -> parts received so far (output "both")
        self._out: asyncio.Queue = asyncio.Queue(max_queued_frames)
        self._t0: float | None = None             # monotonic time of the first avatar audio sent
        self._slots_sent = 0
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self._write_lock = asyncio.Lock()
        self.error: BaseException | None = None
        self.ended = asyncio.Event()

    # ------------------------------------------------------------------ life cycle
    async def __aenter__(self) -> "LiveAvatar":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> "LiveAvatar":
        """Open the session on the server (raises ``grpc.aio.AioRpcError`` as the server answers) and start the clock."""
        from .serve.client import AvatarClient

        if isinstance(self.target, AvatarClient):
            self._client = self.target
        else:
            self._client = AvatarClient(self.target, token=self.token)
            self._own_client = True
        try:
            self._session = await self._client.open(portrait=self.portrait, avatar_id=self.avatar_id,
                                                    output=self.output, codec="raw", size=self.size,
                                                    seed=self.seed, stride=self.stride)
        except BaseException:
            if self._own_client:
                await self._client.close()
            raise
        self.session_id = self._session.session_id
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._pump(), name="live-pump"),
                       loop.create_task(self._read(), name="live-read")]
        return self

    async def close(self, timeout: float = 10.0) -> None:
        """End the session: no more audio, the frames already generated are delivered, then the stream ends."""
        if self._session is None:
            return
        if not self._closing:
            self._closing = True
            pump = self._tasks[0] if self._tasks else None
            if pump is not None:
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
            try:
                async with self._write_lock:
                    await self._session.end()
            except Exception as e:  # noqa: BLE001 - the stream may already be over
                log.debug("live session %s: end: %s", self.session_id[:8], e)
        try:
            await asyncio.wait_for(self.ended.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._own_client:
            await self._client.close()
            self._own_client = False

    # ------------------------------------------------------------------ inputs
    def push_speech(self, samples, sample_rate: int | None = None) -> int:
        """Queue avatar speech (mono, float or int16) to be spoken next; returns the utterance id it joins.

        ``sample_rate`` must be this avatar's ``sample_rate`` (given at construction).
        """
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise InputError("speech", f"sample rate {sample_rate} Hz: this avatar takes {self.sample_rate} Hz "
                                       "(LiveAvatar(sample_rate=...))")
        if not self._utterance_open:
            self._utterance_ids += 1
            self._utterance = self._utterance_ids
            self._utterance_open = True
        x = as_float_pcm(samples)
        if len(x):
            self._speech.append((x, self._utterance))
        return self._utterance

    def end_speech(self) -> int | None:
        """The current utterance is complete: its last frame carries ``utterance_end``. Returns its id."""
        if not self._utterance_open:
            return None
        self._utterance_open = False
        self._speech.append((np.zeros(0, np.float32), self._utterance))   # marks the end in the queue
        return self._utterance

    @property
    def speaking(self) -> bool:
        """Speech is queued or being sent."""
        return bool(self._speech) or len(self._speech_pending) > 0

    def queued_speech_s(self) -> float:
        return (sum(len(x) for x, _ in self._speech) + len(self._speech_pending)) / self.sample_rate

    def clock(self) -> float:
        """Seconds on the session clock (0 before the first avatar audio)."""
        return 0.0 if self._t0 is None else time.monotonic() - self._t0

    def push_user_audio(self, samples, sample_rate: int) -> None:
        """The user's microphone, as captured (any rate; stamped with the session clock now)."""
        if self._t0 is None:
            return
        x = as_float_pcm(samples)
        if self._user_resampler is None or self._user_resampler.rate != sample_rate:
            self._user_resampler = _Resampler(sample_rate, config.SAMPLE_RATE)
        y = self._user_resampler(x)
        if len(y):   # stamped where it was captured, never before the end of the audio already sent
            pts = max(self.clock() - len(y) / config.SAMPLE_RATE, self._user_audio_end)
            self._user_audio_end = pts + len(y) / config.SAMPLE_RATE
            self._user_audio.append((pts, y))

    def push_user_frame(self, rgb: np.ndarray) -> None:
        """The user's camera frame (H, W, 3) uint8 RGB, as captured; sent with the next tick (a camera faster than
        the ticks keeps only its newest ``2 * tick_frames`` frames)."""
        if self._t0 is None:
            return
        pts = self.clock()
        if self._user_frames and pts <= self._user_frames[-1][0]:
            return
        self._user_frames.append((pts, fit_user_frame(rgb)))

    async def interrupt(self) -> None:
        """Stop speaking now: queued speech is dropped here and every buffered window on the server."""
        self._speech.clear()
        self._speech_pending = np.zeros(0, np.float32)
        self._utterance_open = False
        queued = []                                # frames received but not yet taken: their speech is void
        while not self._out.empty():               # (muted, kept: the picture goes on without a jump)
            queued.append(self._out.get_nowait())
        for fr in queued:
            if fr is not None and fr.speech:
                fr.audio, fr.speech = np.zeros_like(fr.audio), False
            self._out.put_nowait(fr)
        self._segments.append(_Segment(None))
        self.stats.interrupts += 1
        async with self._write_lock:
            await self._session.interrupt()

    # ------------------------------------------------------------------ outputs
    async def frames(self):
        """Frames as they arrive, each with its audio, until the session ends (re-raises the session's error)."""
        while True:
            item = await self._out.get()
            if item is None:
                if self.error is not None:
                    raise self.error
                return
            yield item

    # ------------------------------------------------------------------ internals
    def _next_audio(self, n: int) -> list[_Slot]:
        """``n`` frames of avatar audio: queued speech first, then silence (an utterance's end ends its frame)."""
        slots = []
        now = time.time()
        for _ in range(n):
            buf = np.zeros(self.spf, np.float32)
            filled = 0
            utt, end = None, False
            while filled < self.spf:
                if not len(self._speech_pending):
                    if not self._speech:
                        break
                    x, u = self._speech.popleft()
                    if not len(x):                  # end-of-utterance marker: the rest of the frame is silent
                        end, utt = True, (u if utt is None else utt)
                        break
                    self._speech_pending, self._pending_utt = x, u
                take = min(self.spf - filled, len(self._speech_pending))
                buf[filled:filled + take] = self._speech_pending[:take]
                self._speech_pending = self._speech_pending[take:]
                filled += take
                utt = self._pending_utt
            if not end and utt is not None and not len(self._speech_pending) and self._speech \
                    and not len(self._speech[0][0]) and self._speech[0][1] == utt:
                self._speech.popleft()              # the utterance ends exactly at this frame's end
                end = True
            slots.append(_Slot(buf, filled > 0, utt, end, now))
        return slots

    async def _pump(self) -> None:
        s = self._session
        try:
            self._t0 = time.monotonic()
            while True:
                due = int(self.clock() * FPS) + self.lead_frames + self.tick_frames
                n = due - self._slots_sent
                if n > 0:
                    slots = self._next_audio(n)
                    self._segments[-1].slots.extend(slots)
                    user_audio, self._user_audio = self._user_audio, []
                    frames = list(self._user_frames)
                    self._user_frames.clear()
                    async with self._write_lock:
                        step = MESSAGE_FRAMES * config.SAMPLE_RATE // FPS
                        for pts, y in user_audio:         # a long push goes as several messages
                            for k in range(0, len(y), step):
                                await s.send_user_audio(y[k:k + step], pts + k / config.SAMPLE_RATE)
                            self.stats.user_audio_s += len(y) / config.SAMPLE_RATE
                        for pts, rgb in frames:
                            await s.send_user_frame(rgb, pts)
                            self.stats.user_frames_sent += 1
                        # after a stall of the event loop the catch-up is many frames: in messages the
                        # server's per-message limits (1 s, 256 KiB) take, whatever the rate
                        for k in range(0, n, MESSAGE_FRAMES):
                            await s.send_avatar_audio(np.concatenate([x.audio for x in slots[k:k + MESSAGE_FRAMES]]),
                                                      sample_rate=self.sample_rate)
                    self._slots_sent += n
                wake = self._t0 + (self._slots_sent - self.lead_frames) / FPS
                await asyncio.sleep(max(0.005, wake - time.monotonic()))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the read side reports the server's status
            log.debug("live session %s: pump stopped: %s", self.session_id[:8], e)

    def _take_slot(self, f: int) -> tuple[_Slot | None, bool]:
        """The slot of frame ``f`` (slots before it are dropped: frames come in order) and whether it is void
        (sent before an interrupt whose answer has not come yet: its speech is not to be heard)."""
        seg = self._segments[0]
        if seg.base is None or f < seg.base:
            return None, False
        while seg.slots and seg.base < f:
            seg.slots.popleft()
            seg.base += 1
        if not seg.slots or seg.base != f:
            return None, False
        seg.base += 1
        return seg.slots.popleft(), len(self._segments) > 1

    def _emit(self, f: int, rgb=None, motion=None, gap: bool = False) -> None:
        slot, void = self._take_slot(f)
        if slot is None:
            return
        now = time.time()
        speech = slot.speech and not void
        audio = slot.audio if speech or not slot.speech else np.zeros_like(slot.audio)
        fr = AvatarFrame(index=f, audio=audio, rgb=rgb, motion=motion, speech=speech,
                         utterance=slot.utterance, utterance_end=slot.utterance_end, gap=gap,
                         sent_at=slot.sent_at, latency_s=now - slot.sent_at)
        self.stats.frames += 1
        self.stats.speech_frames += speech
        self.stats.gap_frames += gap
        if not gap:
            self.stats.latencies.append(fr.latency_s)
        if self._out.full():                       # nobody is reading: the oldest frame goes
            self._out.get_nowait()
        self._out.put_nowait(fr)

    def _part(self, f: int, **part) -> None:
        if self.output != "both":
            self._emit(f, **part)
            return
        got = self._pending.setdefault(f, {})
        got.update(part)
        if "rgb" in got and "motion" in got:
            del self._pending[f]
            self._emit(f, **got)

    async def _read(self) -> None:
        from .protos import echo_stream_pb2 as pb

        w = h = self.size
        try:
            async for msg in self._session.messages():
                body = msg.WhichOneof("body")
                if body == "video":
                    v = msg.video
                    if v.frames == 1 and len(v.data) == w * h * 3:
                        self._part(int(v.first_frame), rgb=np.frombuffer(v.data, np.uint8).reshape(h, w, 3))
                elif body == "motion":
                    self._part(int(msg.motion.frame), motion=np.asarray(msg.motion.values, np.float32))
                elif body == "event":
                    ev = msg.event
                    if ev.kind == pb.Event.INTERRUPTED:
                        # the oldest unanchored segment starts at the playback position; older ones are void
                        while len(self._segments) > 1 and self._segments[0].base is not None:
                            self._segments.popleft()
                        self._segments[0].base = int(ev.first_frame)
                        self._pending.clear()
                    elif ev.kind == pb.Event.GAP:
                        for f in range(int(ev.first_frame), int(ev.first_frame + ev.frames)):
                            self._emit(f, gap=True)
        except Exception as e:  # noqa: BLE001 - handed to the consumer of frames()
            if not self._closing:
                self.error = e
        finally:
            self.ended.set()
            try:
                self._out.put_nowait(None)
            except asyncio.QueueFull:
                self._out.get_nowait()
                self._out.put_nowait(None)

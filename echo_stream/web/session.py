"""One browser peer: a :class:`~echo_stream.live.LiveAvatar` session and its WebRTC peer connection.

In: the browser's camera track -> :meth:`LiveAvatar.push_user_frame`, its microphone ->
:meth:`LiveAvatar.push_user_audio`. Out: two aiortc tracks (video + audio) in one MediaStream, fed by a
:class:`Pacer` that takes :meth:`LiveAvatar.frames` and sends each frame's picture and its own audio at
the same tick (40 ms), so the browser plays them in sync:

* video pts: the output frame number at 90 kHz (the avatar's frame index while nothing is repeated);
  audio: the frame's 1920 samples (48 kHz) as two 20 ms s16 mono frames, pts in samples;
* frames come from the server in bursts of a generation window; the pacer plays frame ``f`` at
  ``sent_at(f) + delay``: a playout delay that grows to fit a frame that came after its due time and
  shrinks by 20 ms when every frame of the last four seconds came 60 ms early, so the picture moves at an
  even 25 fps;
* when no frame is due in time the last picture is repeated and silence is sent: the streams never stop
  their clock;
* every outgoing picture carries its frame index as a small barcode in its bottom-left corner, which the
  page reads back to estimate the glass-to-glass latency (:func:`stamp_barcode`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import deque
from fractions import Fraction

import numpy as np

from .. import config
from ..live import USER_FRAME_SIDE

log = logging.getLogger(__name__)

FPS = config.FPS
#: the avatar audio's rate in the browser session (WebRTC's Opus runs at 48 kHz)
AUDIO_RATE = 48_000
SAMPLES_PER_FRAME = AUDIO_RATE // FPS
AUDIO_CHUNK = AUDIO_RATE // 50            # 20 ms
VIDEO_CLOCK = 90_000
#: barcode: BITS blocks in the bottom-left corner, the frame index modulo 2 ** (BITS - 1) and an even-parity bit
BARCODE_BITS = 12
MAX_DELAY_S = 3.0
MAX_BUFFER = 4 * FPS
CONNECT_TIMEOUT_S = 30.0


def barcode_block(width: int) -> int:
    """Side of one barcode block for a picture ``width`` pixels wide (8 px, less on tiny pictures)."""
    return int(max(2, min(8, width // (BARCODE_BITS + 2))))


def barcode_value(index: int) -> int:
    v = index % (1 << (BARCODE_BITS - 1))
    return v | ((bin(v).count("1") & 1) << (BARCODE_BITS - 1))


def stamp_barcode(rgb: np.ndarray, index: int) -> np.ndarray:
    """A copy of ``rgb`` with ``index`` drawn as a row of black/white blocks along its bottom-left edge
    (bit 0 leftmost; white = 1), blocks aligned to the block size from the bottom-left corner."""
    out = np.array(rgb, copy=True)
    h, w = out.shape[:2]
    b = barcode_block(w)
    v = barcode_value(index)
    for k in range(BARCODE_BITS):
        out[h - b:h, k * b:(k + 1) * b] = 255 if (v >> k) & 1 else 0
    return out


def read_barcode(rgb: np.ndarray) -> int | None:
    """The index :func:`stamp_barcode` drew (modulo ``2 ** (BARCODE_BITS - 1)``), None when the parity fails."""
    h, w = rgb.shape[:2]
    b = barcode_block(w)
    v = 0
    for k in range(BARCODE_BITS):
        c = rgb[h - b + b // 4:h - b // 4, k * b + b // 4:(k + 1) * b - b // 4].mean()
        v |= int(c > 127) << k
    data = v & ((1 << (BARCODE_BITS - 1)) - 1)
    return data if barcode_value(data) == v else None


def _tracks():
    """The two outgoing track classes (aiortc is imported only here, when a session starts)."""
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class _QueueTrack(MediaStreamTrack):
        def __init__(self, maxsize: int):
            super().__init__()
            self.queue: asyncio.Queue = asyncio.Queue(maxsize)

        def put(self, frame) -> None:
            if self.queue.full():          # the sender fell behind: the oldest goes, the clock does not stop
                self.queue.get_nowait()
            self.queue.put_nowait(frame)

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            return await self.queue.get()

    class AvatarVideoTrack(_QueueTrack):
        kind = "video"

    class AvatarAudioTrack(_QueueTrack):
        kind = "audio"

    return AvatarVideoTrack, AvatarAudioTrack


class Pacer:
    """Plays the avatar's frames at 25 fps on the two tracks (see the module docstring)."""

    def __init__(self, avatar, video, audio, on_frame=None):
        self.avatar, self.video, self.audio = avatar, video, audio
        self.on_frame = on_frame
        self.buffer: deque = deque()        # (frame, arrival time.time())
        self.delay: float | None = None     # playout delay after sent_at (s)
        self.out = None                     # the next output frame number (pts / 3600)
        self.last_rgb = None                # the last picture, its barcode stamped
        self.last_index = -1
        self.sent = 0                       # frames played (new pictures)
        self.repeats = 0                    # ticks with no frame due: last picture again + silence
        self.speech_sent = 0                # frames played with speech
        self.dropped = 0
        self.underruns = 0                  # frames that came after their due time (the delay grew)
        self._slack: deque = deque(maxlen=4 * FPS)
        self.silence = np.zeros(SAMPLES_PER_FRAME, np.float32)
        self.cleared = 0

    def clear(self) -> None:
        """Forget the frames not yet played (their speech was interrupted)."""
        self.cleared += len(self.buffer)
        self.buffer.clear()

    async def feed(self) -> None:
        """Frames from the avatar into the playout buffer, until the session ends (re-raises its error)."""
        async for fr in self.avatar.frames():
            if not fr.gap:
                self.arrive(fr, time.time())

    def arrive(self, fr, now: float) -> None:
        """Frame ``fr`` came at ``now`` (epoch s): into the playout buffer."""
        late = now - fr.sent_at - (self.delay if self.delay is not None else -1.0)
        if late > 0:              # it came after its due time: later frames wait as long as this one did
            if self.delay is not None:
                self.underruns += 1
            self.delay = min(MAX_DELAY_S, now - fr.sent_at + 0.02)
            self._slack.clear()
        self.buffer.append((fr, now))
        if len(self.buffer) > MAX_BUFFER:     # (only when the delay is at its cap) the oldest goes
            self.buffer.popleft()
            self.dropped += 1

    async def play(self) -> None:
        """The 40 ms clock: one picture and its audio per tick, on the monotonic clock."""
        t0 = time.monotonic()
        n = 0
        while True:
            n += 1
            await asyncio.sleep(max(0.0, t0 + n / FPS - time.monotonic()))
            if self.delay is None:
                n, t0 = 0, time.monotonic()     # nothing received yet: wait for the first frame
                continue
            self.tick(time.time())

    def tick(self, now: float) -> None:
        """One tick at ``now``: the head of the buffer when it is due, else the last picture again (silent)."""
        fr = None
        if self.buffer and self.buffer[0][0].sent_at + self.delay <= now + 0.5 / FPS:
            fr, arrived = self.buffer.popleft()
            self._slack.append(fr.sent_at + self.delay - arrived)
            if len(self._slack) == self._slack.maxlen and min(self._slack) > 0.06:
                self.delay = max(0.0, self.delay - 0.02)    # every frame of the last 4 s came early enough
                self._slack.clear()
        if fr is None and self.last_rgb is None:
            return
        if self.out is None:
            self.out = fr.index
        if fr is not None and fr.rgb is not None:   # stamped once per picture (a repeat reuses it)
            self.last_rgb, self.last_index = stamp_barcode(fr.rgb, fr.index), fr.index
        self.emit(fr, now)

    def emit(self, fr, now: float) -> None:
        import av

        picture = av.VideoFrame.from_ndarray(self.last_rgb, format="rgb24")
        picture.pts, picture.time_base = self.out * (VIDEO_CLOCK // FPS), Fraction(1, VIDEO_CLOCK)
        self.video.put(picture)
        pcm = self.silence if fr is None else fr.audio
        s16 = (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16)
        for k in range(SAMPLES_PER_FRAME // AUDIO_CHUNK):
            a = av.AudioFrame.from_ndarray(s16[None, k * AUDIO_CHUNK:(k + 1) * AUDIO_CHUNK], format="s16",
                                           layout="mono")
            a.sample_rate = AUDIO_RATE
            a.pts, a.time_base = self.out * SAMPLES_PER_FRAME + k * AUDIO_CHUNK, Fraction(1, AUDIO_RATE)
            self.audio.put(a)
        self.out += 1
        if fr is None:
            self.repeats += 1
        else:
            self.sent += 1
            self.speech_sent += fr.speech
        if self.on_frame is not None:
            self.on_frame(fr, now)


def _user_pcm(frame) -> np.ndarray:
    """A received aiortc AudioFrame as mono float32."""
    a = frame.to_ndarray()
    ch = len(frame.layout.channels)
    a = a.astype(np.float32).mean(axis=0) if frame.format.is_planar else \
        a.reshape(-1, ch).astype(np.float32).mean(axis=1)
    if frame.format.name.startswith("s16"):
        a /= 32768.0
    elif frame.format.name.startswith("s32"):
        a /= 2147483648.0
    return a


class WebSession:
    """A browser peer: its peer connection, its LiveAvatar and the tasks between them."""

    def __init__(self, avatar, *, on_closed=None):
        self.id = secrets.token_urlsafe(16)
        self.avatar = avatar
        self.pc = None
        self.channel = None
        self.created = time.time()
        self.on_closed = on_closed
        self.tasks: list[asyncio.Task] = []
        self.closed = asyncio.Event()
        self.error: str | None = None
        self.user_video_frames = 0
        self.user_audio_frames = 0
        self.speech_after_interrupt = 0        # speech frames played since the last interrupt
        self.interrupted_at: float | None = None
        self.utterances = 0
        video_cls, audio_cls = _tracks()
        self.video = video_cls(maxsize=2 * FPS)
        self.audio = audio_cls(maxsize=4 * FPS)
        self.pacer = Pacer(avatar, self.video, self.audio, on_frame=self._on_frame)
        self._closing = False

    # ------------------------------------------------------------------ set-up
    async def answer(self, offer_sdp: str, offer_type: str) -> tuple[str, str]:
        """Accept the browser's offer; returns the answer (ICE candidates gathered, no trickle)."""
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        pc = self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))   # no STUN: nothing leaves the LAN

        @pc.on("track")
        def on_track(track):
            self._spawn(self._consume(track), f"web-in-{track.kind}")

        @pc.on("datachannel")
        def on_datachannel(channel):
            self.channel = channel
            self._send({"t": "hello", "session": self.id, "size": self.avatar.size,
                        "block": barcode_block(self.avatar.size), "bits": BARCODE_BITS})

        @pc.on("connectionstatechange")
        async def on_state():
            log.info("web session %s: WebRTC %s", self.id[:8], pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self.close()

        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type=offer_type))
        for track in (self.video, self.audio):
            pc.addTrack(track)                # aiortc gives a peer's senders one msid stream: one MediaStream,
                                              # which the browser plays in sync (tested in tests/test_web.py)
        await pc.setLocalDescription(await pc.createAnswer())
        self._spawn(self.pacer.feed(), "web-feed", watch=True)
        self._spawn(self.pacer.play(), "web-play")
        self._spawn(self._connect_within(CONNECT_TIMEOUT_S), "web-connect", watch=True)
        return pc.localDescription.sdp, pc.localDescription.type

    async def _connect_within(self, seconds: float) -> None:
        """A peer that never connects (ICE fails silently) gives its avatar session back after ``seconds``."""
        end = time.monotonic() + seconds
        while self.pc.connectionState != "connected":
            if time.monotonic() > end:
                raise TimeoutError(f"the browser did not connect over WebRTC within {seconds:.0f} s")
            await asyncio.sleep(0.25)
        await self.closed.wait()

    def _spawn(self, coro, name: str, watch: bool = False) -> None:
        t = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.append(t)
        t.add_done_callback(lambda t: self._task_done(t, watch))

    def _task_done(self, t: asyncio.Task, watch: bool) -> None:
        if t.cancelled():
            return
        e = t.exception()
        if e is not None:
            self.error = _describe(e)
            log.warning("web session %s: %s", self.id[:8], self.error)
            self._send({"t": "error", "msg": f"the avatar session ended: {self.error}"})
        if (e is not None or watch) and not self._closing:
            log.info("web session %s: %s ended; closing", self.id[:8], t.get_name())
            asyncio.get_running_loop().create_task(self.close())

    # ------------------------------------------------------------------ media in
    async def _consume(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        last = 0.0
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                self.user_video_frames += 1
                now = time.monotonic()
                if now - last < 1 / FPS:          # at most the avatar's 25 fps
                    continue
                last = now
                w, h = frame.width, frame.height  # scaled by PyAV here (fit_user_frame would only stride)
                k = max(1, -(-max(w, h) // USER_FRAME_SIDE))
                rgb = frame.reformat(width=(w // k) & ~1, height=(h // k) & ~1, format="rgb24").to_ndarray()
                self.avatar.push_user_frame(rgb)
            else:
                self.user_audio_frames += 1
                self.avatar.push_user_audio(_user_pcm(frame), frame.sample_rate)

    # ------------------------------------------------------------------ speech
    def speak(self, pcm: np.ndarray) -> float:
        """Queue one utterance (mono float32 at 48 kHz); returns its length in seconds."""
        self.avatar.push_speech(pcm)
        self.avatar.end_speech()
        self.utterances += 1
        return len(pcm) / AUDIO_RATE

    async def interrupt(self) -> None:
        self.pacer.clear()
        self.speech_after_interrupt = 0
        self.interrupted_at = time.time()
        await self.avatar.interrupt()

    # ------------------------------------------------------------------ media out: per-frame notes
    def _on_frame(self, fr, now: float) -> None:
        if fr is not None and fr.speech and self.interrupted_at is not None:
            self.speech_after_interrupt += 1
        if fr is None:
            return
        self._send({"t": "f", "i": fr.index, "s": round(fr.sent_at, 4), "l": round(fr.latency_s, 4),
                    "p": round(now - fr.sent_at, 4), "sp": bool(fr.speech), "e": bool(fr.utterance_end)})

    def _send(self, msg: dict) -> None:
        ch = self.channel
        if ch is not None and ch.readyState == "open":
            try:
                ch.send(json.dumps(msg))
            except Exception as e:  # noqa: BLE001 - a closing channel: the page is gone
                log.debug("web session %s: data channel: %s", self.id[:8], e)

    # ------------------------------------------------------------------ state
    def stats(self) -> dict:
        st = self.avatar.stats
        return {"id": self.id[:8], "age_s": round(time.time() - self.created, 2),
                "state": self.pc.connectionState if self.pc else "new", "error": self.error,
                "user_video_frames": self.user_video_frames, "user_audio_frames": self.user_audio_frames,
                "user_frames_sent": st.user_frames_sent, "user_audio_s": round(st.user_audio_s, 3),
                "frames": st.frames, "speech_frames": st.speech_frames, "interrupts": st.interrupts,
                "frames_played": self.pacer.sent, "repeats": self.pacer.repeats,
                "underruns": self.pacer.underruns, "dropped": self.pacer.dropped,
                "speech_played": self.pacer.speech_sent, "speech_after_interrupt": self.speech_after_interrupt,
                "utterances": self.utterances, "speaking": self.avatar.speaking,
                "playout_delay_s": None if self.pacer.delay is None else round(self.pacer.delay, 3),
                "latency_p50_s": _round(st.latency(0.5)), "latency_p99_s": _round(st.latency(0.99)),
                "latencies": [round(x, 4) for x in st.latencies]}

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        me = asyncio.current_task()
        for t in self.tasks:
            if t is not me:
                t.cancel()
        await asyncio.gather(*(t for t in self.tasks if t is not me), return_exceptions=True)
        for coro in ((self.pc.close() if self.pc else None), self.avatar.close(timeout=2.0)):
            if coro is None:
                continue
            try:
                await coro
            except Exception as e:  # noqa: BLE001 - closing anyway
                log.debug("web session %s: close: %s", self.id[:8], e)
        self.closed.set()
        if self.on_closed is not None:
            self.on_closed(self)


def _round(x: float) -> float | None:
    return None if x != x else round(x, 4)


def _describe(e: BaseException) -> str:
    code = getattr(e, "code", None)
    if callable(code):
        try:
            return f"{code().name}: {e.details()}"
        except Exception:  # noqa: BLE001
            pass
    return f"{type(e).__name__}: {e}"

"""Pipecat adapter: an echo-stream avatar as a frame processor (extra ``[pipecat]``, pipecat-ai 1.14+).

Place :class:`EchoStreamAvatar` right after the TTS service::

    Pipeline([transport.input(), stt, user_agg, llm, tts,
              EchoStreamAvatar("avatar-host:50051", token=..., portrait=open("me.jpg", "rb").read()),
              transport.output(), assistant_agg])

What it does with the frames it sees (downstream):

* ``TTSStartedFrame`` / ``TTSAudioRawFrame`` / ``TTSStoppedFrame``: the TTS audio becomes the avatar's speech
  (resampled to the avatar's rate when the TTS uses another); these frames are *consumed*. They leave again,
  re-timed, with the avatar: ``TTSStartedFrame`` just before the utterance's first frame, ``TTSAudioRawFrame``
  carrying each frame's speech, ``TTSStoppedFrame`` just after the utterance's last frame;
* ``InterruptionFrame``: :meth:`LiveAvatar.interrupt <echo_stream.live.LiveAvatar.interrupt>` (queued speech and
  the server's buffered windows are dropped), then passed on;
* ``InputAudioRawFrame`` (the user's microphone) and ``InputImageRawFrame`` / ``UserImageRawFrame`` (the user's
  camera): sent to the session, which reacts to them while listening; passed on unchanged;
* ``StartFrame`` / ``EndFrame`` / ``CancelFrame``: the session is opened in :meth:`setup` (Pipecat's place for
  slow start-up work) and starts feeding the pipeline at ``StartFrame``; ``EndFrame`` waits for the speech already
  queued to be shown, then closes the session; ``CancelFrame`` closes it at once.

What it emits downstream, 25 times a second for as long as the pipeline runs (the avatar's clock never stops):
an ``OutputImageRawFrame`` (output ``video`` or ``both``) and/or an :class:`ARKitBlendshapeFrame` (``motion``
or ``both``), followed by the frame's own audio: a ``TTSAudioRawFrame`` while the avatar speaks, a silent plain
``OutputAudioRawFrame`` while it listens (a plain one does not make the transport report the bot as speaking).
Images have ``sync_with_audio`` set, so the output transport shows each one when the audio queued before it has
played: picture and sound leave together. Image and audio ``pts`` are the frame's time on the session timeline
(``index / 25`` s, in ns); blendshape frames carry no ``pts`` so that the transport forwards them in the audio
queue too (a ``pts`` would route them through its clock queue instead).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import config, motion
from ..errors import InputError
from ..live import LiveAvatar

try:
    from pipecat.audio.utils import create_stream_resampler
    from pipecat.frames.frames import (
        CancelFrame,
        DataFrame,
        EndFrame,
        Frame,
        InputAudioRawFrame,
        InputImageRawFrame,
        InterruptionFrame,
        OutputAudioRawFrame,
        OutputImageRawFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup
except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"echo_stream.integrations.pipecat needs pipecat-ai: pip install 'echo-stream[pipecat]' "
                      f"({e})") from e

log = logging.getLogger(__name__)

FRAME_NS = 1_000_000_000 // config.FPS


@dataclass
class ARKitBlendshapeFrame(DataFrame):
    """One avatar frame as motion: the 52 ARKit blendshapes and 6 head-pose values, by name.

    ``values`` keys are :data:`echo_stream.motion.CHANNELS` (ARKit names such as ``jawOpen``, then ``headPitch``,
    ``headYaw``, ``headRoll`` in radians and ``headTx/Ty/Tz``); blendshapes are in [0, 1].
    ``index`` is the frame number on the session timeline (25 fps), ``speech`` whether its audio is speech.
    """

    values: dict[str, float] = field(default_factory=dict)
    index: int = 0
    speech: bool = False

    @property
    def array(self) -> np.ndarray:
        """The 58 values in :data:`echo_stream.motion.CHANNELS` order."""
        return np.array([self.values[c] for c in motion.CHANNELS], np.float32)

    def __str__(self):
        return f"{self.name}(index: {self.index}, speech: {self.speech}, jawOpen: {self.values.get('jawOpen', 0):.3f})"


def image_to_rgb(image: bytes, size: tuple[int, int], fmt: str | None) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from a Pipecat image frame's bytes (raw RGB/RGBA/BGR/BGRA, or an encoded image)."""
    w, h = int(size[0]), int(size[1])
    f = (fmt or "RGB").upper()
    channels = {"RGB": 3, "RGB24": 3, "BGR": 3, "BGR24": 3, "RGBA": 4, "RGBX": 4, "BGRA": 4, "BGRX": 4}
    if f in channels:
        c = channels[f]
        if len(image) != w * h * c:
            raise InputError("user image", f"{len(image)} bytes do not make a {w}x{h} {f} image "
                                           f"({w * h * c} expected)")
        a = np.frombuffer(image, np.uint8).reshape(h, w, c)
        return np.ascontiguousarray(a[..., 2::-1] if f.startswith("BGR") else a[..., :3])
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        return np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise InputError("user image", f"format {fmt!r}: neither raw RGB/RGBA/BGR/BGRA nor an image file ({e})") \
            from None


def _mono_int16(audio: bytes, channels: int) -> np.ndarray:
    x = np.frombuffer(audio, "<i2")
    if channels > 1:
        if len(x) % channels:
            raise InputError("audio", f"{len(x)} samples do not divide into {channels} channels")
        x = x.reshape(-1, channels).mean(axis=1).astype(np.int16)
    return x


def _pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class EchoStreamAvatar(FrameProcessor):
    """A talking/listening echo-stream avatar in a Pipecat pipeline (see the module docstring).

    ``target``: ``host:port`` of an ``echo-stream serve`` server (``token`` for its auth) or an open
    :class:`echo_stream.serve.client.AvatarClient`. ``portrait``: the face to animate (image bytes or a path)
    or ``avatar_id`` (a portrait the server knows). ``output``: ``video``, ``motion`` (ARKit blendshape frames
    for a 3D avatar, no picture) or ``both``. ``sample_rate``: the rate of the audio the avatar emits (default:
    the pipeline's output rate; must be a multiple of 25). ``listen``: send the user's camera and microphone.
    """

    def __init__(self, target, *, token: str | None = None, portrait: bytes | str | Path | None = None,
                 avatar_id: str | None = None, output: str = "video", size: int = 256, seed: int | None = None,
                 stride: int | None = None, sample_rate: int | None = None, listen: bool = True,
                 sync_with_audio: bool = True, end_timeout_s: float = 5.0, **kwargs):
        super().__init__(**kwargs)
        if target is None or (isinstance(target, str) and ":" not in target):
            raise InputError("target", f"expected host:port of an echo-stream server or an AvatarClient, "
                                       f"got {target!r}")
        if output not in ("video", "motion", "both"):
            raise InputError("output", f"expected video, motion or both, got {output!r}")
        if sample_rate is not None and (sample_rate <= 0 or sample_rate % config.FPS):
            raise InputError("sample_rate", f"{sample_rate} Hz: must be a positive multiple of {config.FPS} Hz")
        if isinstance(portrait, (str, Path)):
            p = Path(portrait)
            if not p.is_file():
                raise InputError(p, "portrait file not found")
            portrait = p.read_bytes()
        if portrait is None and avatar_id is None:
            raise InputError("portrait", "give a portrait image (bytes or path) or an avatar_id the server knows")
        self._target, self._token = target, token
        self._portrait, self._avatar_id = portrait, avatar_id
        self._output, self._size, self._seed, self._stride = output, size, seed, stride
        self._rate = sample_rate
        self._listen, self._sync = listen, sync_with_audio
        self._end_timeout_s = end_timeout_s
        self._avatar: LiveAvatar | None = None
        self._start_error: BaseException | None = None
        self._forward_task: asyncio.Task | None = None
        self._started_at = 0.0                    # time.time() at StartFrame: earlier frames are stale silence
        self._resampler = None
        self._tts_rate: int | None = None
        self._held_start: TTSStartedFrame | None = None
        self._starts: dict[int, TTSStartedFrame] = {}   # utterance -> its TTSStartedFrame, until its first frame
        self._stops: dict[int, TTSStoppedFrame] = {}    # utterance -> its TTSStoppedFrame, until its last frame
        self._ends_pending: set[int] = set()              # utterances whose last frame has not been pushed
        self._context: dict[int, str | None] = {}
        self._last_rgb: np.ndarray | None = None
        self._utt_open = False                    # speech pushed since the last TTSStoppedFrame / interruption
        self._closed = False

    @property
    def avatar(self) -> LiveAvatar | None:
        """The live session (None before setup)."""
        return self._avatar

    # ------------------------------------------------------------------ life cycle
    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)
        rate = self._rate or setup.audio_out_sample_rate
        try:
            self._avatar = LiveAvatar(self._target, token=self._token, portrait=self._portrait,
                                      avatar_id=self._avatar_id, output=self._output, size=self._size,
                                      seed=self._seed, stride=self._stride, sample_rate=rate)
            await self._avatar.start()
        except Exception as e:  # noqa: BLE001 - reported as a fatal error when the pipeline starts
            self._start_error = e
            self._avatar = None
            log.error("echo-stream avatar: could not open a session on %s: %s", self._target, e)

    async def cleanup(self):
        await self._close(cancel=True)
        await super().cleanup()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if direction != FrameDirection.DOWNSTREAM:
            await self.push_frame(frame, direction)
        elif isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            await self._on_start()
        elif isinstance(frame, TTSStartedFrame):
            self._held_start = frame
            await self._reset_resampler()
        elif isinstance(frame, TTSAudioRawFrame):
            await self._on_tts_audio(frame)
        elif isinstance(frame, TTSStoppedFrame):
            await self._on_tts_stopped(frame)
        elif isinstance(frame, InterruptionFrame):
            await self._on_interruption()
            await self.push_frame(frame, direction)
        elif isinstance(frame, InputAudioRawFrame):
            if self._listen and self._avatar is not None:
                self._avatar.push_user_audio(_mono_int16(frame.audio, frame.num_channels), frame.sample_rate)
            await self.push_frame(frame, direction)
        elif isinstance(frame, InputImageRawFrame):
            if self._listen and self._avatar is not None:
                try:
                    self._avatar.push_user_frame(image_to_rgb(frame.image, frame.size, frame.format))
                except InputError as e:
                    await self.push_error(error_msg=str(e), exception=e)
            await self.push_frame(frame, direction)
        elif isinstance(frame, EndFrame):
            # shielded: the EndFrame leaves even if this task is cancelled while the last speech plays out
            await asyncio.shield(self._on_end(frame))
        elif isinstance(frame, CancelFrame):
            await self._close(cancel=True)
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def _on_start(self) -> None:
        if self._avatar is None:
            e = self._start_error
            await self.push_error(error_msg=f"echo-stream avatar: no session on {self._target}: {e}",
                                  exception=e if isinstance(e, Exception) else None, force_treat_as_permanent=True)
            return
        self._started_at = time.time()
        if self._forward_task is None:
            self._forward_task = self.create_task(self._forward(), name="echo-stream-avatar-frames")

    async def _on_end(self, frame: EndFrame) -> None:
        av = self._avatar
        if av is not None and not self._closed:
            u = av.end_speech()                    # an utterance the TTS never stopped is complete now
            if u is not None:
                self._ends_pending.add(u)
            deadline = time.monotonic() + av.queued_speech_s() + self._end_timeout_s
            while (av.speaking or self._ends_pending) and time.monotonic() < deadline \
                    and self._forward_task is not None and not self._forward_task.done():
                await asyncio.sleep(1 / config.FPS)
        await self._close(cancel=False)
        await self.push_frame(frame)

    async def _close(self, cancel: bool) -> None:
        if self._closed:
            return
        self._closed = True
        av, task = self._avatar, self._forward_task
        if av is not None:
            await av.close(timeout=0.5 if cancel else self._end_timeout_s)
        if task is not None:
            if cancel:
                await self.cancel_task(task)
            else:
                try:
                    await asyncio.wait_for(asyncio.shield(task), self._end_timeout_s)
                except asyncio.TimeoutError:
                    await self.cancel_task(task)
                except Exception:  # noqa: BLE001 - reported by the task itself
                    pass

    # ------------------------------------------------------------------ avatar speech in
    async def _reset_resampler(self) -> None:
        if self._resampler is not None:
            await self._resampler.reset()

    async def _on_tts_audio(self, frame: TTSAudioRawFrame) -> None:
        av = self._avatar
        if av is None or self._closed:
            return
        pcm = _mono_int16(frame.audio, frame.num_channels)
        if frame.sample_rate != av.sample_rate:
            if self._resampler is None or self._tts_rate != frame.sample_rate:
                self._resampler = create_stream_resampler()
                self._tts_rate = frame.sample_rate
            pcm = np.frombuffer(await self._resampler.resample(pcm.tobytes(), frame.sample_rate, av.sample_rate),
                                "<i2")
        if not len(pcm):
            return
        u = av.push_speech(pcm)
        self._utt_open = True
        if u not in self._starts and u not in self._context:
            start = self._held_start or TTSStartedFrame(context_id=frame.context_id)
            self._held_start = None
            self._starts[u] = start
            self._context[u] = start.context_id if start.context_id is not None else frame.context_id
            self._ends_pending.add(u)

    async def _on_tts_stopped(self, frame: TTSStoppedFrame) -> None:
        av = self._avatar
        if av is None or self._closed:
            return
        if self._resampler is not None and self._tts_rate is not None:
            tail = np.frombuffer(await self._resampler.flush(), "<i2")
            if len(tail) and self._utt_open:
                av.push_speech(tail)
        self._utt_open = False
        u = av.end_speech()
        if u is None:                              # no audio in this TTS turn: nothing to re-time
            if self._held_start is not None:
                await self.push_frame(self._held_start)
                self._held_start = None
            await self.push_frame(frame)
            return
        self._stops[u] = frame

    async def _on_interruption(self) -> None:
        busy = self._utt_open or bool(self._ends_pending)     # speech sent whose frames are still to come
        self._held_start = None
        self._utt_open = False
        self._starts.clear()
        self._stops.clear()
        self._ends_pending.clear()
        self._context.clear()
        await self._reset_resampler()
        av = self._avatar
        # Pipecat interrupts at every user turn; a listening avatar has nothing to drop (and an interrupt
        # restarts the server's generation: a short pause of the picture), so only speech is interrupted
        if av is not None and not self._closed and (av.speaking or busy):
            await av.interrupt()

    # ------------------------------------------------------------------ avatar frames out
    async def _forward(self) -> None:
        av = self._avatar
        try:
            async for fr in av.frames():
                if not fr.speech and fr.sent_at < self._started_at:
                    continue                       # made before the pipeline started: stale silence
                await self._push_avatar_frame(fr)
            if not self._closed:                   # the server ended the session (drain, restart): say so
                await self.push_error(error_msg=f"echo-stream session {av.session_id[:8]} was ended by the server",
                                      force_treat_as_permanent=True)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the session failed (server gone, bad auth...): say so upstream
            await self.push_error(error_msg=f"echo-stream session {av.session_id[:8]} ended: {e}", exception=e,
                                  force_treat_as_permanent=True)

    async def _push_avatar_frame(self, fr) -> None:
        av = self._avatar
        pts = fr.index * FRAME_NS
        u = fr.utterance
        speech = fr.speech and u is not None and u in self._context
        if speech and u in self._starts:
            await self.push_frame(self._starts.pop(u))
        if self._output in ("video", "both"):
            rgb = fr.rgb if fr.rgb is not None else self._last_rgb     # a gap frame repeats the last picture
            if rgb is not None:
                self._last_rgb = rgb
                img = OutputImageRawFrame(image=rgb.tobytes(), size=(rgb.shape[1], rgb.shape[0]), format="RGB")
                img.pts = pts
                img.sync_with_audio = self._sync
                await self.push_frame(img)
        if self._output in ("motion", "both") and fr.motion is not None:
            await self.push_frame(ARKitBlendshapeFrame(
                values={c: float(v) for c, v in zip(motion.CHANNELS, fr.motion)}, index=fr.index,
                speech=speech))
        if speech:
            audio = TTSAudioRawFrame(audio=_pcm16(fr.audio), sample_rate=av.sample_rate, num_channels=1,
                                     context_id=self._context.get(u))
        else:
            audio = OutputAudioRawFrame(audio=_pcm16(fr.audio) if fr.speech else bytes(2 * len(fr.audio)),
                                        sample_rate=av.sample_rate, num_channels=1)
        audio.pts = pts
        await self.push_frame(audio)
        if fr.utterance_end and u is not None and u in self._ends_pending:
            self._ends_pending.discard(u)
            self._starts.pop(u, None)
            stop = self._stops.pop(u, None)
            self._context.pop(u, None)
            if stop is not None:
                await self.push_frame(stop)

"""The Pipecat adapter (echo_stream.integrations.pipecat) in a real Pipecat pipeline (Pipecat's own run_test),
against a real served echo-stream pipeline: real TTS speech in, avatar video + its audio out in real time,
interruptions, the user's real camera and voice, motion-only mode. Nothing is faked; no network beyond loopback."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("pipecat")

from pipecat.frames.frames import (  # noqa: E402
    CancelFrame,
    ErrorFrame,
    InputAudioRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    UserImageRawFrame,
)
from pipecat.pipeline.worker import PipelineParams  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402

from echo_stream import config, media, motion  # noqa: E402
from echo_stream.errors import InputError  # noqa: E402
from echo_stream.integrations.pipecat import ARKitBlendshapeFrame, EchoStreamAvatar, image_to_rgb  # noqa: E402
from echo_stream.samples import SAMPLE_PORTRAIT  # noqa: E402

from .served import served  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DATA = Path(__file__).parent / "data"
SIZE = 96
OUT_RATE = 24000          # the pipeline's output rate (the avatar's); the TTS speaks at 16 kHz: resampled
TTS_RATE = 16000
FRAME_NS = 1_000_000_000 // config.FPS


@pytest.fixture(scope="module")
def server():
    with served(SIZE, max_sessions=4) as (_, target, _backend):
        yield target


def _tts_frames(seconds: float, name: str = "tts0.ogg", chunk_s: float = 0.02) -> tuple[list, np.ndarray]:
    """A TTS turn as a Pipecat TTS service sends it: started, 20 ms int16 chunks, stopped."""
    x = media.decode_audio(str(DATA / "tts" / name), sample_rate=TTS_RATE)[: int(seconds * TTS_RATE)]
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
    n = int(chunk_s * TTS_RATE)
    frames = [TTSStartedFrame(context_id="turn-1")]
    frames += [TTSAudioRawFrame(audio=pcm[i:i + n].tobytes(), sample_rate=TTS_RATE, num_channels=1,
                                context_id="turn-1") for i in range(0, len(pcm), n)]
    frames.append(TTSStoppedFrame(context_id="turn-1"))
    return frames, x


def _avatar(target, **kw) -> EchoStreamAvatar:
    kw.setdefault("portrait", SAMPLE_PORTRAIT)
    return EchoStreamAvatar(target, size=SIZE, seed=3, **kw)


def _run(avatar, frames, **kw):
    return asyncio.run(run_test(avatar, frames_to_send=frames, start_timeout=30,
                                pipeline_params=PipelineParams(audio_out_sample_rate=OUT_RATE), **kw))


def _rms(x: np.ndarray, n: int) -> np.ndarray:
    k = len(x) // n
    return np.sqrt((x[: k * n].reshape(k, n) ** 2).mean(axis=1))


def test_tts_audio_in_video_and_its_audio_out_in_sync(server):
    seconds = 2.0
    tts, speech = _tts_frames(seconds)
    av = _avatar(server)
    down, up = _run(av, [SleepFrame(0.4)] + tts)
    assert not [f for f in up if isinstance(f, ErrorFrame)], up

    images = [f for f in down if isinstance(f, OutputImageRawFrame)]
    audio = [f for f in down if isinstance(f, OutputAudioRawFrame)]
    assert len(images) > seconds * config.FPS
    pts = [f.pts for f in images]
    assert all(b - a == FRAME_NS for a, b in zip(pts, pts[1:])), "one image every 40 ms, in order, none missing"
    assert all(f.size == (SIZE, SIZE) and f.format == "RGB" and len(f.image) == SIZE * SIZE * 3 and f.sync_with_audio
               for f in images)
    # every image leaves right before its own 40 ms of audio: same pts, nothing can drift
    for i, f in enumerate(down[:-1]):
        if isinstance(f, OutputImageRawFrame):
            nxt = down[i + 1]
            assert isinstance(nxt, OutputAudioRawFrame) and nxt.pts == f.pts
            assert nxt.sample_rate == OUT_RATE and nxt.num_channels == 1 and nxt.num_frames == OUT_RATE // config.FPS
    assert len(audio) == len(images)

    spoken = [f for f in audio if isinstance(f, TTSAudioRawFrame)]
    assert abs(len(spoken) - seconds * config.FPS) <= 1
    assert [f.pts for f in spoken] == list(range(spoken[0].pts, spoken[-1].pts + 1, FRAME_NS)), "speech contiguous"
    assert all(f.context_id == "turn-1" for f in spoken)
    silent = [f for f in audio if not isinstance(f, TTSAudioRawFrame)]
    assert silent and all(not any(f.audio) for f in silent), "listening: plain silent OutputAudioRawFrames"
    # the TTS turn's start/stop frames are re-timed around the avatar's speech
    k0 = down.index(next(f for f in down if isinstance(f, TTSAudioRawFrame)))
    starts = [i for i, f in enumerate(down) if isinstance(f, TTSStartedFrame)]
    stops = [i for i, f in enumerate(down) if isinstance(f, TTSStoppedFrame)]
    assert len(starts) == 1 and len(stops) == 1
    assert starts[0] == k0 - 2                    # TTSStartedFrame, image, its speech audio
    assert down[stops[0] - 1] is spoken[-1]
    # the speech heard with image k is the speech of time k (per-frame loudness follows the input, no lag)
    heard = np.concatenate([np.frombuffer(f.audio, "<i2") / 32768.0 for f in spoken])
    env_in = _rms(speech, TTS_RATE // config.FPS)
    env_out = _rms(heard, OUT_RATE // config.FPS)
    n = min(len(env_in), len(env_out)) - 4
    corr = {lag: np.corrcoef(env_in[2:2 + n], env_out[2 + lag:2 + lag + n])[0, 1] for lag in (-2, -1, 0, 1, 2)}
    assert max(corr, key=corr.get) == 0 and corr[0] > 0.95, corr
    # the mouth moves while it speaks
    sp = {f.pts for f in spoken}
    pics = {f.pts: np.frombuffer(f.image, np.uint8).reshape(SIZE, SIZE, 3).astype(float) for f in images}
    moving = np.mean([np.abs(pics[p + FRAME_NS] - pics[p]).mean() for p in sorted(sp)[5:40] if p + FRAME_NS in pics])
    still = [np.abs(pics[p + FRAME_NS] - pics[p]).mean() for p in sorted(pics)[:8] if p not in sp]
    assert moving > np.mean(still)
    assert av.avatar.stats.speech_frames == len(spoken)


def test_interruption_stops_speech_within_a_window(server):
    tts, _ = _tts_frames(6.0)
    av = _avatar(server)
    down, _ = _run(av, tts + [SleepFrame(3.0), InterruptionFrame(), SleepFrame(2.4)])
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    before = [f for f in down[:cut] if isinstance(f, TTSAudioRawFrame)]
    after = [f for f in down[cut:] if isinstance(f, OutputAudioRawFrame)]
    assert len(before) >= 25, f"latency p50 {av.avatar.stats.latency():.2f} s"
    late = [f for f in after if isinstance(f, TTSAudioRawFrame)]
    assert len(late) <= 12, f"{len(late)} speech frames after the interruption"       # at most one window
    assert len(after) >= 30 and not any(isinstance(f, TTSAudioRawFrame) for f in after[-20:])
    assert not any(any(f.audio) for f in after[-20:])
    assert not [f for f in down if isinstance(f, TTSStoppedFrame)], "the interrupted turn never ends on screen"
    images = [f.pts for f in down if isinstance(f, OutputImageRawFrame)]
    assert images == sorted(images) and len(set(images)) == len(images)
    assert av.avatar.stats.interrupts == 1


def test_motion_only_listens_to_the_users_camera_and_microphone(server):
    video = [rgb for _, _, rgb in media.iter_video_frames(str(DATA / "real" / "WolfgangLanger_Pexels.mp4"),
                                                          fps=config.FPS)][:40]
    voice = media.decode_audio(str(DATA / "tts" / "tts1.ogg"), sample_rate=48000)
    voice = (np.clip(voice, -1, 1) * 32767).astype("<i2")
    frames = []
    for k, rgb in enumerate(video):          # camera and mic as a transport delivers them, in real time
        h, w = rgb.shape[:2]
        frames.append(UserImageRawFrame(image=rgb.tobytes(), size=(w, h), format="RGB", user_id="u"))
        stereo = np.repeat(voice[k * 1920:(k + 1) * 1920, None], 2, axis=1)
        frames.append(InputAudioRawFrame(audio=stereo.tobytes(), sample_rate=48000, num_channels=2))
        frames.append(SleepFrame(1 / config.FPS))
    av = _avatar(server, output="motion")
    # the user starts a turn: Pipecat interrupts, but a listening avatar has nothing to drop
    down, _ = _run(av, [SleepFrame(0.2), InterruptionFrame()] + frames + [SleepFrame(0.5)])
    assert av.avatar.stats.interrupts == 0
    shapes = [f for f in down if isinstance(f, ARKitBlendshapeFrame)]
    assert not [f for f in down if isinstance(f, OutputImageRawFrame)]
    assert len(shapes) >= 40
    assert all(list(f.values) == list(motion.CHANNELS) and f.array.shape == (58,) for f in shapes)
    assert [f.index for f in shapes] == list(range(shapes[0].index, shapes[0].index + len(shapes)))
    assert all(f.pts is None for f in shapes), "no pts: the transport forwards them in its audio queue"
    assert np.ptp(np.stack([f.array for f in shapes]), axis=0).max() > 0, "the face moves"
    # the user's media reached the session and passed on unchanged
    stats = av.avatar.stats
    assert stats.user_frames_sent >= 20
    assert stats.user_audio_s == pytest.approx(40 * 1920 / 48000, abs=0.1)
    assert sum(isinstance(f, UserImageRawFrame) for f in down) == 40
    assert sum(isinstance(f, InputAudioRawFrame) for f in down) == 40
    # each blendshape frame is followed by its (silent, listening) audio
    for i, f in enumerate(down[:-1]):
        if isinstance(f, ARKitBlendshapeFrame):
            assert isinstance(down[i + 1], OutputAudioRawFrame) and down[i + 1].pts == f.index * FRAME_NS


def test_cancel_closes_the_session_at_once(server):
    tts, _ = _tts_frames(6.0)
    av = _avatar(server)
    down, _ = _run(av, tts + [SleepFrame(1.5), CancelFrame()], send_end_frame=False)
    assert av.avatar.stats.frames < 6 * config.FPS, "the session's clock stopped before the 6 s were sent"
    spoken = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert len(spoken) < 3 * config.FPS, "the queued 6 s were not played out"
    assert av.avatar.ended.is_set(), "the session is over"
    assert any(isinstance(f, CancelFrame) for f in down)


def test_a_session_ended_by_the_server_is_reported(server):
    from echo_stream.serve.client import AvatarClient

    av = _avatar(server)

    async def main():
        async def end_it():                     # what a server drain or an operator does to a session
            while av.avatar is None or not av.avatar.session_id:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            async with AvatarClient(server) as c:
                await c.control(av.avatar.session_id, "end")
        ender = asyncio.create_task(end_it())
        res = await run_test(av, frames_to_send=[SleepFrame(6.0)], start_timeout=30)
        await ender
        return res

    down, up = asyncio.run(main())
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert errors and f"echo-stream session {av.avatar.session_id[:8]}" in errors[0].error, up
    assert not av.is_usable


def test_unreachable_server_is_a_fatal_error_naming_it():
    av = EchoStreamAvatar("127.0.0.1:9", portrait=SAMPLE_PORTRAIT, size=SIZE)
    down, up = asyncio.run(run_test(av, frames_to_send=[SleepFrame(0.3)], start_timeout=30))
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert errors and "127.0.0.1:9" in errors[0].error
    assert not av.is_usable        # permanent: the worker's ProcessorUnusablePolicy decides (CANCEL ends the bot)
    assert not [f for f in down if isinstance(f, OutputImageRawFrame)]


def test_bad_arguments_and_images_are_named(tmp_path):
    with pytest.raises(InputError, match="host:port"):
        EchoStreamAvatar("localhost", portrait=b"x")
    with pytest.raises(InputError, match="video, motion or both"):
        EchoStreamAvatar("h:1", portrait=b"x", output="gif")
    with pytest.raises(InputError, match="multiple of 25"):
        EchoStreamAvatar("h:1", portrait=b"x", sample_rate=22051)
    with pytest.raises(InputError, match="not found"):
        EchoStreamAvatar("h:1", portrait=tmp_path / "none.jpg")
    with pytest.raises(InputError, match="avatar_id"):
        EchoStreamAvatar("h:1")
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    np.testing.assert_array_equal(image_to_rgb(rgb.tobytes(), (6, 4), "RGB"), rgb)
    bgra = np.concatenate([rgb[..., ::-1], np.full((4, 6, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(image_to_rgb(bgra.tobytes(), (6, 4), "BGRA"), rgb)
    jpeg = SAMPLE_PORTRAIT.read_bytes()
    assert image_to_rgb(jpeg, (0, 0), "JPEG").ndim == 3
    with pytest.raises(InputError, match="4x4 RGB"):
        image_to_rgb(b"\0" * 10, (4, 4), "RGB")
    with pytest.raises(InputError, match="YUV"):
        image_to_rgb(b"\0" * 10, (4, 4), "YUV")

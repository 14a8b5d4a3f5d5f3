"""LiveAvatar (echo_stream.live) against a real served pipeline: the clock never stops, frames carry their
audio, utterance ends and interrupts, the user's real camera and voice reach the session."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from echo_stream import config, media, motion  # noqa: E402
from echo_stream.live import LiveAvatar, fit_user_frame  # noqa: E402
from echo_stream.samples import SAMPLE_PORTRAIT  # noqa: E402

from .served import served  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DATA = Path(__file__).parent / "data"
SIZE = 96


@pytest.fixture(scope="module")
def server():
    with served(SIZE, max_sessions=4) as (st, target, _):
        yield st, target


def _speech(seconds: float, rate: int) -> np.ndarray:
    x = media.decode_audio(str(DATA / "tts" / "tts0.ogg"), sample_rate=rate)
    return x[: int(seconds * rate)]


async def _collect(avatar: LiveAvatar, until, limit_s: float = 30.0) -> list:
    got = []

    async def run():
        async for fr in avatar.frames():
            got.append(fr)
            if until(got):
                return
    await asyncio.wait_for(run(), limit_s)
    return got


def test_speech_comes_back_paired_with_its_frames(server):
    st, target = server
    rate = 24000
    speech = _speech(1.6, rate)

    async def main():
        async with LiveAvatar(target, portrait=SAMPLE_PORTRAIT.read_bytes(), size=SIZE, seed=3,
                              sample_rate=rate, output="both") as av:
            await asyncio.sleep(0.3)                 # listening first: the clock runs on silence
            utt = av.push_speech(speech)
            assert av.end_speech() == utt
            got = await _collect(av, lambda g: sum(f.speech for f in g) >= 40 and len(g) > 2
                                 and not any(f.speech for f in g[-20:]))
        return got

    got = st.run(main(), timeout=90)
    idx = [f.index for f in got]
    assert idx == list(range(idx[0], idx[0] + len(idx))), "frames come in order, none missing"
    assert all(f.rgb is not None and f.rgb.shape == (SIZE, SIZE, 3) for f in got)
    spoken = [f for f in got if f.speech]
    assert abs(len(spoken) - len(speech) / rate * config.FPS) <= 1
    assert [f.index for f in spoken] == list(range(spoken[0].index, spoken[-1].index + 1)), "speech is contiguous"
    heard = np.concatenate([f.audio for f in spoken])
    np.testing.assert_array_equal(heard[: len(speech)], speech)     # each frame plays exactly its own audio
    assert all(len(f.audio) == rate // config.FPS for f in got)
    ends = [f for f in got if f.utterance_end]
    assert len(ends) == 1 and ends[0] is spoken[-1] and ends[0].utterance == spoken[0].utterance
    silent = [f for f in got if not f.speech]
    assert all(not f.audio.any() for f in silent)
    # the jaw opens while it speaks and rests while it listens (the frames after the speech, lookahead past)
    jaw = motion.CHANNELS.index("jawOpen")
    assert all(f.motion is not None for f in got)
    speaking = np.std([f.motion[jaw] for f in spoken])
    listening = np.std([f.motion[jaw] for f in got[got.index(spoken[-1]) + 8:]] or [0.0])
    assert speaking > 2 * listening, (speaking, listening)
    assert all(f.latency_s > 0 for f in got)                   # measured, not bounded here (bench web)
    assert [f.sent_at for f in got] == sorted(f.sent_at for f in got)


def test_interrupt_stops_speech_within_a_window(server):
    st, target = server

    async def main():
        async with LiveAvatar(target, portrait=SAMPLE_PORTRAIT.read_bytes(), size=SIZE, seed=1) as av:
            av.push_speech(_speech(6.0, config.SAMPLE_RATE))
            av.end_speech()
            got = await _collect(av, lambda g: sum(f.speech for f in g) >= 25)
            await av.interrupt()
            cut = got[-1].index
            assert not av.speaking
            after = await _collect(av, lambda g: len(g) >= 40)
        return cut, after, av.stats

    cut, after, stats = st.run(main(), timeout=90)
    assert stats.interrupts == 1
    late = [f.index for f in after if f.speech]
    # speech frames after the interrupt are only those the server had already generated: at most one window
    assert len(late) <= 12, late
    assert not any(f.speech for f in after[-20:])
    idx = [f.index for f in after]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)


def test_user_camera_and_voice_reach_the_session(server):
    st, target = server
    frames = [rgb for _, _, rgb in media.iter_video_frames(str(DATA / "real" / "WolfgangLanger_Pexels.mp4"),
                                                           fps=config.FPS)][:75]
    voice = media.decode_audio(str(DATA / "tts" / "tts1.ogg"), sample_rate=48000)

    async def main():
        async with LiveAvatar(target, output="motion", seed=2) as av:
            await asyncio.sleep(0.05)
            for k, rgb in enumerate(frames):
                av.push_user_frame(rgb)
                av.push_user_audio(voice[k * 1920:(k + 1) * 1920], 48000)
                await asyncio.sleep(1 / config.FPS)
            got = await _collect(av, lambda g: len(g) >= 50)
        return got, av.stats

    got, stats = st.run(main(), timeout=90)
    assert stats.user_frames_sent >= 50
    assert stats.user_audio_s == pytest.approx(75 * 1920 / 48000, abs=0.1)
    assert all(f.motion is not None and f.motion.shape == (58,) and f.rgb is None for f in got)


def test_a_stalled_event_loop_does_not_end_the_session(server):
    """After the client's event loop stalls (a busy process), the pump's catch-up and a long microphone push go
    in messages within the server's limits (1 s, 256 KiB each): the session carries on."""
    _, target = server
    voice = media.decode_audio(str(DATA / "tts" / "tts1.ogg"), sample_rate=48000)

    async def main():
        async with LiveAvatar(target, output="motion", seed=4, sample_rate=48000) as av:
            await _collect(av, lambda g: len(g) >= 5)
            av.push_user_audio(voice[: 48000 * 2], 48000)    # two seconds in one push
            time.sleep(1.6)                                     # the loop stalls: ~40 frames are due at once
            got = await _collect(av, lambda g: len(g) >= 60)
            return got, av.error, av.stats

    got, error, stats = asyncio.run(main())
    assert error is None
    idx = [f.index for f in got]
    assert idx == list(range(idx[0], idx[0] + len(idx)))
    assert stats.user_audio_s >= 1.9


def test_fit_user_frame_bounds_and_checks():
    out = fit_user_frame(np.zeros((720, 1280, 3), np.uint8))
    assert max(out.shape[:2]) <= 320 and out.shape[0] % 2 == 0 and out.shape[1] % 2 == 0
    with pytest.raises(Exception, match="RGB"):
        fit_user_frame(np.zeros((10, 10), np.uint8))


def test_bad_arguments_are_named():
    with pytest.raises(Exception, match="multiple of 25"):
        LiveAvatar("x:1", sample_rate=22051)
    with pytest.raises(Exception, match="video, motion or both"):
        LiveAvatar("x:1", output="gif")
    av = LiveAvatar("x:1", sample_rate=24000)
    with pytest.raises(Exception, match="24000"):
        av.push_speech(np.zeros(10, np.float32), sample_rate=16000)

"""The LiveKit adapter (echo_stream.integrations.livekit) driven by LiveKit's own AvatarRunner, against a real
served echo-stream pipeline.

Real: AvatarRunner, QueueAudioOutput (the agent side's audio output and the runner's audio receiver, as an
in-process avatar plugin uses it), AVSynchronizer / AudioSource / VideoSource (livekit.rtc's native media
pipeline), rtc.VideoStream / rtc.AudioStream reading the user's camera and microphone tracks, real speech and a
real face video. The one stand-in is the room (no LiveKit server here): always connected, ``publish_track``
records the track and its subscription is immediate; the user's tracks are local tracks announced with the
room's ``track_subscribed`` event as a connected room would."""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("livekit.agents")

from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarOptions  # noqa: E402

from echo_stream import config, media  # noqa: E402
from echo_stream.errors import InputError  # noqa: E402
from echo_stream.integrations.livekit import (  # noqa: E402
    EchoStreamAvatarSession,
    EchoStreamVideoGenerator,
    avatar_options,
    avatar_worker_token,
    check_options,
)
from echo_stream.live import LiveAvatar  # noqa: E402
from echo_stream.samples import SAMPLE_PORTRAIT  # noqa: E402

from .served import served  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DATA = Path(__file__).parent / "data"
SIZE = 96
RATE = 24000          # the avatar's (and the published audio's) rate; the TTS speaks at 16 kHz: resampled
TTS_RATE = 16000


@pytest.fixture(scope="module")
def server():
    with served(SIZE, max_sessions=4) as (_, target, _backend):
        yield target


class _Publication:
    def __init__(self, source=rtc.TrackSource.SOURCE_UNKNOWN):
        self.source = source

    async def wait_for_subscription(self) -> None:
        return None


class _LocalParticipant:
    identity = "agent"

    def __init__(self):
        self.published: list = []

    async def publish_track(self, track, options):
        self.published.append((track.name, options.source))
        return _Publication(options.source)


class _User:
    identity = "user"
    kind = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD


class StandInRoom(rtc.EventEmitter):
    """What AvatarRunner and UserMediaForwarder use of rtc.Room, without a server."""

    def __init__(self):
        super().__init__()
        self.name = "test-room"
        self.local_participant = _LocalParticipant()
        self.remote_participants: dict = {}

    def isconnected(self) -> bool:
        return True


def _tts(seconds: float, name: str = "tts0.ogg") -> tuple[list[rtc.AudioFrame], np.ndarray]:
    x = media.decode_audio(str(DATA / "tts" / name), sample_rate=TTS_RATE)[: int(seconds * TTS_RATE)]
    pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16)
    n = TTS_RATE // 50
    return [rtc.AudioFrame(pcm[i:i + n].tobytes(), TTS_RATE, 1, len(pcm[i:i + n])) for i in range(0, len(pcm), n)], x


def _spy(runner) -> list:
    """Records (time, frame) for everything the runner pushes into its AVSynchronizer (the room's tracks)."""
    pushed: list = []
    push = runner.av_sync.push

    async def spy(frame, *a, **kw):
        pushed.append((time.monotonic(), frame))
        return await push(frame, *a, **kw)

    runner.av_sync.push = spy
    return pushed


def _rms(x: np.ndarray, n: int) -> np.ndarray:
    k = len(x) // n
    return np.sqrt((x[: k * n].reshape(k, n) ** 2).mean(axis=1))


def _avatar(target) -> LiveAvatar:
    return LiveAvatar(target, portrait=SAMPLE_PORTRAIT.read_bytes(), size=SIZE, seed=3, sample_rate=RATE)


def test_speech_frames_at_25_fps_and_segment_end_after_its_last_frame(server):
    seconds = 2.0
    tts, speech = _tts(seconds)

    async def main():
        room = StandInRoom()
        avatar = _avatar(server)
        session = EchoStreamAvatarSession(avatar, listen=False)
        handle = await session.start(None, room)
        pushed = _spy(handle.runner)
        out = session.audio_output
        events = []
        out.on("playback_started", lambda ev: events.append(("started", sum(
            isinstance(f, rtc.AudioFrame) for _, f in pushed))))
        out.on("playback_finished", lambda ev: events.append(("finished", ev, sum(
            isinstance(f, rtc.AudioFrame) for _, f in pushed))))
        await asyncio.sleep(0.4)                 # listening first
        for f in tts:                            # what AgentSession does with its TTS audio
            await out.capture_frame(f)
        out.flush()
        ev = await asyncio.wait_for(out.wait_for_playout(), 30)
        await asyncio.sleep(0.4)
        await session.aclose()
        frames_seen = avatar.stats.frames
        return room, pushed, events, ev, frames_seen

    room, pushed, events, ev, frames_seen = asyncio.run(main())
    frames = [f for _, f in pushed]
    audio = [f for f in frames if isinstance(f, rtc.AudioFrame)]
    video = [(t, f) for t, f in pushed if isinstance(f, rtc.VideoFrame)]
    assert all(f.width == SIZE and f.height == SIZE and f.type == rtc.VideoBufferType.RGB24 for _, f in video)
    assert abs(len(audio) - seconds * config.FPS) <= 1
    assert all(f.sample_rate == RATE and f.num_channels == 1 and f.samples_per_channel == RATE // config.FPS
               for f in audio)
    # every audio frame goes right after its own picture; pictures also flow while listening, at 25 fps
    for i, f in enumerate(frames):
        if isinstance(f, rtc.AudioFrame):
            assert isinstance(frames[i - 1], rtc.VideoFrame)
    assert len(video) > len(audio) + 10
    assert len(video) <= frames_seen                    # no picture made up beyond the avatar's timeline
    t = [x for x, _ in video[5:]]
    assert 23 <= (len(t) - 1) / (t[-1] - t[0]) <= 27
    # the agent hears: playback started, then finished (not interrupted) after the segment's very last frame
    kinds = [e[0] for e in events]
    assert kinds == ["started", "finished"]
    assert events[1][2] == len(audio), "AudioSegmentEnd came after the segment's last audio frame"
    assert not ev.interrupted and ev.playback_position == pytest.approx(len(audio) / config.FPS, abs=1e-6)
    # the audio is the speech, frame for frame (per-frame loudness follows the input with no lag)
    heard = np.concatenate([np.frombuffer(f.data, np.int16) / 32768.0 for f in audio])
    env_in, env_out = _rms(speech, TTS_RATE // config.FPS), _rms(heard, RATE // config.FPS)
    n = min(len(env_in), len(env_out)) - 4
    corr = {lag: np.corrcoef(env_in[2:2 + n], env_out[2 + lag:2 + lag + n])[0, 1] for lag in (-2, -1, 0, 1, 2)}
    assert max(corr, key=corr.get) == 0 and corr[0] > 0.95, corr
    assert ("avatar_video", rtc.TrackSource.SOURCE_CAMERA) in room.local_participant.published
    assert ("avatar_audio", rtc.TrackSource.SOURCE_MICROPHONE) in room.local_participant.published


def test_clear_buffer_stops_speech_within_a_window(server):
    tts, _ = _tts(6.0)

    async def main():
        session = EchoStreamAvatarSession(_avatar(server), listen=False)
        handle = await session.start(None, StandInRoom())
        pushed = _spy(handle.runner)
        out = session.audio_output
        finished = []
        out.on("playback_finished", finished.append)
        for f in tts:
            await out.capture_frame(f)
        out.flush()
        t0 = time.monotonic()
        while sum(isinstance(f, rtc.AudioFrame) for _, f in pushed) < 25 and time.monotonic() - t0 < 30:
            await asyncio.sleep(0.02)
        cut = len(pushed)
        out.clear_buffer()                       # the agent was interrupted by the user
        ev = await asyncio.wait_for(out.wait_for_playout(), 10)
        await asyncio.sleep(2.4)       # the server restarts at the playback position: a short pause, then frames
        await session.aclose()
        return pushed, cut, finished, ev, session.avatar.stats

    pushed, cut, finished, ev, stats = asyncio.run(main())
    assert ev.interrupted and len(finished) == 1, "one playback_finished, marked interrupted"
    before = [f for _, f in pushed[:cut] if isinstance(f, rtc.AudioFrame)]
    after = [f for _, f in pushed[cut:]]
    assert 25 <= len(before) < 6 * config.FPS
    late = [f for f in after if isinstance(f, rtc.AudioFrame)]
    assert len(late) <= 12, f"{len(late)} speech frames after clear_buffer"      # at most one window
    assert ev.playback_position == pytest.approx((len(before) + len(late)) / config.FPS, abs=0.2)
    tv = [t for t, f in pushed[cut:] if isinstance(f, rtc.VideoFrame)]
    gaps = np.diff(tv)
    assert len(tv) >= 30, f"the picture keeps coming: {len(tv)} frames, gaps {np.round(gaps, 2).tolist()}"
    assert not any(isinstance(f, rtc.AudioFrame) for f in after[-20:])
    assert stats.interrupts == 1


def test_the_users_camera_and_microphone_tracks_reach_the_session(server):
    video = [rgb for _, _, rgb in media.iter_video_frames(str(DATA / "real" / "WolfgangLanger_Pexels.mp4"),
                                                          fps=config.FPS)][:40]
    voice = (np.clip(media.decode_audio(str(DATA / "tts" / "tts1.ogg"), sample_rate=48000), -1, 1)
             * 32767).astype(np.int16)

    async def main():
        room = StandInRoom()
        session = EchoStreamAvatarSession(_avatar(server))
        handle = await session.start(None, room)
        h, w = video[0].shape[:2]
        cam_src, mic_src = rtc.VideoSource(w, h), rtc.AudioSource(48000, 1)
        cam = rtc.LocalVideoTrack.create_video_track("camera", cam_src)
        mic = rtc.LocalAudioTrack.create_audio_track("mic", mic_src)
        room.emit("track_subscribed", cam, _Publication(rtc.TrackSource.SOURCE_CAMERA), _User())
        room.emit("track_subscribed", mic, _Publication(rtc.TrackSource.SOURCE_MICROPHONE), _User())
        room.emit("track_subscribed", rtc.LocalVideoTrack.create_video_track("screen", rtc.VideoSource(8, 8)),
                  _Publication(rtc.TrackSource.SOURCE_SCREENSHARE), _User())      # not a camera: ignored
        await asyncio.sleep(0.1)
        session.audio_output.clear_buffer()      # an agent-side clear while listening: nothing to drop
        for k, rgb in enumerate(video):
            rgba = np.concatenate([rgb, np.full((h, w, 1), 255, np.uint8)], axis=2)
            cam_src.capture_frame(rtc.VideoFrame(w, h, rtc.VideoBufferType.RGBA, rgba.tobytes()))
            chunk = voice[k * 1920:(k + 1) * 1920]
            await mic_src.capture_frame(rtc.AudioFrame(chunk.tobytes(), 48000, 1, len(chunk)))
            await asyncio.sleep(0.5 / config.FPS)
        await asyncio.sleep(0.5)
        fwd = handle.forwarder
        listened = (fwd.video_frames, fwd.audio_frames, len(fwd._tasks))
        await session.aclose()
        return listened, session.avatar.stats

    (n_video, n_audio, readers), stats = asyncio.run(main())
    assert readers == 2, "one camera reader and one microphone reader (the screen share is not the user's face)"
    assert n_video >= 20 and n_audio >= 50
    assert stats.user_frames_sent >= 15
    assert stats.user_audio_s == pytest.approx(40 * 1920 / 48000, abs=0.25)
    assert stats.interrupts == 0, "clear_buffer while listening leaves the session's generation alone"


def test_generator_contract_and_bad_options():
    av = LiveAvatar("127.0.0.1:9", size=SIZE, sample_rate=RATE, portrait=b"x")
    opts = avatar_options(av)
    assert (opts.video_width, opts.video_height, opts.video_fps, opts.audio_sample_rate, opts.audio_channels) == \
        (SIZE, SIZE, 25, RATE, 1)
    check_options(opts, av)
    with pytest.raises(InputError, match="video_fps.*30"):
        check_options(AvatarOptions(SIZE, SIZE, 30, RATE, 1), av)
    with pytest.raises(InputError, match="audio_sample_rate"):
        check_options(AvatarOptions(SIZE, SIZE, 25, 48000, 1), av)
    with pytest.raises(InputError, match="motion"):
        EchoStreamVideoGenerator(LiveAvatar("127.0.0.1:9", output="motion"))
    gen = EchoStreamVideoGenerator(av)

    async def feed():
        # stereo 48 kHz in, mono 24 kHz speech queued; the segment end closes the utterance
        x = np.zeros((4800, 2), np.int16)
        await gen.push_audio(rtc.AudioFrame(x.tobytes(), 48000, 2, 4800))
        await gen.push_audio(AudioSegmentEnd())
        with pytest.raises(InputError, match="AudioFrame"):
            await gen.push_audio(b"\0\0")
    asyncio.run(feed())
    assert av.queued_speech_s() == pytest.approx(0.1, abs=0.01)
    assert gen._ends == [1]
    tok = avatar_worker_token("key", "secret-secret-secret-secret-32by", room="r", agent_identity="agent")
    import jwt                                # pyjwt: a dependency of livekit-api
    claims = jwt.decode(tok, options={"verify_signature": False})
    assert claims["sub"] == "echo-stream-avatar" and claims["video"]["room"] == "r"
    assert claims["attributes"]["lk.publish_on_behalf"] == "agent" and claims["kind"] == "agent"


def test_worker_entry_point_names_what_is_missing(tmp_path, monkeypatch, capsys):
    from echo_stream.integrations.livekit import main

    monkeypatch.delenv("LIVEKIT_URL", raising=False)
    monkeypatch.delenv("LIVEKIT_TOKEN", raising=False)

    def error(*args) -> str:
        with pytest.raises(SystemExit) as e:
            main(list(args))
        assert e.value.code == 2
        return capsys.readouterr().err
    assert "--url and --token" in error("--portrait", str(SAMPLE_PORTRAIT))
    assert "none.jpg: file not found" in error("--url", "ws://x", "--token", "t",
                                               "--portrait", str(tmp_path / "none.jpg"))
    handlers = list(logging.getLogger().handlers)
    assert "multiple of 25" in error("--url", "ws://x", "--token", "t", "--portrait", str(SAMPLE_PORTRAIT),
                                     "--sample-rate", "22051")
    assert logging.getLogger().handlers == handlers    # a refused start leaves the process's logging alone

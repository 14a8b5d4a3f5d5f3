"""LiveKit Agents adapter: an echo-stream avatar as a ``VideoGenerator`` for ``AvatarRunner`` (extra ``[livekit]``,
livekit-agents 1.8+).

:class:`EchoStreamVideoGenerator` implements ``livekit.agents.voice.avatar.VideoGenerator`` on a
:class:`~echo_stream.live.LiveAvatar` (one ``echo-stream serve`` session):

* ``push_audio(rtc.AudioFrame)``: the agent's speech (TTS), resampled to the avatar's rate if needed, is queued
  as the avatar's speech; ``push_audio(AudioSegmentEnd())`` ends the segment (``LiveAvatar.end_speech``);
* ``clear_buffer()`` (the user interrupted): ``LiveAvatar.interrupt`` drops the queued speech here and the
  server's buffered windows; ``AvatarRunner`` then reports ``playback_finished(interrupted=True)`` itself, so the
  interrupted segment's ``AudioSegmentEnd`` is never yielded;
* iterating yields, 25 times a second for as long as the session lives, an ``rtc.VideoFrame`` (RGB24) followed,
  while the avatar speaks, by that frame's own ``rtc.AudioFrame`` (40 ms), and ``AudioSegmentEnd`` right after
  the last frame of a segment: ``AvatarRunner`` pushes video and audio through its ``AVSynchronizer``, counts
  the audio as the playback position and tells the agent ``playback_finished(interrupted=False)`` on the
  ``AudioSegmentEnd``. While the avatar listens, only video frames are yielded (as LiveKit's own examples do:
  an audio frame would count as playback).

Two ways to run it (docs/integrations.md):

* **in the agent's process**: :class:`EchoStreamAvatarSession` ``.start(agent_session, room)``; the agent's own
  participant publishes the avatar's video and audio (``QueueAudioOutput`` carries the agent's speech);
* **as its own participant** (an avatar worker): :func:`run_avatar_worker` joins the room with a token from
  :func:`avatar_worker_token`, receives the agent's speech over LiveKit data streams (``DataStreamAudioReceiver``;
  the agent routes it with ``DataStreamAudioOutput``) and publishes on the agent's behalf.

Either way :class:`UserMediaForwarder` feeds the user's published camera (``rtc.VideoStream``) and microphone
(``rtc.AudioStream``) to the session, which reacts to them while listening.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import numpy as np

from .. import config
from ..errors import InputError
from ..live import AvatarFrame, LiveAvatar

try:
    from livekit import rtc
    from livekit.agents.voice.avatar import (
        AudioReceiver,
        AudioSegmentEnd,
        AvatarOptions,
        AvatarRunner,
        DataStreamAudioReceiver,
        QueueAudioOutput,
        VideoGenerator,
    )
except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"echo_stream.integrations.livekit needs livekit-agents: pip install 'echo-stream[livekit]' "
                      f"({e})") from e

log = logging.getLogger(__name__)

#: the sample rate of the user's microphone as sent to the session (its features run at 16 kHz)
USER_AUDIO_RATE = config.SAMPLE_RATE


def avatar_options(avatar: LiveAvatar) -> AvatarOptions:
    """The ``AvatarOptions`` that match ``avatar``: its square frame size, 25 fps, its sample rate, mono."""
    if avatar.output == "motion":
        raise InputError("output", "a LiveKit avatar publishes video: use output='video' or 'both', not 'motion'")
    return AvatarOptions(video_width=avatar.size, video_height=avatar.size, video_fps=config.FPS,
                         audio_sample_rate=avatar.sample_rate, audio_channels=1)


def check_options(options: AvatarOptions, avatar: LiveAvatar) -> None:
    """Raise :class:`InputError` naming the first ``AvatarOptions`` field the avatar cannot honour."""
    want = avatar_options(avatar)
    for name in ("video_fps", "audio_sample_rate", "audio_channels", "video_width", "video_height"):
        if getattr(options, name) != getattr(want, name):
            raise InputError(f"AvatarOptions.{name}", f"{getattr(options, name)}: this avatar produces "
                                                      f"{getattr(want, name)} (use avatar_options(avatar))")


class EchoStreamVideoGenerator(VideoGenerator):
    """``VideoGenerator`` backed by a :class:`LiveAvatar` (see the module docstring).

    The avatar is started by :meth:`start` (or on first iteration) and closed by :meth:`aclose`.
    ``on_frame``: called with every :class:`~echo_stream.live.AvatarFrame` (e.g. its ``motion`` with
    ``output='both'``, to send blendshapes to a 3D client over the room's data channel).
    """

    def __init__(self, avatar: LiveAvatar, *, on_frame: Callable[[AvatarFrame], None] | None = None):
        avatar_options(avatar)                    # refuses output='motion'
        self.avatar = avatar
        self.on_frame = on_frame
        self._started = False
        self._resampler: rtc.AudioResampler | None = None
        self._resampler_rate: int | None = None
        self._segment_open = False
        self._ends: list[int] = []                # utterances whose AudioSegmentEnd is due after their last frame
        self._loose_ends = 0                      # segments without audio: their end is due at once
        self._last_video: rtc.VideoFrame | None = None
        self._iter_started = 0.0

    async def start(self) -> None:
        if not self._started:
            self._started = True
            await self.avatar.start()

    async def aclose(self) -> None:
        if self._started:
            await self.avatar.close()

    # ------------------------------------------------------------------ VideoGenerator
    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        av = self.avatar
        if isinstance(frame, AudioSegmentEnd):
            if self._resampler is not None:
                for f in self._resampler.flush():
                    self._speak(f)
                self._resampler = None
            u = av.end_speech()
            self._segment_open = False
            if u is None:
                self._loose_ends += 1
            else:
                self._ends.append(u)
            return
        if not isinstance(frame, rtc.AudioFrame):
            raise InputError("avatar audio", f"expected rtc.AudioFrame or AudioSegmentEnd, got {type(frame).__name__}")
        if frame.num_channels > 1:             # the avatar speaks mono
            x = np.frombuffer(frame.data, np.int16).reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
            frame = rtc.AudioFrame(x.tobytes(), frame.sample_rate, 1, len(x))
        if frame.sample_rate != av.sample_rate:
            if self._resampler is None or self._resampler_rate != frame.sample_rate:
                self._resampler = rtc.AudioResampler(frame.sample_rate, av.sample_rate, num_channels=1)
                self._resampler_rate = frame.sample_rate
            for f in self._resampler.push(frame):
                self._speak(f)
        else:
            self._speak(frame)

    def _speak(self, frame: rtc.AudioFrame) -> None:
        x = np.frombuffer(frame.data, np.int16)
        if len(x):
            self.avatar.push_speech(x)
            self._segment_open = True

    async def clear_buffer(self) -> None:
        busy = self._segment_open or bool(self._ends)   # speech sent whose frames are still to come
        self._ends.clear()
        self._loose_ends = 0
        self._segment_open = False
        self._resampler = None
        if self._started and (self.avatar.speaking or busy):   # a listening avatar has nothing to drop
            await self.avatar.interrupt()

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._frames()

    # ------------------------------------------------------------------ frames out
    async def _frames(self):
        await self.start()
        self._iter_started = time.time()
        av = self.avatar
        async for fr in av.frames():
            if not fr.speech and fr.sent_at < self._iter_started:
                continue                           # made before anyone was reading: stale silence
            if self.on_frame is not None:
                self.on_frame(fr)
            while self._loose_ends and not self._ends:
                self._loose_ends -= 1
                yield AudioSegmentEnd()
            video = self._video(fr)
            if video is not None:
                yield video
            if fr.speech:
                pcm = (np.clip(fr.audio, -1.0, 1.0) * 32767.0).astype(np.int16)
                yield rtc.AudioFrame(pcm.tobytes(), av.sample_rate, 1, len(pcm))
            if fr.utterance_end and fr.utterance in self._ends:
                # segments end in order: this one and any older ones whose end frame was void (interrupted)
                k = self._ends.index(fr.utterance)
                del self._ends[: k + 1]
                yield AudioSegmentEnd()

    def _video(self, fr: AvatarFrame) -> rtc.VideoFrame | None:
        if fr.rgb is None:                         # a gap frame (server fault): repeat the last picture
            return self._last_video
        h, w = fr.rgb.shape[:2]
        self._last_video = rtc.VideoFrame(w, h, rtc.VideoBufferType.RGB24, np.ascontiguousarray(fr.rgb).tobytes())
        return self._last_video


class UserMediaForwarder:
    """Feeds the user's published camera and microphone to ``avatar`` (``rtc.VideoStream`` / ``rtc.AudioStream``).

    ``identity``: the user's participant identity; None: any participant that is not an agent (the first camera
    and microphone subscribed). Tracks already subscribed when :meth:`start` runs are picked up too.
    """

    def __init__(self, room: rtc.Room, avatar: LiveAvatar, *, identity: str | None = None):
        self.room, self.avatar, self.identity = room, avatar, identity
        self._tasks: dict[tuple, asyncio.Task] = {}   # track -> its reader
        self._kinds: dict[tuple, str] = {}            # track -> "video" / "audio"
        self.video_frames = 0
        self.audio_frames = 0

    def start(self) -> None:
        self.room.on("track_subscribed", self._on_track_subscribed)
        self.room.on("track_unsubscribed", self._on_track_unsubscribed)
        for p in list(getattr(self.room, "remote_participants", {}).values()):
            for pub in list(p.track_publications.values()):
                if pub.track is not None and pub.subscribed:
                    self._on_track_subscribed(pub.track, pub, p)

    async def aclose(self) -> None:
        self.room.off("track_subscribed", self._on_track_subscribed)
        self.room.off("track_unsubscribed", self._on_track_unsubscribed)
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _wanted(self, participant) -> bool:
        if self.identity is not None:
            return participant.identity == self.identity
        return getattr(participant, "kind", None) != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT

    def _on_track_subscribed(self, track, publication, participant) -> None:
        key = self._key(track)
        if not self._wanted(participant) or key in self._tasks:
            return
        if track.kind == rtc.TrackKind.KIND_VIDEO and publication.source == rtc.TrackSource.SOURCE_CAMERA:
            kind, read = "video", self._read_video
        elif track.kind == rtc.TrackKind.KIND_AUDIO and publication.source == rtc.TrackSource.SOURCE_MICROPHONE:
            kind, read = "audio", self._read_audio
        else:
            return
        if kind in self._kinds.values():
            return                                # one camera and one microphone are enough
        log.info("avatar listens to %s's %s (%s)", participant.identity, kind, track.sid)
        task = asyncio.get_running_loop().create_task(read(track), name=f"echo-stream-user-{kind}")
        self._tasks[key], self._kinds[key] = task, kind
        task.add_done_callback(lambda _t, k=key: self._forget(k))

    @staticmethod
    def _key(track) -> tuple:
        return track.sid, id(track)               # local tracks all have sid TR_unknown until published

    def _forget(self, key: tuple) -> None:
        self._tasks.pop(key, None)
        self._kinds.pop(key, None)

    def _on_track_unsubscribed(self, track, publication, participant) -> None:
        task = self._tasks.get(self._key(track))
        if task is not None:
            task.cancel()

    async def _read_video(self, track) -> None:
        stream = rtc.VideoStream(track, format=rtc.VideoBufferType.RGB24)
        try:
            async for ev in stream:
                f = ev.frame
                rgb = np.frombuffer(f.data, np.uint8).reshape(f.height, f.width, 3)
                self.avatar.push_user_frame(rgb)
                self.video_frames += 1
        finally:
            await stream.aclose()

    async def _read_audio(self, track) -> None:
        stream = rtc.AudioStream(track, sample_rate=USER_AUDIO_RATE, num_channels=1)
        try:
            async for ev in stream:
                self.avatar.push_user_audio(np.frombuffer(ev.frame.data, np.int16), USER_AUDIO_RATE)
                self.audio_frames += 1
        finally:
            await stream.aclose()


class AvatarHandle:
    """A running avatar in a room: the runner, its generator, the user media forwarder."""

    def __init__(self, runner: AvatarRunner, generator: EchoStreamVideoGenerator,
                 forwarder: UserMediaForwarder | None):
        self.runner, self.generator, self.forwarder = runner, generator, forwarder

    async def wait_for_complete(self) -> None:
        await self.runner.wait_for_complete()

    async def aclose(self) -> None:
        if self.forwarder is not None:
            await self.forwarder.aclose()
        await self.runner.aclose()
        await self.generator.aclose()


async def start_avatar(room: rtc.Room, avatar: LiveAvatar, *, audio_recv: AudioReceiver | None = None,
                       listen: bool = True, user_identity: str | None = None,
                       on_frame: Callable[[AvatarFrame], None] | None = None) -> AvatarHandle:
    """Open the avatar's session and run it in ``room`` with LiveKit's ``AvatarRunner``.

    ``audio_recv``: where the agent's speech comes from; default ``DataStreamAudioReceiver(room)`` (an avatar
    worker joined as its own participant). ``listen``: forward the user's camera and microphone.
    """
    gen = EchoStreamVideoGenerator(avatar, on_frame=on_frame)
    await gen.start()
    runner = None
    forwarder = None
    try:
        runner = AvatarRunner(room, audio_recv=audio_recv if audio_recv is not None else DataStreamAudioReceiver(room),
                              video_gen=gen, options=avatar_options(avatar))
        await runner.start()
        if listen:
            forwarder = UserMediaForwarder(room, avatar, identity=user_identity)
            forwarder.start()
    except BaseException:
        if runner is not None:
            await runner.aclose()
        await gen.aclose()
        raise
    return AvatarHandle(runner, gen, forwarder)


class EchoStreamAvatarSession:
    """The avatar inside the agent's own process and participant (no second participant, no data streams).

    ``await EchoStreamAvatarSession(avatar).start(session, ctx.room)`` before ``session.start(...)``: the agent's
    speech goes to the avatar through a ``QueueAudioOutput`` (installed as the session's audio output tail) and the
    agent's participant publishes the avatar's video and audio. ``aclose()`` at the end of the job.
    """

    def __init__(self, avatar: LiveAvatar, *, listen: bool = True, user_identity: str | None = None,
                 on_frame: Callable[[AvatarFrame], None] | None = None):
        self.avatar = avatar
        self.listen, self.user_identity, self.on_frame = listen, user_identity, on_frame
        self.audio_output: QueueAudioOutput | None = None
        self.handle: AvatarHandle | None = None

    async def start(self, agent_session, room: rtc.Room) -> AvatarHandle:
        self.audio_output = QueueAudioOutput(sample_rate=self.avatar.sample_rate, wait_playback_start=True)
        self.handle = await start_avatar(room, self.avatar, audio_recv=self.audio_output, listen=self.listen,
                                         user_identity=self.user_identity, on_frame=self.on_frame)
        if agent_session is not None:
            agent_session.output.replace_audio_tail(self.audio_output)
        return self.handle

    async def aclose(self) -> None:
        if self.handle is not None:
            await self.handle.aclose()
            self.handle = None


def avatar_worker_token(api_key: str, api_secret: str, *, room: str, identity: str = "echo-stream-avatar",
                        agent_identity: str | None = None, name: str = "echo-stream avatar") -> str:
    """A join token for an avatar worker; with ``agent_identity`` it publishes on that agent's behalf."""
    from livekit import api
    from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF

    tok = (api.AccessToken(api_key, api_secret).with_identity(identity).with_name(name).with_kind("agent")
           .with_grants(api.VideoGrants(room_join=True, room=room)))
    if agent_identity:
        tok = tok.with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: agent_identity})
    return tok.to_jwt()


async def run_avatar_worker(url: str, token: str, avatar: LiveAvatar, *, user_identity: str | None = None) -> None:
    """An avatar worker: join the room, run the avatar until the agent leaves or the room closes.

    The agent routes its speech here with ``DataStreamAudioOutput(room, destination_identity=<this identity>)``.
    """
    room = rtc.Room()
    stop = asyncio.Event()

    @room.on("participant_disconnected")
    def _left(p: rtc.RemoteParticipant):
        if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
            stop.set()

    @room.on("disconnected")
    def _gone(*_):
        stop.set()

    await room.connect(url, token)
    handle = None
    try:
        handle = await start_avatar(room, avatar, user_identity=user_identity)
        done = asyncio.ensure_future(handle.wait_for_complete())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([done, stopped], return_when=asyncio.FIRST_COMPLETED)
        for t in (done, stopped):
            t.cancel()
    finally:
        if handle is not None:
            await handle.aclose()
        await room.disconnect()


def main(argv: list[str] | None = None) -> int:
    """``python -m echo_stream.integrations.livekit``: an avatar worker process (what a dispatcher launches)."""
    import argparse
    import os
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m echo_stream.integrations.livekit",
                                 description="Join a LiveKit room as an echo-stream avatar worker.")
    ap.add_argument("--url", default=os.environ.get("LIVEKIT_URL"), help="LiveKit server URL ($LIVEKIT_URL)")
    ap.add_argument("--token", default=os.environ.get("LIVEKIT_TOKEN"),
                    help="the worker's join token ($LIVEKIT_TOKEN; see avatar_worker_token)")
    ap.add_argument("--server", default=os.environ.get("ECHO_STREAM_SERVER", "127.0.0.1:50051"),
                    help="echo-stream serve host:port ($ECHO_STREAM_SERVER)")
    ap.add_argument("--server-token", default=os.environ.get("ECHO_STREAM_TOKEN"),
                    help="bearer token of the echo-stream server ($ECHO_STREAM_TOKEN)")
    ap.add_argument("--portrait", required=True, help="the face to animate (an image file)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--sample-rate", type=int, default=24000, help="the agent's TTS rate (a multiple of 25)")
    ap.add_argument("--user", default=None, help="identity of the user to listen to (default: any non-agent)")
    a = ap.parse_args(argv)
    if not a.url or not a.token:
        ap.error("--url and --token (or $LIVEKIT_URL and $LIVEKIT_TOKEN) are required")
    portrait = Path(a.portrait)
    if not portrait.is_file():
        ap.error(f"--portrait {portrait}: file not found")
    try:
        avatar = LiveAvatar(a.server, token=a.server_token, portrait=portrait.read_bytes(), size=a.size,
                            sample_rate=a.sample_rate)
    except InputError as e:
        ap.error(str(e))
    # logging is configured only once the arguments are known good: an error above leaves the process's
    # logging as it was (the worker's INFO lines on a stream that may be gone would slow everything after)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(run_avatar_worker(a.url, a.token, avatar, user_identity=a.user))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

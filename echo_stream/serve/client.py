"""Python client of ``echo-stream serve`` (``grpc.aio``), and what ``echo-stream client`` runs.

Low level::

    async with AvatarClient("localhost:50051", token=...) as client:
        s = await client.open(portrait=open("me.jpg", "rb").read(), output="both")
        await s.send_avatar_audio(samples)           # 16 kHz mono float32
        await s.end()
        async for msg in s.messages():               # echo_stream_pb2.ServerMessage
            ...

High level: :func:`stream_inputs` streams local files (or a generated test
signal) in real time and returns a :class:`SessionResult`, whose
:meth:`~SessionResult.save` writes the mp4 / motion Parquet atomically.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc import aio

from .. import atomic, config, motion
from ..errors import InputError
from ..protos import echo_stream_pb2 as pb
from .server import CONTROL_METHOD, SESSION_METHOD

MODES = {"video": pb.OUTPUT_MODE_VIDEO, "motion": pb.OUTPUT_MODE_MOTION, "both": pb.OUTPUT_MODE_BOTH}
CODECS = {"fmp4": pb.VIDEO_CODEC_H264_FMP4, "raw": pb.VIDEO_CODEC_RAW_RGB}


class AvatarClient:
    def __init__(self, target: str, token: str | None = None, tls_ca: bytes | None = None,
                 tls: bool = False, max_message_bytes: int = 16 * 1024 * 1024, own_connection: bool = False):
        """``own_connection``: this client's own TCP connection (by default gRPC shares one between the channels
        of a process to the same target, so a TCP load balancer would see one connection for all of them)."""
        # a connection that fails is tried again after 0.1 s, backing off to 2 s at most (gRPC's defaults: 1 s
        # growing to 120 s): a live session resuming after its server was lost must not sit out a long backoff
        # because its first try met the lost server (a load balancer may still send it there for a while)
        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000)]
        if own_connection:
            opts.append(("grpc.use_local_subchannel_pool", 1))
        if tls or tls_ca:
            self.channel = aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca),
                                              options=opts)
        else:
            self.channel = aio.insecure_channel(target, options=opts)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._session = self.channel.stream_stream(SESSION_METHOD, request_serializer=pb.ClientMessage.SerializeToString,
                                                   response_deserializer=pb.ServerMessage.FromString)
        self._control = self.channel.unary_unary(CONTROL_METHOD,
                                                 request_serializer=pb.SessionControlRequest.SerializeToString,
                                                 response_deserializer=pb.SessionControlReply.FromString)

    async def __aenter__(self) -> "AvatarClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def open(self, portrait: bytes | None = None, avatar_id: str | None = None, output: str = "both",
                   codec: str = "fmp4", size: int | tuple[int, int] = 256, seed: int | None = None,
                   stride: int | None = None) -> "ClientSession":
        """Start a session; returns once the server has issued its id (raises grpc.aio.AioRpcError).

        ``stride``: new frames per generation window (None: the server's default for the output mode).
        """
        w, h = (size, size) if isinstance(size, int) else size
        cfg = pb.SessionConfig(output_mode=MODES[output], codec=CODECS[codec], width=w, height=h, fps=config.FPS,
                               seed=seed or 0, has_seed=seed is not None, stride_frames=stride or 0)
        if portrait is not None:
            cfg.portrait_image = portrait
        elif avatar_id is not None:
            cfg.avatar_id = avatar_id
        return await self.start(cfg)

    async def resume(self, cfg: pb.SessionConfig, session_id: str, next_frame: int) -> "ClientSession":
        """Continue a session whose stream broke, on this server (any server of the deployment): ``cfg`` as the
        session was opened with (``ClientSession.config``), ``next_frame`` the first frame not received. The
        returned session's ``opened.resume_pts`` is where to send the input again from."""
        c = pb.SessionConfig()
        c.CopyFrom(cfg)
        c.resume.session_id = session_id
        c.resume.next_frame = next_frame
        return await self.start(c)

    async def start(self, cfg: pb.SessionConfig) -> "ClientSession":
        """Open a stream with ``cfg`` as its first message and read the server's SessionOpened."""
        call = self._session(metadata=self.metadata)
        s = ClientSession(call)
        s.config = pb.SessionConfig()
        s.config.CopyFrom(cfg)
        s.config.ClearField("resume")
        await s._write(pb.ClientMessage(seq=0, config=cfg), count=False)
        first = await call.read()
        if first is aio.EOF:
            await call.code()          # raises the status
            raise RuntimeError("the server closed the stream without a reply")
        if first.WhichOneof("body") != "opened":
            raise RuntimeError(f"expected SessionOpened, got {first.WhichOneof('body')}")
        s.opened = first.opened
        s.session_id = first.opened.session_id
        if first.opened.resumed:
            s.audio_pts = first.opened.resume_pts
        return s

    async def control(self, session_id: str, kind: str) -> pb.SessionControlReply:
        k = {"interrupt": pb.Control.INTERRUPT, "flush": pb.Control.FLUSH, "end": pb.Control.END}[kind]
        return await self._control(pb.SessionControlRequest(session_id=session_id, control=pb.Control(kind=k)),
                                   metadata=self.metadata)


class ClientSession:
    """One open session: ``send_*`` inputs (seq numbers are filled in), read ``messages()``."""

    def __init__(self, call):
        self.call = call
        self.seq = 0
        self.session_id = ""
        self.opened = None
        self.config: pb.SessionConfig | None = None    # what the session was opened with (for a resume)
        self.audio_pts = 0.0

    async def _write(self, msg: pb.ClientMessage, count: bool = True) -> None:
        if count:
            self.seq += 1
            msg.seq = self.seq
        try:
            await self.call.write(msg)
        except (aio.AioRpcError, aio.UsageError, asyncio.InvalidStateError) as e:
            # the server ended the call (e.g. rejected the session) while we wrote: report ITS status
            code = await self.call.code()
            if code != grpc.StatusCode.OK:
                raise aio.AioRpcError(code, await self.call.initial_metadata(), await self.call.trailing_metadata(),
                                      await self.call.details(), await self.call.debug_error_string()) from None
            raise e

    async def send_avatar_audio(self, samples: np.ndarray, sample_rate: int = config.SAMPLE_RATE,
                                pts: float | None = None) -> None:
        x = np.asarray(samples, np.float32).reshape(-1)
        pts = self.audio_pts if pts is None else pts
        self.audio_pts = pts + len(x) / sample_rate
        await self._write(pb.ClientMessage(pts=pts, avatar_audio=pb.AudioChunk(
            pcm_f32le=x.astype("<f4").tobytes(), sample_rate=sample_rate, channels=1)))

    async def send_user_audio(self, samples: np.ndarray, pts: float, sample_rate: int = config.SAMPLE_RATE) -> None:
        x = np.asarray(samples, np.float32).reshape(-1)
        await self._write(pb.ClientMessage(pts=pts, user_audio=pb.AudioChunk(
            pcm_f32le=x.astype("<f4").tobytes(), sample_rate=sample_rate, channels=1)))

    async def send_user_frame(self, rgb: np.ndarray, pts: float) -> None:
        h, w = rgb.shape[:2]
        await self._write(pb.ClientMessage(pts=pts, user_video=pb.VideoFrame(
            raw_rgb=np.ascontiguousarray(rgb, np.uint8).tobytes(), width=w, height=h)))

    async def send_blendshapes(self, values: dict, pts: float) -> None:
        await self._write(pb.ClientMessage(pts=pts, user_blendshapes=pb.Blendshapes(values=values)))

    async def send_transcript(self, text: str, start: float, end: float, speaker: str = "user") -> None:
        await self._write(pb.ClientMessage(pts=start, transcript=pb.TranscriptSegment(
            speaker=speaker, text=text, end_pts=end)))

    async def _control(self, kind) -> None:
        await self._write(pb.ClientMessage(pts=self.audio_pts, control=pb.Control(kind=kind)))

    async def interrupt(self) -> None:
        await self._control(pb.Control.INTERRUPT)

    async def flush(self) -> None:
        await self._control(pb.Control.FLUSH)

    async def end(self) -> None:
        await self._control(pb.Control.END)
        await self.call.done_writing()

    async def messages(self):
        """Server messages until the stream ends (raises grpc.aio.AioRpcError on an error status)."""
        while True:
            msg = await self.call.read()
            if msg is aio.EOF:
                await self.call.code()
                return
            yield msg


@dataclass
class SessionResult:
    session_id: str = ""
    motion_frames: list = field(default_factory=list)     # frame numbers, arrival order
    motion: list = field(default_factory=list)            # (58,) rows
    video: bytearray = field(default_factory=bytearray)   # fMP4 stream
    raw_frames: list = field(default_factory=list)        # (frame, (H, W, 3)) for the raw codec
    events: list = field(default_factory=list)            # pb.Event
    event_arrival: list = field(default_factory=list)     # ... and when each came (client monotonic time)
    stats: pb.SessionStats | None = None
    sent_audio_s: float = 0.0
    wall_s: float = 0.0
    frame_arrival: dict = field(default_factory=dict)     # frame -> client receive time (monotonic)
    first_send: float | None = None
    video_end: int = 0                                    # frames of video received: [0, video_end)
    earlier_video: list = field(default_factory=list)     # fMP4 streams of the streams before a resume
    resumes: list = field(default_factory=list)           # pb.SessionOpened of each resumed stream
    breaks: list = field(default_factory=list)            # monotonic times the streams broke (one per resume)
    resumed_at: list = field(default_factory=list)        # ... and the resumed streams were opened

    def next_frame(self, output: str) -> int:
        """The first frame not received of the outputs the session wants (every frame before it came: a
        session's frames arrive in order)."""
        ends = []
        if output in ("motion", "both"):
            ends.append(max(self.motion_frames) + 1 if self.motion_frames else 0)
        if output in ("video", "both"):
            ends.append(self.video_end)
        return min(ends)

    def resumed(self, opened) -> None:
        """A new stream of the session: an fMP4 stream starts again (init segment first), kept apart."""
        self.resumes.append(opened)
        self.resumed_at.append(time.monotonic())
        if self.video:
            self.earlier_video.append(self.video)
            self.video = bytearray()

    def add(self, msg: pb.ServerMessage, size: tuple[int, int] = (256, 256)) -> None:
        body = msg.WhichOneof("body")
        now = time.monotonic()
        if body == "motion":
            self.motion_frames.append(int(msg.motion.frame))
            self.motion.append(np.asarray(msg.motion.values, np.float32))
            self.frame_arrival.setdefault(int(msg.motion.frame), now)
        elif body == "video":
            if msg.video.frames == 1 and len(msg.video.data) == size[0] * size[1] * 3:
                self.raw_frames.append((int(msg.video.first_frame),
                                        np.frombuffer(msg.video.data, np.uint8).reshape(size[1], size[0], 3)))
            else:
                self.video += msg.video.data
            for f in range(msg.video.first_frame, msg.video.first_frame + msg.video.frames):
                self.frame_arrival.setdefault(int(f), now)
            self.video_end = max(self.video_end, int(msg.video.first_frame + msg.video.frames))
        elif body == "event":
            self.events.append(msg.event)
            self.event_arrival.append(now)
            if msg.event.kind == pb.Event.ENDED:
                self.stats = msg.event.stats

    def motion_array(self) -> tuple[np.ndarray, np.ndarray]:
        frames = np.asarray(self.motion_frames, np.int64)
        values = np.stack(self.motion) if self.motion else np.zeros((0, motion.NUM_CHANNELS), np.float32)
        return frames, values

    def save(self, video_out: str | None = None, motion_out: str | None = None) -> list[str]:
        """Write the fMP4 and / or the motion Parquet (atomically); returns the paths written. A session resumed
        on new streams has one fMP4 stream per stream: the first goes to ``video_out``, the k-th after it to
        ``<stem>.resumed<k><suffix>``."""
        from pathlib import Path

        from ..generate import motion_table

        wrote = []
        if video_out:
            parts = [v for v in self.earlier_video + [self.video] if v]
            if not parts:
                raise InputError(video_out, "the server sent no H.264 video (output mode motion, or raw codec)")
            p = Path(video_out)
            for k, data in enumerate(parts):
                path = video_out if k == 0 else str(p.with_name(f"{p.stem}.resumed{k}{p.suffix}"))
                atomic.write_bytes(path, bytes(data))
                wrote.append(path)
        if motion_out:
            frames, values = self.motion_array()
            if not len(frames):
                raise InputError(motion_out, "the server sent no motion (output mode video)")
            atomic.write_parquet(motion_table(frames, values), motion_out)
            wrote.append(motion_out)
        return wrote


def test_signal(seconds: float = 4.0, seed: int = 0) -> np.ndarray:
    """A synthetic spoken sentence (16 kHz float32) for trying a server without files."""
    from ..corpus import speech_with_targets

    words = "hello there this is a test of the echo stream server and it keeps talking for a while".split()
    text = " ".join(words[: max(3, int(seconds * 2.5))])
    audio = speech_with_targets(text, seed=seed).audio
    n = int(seconds * config.SAMPLE_RATE)
    return np.resize(audio, n).astype(np.float32) if len(audio) < n else audio[:n]


@dataclass
class Inputs:
    """What a client streams: avatar audio (16 kHz float32) and optional user tracks, all in memory."""

    avatar_audio: np.ndarray
    user_audio: np.ndarray | None = None
    user_frames: list | None = None          # RGB frames on the 25 fps grid
    transcript: list = field(default_factory=list)   # transcript.Segment

    @classmethod
    def from_files(cls, avatar_audio: str, user_video: str | None = None, user_audio: str | None = None,
                   transcript: str | None = None) -> "Inputs":
        """Decode local files the way ``generate`` does (the same samples and frames reach the stages)."""
        from .. import media, transcript as tr
        from ..stages.decode import user_video_size

        avatar = media.decode_audio(avatar_audio)
        ua_path = user_audio
        if ua_path is None and user_video is not None and media.probe(user_video).has_audio:
            ua_path = user_video
        ua = media.decode_audio(ua_path) if ua_path else None
        frames = None
        if user_video is not None:
            frames = [rgb for _, _, rgb in media.iter_video_frames(user_video, fps=config.FPS,
                                                                   size=user_video_size(user_video))]
        return cls(avatar, ua, frames, tr.load(transcript))


async def send_inputs(s: ClientSession, inp: Inputs, realtime: bool = True, tick_frames: int = 2,
                      lead_s: float = 0.0, on_send=None, start_s: float = 0.0, t0: float | None = None) -> float:
    """Stream ``inp`` tick by tick (``tick_frames`` frames of audio per message); ``realtime`` paces the
    sending to the audio clock (``lead_s`` ahead of it; ``t0``: the monotonic time of its 0, default now). Ends
    the session. ``start_s`` (a resumed stream's ``resume_pts``): the input from that time on, the rest of the
    audio before the clock's present at once. Returns seconds of audio sent."""
    spf = config.SAMPLES_PER_FRAME
    n = len(inp.avatar_audio)
    first = int(round(start_s * config.SAMPLE_RATE))
    segs = sorted((x for x in inp.transcript if x.start >= start_s - 1e-6), key=lambda x: x.start)
    step = tick_frames * spf
    t0 = time.monotonic() if t0 is None else t0
    frame = first // spf
    for k, a in enumerate(range(first, n, step)):
        b = min(n, a + step)
        pts = a / config.SAMPLE_RATE
        if realtime:
            wait = t0 + pts - lead_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        while segs and segs[0].start <= b / config.SAMPLE_RATE:   # text that has "arrived" by this chunk's end
            seg = segs.pop(0)
            await s.send_transcript(seg.text, seg.start, seg.end, seg.speaker)
        if inp.user_audio is not None:
            ua = np.zeros(b - a, np.float32)
            got = inp.user_audio[a:b]
            ua[:len(got)] = got
            await s.send_user_audio(ua, pts)
        last_frame = -(-b // spf)
        if inp.user_frames:
            while frame < last_frame:
                if frame < len(inp.user_frames):
                    await s.send_user_frame(inp.user_frames[frame], frame / config.FPS)
                frame += 1
        if on_send is not None:
            on_send(pts)
        await s.send_avatar_audio(inp.avatar_audio[a:b], pts=pts)
    for seg in segs:
        await s.send_transcript(seg.text, seg.start, seg.end, seg.speaker)
    await s.end()
    return n / config.SAMPLE_RATE


#: how a broken stream ends on the client's side when its server (or the way to it) was lost
BROKEN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


async def stream_inputs(client: AvatarClient, inp: Inputs, portrait: bytes | None = None,
                        avatar_id: str | None = None, output: str = "both", codec: str = "fmp4", size: int = 256,
                        seed: int | None = None, realtime: bool = True, tick_frames: int = 2,
                        lead_s: float = 0.0, stride: int | None = None, resume_through=(),
                        max_resumes: int = 3, resume_wait_s: float = 0.25,
                        resume_timeout_s: float = 15.0) -> SessionResult:
    """Open a session, send ``inp`` while receiving, and collect everything the server sends back.

    ``resume_through``: clients of other servers (or of the same load balancer) to resume the session
    through when its stream breaks (:data:`BROKEN`; at most ``max_resumes`` breaks): they are tried in turn,
    the first client too, the first try at once and then ``resume_wait_s`` apart, doubling up to 2 s, for up
    to ``resume_timeout_s`` — a load balancer may still send new connections to the lost server for a while.
    The input is sent again from the resumed stream's ``resume_pts``, and the result holds every frame once
    (``SessionResult.resumes``: the streams' openings).
    """
    t = time.monotonic()
    s = await client.open(portrait=portrait, avatar_id=avatar_id, output=output, codec=codec, size=size, seed=seed,
                          stride=stride)
    res = SessionResult(session_id=s.session_id)

    def mark(_pts):
        if res.first_send is None:
            res.first_send = time.monotonic()

    targets = list(resume_through) + [client]
    cfg = s.config
    t0, start_s, tries = time.monotonic(), 0.0, 0
    while True:
        sender = asyncio.get_running_loop().create_task(
            send_inputs(s, inp, realtime, tick_frames, lead_s, mark, start_s=start_s, t0=t0))
        try:
            async for msg in s.messages():
                res.add(msg, (size, size))
            res.sent_audio_s = await sender
            break
        except aio.AioRpcError as e:
            if not resume_through or e.code() not in BROKEN or len(res.breaks) >= max_resumes:
                raise
            res.breaks.append(time.monotonic())
            s, wait, give_up = None, 0.0, time.monotonic() + resume_timeout_s
            while s is None:                     # the next server that takes the session (the first try at once)
                target = targets[tries % len(targets)]
                tries += 1
                await asyncio.sleep(wait)
                wait = min(2.0, max(resume_wait_s, 2 * wait))
                try:
                    s = await target.resume(cfg, res.session_id, res.next_frame(output))
                except aio.AioRpcError as e2:
                    if e2.code() not in BROKEN or time.monotonic() + wait > give_up:
                        raise
            res.resumed(s.opened)
            start_s = s.opened.resume_pts
        finally:
            if not sender.done():
                sender.cancel()
    res.wall_s = time.monotonic() - t
    return res

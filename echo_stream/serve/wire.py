"""Protobuf <-> plain values: validation of client messages against the limits, and server messages.

Only protobuf crosses the trust boundary: every client field is checked here
(sizes, rates, shapes, ordering) and turned into plain bytes / numbers before
anything reaches a stage. Each problem raises :class:`InputError` naming the
field, which the server answers with INVALID_ARGUMENT.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from .. import config, motion
from ..errors import InputError
from ..stages.decode import MAX_USER_VIDEO_ASPECT
from ..protos import echo_stream_pb2 as pb

OUTPUT_MODES = {pb.OUTPUT_MODE_UNSPECIFIED: "both", pb.OUTPUT_MODE_VIDEO: "video",
                pb.OUTPUT_MODE_MOTION: "motion", pb.OUTPUT_MODE_BOTH: "both"}
CODECS = {pb.VIDEO_CODEC_UNSPECIFIED: "fmp4", pb.VIDEO_CODEC_H264_FMP4: "fmp4", pb.VIDEO_CODEC_RAW_RGB: "raw"}
_SPEAKER = re.compile(r"[A-Za-z_][\w-]{0,31}")
_CODEC = re.compile(r"[a-z0-9_]{1,32}")         # an FFmpeg decoder name (mp3, aac, libopus, h264, ...)
MEDIA_KINDS = ("avatar_audio", "user_audio", "user_video", "user_blendshapes")
MAX_RESUME_FRAME = 1 << 40


@dataclass(frozen=True)
class Limits:
    """Per-message and per-session limits (a message over a limit is INVALID_ARGUMENT)."""

    max_message_bytes: int = 16 * 1024 * 1024   # transport cap (gRPC answers RESOURCE_EXHAUSTED beyond it)
    max_audio_bytes: int = 256 * 1024           # one audio message: 1 s of 48 kHz stereo s16 fits
    max_audio_seconds: float = 1.0
    max_video_bytes: int = 4 * 1024 * 1024      # one raw / encoded video message
    max_video_pixels: int = 1920 * 1088
    max_portrait_bytes: int = 8 * 1024 * 1024
    max_portrait_side: int = 4096               # a portrait as decoded (see serve/portrait_gate.py) ...
    max_portrait_pixels: int = 16_000_000       # ... checked from its header before any pixel is decoded
    portrait_working_side: int = 2048           # portraits are scaled down to this long side at the edge
    portrait_decode_cpu_s: float = 5.0          # budget of one portrait's decoding (a child process, killed beyond):
    portrait_decode_wall_s: float = 30.0        # CPU seconds, with a wall-clock backstop, ...
    portrait_decode_memory_mb: int = 1024       # ... and its address space
    max_text_bytes: int = 4096
    max_blendshapes: int = 64
    max_size: int = 1024
    min_size: int = 64
    messages_per_s: float = 500.0               # token bucket per session (flow control: the reader waits)
    burst: int = 1000
    max_lead_s: float = 2.0                     # avatar audio may run this far ahead of real time (flow control)
    config_timeout_s: float = 10.0
    max_pending_streams: int = 64               # authenticated streams still waiting for their SessionConfig
    max_pending_per_principal: int = 16         # ... of one principal (when tokens are configured)
    # Streams without a known token are refused once their first message is read (the client sees
    # UNAUTHENTICATED, not a broken write); while it is awaited they hold a slot of their own pool, never one of
    # the authenticated callers': at most this many per peer address and this many in all, for at most this long
    unauthenticated_config_timeout_s: float = 1.0
    max_unauthenticated_per_peer: int = 4
    max_unauthenticated_streams: int = 256


@dataclass
class SessionSpec:
    output_mode: str = "both"                   # video / motion / both
    codec: str = "fmp4"                         # fmp4 / raw
    width: int = 256
    height: int = 256
    seed: int | None = None
    portrait: object = None                     # image bytes (a DecodedImage once the edge decoded them), or the
                                                # path of a registered avatar
    stride: int | None = None                   # new frames per window (None: the server's default)
    avatar_id: str | None = None                # the registered avatar (portrait is then its server-side path)

    @property
    def wants_video(self) -> bool:
        return self.output_mode in ("video", "both")

    @property
    def wants_motion(self) -> bool:
        return self.output_mode in ("motion", "both")


def _parse(cls, data: bytes):
    """gRPC request deserializer that never raises: undecodable bytes become a :class:`Malformed`."""
    msg = cls()
    try:
        msg.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        return Malformed(f"{cls.__name__}: not a valid protobuf message ({e})", len(data))
    return msg


def parse_client_message(data: bytes):
    return _parse(pb.ClientMessage, data)


def parse_control_request(data: bytes):
    return _parse(pb.SessionControlRequest, data)


@dataclass
class Malformed:
    problem: str
    size: int


def session_spec(msg, limits: Limits, avatars: dict[str, str]) -> SessionSpec:
    """Validate the first message (a SessionConfig) into a :class:`SessionSpec`."""
    if isinstance(msg, Malformed):
        raise InputError("message 0", msg.problem)
    if msg.WhichOneof("body") != "config":
        raise InputError("message 0", f"the first message must be a SessionConfig, got {msg.WhichOneof('body')}")
    if msg.seq != 0:
        raise InputError("config.seq", f"must be 0, got {msg.seq}")
    c = msg.config
    if c.output_mode not in OUTPUT_MODES:
        raise InputError("config.output_mode", f"unknown value {c.output_mode}")
    if c.codec not in CODECS:
        raise InputError("config.codec", f"unknown value {c.codec}")
    spec = SessionSpec(output_mode=OUTPUT_MODES[c.output_mode], codec=CODECS[c.codec],
                       width=c.width or 256, height=c.height or 256, seed=c.seed if c.has_seed else None,
                       stride=c.stride_frames or None)
    if c.fps not in (0, config.FPS):
        raise InputError("config.fps", f"{c.fps} is not supported: the motion rate is {config.FPS} fps")
    for name, v in (("width", spec.width), ("height", spec.height)):
        if v % 2 or not limits.min_size <= v <= limits.max_size:
            raise InputError(f"config.{name}", f"{v} must be even and in {limits.min_size}..{limits.max_size}")
    which = c.WhichOneof("avatar")
    if which == "portrait_image":
        if len(c.portrait_image) > limits.max_portrait_bytes:
            raise InputError("config.portrait_image", f"{len(c.portrait_image)} bytes is over the "
                                                      f"{limits.max_portrait_bytes}-byte limit")
        spec.portrait = bytes(c.portrait_image)
    elif which == "avatar_id":
        if c.avatar_id not in avatars:
            known = ", ".join(sorted(avatars)) or "none registered"
            raise InputError("config.avatar_id", f"unknown avatar {c.avatar_id!r} (known: {known})")
        spec.portrait = avatars[c.avatar_id]
        spec.avatar_id = c.avatar_id
    elif spec.wants_video:
        raise InputError("config.avatar", "video output needs portrait_image or avatar_id "
                                          "(or set output_mode to OUTPUT_MODE_MOTION)")
    return spec


class InputChecker:
    """Checks one session's input messages in order: seq +1 each, pts not decreasing per kind, limits."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.next_seq = 1
        self.last_pts: dict[str, float] = {}

    def _audio(self, what: str, a) -> dict:
        which = a.WhichOneof("payload")
        if which is None:
            raise InputError(what, "no payload: set pcm_s16le, pcm_f32le or encoded")
        data = getattr(a, which)
        if not data:
            raise InputError(f"{what}.{which}", "empty (0 bytes): an audio message carries at least one sample")
        if len(data) > self.limits.max_audio_bytes:
            raise InputError(f"{what}.{which}", f"{len(data)} bytes is over the {self.limits.max_audio_bytes}-byte "
                                                "limit per message; send shorter chunks (e.g. 20-100 ms)")
        if which == "encoded":
            if not a.codec:
                raise InputError(f"{what}.codec", "encoded audio needs the decoder name (e.g. mp3, aac, flac)")
            _check_codec(f"{what}.codec", a.codec)
            return {"encoded": bytes(data), "codec": a.codec}   # its duration is known once decoded
        ch = a.channels or 1
        if ch not in (1, 2):
            raise InputError(f"{what}.channels", f"{ch}: only mono or stereo PCM")
        if not 8000 <= a.sample_rate <= 192000:
            raise InputError(f"{what}.sample_rate", f"{a.sample_rate} Hz is not in 8000..192000")
        width = 2 if which == "pcm_s16le" else 4
        if len(data) % (width * ch):
            raise InputError(f"{what}.{which}", f"{len(data)} bytes is not a whole number of {ch}-channel samples")
        if which == "pcm_f32le" and not np.isfinite(np.frombuffer(data, "<f4")).all():
            raise InputError(f"{what}.pcm_f32le", "NaN or infinite samples")
        seconds = len(data) / (width * ch) / a.sample_rate
        if seconds > self.limits.max_audio_seconds:
            raise InputError(f"{what}.{which}", f"{seconds:.2f} s of audio in one message; at most "
                                                f"{self.limits.max_audio_seconds:g} s")
        return {"pcm": bytes(data), "format": which[4:], "rate": int(a.sample_rate), "channels": ch,
                "seconds": seconds}

    def check(self, msg) -> tuple[str, dict]:
        """``(kind, fields)`` of a validated input message."""
        if isinstance(msg, Malformed):
            raise InputError(f"message {self.next_seq}", msg.problem)
        kind = msg.WhichOneof("body")
        if kind is None:
            raise InputError(f"message {msg.seq}", "empty message (no body)")
        if msg.seq != self.next_seq:
            raise InputError(f"message {msg.seq}", f"out of order: expected seq {self.next_seq}")
        self.next_seq += 1
        if not math.isfinite(msg.pts) or msg.pts < 0:
            raise InputError(f"message {msg.seq}.pts", f"{msg.pts} is not a finite time >= 0")
        if kind in MEDIA_KINDS or kind == "transcript":
            if msg.pts < self.last_pts.get(kind, 0.0) - 1e-6:
                raise InputError(f"message {msg.seq}.pts", f"{kind} pts {msg.pts:.3f} is before the previous "
                                                           f"{self.last_pts[kind]:.3f}")
            self.last_pts[kind] = msg.pts
        if kind == "config":
            raise InputError(f"message {msg.seq}", "a second SessionConfig: one per session")
        if kind in ("avatar_audio", "user_audio"):
            return kind, dict(self._audio(kind, getattr(msg, kind)), pts=float(msg.pts))
        if kind == "user_video":
            v = msg.user_video
            which = v.WhichOneof("payload")
            if which is None:
                raise InputError("user_video", "no payload: set raw_rgb or encoded")
            data = getattr(v, which)
            if not data:
                raise InputError(f"user_video.{which}", "empty (0 bytes)")
            if len(data) > self.limits.max_video_bytes:
                raise InputError(f"user_video.{which}", f"{len(data)} bytes is over the "
                                                        f"{self.limits.max_video_bytes}-byte limit per message")
            if which == "encoded":
                if not v.codec:
                    raise InputError("user_video.codec", "encoded video needs the decoder name (e.g. h264, mjpeg)")
                _check_codec("user_video.codec", v.codec)
                return kind, {"encoded": bytes(data), "codec": v.codec}
            if not v.width or not v.height or v.width * v.height > self.limits.max_video_pixels:
                raise InputError("user_video", f"raw frame size {v.width}x{v.height} is not in 1x1.."
                                               f"{self.limits.max_video_pixels} pixels")
            if max(v.width, v.height) > MAX_USER_VIDEO_ASPECT * min(v.width, v.height):
                raise InputError("user_video", f"raw frame size {v.width}x{v.height}: aspect ratio beyond "
                                               f"{MAX_USER_VIDEO_ASPECT}:1")
            if len(data) != v.width * v.height * 3:
                raise InputError("user_video.raw_rgb", f"{len(data)} bytes, expected width*height*3 = "
                                                       f"{v.width * v.height * 3}")
            return kind, {"raw": bytes(data), "width": int(v.width), "height": int(v.height), "pts": float(msg.pts)}
        if kind == "user_blendshapes":
            values = dict(msg.user_blendshapes.values)
            if len(values) > self.limits.max_blendshapes:
                raise InputError("user_blendshapes", f"{len(values)} values, at most {self.limits.max_blendshapes}")
            from ..features import blendshape_frames
            blendshape_frames(values)   # raises InputError naming an unknown name / NaN
            return "blendshapes", {"values": values, "pts": float(msg.pts)}
        if kind == "transcript":
            t = msg.transcript
            if len(t.text.encode()) > self.limits.max_text_bytes:
                raise InputError("transcript.text", f"over the {self.limits.max_text_bytes}-byte limit")
            if t.speaker and not _SPEAKER.fullmatch(t.speaker):
                raise InputError("transcript.speaker", f"{t.speaker[:40]!r}: a name of 1-32 letters, digits, _ or - "
                                                       "(e.g. 'user', 'avatar')")
            return kind, {"speaker": t.speaker or "user", "text": t.text, "pts": float(msg.pts),
                          "end_pts": max(float(t.end_pts), float(msg.pts))}
        if kind == "control":
            k = msg.control.kind
            names = {pb.Control.INTERRUPT: "interrupt", pb.Control.FLUSH: "flush", pb.Control.END: "end"}
            if k not in names:
                raise InputError("control.kind", f"{k} is not INTERRUPT, FLUSH or END")
            return "control", {"kind": names[k]}
        raise InputError(f"message {msg.seq}", f"unexpected {kind}")  # pragma: no cover


def _check_codec(what: str, name: str) -> None:
    if not _CODEC.fullmatch(name):
        raise InputError(what, f"{name[:40]!r} is not a decoder name (1-32 of a-z, 0-9, _; e.g. mp3, aac, h264)")


@dataclass
class ResumeRequest:
    """A SessionConfig's ``resume``: the session to continue, the first frame its client lacks, and the digest
    of the config without it (checked against the one the session was opened with)."""

    session_id: str
    next_frame: int
    digest: str


_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def resume_request(msg) -> ResumeRequest | None:
    """The validated ``config.resume`` of a first message (None: a new session)."""
    c = msg.config
    if not c.HasField("resume"):
        return None
    r = c.resume
    if not _SESSION_ID.fullmatch(r.session_id):
        raise InputError("config.resume.session_id", "not a session id: send SessionOpened.session_id of the "
                                                     "stream that broke")
    if r.next_frame > MAX_RESUME_FRAME:
        raise InputError("config.resume.next_frame", f"{r.next_frame} is beyond any session's length")
    return ResumeRequest(r.session_id, int(r.next_frame), config_fingerprint(msg))


def config_fingerprint(msg) -> str:
    """The digest of a first message's SessionConfig without its ``resume`` field."""
    from .resume import config_digest

    plain = pb.SessionConfig()
    plain.CopyFrom(msg.config)
    plain.ClearField("resume")
    return config_digest(plain.SerializeToString(deterministic=True))


def opened(seq: int, session_id: str, spec: SessionSpec, point=None) -> pb.ServerMessage:
    """SessionOpened (``point``: where a resumed session starts, :class:`~echo_stream.serve.resume.ResumePoint`)."""
    msg = pb.ServerMessage(seq=seq, opened=pb.SessionOpened(
        session_id=session_id, width=spec.width, height=spec.height, fps=config.FPS,
        motion_channels=list(motion.CHANNELS)))
    if point is not None:
        msg.opened.resumed = True
        msg.opened.resume_frame = point.frame
        msg.opened.resume_pts = point.pts
    return msg

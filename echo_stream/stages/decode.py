"""Decode stage: media in (any container/codec PyAV reads) -> AudioChunk + VideoFrames batches.

Audio is resampled to 16 kHz mono float32 and cut into rows of one video frame
(640 samples, the last row zero-padded); user video is put on the 25 fps grid
at a small working resolution (192 px wide) for the face tracker. The avatar's audio
defines the session timeline: user streams are aligned to it (silence / the
last frame after they end, cut when they run longer), so every later stage
sees the three tracks in lock-step.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .. import config, media, schemas
from ..arrays import pop_rows
from ..errors import InputError
from . import Packet, Stage, warmup

USER_VIDEO_WIDTH = 192


@dataclass
class _Source:
    avatar: Iterator
    user_audio: Iterator | None
    user_video: Iterator | None
    chunk_frames: int
    next_frame: int = 0
    seq: int = 0
    pending: tuple | None = None
    last_video: np.ndarray | None = None
    user_audio_done: bool = False
    user_video_done: bool = False
    meta: dict = field(default_factory=dict)


#: the working height of user video is at most this many times its width (extreme shapes are squeezed)
MAX_USER_VIDEO_ASPECT = 4
#: pushed user media (audio, video frames, blendshapes) may run this far ahead of the avatar audio
MAX_USER_LEAD_S = 10.0
#: one pushed encoded avatar/user audio message may decode to at most this much audio
MAX_DECODED_SECONDS_PER_PUSH = 4.0
#: an encoded audio track that decoded nothing (or more undecodable frames than decodable ones) from this many
#: bytes is not what its codec says; checked again at its end whatever its size
MAX_AUDIO_BYTES_WITHOUT_SAMPLES = 64 * 1024
#: an encoded video track that decoded no frame from this many bytes / messages is not what its codec says
MAX_VIDEO_BYTES_WITHOUT_FRAMES = 4 * 1024 * 1024
MAX_VIDEO_MESSAGES_WITHOUT_FRAMES = 250


def working_size(w: int, h: int, width: int = USER_VIDEO_WIDTH) -> tuple[int, int]:
    """The (even) working size of user video: ``width`` wide, the source's aspect, at most 4:1 tall."""
    h = int(round(width * h / max(w, 1) / 2)) * 2
    return width, min(max(2, h), MAX_USER_VIDEO_ASPECT * width)


def user_video_size(path: str, width: int = USER_VIDEO_WIDTH) -> tuple[int, int]:
    info = media.probe(path)
    if not info.has_video:
        raise InputError(path, "no video stream")
    return working_size(info.width, info.height, width)


def _stream_decoder(current, codec: str, what: str, kind: str):
    """The PyAV decoder of a pushed encoded stream: ``current`` once open, else a new one for ``codec``."""
    import av

    if current is None:
        try:
            return av.CodecContext.create(codec, "r")
        except (av.FFmpegError, ValueError) as e:
            raise InputError(f"{what}.codec", f"unknown {kind} decoder {codec!r} ({e})") from None
    if current.name != codec and codec:
        raise InputError(f"{what}.codec", f"changed from {current.name!r} to {codec!r} mid-stream")
    return current


class PushedAudio:
    """One pushed audio track -> 16 kHz mono float32: PCM (s16le / f32le, any rate, mono or stereo)
    or pieces of an encoded elementary stream (an FFmpeg decoder with a parser: mp3, aac (ADTS), flac, ...)."""

    def __init__(self, what: str):
        self.what = what
        self._resampler = None
        self._key = None
        self._codec = None
        self._good = self._bad = 0
        self.encoded_bytes = 0         # encoded bytes received
        self.samples = 0               # 16 kHz samples they decoded to

    def _decode(self, packets) -> list[np.ndarray]:
        import av

        out = []
        for pkt in packets:
            try:
                frames = self._codec.decode(pkt)
            except av.FFmpegError as e:   # a damaged or non-audio frame (e.g. a tag): skipped, like players do
                self._bad += 1
                if self._bad > 64 and not self._good:
                    raise InputError(f"{self.what}.encoded", f"not decodable as {self._codec.name} ({e})") from None
                continue
            self._good += len(frames)
            for fr in frames:
                out += self._resample(fr)
        return out

    def _garbage(self) -> InputError | None:
        """The error of a track that is not what its codec says, or None: it decoded nothing, or more of its frames
        failed to decode than decoded (random bytes hold the odd false frame; real streams fail on a tag or so)."""
        name = self._codec.name
        if not self.samples:
            return InputError(f"{self.what}.encoded", f"{self.encoded_bytes} bytes sent as {name} decoded to no "
                                                      f"audio: they are not {name} data")
        if self._bad > self._good:
            return InputError(f"{self.what}.encoded", f"{self.encoded_bytes} bytes sent as {name}: {self._bad} of "
                                                      f"their {self._bad + self._good} frames are not decodable: they "
                                                      f"are not {name} data")
        return None

    def finish(self) -> np.ndarray:
        """The end of an encoded track: what the parser, decoder and resampler still hold (16 kHz mono).
        Raises InputError when the track's bytes decoded to no audio at all."""
        if self._codec is None:
            return np.zeros(0, np.float32)
        import av

        try:
            out = self._decode(self._codec.parse(None) + [None])
        except av.FFmpegError:         # the flush of a damaged stream: what was decoded stands
            out = []
        if self._resampler is not None:
            out += self._drain(self._resampler.resample(None))
            self._resampler = None
        y = np.clip(np.concatenate(out), -1, 1).astype(np.float32) if out else np.zeros(0, np.float32)
        self.samples += len(y)
        if self.encoded_bytes and self._garbage() is not None:
            raise self._garbage()
        return y

    def _resample(self, frame) -> list[np.ndarray]:
        import av

        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        out = []
        if self._resampler is None or key != self._key:
            if self._resampler is not None:
                out += self._drain(self._resampler.resample(None))
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=config.SAMPLE_RATE)
            self._key = key
        frame.pts = None
        return out + self._drain(self._resampler.resample(frame))

    @staticmethod
    def _drain(frames) -> list[np.ndarray]:
        return [f.to_ndarray().reshape(-1).astype(np.float32, copy=False) for f in frames if f.samples]

    def convert(self, item: dict) -> np.ndarray:
        import av

        if "encoded" in item:
            self._codec = _stream_decoder(self._codec, item.get("codec") or "", self.what, "audio")
            try:
                packets = self._codec.parse(item["encoded"])
            except av.FFmpegError as e:
                raise InputError(f"{self.what}.encoded", f"unparsable {self._codec.name} data ({e})") from None
            self.encoded_bytes += len(item["encoded"])
            out = self._decode(packets)
            y = np.clip(np.concatenate(out), -1, 1).astype(np.float32) if out else np.zeros(0, np.float32)
            if len(y) > MAX_DECODED_SECONDS_PER_PUSH * config.SAMPLE_RATE:
                raise InputError(f"{self.what}.encoded", f"one message decodes to {len(y) / config.SAMPLE_RATE:.1f} s "
                                 f"of audio (at most {MAX_DECODED_SECONDS_PER_PUSH:g} s): send encoded audio in "
                                 f"real-time-sized pieces")
            self.samples += len(y)
            if self.encoded_bytes >= MAX_AUDIO_BYTES_WITHOUT_SAMPLES and self._garbage() is not None:
                raise self._garbage()
            return y
        rate, ch = int(item["rate"]), int(item.get("channels") or 1)
        dtype = "<i2" if item["format"] == "s16le" else "<f4"
        x = np.frombuffer(item["pcm"], dtype=dtype).reshape(-1, ch)
        x = x.astype(np.float32) / 32768.0 if dtype == "<i2" else x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise InputError(f"{self.what}.pcm_f32le", "NaN or infinite samples")
        mono = np.clip(x.mean(axis=1) if ch > 1 else x[:, 0], -1, 1).astype(np.float32)
        if rate == config.SAMPLE_RATE:
            return mono
        frame = av.AudioFrame.from_ndarray(mono[None], format="flt", layout="mono")
        frame.sample_rate = rate
        out = self._resample(frame)
        return np.concatenate(out) if out else np.zeros(0, np.float32)


class PushedVideo:
    """Pushed user video -> RGB frames at the working size: raw RGB24 frames or pieces of an encoded
    elementary stream (h264 Annex B, mjpeg, ...); one decoded frame per 25 fps frame."""

    def __init__(self, what: str = "user_video"):
        self.what = what
        self.size: tuple[int, int] | None = None
        self._codec = None
        self.encoded_bytes = self.encoded_messages = self.frames = 0

    def _garbage(self) -> InputError:
        return InputError(f"{self.what}.encoded", f"{self.encoded_bytes} bytes in {self.encoded_messages} "
                                                  f"message{'s' if self.encoded_messages != 1 else ''} "
                                                  f"sent as {self._codec.name} decoded to no frame: they are not "
                                                  f"{self._codec.name} data (or the stream never had a key frame)")

    def finish(self) -> list[np.ndarray]:
        """The end of an encoded stream: the frames the decoder still holds. Raises InputError when the
        stream's bytes decoded to no frame at all."""
        if self._codec is None:
            return []
        import av

        try:
            out = [self._fit(fr) for pkt in self._codec.parse(None) + [None] for fr in self._codec.decode(pkt)]
        except av.FFmpegError:         # the flush of a damaged stream: what was decoded stands
            out = []
        self.frames += len(out)
        if self.encoded_bytes and not self.frames:
            raise self._garbage()
        return out

    def _fit(self, frame) -> np.ndarray:
        if self.size is None:
            self.size = working_size(frame.width, frame.height)
        if (frame.width, frame.height) == self.size and frame.format.name == "rgb24":
            return frame.to_ndarray()
        return frame.reformat(width=self.size[0], height=self.size[1], format="rgb24").to_ndarray()

    def convert(self, item: dict) -> list[np.ndarray]:
        import av

        if "encoded" in item:
            self._codec = _stream_decoder(self._codec, item.get("codec") or "", self.what, "video")
            try:
                out = [self._fit(fr) for pkt in self._codec.parse(item["encoded"]) for fr in self._codec.decode(pkt)]
            except av.FFmpegError as e:
                raise InputError(f"{self.what}.encoded", f"undecodable {self._codec.name} data ({e})") from None
            self.encoded_bytes += len(item["encoded"])
            self.encoded_messages += 1
            self.frames += len(out)
            if not self.frames and (self.encoded_bytes >= MAX_VIDEO_BYTES_WITHOUT_FRAMES
                                    or self.encoded_messages >= MAX_VIDEO_MESSAGES_WITHOUT_FRAMES):
                raise self._garbage()
            return out
        w, h = int(item["width"]), int(item["height"])
        rgb = np.frombuffer(item["raw"], np.uint8).reshape(h, w, 3)
        if self.size is None or (w, h) != self.size:
            return [self._fit(av.VideoFrame.from_ndarray(rgb, format="rgb24"))]
        return [rgb.copy()]


@dataclass
class _PushSource:
    """A session whose inputs are pushed (serving) rather than read from files."""

    avatar: PushedAudio = field(default_factory=lambda: PushedAudio("avatar_audio"))
    user: PushedAudio = field(default_factory=lambda: PushedAudio("user_audio"))
    video: PushedVideo = field(default_factory=PushedVideo)
    avatar_buf: list = field(default_factory=list)
    avatar_len: int = 0
    user_buf: list = field(default_factory=list)
    user_len: int = 0
    frames: deque = field(default_factory=deque)
    blend: deque = field(default_factory=deque)
    last_video: np.ndarray | None = None
    has_user_audio: bool = False
    next_frame: int = 0
    seq: int = 0


class DecodeStage(Stage):
    name = "decode"
    resources = {"num_cpus": 0.25}

    def __init__(self, chunk_frames: int = 8) -> None:
        super().__init__()
        self.chunk_frames = int(chunk_frames)
        self._sessions: dict[str, _Source] = {}

    def setup(self) -> None:
        """Warm the push path (see :mod:`.warmup`) so that a session's first audio is not the one to pay."""
        self.open_stream(warmup.SESSION)
        try:
            self.push(warmup.SESSION, warmup.pushed_inputs(4), end=True)
        finally:
            self.close_session(warmup.SESSION)
        super().setup()

    def open_session(self, session_id: str, avatar_audio: str, user_audio: str | None = None,
                     user_video: str | None = None) -> dict:
        """Open a session's input files; returns what was found (durations, which user tracks exist).

        A user video's own audio track is the user audio when ``user_audio`` is not given.
        """
        info = media.probe(avatar_audio)
        if not info.has_audio:
            raise InputError(avatar_audio, "no audio stream: the avatar audio must contain speech audio")
        chunk = self.chunk_frames * config.SAMPLES_PER_FRAME
        avatar = media.iter_audio_chunks(avatar_audio, chunk)
        ua_path = user_audio
        if ua_path is None and user_video is not None and media.probe(user_video).has_audio:
            ua_path = user_video
        if ua_path is not None and not media.probe(ua_path).has_audio:
            raise InputError(ua_path, "no audio stream")
        ua = media.iter_audio_chunks(ua_path, chunk) if ua_path else None
        uv = None
        if user_video is not None:
            uv = media.iter_video_frames(user_video, fps=config.FPS, size=user_video_size(user_video))
        src = _Source(avatar, ua, uv, self.chunk_frames)
        src.meta = {"avatar_duration": info.duration, "has_user_audio": ua is not None,
                    "has_user_video": uv is not None}
        src.pending = self._read_avatar(src)
        if src.pending is None:
            raise InputError(avatar_audio, "zero-length audio: the file holds no samples")
        self._sessions[session_id] = src
        return dict(src.meta)

    @staticmethod
    def _read_avatar(src: _Source):
        try:
            return next(src.avatar)
        except StopIteration:
            return None

    def _user_audio_rows(self, src: _Source, n_samples: int) -> np.ndarray:
        out = np.zeros(n_samples, np.float32)
        if src.user_audio is None or src.user_audio_done:
            return out
        try:
            _, samples = next(src.user_audio)
            out[: min(len(samples), n_samples)] = samples[:n_samples]
        except StopIteration:
            src.user_audio_done = True
        return out

    def _user_video_rows(self, src: _Source, n_frames: int) -> np.ndarray | None:
        if src.user_video is None:
            return None
        frames = []
        for _ in range(n_frames):
            if not src.user_video_done:
                try:
                    _, _, rgb = next(src.user_video)
                    src.last_video = rgb
                except StopIteration:
                    src.user_video_done = True
            if src.last_video is None:
                return None
            frames.append(src.last_video)
        return np.stack(frames)

    def next_chunk(self, session_id: str) -> tuple[Packet, dict]:
        """The next chunk of the session's inputs, in pts order.

        Returns ``(packet, info)``; ``info`` holds ``end`` and the avatar's valid
        samples of this chunk (what the egress muxes as the output's audio).
        """
        src = self._sessions.get(session_id)
        if src is None:
            raise KeyError(f"unknown session {session_id!r}: open it first")
        start, samples = src.pending
        src.pending = self._read_avatar(src)
        end = src.pending is None
        n_valid = len(samples)
        n_frames = -(-n_valid // config.SAMPLES_PER_FRAME)
        padded = np.zeros(n_frames * config.SAMPLES_PER_FRAME, np.float32)
        padded[:n_valid] = samples
        f0 = src.next_frame
        frames = np.arange(f0, f0 + n_frames)
        pts = frames / config.FPS
        user = self._user_audio_rows(src, len(padded)) if src.user_audio is not None else None
        rows_audio = [padded.reshape(n_frames, -1)]
        tracks = ["avatar"] * n_frames
        if user is not None:
            rows_audio.append(user.reshape(n_frames, -1))
            tracks += ["user"] * n_frames
        n_rows = len(tracks)
        seq0 = src.seq
        packet = Packet(session_id, end=end, meta={
            "first_frame": int(f0), "frames": int(n_frames), "avatar_samples": int(n_valid), **src.meta})
        packet.put(schemas.make_batch(schemas.AUDIO_CHUNK, {
            "session_id": [session_id] * n_rows, "seq": np.arange(seq0, seq0 + n_rows),
            "pts": np.concatenate([pts] * (n_rows // n_frames)), "track": tracks,
            "samples": np.concatenate(rows_audio)}), schemas.AUDIO_CHUNK)
        seq0 += n_rows
        video = self._user_video_rows(src, n_frames)
        if video is not None:
            packet.put(schemas.make_batch(schemas.VIDEO_FRAMES, {
                "session_id": [session_id] * n_frames, "seq": np.arange(seq0, seq0 + n_frames),
                "pts": pts, "frame": frames, "image": video}), schemas.VIDEO_FRAMES)
            seq0 += n_frames
        src.seq = seq0
        src.next_frame += n_frames
        if end:
            self.close_session(session_id)
        return packet, {"end": end, "avatar_audio": samples}

    # -- pushed input (serving) -------------------------------------------------------------------
    def open_stream(self, session_id: str) -> None:
        """Start a session whose inputs arrive through :meth:`push` (the gRPC ingress)."""
        self._sessions[session_id] = _PushSource()

    def push(self, session_id: str, items: list[tuple[str, dict]], end: bool = False) -> tuple[Packet, dict]:
        """Add pushed inputs; returns ``(packet, info)`` with every frame whose avatar audio is complete.

        ``items`` are ``(kind, fields)`` pairs in arrival order, kind one of
        ``avatar_audio`` / ``user_audio`` (``pcm`` bytes with ``format``
        ``s16le``/``f32le``, ``rate``, ``channels``; or ``encoded`` + ``codec``),
        ``user_video`` (``raw`` + ``width``/``height``; or ``encoded`` + ``codec``)
        and ``blendshapes`` (``values``: name -> float, one frame). Frame ``f``
        is the avatar audio's samples ``[640 f, 640 (f + 1))``; user tracks are
        aligned to it in arrival order (silence / the last video frame when they
        lag). ``end`` pads the last frame and ends the stream. ``info`` holds
        ``end``, ``first_frame``, ``frames`` and ``avatar_audio`` (the valid
        samples of these frames, for muxing).
        """
        from .. import features as feat

        src = self._sessions.get(session_id)
        if not isinstance(src, _PushSource):
            raise KeyError(f"unknown pushed session {session_id!r}: call open_stream first")
        for kind, item in items:
            if kind == "avatar_audio":
                x = src.avatar.convert(item)
                src.avatar_buf.append(x)
                src.avatar_len += len(x)
            elif kind == "user_audio":
                x = src.user.convert(item)
                src.has_user_audio = True
                src.user_buf.append(x)
                src.user_len += len(x)
            elif kind == "user_video":
                src.frames.extend(src.video.convert(item))
            elif kind == "blendshapes":
                src.blend.append(feat.blendshape_frames(dict(item["values"]))[0])
            else:
                raise InputError("push", f"unknown input kind {kind!r}")
        if end:                       # what the decoders of encoded streams still hold
            tail = src.avatar.finish()
            src.avatar_buf.append(tail)
            src.avatar_len += len(tail)
            tail = src.user.finish()
            if len(tail):
                src.has_user_audio = True
                src.user_buf.append(tail)
                src.user_len += len(tail)
            src.frames.extend(src.video.finish())
        lead_frames = MAX_USER_LEAD_S * config.FPS
        have = src.avatar_len / config.SAMPLES_PER_FRAME
        for what, ahead in (("user_audio", src.user_len / config.SAMPLES_PER_FRAME - have),
                            ("user_video", len(src.frames) - have), ("user_blendshapes", len(src.blend) - have)):
            if ahead > lead_frames:   # buffered per session in a shared actor: must stay bounded
                raise InputError(what, f"{ahead / config.FPS:.1f} s ahead of the avatar audio (at most "
                                       f"{MAX_USER_LEAD_S:g} s): send user media in real time with the avatar audio")
        spf = config.SAMPLES_PER_FRAME
        n_frames = -(-src.avatar_len // spf) if end else src.avatar_len // spf
        n_valid = min(src.avatar_len, n_frames * spf)
        avatar = pop_rows(src.avatar_buf, n_frames * spf)[0]
        src.avatar_len -= n_valid
        f0 = src.next_frame
        frames = np.arange(f0, f0 + n_frames)
        pts = frames / config.FPS
        packet = Packet(session_id, end=end, meta={"first_frame": int(f0), "frames": int(n_frames),
                                                   "avatar_samples": int(n_valid)})
        rows = [avatar.reshape(n_frames, spf)]
        tracks = ["avatar"] * n_frames
        if src.has_user_audio:
            rows.append(pop_rows(src.user_buf, n_frames * spf)[0].reshape(n_frames, spf))
            src.user_len = max(0, src.user_len - n_frames * spf)
            tracks += ["user"] * n_frames
        seq0 = src.seq
        n_rows = len(tracks)
        packet.put(schemas.make_batch(schemas.AUDIO_CHUNK, {
            "session_id": [session_id] * n_rows, "seq": np.arange(seq0, seq0 + n_rows),
            "pts": np.concatenate([pts] * (n_rows // max(n_frames, 1))) if n_frames else np.zeros(0),
            "track": tracks, "samples": np.concatenate(rows) if n_frames else np.zeros((0, spf), np.float32)}),
            schemas.AUDIO_CHUNK)
        seq0 += n_rows
        video = []
        for _ in range(n_frames):
            if src.frames:
                src.last_video = src.frames.popleft()
            if src.last_video is None:
                break
            video.append(src.last_video)
        if n_frames and len(video) == n_frames:
            packet.put(schemas.make_batch(schemas.VIDEO_FRAMES, {
                "session_id": [session_id] * n_frames, "seq": np.arange(seq0, seq0 + n_frames),
                "pts": pts, "frame": frames, "image": np.stack(video)}), schemas.VIDEO_FRAMES)
            seq0 += n_frames
        blend = [src.blend.popleft() for _ in range(min(n_frames, len(src.blend)))]
        if blend:
            k = len(blend)
            packet.put(schemas.make_batch(schemas.USER_BLENDSHAPES, {
                "session_id": [session_id] * k, "seq": np.arange(seq0, seq0 + k), "pts": pts[:k],
                "frame": frames[:k], "values": np.stack(blend)}), schemas.USER_BLENDSHAPES)
            seq0 += k
        src.seq = seq0
        src.next_frame += n_frames
        if end:
            self.close_session(session_id)
        return packet, {"end": end, "first_frame": int(f0), "frames": int(n_frames),
                        "avatar_audio": avatar[:n_valid]}

    def close_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def reset_session(self, session_id: str) -> None:
        self.close_session(session_id)


def chunks(stage: DecodeStage, session_id: str) -> Iterator[tuple[Packet, dict]]:
    """Iterate a session's chunks until the end (used by the inline runner and tests)."""
    for _ in itertools.count():
        packet, info = stage.next_chunk(session_id)
        yield packet, info
        if info["end"]:
            return


def warmup_packet(frames: int) -> Packet:
    """What the decode stage makes of :func:`.warmup.pushed_inputs` (the features stage's warm-up input)."""
    dec = DecodeStage()
    dec.open_stream(warmup.SESSION)
    try:
        packet, _ = dec.push(warmup.SESSION, warmup.pushed_inputs(frames), end=True)
    finally:
        dec.close_session(warmup.SESSION)
    return packet

"""Decode stage: media in (any container/codec PyAV reads) -> AudioChunk + VideoFrames batches.

Audio is resampled to 16 kHz mono float32 and cut into rows of one video frame
(640 samples, the last row zero-padded); user video is put on the 25 fps grid
at a small working resolution for behaviour features. The avatar's audio
defines the session timeline: user streams are aligned to it (silence / the
last frame after they end, cut when they run longer), so every later stage
sees the three tracks in lock-step.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .. import config, media, schemas
from ..errors import InputError
from . import Packet, Stage

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


def user_video_size(path: str, width: int = USER_VIDEO_WIDTH) -> tuple[int, int]:
    info = media.probe(path)
    if not info.has_video:
        raise InputError(path, "no video stream")
    h = max(2, int(round(width * info.height / max(info.width, 1) / 2)) * 2)
    return width, h


class DecodeStage(Stage):
    name = "decode"
    resources = {"num_cpus": 0.25}

    def __init__(self, chunk_frames: int = 8) -> None:
        super().__init__()
        self.chunk_frames = int(chunk_frames)
        self._sessions: dict[str, _Source] = {}

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

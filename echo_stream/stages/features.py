"""Features stage: AudioChunk + VideoFrames -> Features (one row per 25 fps frame).

Both audio tracks go through the same streaming log-mel + prosody extractor
(:mod:`echo_stream.features`, shared with offline preprocessing); user video
frames through the behaviour extractor. A frame is emitted once the avatar
audio it needs (its analysis windows) has arrived, so features lag the input
by at most one analysis window; the user tracks are decoded in lock-step with
the avatar track and follow the same timeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import config, features, motion, schemas
from . import Packet, Stage

_FEAT_SHAPE = (config.MELS_PER_FRAME, config.AUDIO_FEAT_DIM)


@dataclass
class _SessionFeatures:
    avatar: features.AudioFeatureExtractor
    user: features.AudioFeatureExtractor
    video: features.VideoBehaviourExtractor
    next_frame: int = 0
    seq: int = 0
    user_feats: list = field(default_factory=list)      # pending (n, 2, 83) arrays
    video_feats: list = field(default_factory=list)     # pending (n, 16) arrays
    blend: list = field(default_factory=list)           # pending (n, 58) client blendshape rows
    has_user_audio: bool = False
    has_user_video: bool = False


def _take(pending: list, n: int, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """Pop up to n rows from a list of arrays; pad with zeros; return (rows, how many were real)."""
    out = np.zeros((n, *shape), np.float32)
    got = 0
    while pending and got < n:
        head = pending[0]
        k = min(n - got, len(head))
        out[got:got + k] = head[:k]
        got += k
        if k == len(head):
            pending.pop(0)
        else:
            pending[0] = head[k:]
    return out, got


class FeaturesStage(Stage):
    name = "features"
    resources = {"num_cpus": 0.5}
    input_contracts = (schemas.AUDIO_CHUNK, schemas.VIDEO_FRAMES, schemas.USER_BLENDSHAPES)

    def __init__(self) -> None:
        super().__init__()
        self._sessions: dict[str, _SessionFeatures] = {}

    def setup(self) -> None:
        from . import warmup

        features.warmup()
        super().setup()
        try:                                  # one synthetic session through process (see .warmup)
            self.process(warmup.decode_packet(12))
        finally:
            self.close_session(warmup.SESSION)

    def _session(self, sid: str) -> _SessionFeatures:
        s = self._sessions.get(sid)
        if s is None:
            s = self._sessions[sid] = _SessionFeatures(
                features.AudioFeatureExtractor(), features.AudioFeatureExtractor(), features.VideoBehaviourExtractor())
        return s

    def process(self, packet: Packet) -> Packet:
        self.ensure_setup()
        self.check_input(packet)
        sid = packet.session_id
        s = self._session(sid)
        audio = packet.get(schemas.AUDIO_CHUNK)
        if audio is not None and audio.num_rows:
            tracks = schemas.column(audio, "track")
            samples = schemas.column(audio, "samples")
            av = samples[tracks == "avatar"].reshape(-1)
            us = samples[tracks == "user"].reshape(-1)
            if len(av):
                s.avatar.push(av)
            if len(us):
                s.has_user_audio = True
                s.user.push(us)
        video = packet.get(schemas.VIDEO_FRAMES)
        if video is not None and video.num_rows:
            s.has_user_video = True
            s.video_feats.append(s.video.process(schemas.column(video, "image")))
        blend = packet.get(schemas.USER_BLENDSHAPES)
        if blend is not None and blend.num_rows:
            s.blend.append(schemas.column(blend, "values"))

        if packet.end:
            av_feats = s.avatar.flush()
            if s.has_user_audio:
                s.user_feats.append(s.user.flush())
        else:
            av_feats = s.avatar.pop_frames()
            if s.has_user_audio:
                s.user_feats.append(s.user.pop_frames())
        n = len(av_feats)
        ua, n_ua = _take(s.user_feats, n, _FEAT_SHAPE)
        uv, n_uv = _take(s.video_feats, n, (config.USER_VIDEO_DIM,))
        ub, n_ub = _take(s.blend, n, (motion.NUM_CHANNELS,))
        present = np.zeros((n, 3), np.float32)
        present[:n_ua, 0] = 1.0
        present[:n_uv, 1] = 1.0
        present[:n_ub, 2] = 1.0
        frames = np.arange(s.next_frame, s.next_frame + n)
        out = Packet(sid, end=packet.end, meta=dict(packet.meta))
        out.put(schemas.make_batch(schemas.FEATURES, {
            "session_id": [sid] * n, "seq": np.arange(s.seq, s.seq + n), "pts": frames / config.FPS,
            "frame": frames, "avatar_audio": av_feats.reshape(n, *_FEAT_SHAPE), "user_audio": ua,
            "user_video": uv, "user_blend": ub,
            "user_present": present}), schemas.FEATURES)
        s.next_frame += n
        s.seq += n
        if packet.end:
            self.close_session(sid)
        return out

    def reset_session(self, session_id: str) -> None:
        self.close_session(session_id)

    def close_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

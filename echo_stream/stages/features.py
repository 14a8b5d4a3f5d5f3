"""Features stage: AudioChunk + VideoFrames -> Features (one row per 25 fps frame).

Both audio tracks go through the same streaming log-mel + prosody extractor
(:mod:`echo_stream.features`, shared with offline preprocessing). The user's
face, whichever side tracked it, reaches the model in one form: the
58-channel motion of :mod:`echo_stream.motion` in the ``user_blend`` column
(presence flag 2). Client-side blendshapes are taken as sent; user video
frames go through the bundled face tracker (:class:`echo_stream.face.tracker.FaceTracker`,
streaming, one per session, the models shared by all sessions), so a client
that tracks on the device and one that sends its camera are interchangeable.
A frame without a face has flag 2 off. The ``user_video`` column (16
hand-made behaviour features of earlier checkpoints) stays in the schema and is
zero with flag 1 off. Once a session has sent client blendshapes its video is
no longer tracked (the client's own tracking wins); rows already tracked keep their frames.

A frame is emitted once the avatar audio it needs (its analysis windows) has
arrived, so features lag the input by at most one analysis window; the user
tracks are decoded in lock-step with the avatar track and follow the same timeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import config, features, motion, schemas
from ..arrays import pop_rows
from . import Packet, Stage

_FEAT_SHAPE = (config.MELS_PER_FRAME, config.AUDIO_FEAT_DIM)


_BLEND_ROW = (motion.NUM_CHANNELS + 1,)                 # 58 values + the frame's face flag


@dataclass
class _SessionFeatures:
    avatar: features.AudioFeatureExtractor
    user: features.AudioFeatureExtractor
    face: object | None = None                          # the session's FaceTracker, once video arrives
    next_frame: int = 0
    seq: int = 0
    user_feats: list = field(default_factory=list)      # pending (n, 2, 83) arrays
    blend: list = field(default_factory=list)           # pending (n, 59) rows: user face motion + face flag
    has_user_audio: bool = False
    client_blend: bool = False                          # the client sends its own blendshapes


def face_rows(tracker, frames: np.ndarray) -> np.ndarray:
    """User video frames -> (n, 59) rows: the tracked motion and 1 where a face was found.
    The same function serves the stage and offline preprocessing (:mod:`echo_stream.dataset`)."""
    values, confidence = tracker.process(frames)
    return np.concatenate([values, (confidence > 0).astype(np.float32)[:, None]], 1)


class FeaturesStage(Stage):
    name = "features"
    resources = {"num_cpus": 0.5}
    input_contracts = (schemas.AUDIO_CHUNK, schemas.VIDEO_FRAMES, schemas.USER_BLENDSHAPES)

    def __init__(self) -> None:
        super().__init__()
        self._sessions: dict[str, _SessionFeatures] = {}
        self._face_models = None

    def _tracker(self):
        from ..face.tracker import FaceModels, FaceTracker

        if self._face_models is None:
            self._face_models = FaceModels()
        return FaceTracker(models=self._face_models)

    def setup(self) -> None:
        from . import warmup
        from .decode import warmup_packet

        features.warmup()
        super().setup()
        try:                                  # one synthetic session through process (see .warmup)
            self.process(warmup_packet(12))
        finally:
            self.close_session(warmup.SESSION)

    def _session(self, sid: str) -> _SessionFeatures:
        s = self._sessions.get(sid)
        if s is None:
            s = self._sessions[sid] = _SessionFeatures(features.AudioFeatureExtractor(),
                                                       features.AudioFeatureExtractor())
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
        blend = packet.get(schemas.USER_BLENDSHAPES)
        if blend is not None and blend.num_rows:
            # the client tracks from now on: rows tracked from its video so far keep their frames (the
            # timeline is one row per frame), its blendshapes follow them, its video is no longer tracked
            s.client_blend = True
            values = schemas.column(blend, "values")
            s.blend.append(np.concatenate([values, np.ones((len(values), 1), np.float32)], 1))
        video = packet.get(schemas.VIDEO_FRAMES)
        if video is not None and video.num_rows and not s.client_blend:
            if s.face is None:
                s.face = self._tracker()
            s.blend.append(face_rows(s.face, schemas.column(video, "image")))

        if packet.end:
            av_feats = s.avatar.flush()
            if s.has_user_audio:
                s.user_feats.append(s.user.flush())
        else:
            av_feats = s.avatar.pop_frames()
            if s.has_user_audio:
                s.user_feats.append(s.user.pop_frames())
        n = len(av_feats)
        ua, n_ua = pop_rows(s.user_feats, n, _FEAT_SHAPE)
        uv = np.zeros((n, config.USER_VIDEO_DIM), np.float32)
        rows, _ = pop_rows(s.blend, n, _BLEND_ROW)
        ub = np.ascontiguousarray(rows[:, :motion.NUM_CHANNELS])
        present = np.zeros((n, 3), np.float32)
        present[:n_ua, 0] = 1.0
        present[:, 2] = rows[:, motion.NUM_CHANNELS]
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

"""Synthetic inputs that let each stage warm up in ``setup()``.

The first call of a stage's ``process`` in a fresh process is slow (lazy
imports, Arrow and NumPy conversion paths, the first run of each torch or
OpenCV kernel at its shapes): 0.4-0.6 s per stage on a CPU, serially along the
pipeline, which a live session's first frame would otherwise pay. Each stage's
``setup()`` therefore pushes one short synthetic session through its own
``process`` (and closes it), so that a session arriving later finds it warm.

This module imports no stage: the stages import it (what the decode stage makes of
:func:`pushed_inputs`, the features stage's warm-up input, is
:func:`echo_stream.stages.decode.warmup_packet`).
"""
from __future__ import annotations

import numpy as np

from .. import config, motion, schemas
from . import Packet

#: the id of the synthetic session (a NUL byte: no client-issued or server-issued id has one)
SESSION = "\0warmup"


def pushed_inputs(frames: int, seed: int = 0) -> list[tuple[str, dict]]:
    """``frames`` frames of quiet noise as avatar and user PCM, plus a raw grey user-video frame per frame."""
    rng = np.random.default_rng(seed)
    n = frames * config.SAMPLES_PER_FRAME

    def pcm() -> dict:
        x = (0.01 * rng.standard_normal(n)).astype("<f4")
        return {"pcm": x.tobytes(), "format": "f32le", "rate": config.SAMPLE_RATE, "channels": 1}

    h, w = 96, 128
    grey = np.full((h, w, 3), 128, np.uint8).tobytes()
    items = [("avatar_audio", pcm()), ("user_audio", pcm())]
    items += [("user_video", {"raw": grey, "width": w, "height": h})] * frames
    return items


def features_packet(frames: int, end: bool = True, seed: int = 0) -> Packet:
    """A Features packet of ``frames`` frames of small random features (the memory stage's input)."""
    rng = np.random.default_rng(seed)
    f = np.arange(frames)

    def rnd(*shape):
        return (0.1 * rng.standard_normal((frames, *shape))).astype(np.float32)

    p = Packet(SESSION, end=end)
    p.put(schemas.make_batch(schemas.FEATURES, {
        "session_id": [SESSION] * frames, "seq": f, "pts": f / config.FPS, "frame": f,
        "avatar_audio": rnd(config.MELS_PER_FRAME, config.AUDIO_FEAT_DIM),
        "user_audio": rnd(config.MELS_PER_FRAME, config.AUDIO_FEAT_DIM),
        "user_video": rnd(config.USER_VIDEO_DIM), "user_blend": np.tile(motion.neutral_motion(1), (frames, 1)),
        "user_present": np.ones((frames, 3), np.float32)}), schemas.FEATURES)
    return p


def motion_packet(frames: int) -> Packet:
    """A MotionWindow packet of ``frames`` neutral frames (the render stage's input)."""
    f = np.arange(frames)
    p = Packet(SESSION, end=True)
    p.put(schemas.make_batch(schemas.MOTION_WINDOW, {
        "session_id": [SESSION] * frames, "seq": f, "pts": f / config.FPS, "frame": f, "window": [0] * frames,
        "motion": np.tile(motion.neutral_motion(1), (frames, 1))}), schemas.MOTION_WINDOW)
    return p

"""One conversation's files -> per-frame features and motion targets, with the serving pipeline's own code.

:func:`featurize_conversation` runs the *same* code as the streaming pipeline
(:mod:`echo_stream.features`, with the decode stage's video geometry, the bundled face tracker on the
user's video), so the model trains on exactly what it will see when serving; ``tests/test_train.py``
checks this against ``DecodeStage`` + ``FeaturesStage`` frame by frame. ``preprocess`` (and so
``shards``) and ``eval`` call it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import config, features, media, motion, tracks, transcript
from .errors import InputError


def _resolve(root: str | os.PathLike, rel) -> str | None:
    if rel is None or rel == "":
        return None
    p = Path(rel)
    return str(p if p.is_absolute() else Path(root) / p)


def _user_face(path: str, num_frames: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``((T, 58) user face motion, (T,) face flags, source frames used)`` exactly as the streaming decode +
    features stages compute them: frames on the 25 fps grid at the decode stage's working size through
    the bundled face tracker (streaming, as in a session), the last frame repeated after the video
    ends, frames past the avatar's end ignored."""
    from .face.tracker import FaceTracker, shared_models
    from .stages.decode import user_video_size
    from .stages.features import face_rows

    tracker = FaceTracker(models=shared_models())
    out = np.zeros((num_frames, motion.NUM_CHANNELS + 1), np.float32)
    it = media.iter_video_frames(path, fps=config.FPS, size=user_video_size(path))
    done, last, block = 0, None, []

    def flush_block():
        nonlocal done
        if block:
            out[done:done + len(block)] = face_rows(tracker, np.stack(block))
            done += len(block)
            block.clear()

    for _, _, rgb in it:
        if done + len(block) >= num_frames:
            break
        block.append(rgb)
        last = rgb
        if len(block) == 32:
            flush_block()
    if last is None:
        raise InputError(path, "video stream has no decodable frames")
    decoded = done + len(block)
    while done + len(block) < num_frames:
        block.append(last)
        if len(block) == 32:
            flush_block()
    flush_block()
    return np.ascontiguousarray(out[:, :motion.NUM_CHANNELS]), out[:, motion.NUM_CHANNELS], decoded


def featurize_conversation(row: dict, root: str | os.PathLike, *, tracker=None,
                           livelink_fps: float | None = None) -> dict:
    """Per-frame features and targets of one conversation (a pure function of the manifest row and root).

    Returns a dict over ``T = ceil(avatar samples / 640)`` frames of the 25 fps grid:

    * ``avatar_audio`` (T, 2, 83), ``user_audio`` (T, 2, 83), ``user_video`` (T, 16: zeros),
      ``user_blend`` (T, 58: the user's face tracked on the user video, flag 2 where a face was found),
      ``user_present`` (T, 3) float32: exactly what the pipeline's
      ``FeaturesStage`` emits for the same files (user audio/video aligned to the avatar track: cut
      when longer, silence / last frame repeated when shorter; no user track: zeros, flag 0);
    * ``motion`` (T, 58) float32: the avatar's motion targets from ``avatar_motion`` (project motion
      Parquet or Live Link Face CSV, see :mod:`echo_stream.tracks`; shifted by the row's optional
      ``avatar_motion_offset_s``), else from ``tracker`` (a :class:`~echo_stream.tracks.FaceTracker`, or
      the bundled :class:`~echo_stream.face.VideoMotionTracker`) over the avatar media's video stream,
      else zeros (``has_motion`` says which);
    * ``transcript``: list of ``{"start", "end", "speaker", "text"}`` dicts, sorted by start;
    * ``frames`` (int), ``has_user_audio``, ``has_user_video``, ``has_user_blend``, ``has_motion`` (bool);
    * ``media``: facts for quality checks: ``avatar_s`` (seconds), ``avatar_peak`` (max |sample|),
      ``user_audio_s``, ``user_video_s`` (None without that track; video counted up to ``T`` frames),
      ``motion_s`` (seconds the motion track covers), ``motion_source``.

    Raises :class:`~echo_stream.errors.InputError` naming the file for unusable media.
    """
    if not isinstance(row, dict) or not row.get("avatar_media"):
        raise InputError(str(row.get("conversation_id", "<row>")) if isinstance(row, dict) else "<row>",
                         "manifest row needs 'avatar_media'")
    avatar_path = _resolve(root, row["avatar_media"])
    media.check_audio(avatar_path)
    samples = media.decode_audio(avatar_path)
    T = features.num_video_frames(samples.size)
    facts = {"avatar_s": samples.size / config.SAMPLE_RATE, "avatar_peak": float(np.abs(samples).max()),
             "user_audio_s": None, "user_video_s": None, "motion_s": None, "motion_source": None}
    avatar_audio = features.offline_audio_features(samples)
    del samples
    user_audio = np.zeros_like(avatar_audio)
    user_video = np.zeros((T, config.USER_VIDEO_DIM), np.float32)
    user_blend = np.zeros((T, motion.NUM_CHANNELS), np.float32)
    present = np.zeros((T, 3), np.float32)
    has_ua = has_uv = False
    user_path = _resolve(root, row.get("user_media"))
    if user_path is not None:
        info = media.probe(user_path)
        if info.has_audio:
            media.check_audio(user_path)
            u = media.decode_audio(user_path)
            facts["user_audio_s"] = u.size / config.SAMPLE_RATE
            aligned = np.zeros(T * config.SAMPLES_PER_FRAME, np.float32)
            n = min(u.size, aligned.size)
            aligned[:n] = u[:n]
            user_audio = features.offline_audio_features(aligned)
            present[:, 0] = 1.0
            has_ua = True
        if info.has_video:
            user_blend, present[:, 2], used = _user_face(user_path, T)
            facts["user_video_s"] = used / config.FPS
            has_uv = True
    motion_path = _resolve(root, row.get("avatar_motion"))
    if motion_path is not None:
        pts, cols = tracks.load_track(motion_path, livelink_fps=livelink_fps)
        pts = pts + float(row.get("avatar_motion_offset_s") or 0.0)
        targets = tracks.resample_to_grid(pts, cols, T, motion_path)
        facts["motion_s"], facts["motion_source"] = tracks.track_span(pts), os.path.basename(motion_path)
    elif tracker is not None and media.probe(avatar_path).has_video:
        if hasattr(tracker, "track_video"):          # the bundled tracker: whole-video calibration
            targets, used = tracker.track_video(avatar_path, T)
        else:
            targets, used = tracks.extract_motion(tracker, avatar_path, T)
        facts["motion_s"], facts["motion_source"] = used / config.FPS, f"tracker:{type(tracker).__name__}"
    else:
        targets = np.zeros((T, motion.NUM_CHANNELS), np.float32)
    segs = []
    tpath = _resolve(root, row.get("transcript"))
    if tpath is not None:
        segs = [{"start": float(s.start), "end": float(s.end), "speaker": s.speaker, "text": s.text}
                for s in transcript.load(tpath)]
    return {
        "avatar_audio": avatar_audio.astype(np.float32, copy=False),
        "user_audio": user_audio.astype(np.float32, copy=False),
        "user_video": user_video,
        "user_blend": user_blend,
        "user_present": present,
        "motion": targets,
        "transcript": segs,
        "frames": int(T),
        "has_user_audio": has_ua,
        "has_user_video": has_uv,
        "has_user_blend": bool(present[:, 2].any()),
        "has_motion": facts["motion_source"] is not None,
        "media": facts,
    }

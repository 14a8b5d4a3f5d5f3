"""Small generated conversations for the preprocessing tests, Live Link Face CSV writing, and face trackers
(the user-supplied extractor interface) that Ray workers import by name."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from echo_stream import atomic, config, features, generate, motion

from . import mediagen

LIVELINK_HEADER = (["Timecode", "BlendShapeCount"]
                   + [c[0].upper() + c[1:] for c in motion.BLENDSHAPES]
                   + ["HeadYaw", "HeadPitch", "HeadRoll", "LeftEyeYaw", "LeftEyePitch", "LeftEyeRoll",
                      "RightEyeYaw", "RightEyePitch", "RightEyeRoll"])


def motion_for(samples: np.ndarray, seed: int) -> np.ndarray:
    """Learnable targets: jaw follows the audio envelope, the head sways."""
    T = features.num_video_frames(samples.size)
    env = features.rms_envelope(samples)[:T]
    m = np.zeros((T, motion.NUM_CHANNELS), np.float32)
    m[:, motion.CHANNEL_INDEX["jawOpen"]] = np.clip(env / max(env.max(), 1e-6), 0, 1)
    t = np.arange(T) / config.FPS
    m[:, motion.CHANNEL_INDEX["headPitch"]] = 0.05 * np.sin(2 * np.pi * 0.5 * t + seed)
    return m


def timecode(t: float, rate: float, start_s: float = 36000.0) -> str:
    """``HH:MM:SS:FF.sss`` of ``start_s + t`` at ``rate`` frames per second."""
    total = start_s + t
    whole = int(np.floor(total + 1e-9))
    frac = (total - whole) * rate
    ff = int(np.floor(frac + 1e-6))
    sub = max(0.0, frac - ff)
    h, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    return f"{h:02d}:{m:02d}:{s:02d}:{ff:02d}.{int(round(sub * 1000)):03d}"


def write_livelink_csv(path: str | os.PathLike, t: np.ndarray, values: dict[str, np.ndarray], rate: float = 60.0,
                       start_s: float = 36000.0) -> Path:
    """A Live Link Face style CSV: ``values`` maps ARKit / Live Link column names to per-row values at times ``t``."""
    path = Path(path)
    lines = [",".join(LIVELINK_HEADER)]
    for i, ti in enumerate(t):
        row = [timecode(float(ti), rate, start_s), "61"]
        for name in LIVELINK_HEADER[2:]:
            row.append(f"{float(values[name][i]) if name in values else 0.0:.6f}")
        lines.append(",".join(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_conversation(d: Path, k: int, dur: float, *, user: str = "video", track: str = "parquet",
                       transcript: bool = True) -> dict:
    """One conversation directory in the documented layout (avatar.wav, user.*, transcript.json,
    avatar_motion.parquet|csv). Returns its manifest row (paths relative to ``d.parent``)."""
    d.mkdir(parents=True, exist_ok=True)
    samples = mediagen.speech_like(dur, 16000, seed=k, f0=120 + 20 * k)
    mediagen.write_audio(d / "avatar.wav", samples, 16000)
    user_audio = mediagen.speech_like(dur, 44100, seed=20 + k)
    row = {"conversation_id": d.name, "avatar_media": f"{d.name}/avatar.wav", "split": "train"}
    if user == "video":
        frames = mediagen.real_face_frames(int(dur * 25), start_s=(1.0 + 3.1 * k) % 16)   # a real face
        mediagen.write_video(d / "user.mp4", frames, fps=25, audio=user_audio, audio_rate=44100)
        row["user_media"] = f"{d.name}/user.mp4"
    elif user == "audio":
        mediagen.write_audio(d / "user.wav", user_audio, 44100)
        row["user_media"] = f"{d.name}/user.wav"
    m = motion_for(samples, k)
    if track == "parquet":
        atomic.write_parquet(generate.motion_table(np.arange(len(m)), m), str(d / "avatar_motion.parquet"))
        row["avatar_motion"] = f"{d.name}/avatar_motion.parquet"
    elif track == "csv":  # the same motion sampled at 60 fps, written as a Live Link Face export
        t60 = np.arange(int(dur * 60)) / 60.0
        grid = np.arange(len(m)) / config.FPS
        vals = {"JawOpen": np.interp(t60, grid, m[:, motion.CHANNEL_INDEX["jawOpen"]]),
                "HeadPitch": np.interp(t60, grid, m[:, motion.CHANNEL_INDEX["headPitch"]])}
        write_livelink_csv(d / "avatar_motion.csv", t60, vals)
        row["avatar_motion"] = f"{d.name}/avatar_motion.csv"
    if transcript:
        (d / "transcript.json").write_text(json.dumps([
            {"start": 0.3, "end": 1.2, "speaker": "user", "text": "I got the job, great news"},
            {"start": 1.5, "end": 2.5, "speaker": "avatar", "text": "that is wonderful"}]))
        row["transcript"] = f"{d.name}/transcript.json"
    return row


def write_avatar_video(path: Path, dur: float, seed: int = 0) -> Path:
    """Avatar media with a face video stream and speech audio (for the face-tracker extractor)."""
    frames = mediagen.face_frames(int(dur * 25), 160, 120, motion="nod", seed=seed)
    return mediagen.write_video(path, frames, fps=25, audio=mediagen.speech_like(dur, 16000, seed=seed),
                                audio_rate=16000)


class BrightnessTracker:
    """A "face tracker" whose model file is JSON ``{"gain": g}``: ``jawOpen = g * mean brightness`` per frame."""

    frame_size = (80, 60)

    def __init__(self, model_path: str):
        self.gain = float(json.loads(Path(model_path).read_text())["gain"])

    def __call__(self, frames: np.ndarray) -> dict:
        return {"jawOpen": self.gain * frames.reshape(len(frames), -1).mean(1) / 255.0}


class CrashOnceTracker(BrightnessTracker):
    """Kills its worker process the first time it is called anywhere (``MODEL.crashed`` records it)."""

    def __init__(self, model_path: str):
        super().__init__(model_path)
        self.marker = Path(model_path + ".crashed")

    def __call__(self, frames: np.ndarray) -> dict:
        if not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(frames)

#!/usr/bin/env python
"""Regenerate the demo's bundled sample inputs in echo_stream/assets/sample/.

* ``avatar_speech.ogg`` — the avatar's reply, real synthetic speech from
  espeak-ng (``apt-get install espeak-ng``), after a pause while the user talks;
* ``user_webcam.webm`` — the user's side: the bundled portrait, mirrored,
  animated by echo-stream's own renderer (talking while the user speaks,
  nodding and smiling while the avatar speaks), with the user's espeak-ng
  speech as its audio track (VP9 + Opus);
* ``transcript.txt`` — the timed transcript of both turns.

The files are committed; this script documents how they were made and
re-creates them: ``.venv/bin/python scripts/make_sample_assets.py``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from echo_stream import config, features, media, motion
from echo_stream.render import PortraitRenderer, load_portrait

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "echo_stream" / "assets" / "sample"
USER_TEXT = "Hey! Guess what. I finally got the job. They called me this morning."
AVATAR_TEXT = "Oh, that's wonderful news! I'm so happy for you. You really worked hard for this. When do you start?"
SR = config.SAMPLE_RATE


def tts(text: str, voice: str, speed: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        wav = os.path.join(d, "tts.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", wav, text], check=True)
        return media.decode_audio(wav)


def write_audio_ogg(path: Path, samples: np.ndarray) -> None:
    with av.open(str(path), "w", format="ogg") as c:
        s = c.add_stream("libopus", rate=SR)
        s.bit_rate = 24_000
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate = SR
        frame.pts = 0
        frame.time_base = Fraction(1, SR)
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def user_motion(n: int, user_env: np.ndarray, avatar_env: np.ndarray, user_end_frame: int) -> np.ndarray:
    m = motion.neutral_motion(n)
    t = np.arange(n) / config.FPS
    rng = np.random.default_rng(7)
    m[:, motion.CHANNEL_INDEX["jawOpen"]] = np.clip(user_env[:n] / (user_env.max() + 1e-9), 0, 1) * 0.6
    listening = avatar_env[:n] > 0.02 * avatar_env.max()
    nod = 0.08 * np.sin(2 * np.pi * 1.6 * t) * np.convolve(listening, np.ones(12) / 12, mode="same")
    m[:, motion.CHANNEL_INDEX["headPitch"]] = nod + 0.01 * rng.standard_normal(n).cumsum() / np.sqrt(n)
    m[:, motion.CHANNEL_INDEX["headYaw"]] = 0.06 * np.sin(2 * np.pi * 0.13 * t)
    smile = np.clip((np.arange(n) - user_end_frame + 60) / 25, 0, 1) * 0.7
    m[:, motion.CHANNEL_INDEX["mouthSmileLeft"]] = smile
    m[:, motion.CHANNEL_INDEX["mouthSmileRight"]] = smile
    blink = np.zeros(n)
    for f in range(17, n, 83):
        blink[f:f + 4] = [0.5, 1, 1, 0.5][: len(blink[f:f + 4])]
    m[:, motion.CHANNEL_INDEX["eyeBlinkLeft"]] = blink
    m[:, motion.CHANNEL_INDEX["eyeBlinkRight"]] = blink
    return motion.clamp_motion(m)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    user = tts(USER_TEXT, "en-gb+f3", 150)
    avatar = tts(AVATAR_TEXT, "en-us", 155)
    user_start, gap = int(0.3 * SR), int(0.7 * SR)
    total = user_start + len(user) + gap + len(avatar)
    user_track = np.zeros(total, np.float32)
    user_track[user_start:user_start + len(user)] = user
    avatar_track = np.zeros(total, np.float32)
    avatar_track[total - len(avatar):] = avatar
    write_audio_ogg(OUT / "avatar_speech.ogg", avatar_track)

    n = -(-total // config.SAMPLES_PER_FRAME)
    env_u = features.rms_envelope(user_track)
    env_a = features.rms_envelope(avatar_track)
    user_end = (user_start + len(user)) // config.SAMPLES_PER_FRAME
    mo = user_motion(n, env_u, env_a, user_end)
    mirrored = load_portrait(ROOT / "echo_stream" / "assets" / "portrait.jpg")
    renderer = PortraitRenderer(mirrored, size=(240, 240))
    frames = renderer.render(mo)[:, :, ::-1]  # mirrored: a different-looking "user"
    canvas = np.zeros((n, 240, 320, 3), np.uint8)
    canvas[:] = (40, 44, 52)
    canvas[:, :, 40:280] = frames
    path = OUT / "user_webcam.webm"
    with av.open(str(path), "w", format="webm") as c:
        vs = c.add_stream("libvpx-vp9", rate=config.FPS)
        vs.width, vs.height, vs.pix_fmt = 320, 240, "yuv420p"
        vs.options = {"crf": "40", "b": "0", "deadline": "good", "cpu-used": "4"}
        as_ = c.add_stream("libopus", rate=48000)
        as_.layout = "mono"
        as_.bit_rate = 24_000
        for i, img in enumerate(canvas):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            vf.pts = i
            vf.time_base = Fraction(1, config.FPS)
            for p in vs.encode(vf):
                c.mux(p)
        for p in vs.encode(None):
            c.mux(p)
        resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
        af = av.AudioFrame.from_ndarray((user_track * 32767).astype(np.int16)[None], format="s16", layout="mono")
        af.sample_rate, af.pts, af.time_base = SR, 0, Fraction(1, SR)
        for rf in resampler.resample(af) + resampler.resample(None):
            for p in as_.encode(rf):
                c.mux(p)
        for p in as_.encode(None):
            c.mux(p)
    u0, u1 = user_start / SR, (user_start + len(user)) / SR
    a0, a1 = (total - len(avatar)) / SR, total / SR
    (OUT / "transcript.txt").write_text(
        f"[{u0:.2f}-{u1:.2f}] user: {USER_TEXT}\n[{a0:.2f}-{a1:.2f}] avatar: {AVATAR_TEXT}\n")
    for p in sorted(OUT.iterdir()):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size / 1024:.0f} KiB")
    print(f"duration {total / SR:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real headless Chromium (Debian's, driven by selenium) with a fake camera and microphone made from the
repository's test media: what tests/test_web.py and ``echo-stream bench web`` talk to the page with."""
from __future__ import annotations

import os
import tempfile
import wave
from pathlib import Path

import numpy as np

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: the repository's test media (a real face clip, TTS speech)
DATA = Path(__file__).resolve().parents[2] / "tests" / "data"


def missing_browser(chromium: str = CHROMIUM, driver: str = CHROMEDRIVER) -> str | None:
    """Why the browser tests cannot run here, or None."""
    for p in (chromium, driver):
        if not os.access(p, os.X_OK):
            return f"{p} is not installed (scripts/ensure_chromium.sh installs Debian's chromium + chromium-driver)"
    return None


def make_fake_camera(path: Path, seconds: float = 4.0, size=(320, 180)) -> Path:
    """The real face clip as a raw Y4M file (what Chromium's fake camera reads), ``size``, 25 fps."""
    import av

    w, h = size
    with av.open(str(DATA / "real" / "WolfgangLanger_Pexels.mp4")) as src, open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{w} H{h} F25:1 Ip A1:1 C420jpeg\n".encode())
        n = 0
        for frame in src.decode(video=0):
            yuv = frame.reformat(width=w, height=h, format="yuv420p").to_ndarray()
            out.write(b"FRAME\n" + np.ascontiguousarray(yuv).tobytes())
            n += 1
            if n >= seconds * 25:
                break
    return path


def make_wav(path: Path, files=("tts1.ogg",), rate: int = 48000) -> Path:
    """The test speech files, one after another, as a 16-bit mono WAV at ``rate``."""
    from echo_stream import media

    x = np.concatenate([media.decode_audio(str(DATA / "tts" / f), sample_rate=rate) for f in files])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def launch(camera: Path, microphone: Path, *, fake_ui: bool = True, chromium: str = CHROMIUM,
           driver: str = CHROMEDRIVER):
    """A headless Chromium with fake media devices (and, without ``fake_ui``, no automatic permission)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="echo-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
                 f"--user-data-dir={profile}", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-video-capture={camera}", f"--use-file-for-fake-audio-capture={microphone}",
                 "--window-size=1100,760"):
        opts.add_argument(flag)
    if fake_ui:
        opts.add_argument("--use-fake-ui-for-media-stream")
    return webdriver.Chrome(options=opts, service=Service(driver))

"""An offline text-to-speech voice for the browser demo: ``espeak-ng`` (Debian's package) when installed.

Nothing is downloaded: without ``espeak-ng`` (or ``espeak``) on ``PATH`` the page says so and offers the
audio-file upload instead.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import numpy as np

from ..errors import InputError

#: longest sentence accepted (characters)
MAX_TEXT = 1000


def find_tts() -> str | None:
    """The path of an offline TTS program (``espeak-ng``, else ``espeak``), or None when none is installed."""
    return shutil.which("espeak-ng") or shutil.which("espeak")


def synthesize(text: str, sample_rate: int, exe: str | None = None, voice: str = "en",
               timeout: float = 30.0) -> np.ndarray:
    """``text`` spoken by espeak-ng as mono float32 at ``sample_rate`` (blocking: run it in an executor)."""
    from ..media import decode_audio

    exe = exe or find_tts()
    if exe is None:
        raise InputError("say", "no offline TTS is installed on the server (apt-get install espeak-ng); "
                                "upload an audio file instead")
    text = " ".join(str(text).split())
    if not text:
        raise InputError("say", "the text is empty")
    if len(text) > MAX_TEXT:
        raise InputError("say", f"the text is {len(text)} characters; at most {MAX_TEXT}")
    fd, wav = tempfile.mkstemp(prefix="echo-tts-", suffix=".wav")
    os.close(fd)
    try:
        # the text goes in on stdin: a sentence starting with '-' is never read as an option
        r = subprocess.run([exe, "-v", voice, "-w", wav], input=text.encode("utf-8"), capture_output=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise InputError("say", f"{os.path.basename(exe)} failed: "
                                    f"{r.stderr.decode('utf-8', 'replace').strip()[:200]}")
        return decode_audio(wav, sample_rate=sample_rate)
    except subprocess.TimeoutExpired:
        raise InputError("say", f"{os.path.basename(exe)} took longer than {timeout:.0f} s") from None
    finally:
        os.unlink(wav)

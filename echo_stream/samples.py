"""The bundled files: where ``echo_stream/assets`` is, and the sample inputs ``demo`` and the benchmarks use.

A leaf module (standard library only), so that any module can find the bundled files without
importing the command line or the renderer.
"""
from __future__ import annotations

from pathlib import Path

#: ``echo_stream/assets``: the sample portrait and inputs, the default checkpoint, the face models
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
#: the bundled portrait (the renderer's and the server's default avatar)
SAMPLE_PORTRAIT = ASSETS_DIR / "portrait.jpg"
#: sample inputs of ``echo-stream demo``: avatar speech, a user webcam clip, a transcript
SAMPLE_DIR = ASSETS_DIR / "sample"


def demo_inputs() -> dict[str, str]:
    """The inputs of ``echo-stream demo`` (and ``bench pipeline``): ``portrait``, ``avatar_audio``,
    ``user_video``, ``transcript`` -> file paths."""
    return {
        "portrait": str(SAMPLE_PORTRAIT),
        "avatar_audio": str(SAMPLE_DIR / "avatar_speech.ogg"),
        "user_video": str(SAMPLE_DIR / "user_webcam.webm"),
        "transcript": str(SAMPLE_DIR / "transcript.txt"),
    }

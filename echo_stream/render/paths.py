"""Where the renderer's bundled files are."""
from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
SAMPLE_PORTRAIT = ASSETS_DIR / "portrait.jpg"
CASCADE_DIR = ASSETS_DIR / "haarcascades"

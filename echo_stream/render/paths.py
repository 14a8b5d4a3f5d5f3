"""Where the renderer's bundled files are."""
from __future__ import annotations

from ..samples import ASSETS_DIR, SAMPLE_PORTRAIT  # noqa: F401 (SAMPLE_PORTRAIT re-exported)

CASCADE_DIR = ASSETS_DIR / "haarcascades"

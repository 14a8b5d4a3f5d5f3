"""Time base and constants shared by the corpus modules."""
from __future__ import annotations

from .. import config, motion

SR = config.SAMPLE_RATE
FPS = config.FPS
SPF = config.SAMPLES_PER_FRAME
#: 2: listener rules b (micro-nods), d (brows after questions) and e (gaze); user questions and comma pauses
CORPUS_VERSION = 2
AFFECTS = ("positive", "negative", "neutral")
_FINE = 200                     # Hz: grid on which articulation targets are built (8 per video frame)
_FINE_PER_FRAME = _FINE // FPS
_CI = motion.CHANNEL_INDEX



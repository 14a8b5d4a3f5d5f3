"""Arguments of ``echo-stream track VIDEO -o MOTION.parquet``."""
from __future__ import annotations

import argparse

TRACK_EPILOG = """\
output: the same columns as `generate --motion-out` (frame, pts on the 25 fps grid, the 52 ARKit
blendshapes, headPitch/headYaw/headRoll in radians, headTx/headTy/headTz in face heights) plus
face_present (bool) and face_confidence (the mesh's face-presence probability, 0 without a face).

Channels the mesh cannot support stay 0 (tongueOut, cheekPuff, noseSneer*, mouthRoll*, mouthShrug*,
mouthPress*, mouthDimple*, mouthStretch*, mouthUpperUp*, mouthLowerDown*, jawForward). Estimates are
relative to the person's neutral face, taken from the whole video (resting mouth closed, eyes open);
head pose is relative to their average pose. Frames without a face for up to 0.5 s are interpolated;
longer gaps are neutral with face_present = false.

examples:
  echo-stream track interview.mp4 -o interview_motion.parquet
  echo-stream track webcam.webm -o motion.parquet --plot motion.png
"""


def add_track_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream track``."""
    p.epilog = TRACK_EPILOG
    p.add_argument("video", metavar="VIDEO", help="a video with a face (any container/codec PyAV reads)")
    p.add_argument("-o", "--out", metavar="MOTION.parquet", required=True, help="where to write the motion table")
    p.add_argument("--plot", metavar="PNG", help="also draw the main channels over time")
    p.add_argument("--max-seconds", type=float, metavar="S", help="track only the first S seconds")
    p.add_argument("--no-smooth", action="store_true", help="skip the One-Euro filter (raw per-frame estimates)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

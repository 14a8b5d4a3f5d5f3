"""``echo-stream track VIDEO -o MOTION.parquet``: a face video -> ARKit motion, with the bundled tracker."""
from __future__ import annotations

import argparse
import math
import os
import sys

EPILOG = """\
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("video", metavar="VIDEO", help="a video with a face (any container/codec PyAV reads)")
    p.add_argument("-o", "--out", metavar="MOTION.parquet", required=True, help="where to write the motion table")
    p.add_argument("--plot", metavar="PNG", help="also draw the main channels over time")
    p.add_argument("--max-seconds", type=float, metavar="S", help="track only the first S seconds")
    p.add_argument("--no-smooth", action="store_true", help="skip the One-Euro filter (raw per-frame estimates)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def motion_with_presence(track):
    """The motion table of :func:`echo_stream.generate.motion_table` plus the presence columns."""
    import numpy as np
    import pyarrow as pa

    from ..generate import motion_table

    table = motion_table(np.arange(len(track.present)), track.motion)
    table = table.append_column("face_present", pa.array(track.present.astype(bool)))
    return table.append_column("face_confidence", pa.array(track.confidence.astype(np.float32)))


def plot(track, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .. import atomic, motion

    groups = (("jaw / lips", ("jawOpen", "mouthSmileLeft", "mouthFrownLeft", "mouthPucker")),
              ("eyes", ("eyeBlinkLeft", "eyeBlinkRight", "eyeWideLeft", "eyeSquintLeft")),
              ("gaze", ("eyeLookUpLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft")),
              ("brows / cheeks", ("browInnerUp", "browDownLeft", "browOuterUpLeft", "cheekSquintLeft")),
              ("head (rad)", ("headPitch", "headYaw", "headRoll")))
    t = np.arange(len(track.present)) / motion.FPS
    fig, axes = plt.subplots(len(groups) + 1, 1, figsize=(11, 2.0 * (len(groups) + 1)), sharex=True)
    for ax, (name, chans) in zip(axes, groups):
        for c in chans:
            ax.plot(t, track.motion[:, motion.CHANNEL_INDEX[c]], lw=1, label=c)
        ax.set_ylabel(name)
        ax.legend(loc="upper right", fontsize=7, ncol=len(chans))
    axes[-1].fill_between(t, track.confidence, step="mid", alpha=0.5)
    axes[-1].set_ylabel("face confidence")
    axes[-1].set_xlabel("time (s)")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def run(args) -> int:
    from .. import atomic, motion
    from ..errors import InputError
    from ..generate import _check_output
    from .tracker import FaceTracker, track_video

    if not os.path.exists(args.video):
        raise InputError(args.video, "video not found")
    _check_output(args.out, "motion output")
    if args.plot:
        _check_output(args.plot, "plot")
    if args.max_seconds is not None and not (math.isfinite(args.max_seconds) and args.max_seconds > 0):
        raise InputError("--max-seconds", f"must be a finite number of seconds > 0, got {args.max_seconds}")
    limit = None if args.max_seconds is None else max(1, math.ceil(args.max_seconds * motion.FPS - 1e-9))
    track = track_video(args.video, tracker=lambda: FaceTracker(smooth=not args.no_smooth), num_frames=limit,
                        progress=not args.quiet)
    atomic.write_parquet(motion_with_presence(track), args.out)
    if args.plot:
        plot(track, args.plot, os.path.basename(args.video))
    n = len(track.present)
    print(f"wrote {args.out}: {n} frames ({n / motion.FPS:.2f} s), face found in {track.present.mean():.1%} "
          f"of frames", file=sys.stderr)
    return 0

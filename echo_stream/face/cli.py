"""``echo-stream track VIDEO -o MOTION.parquet``: a face video -> ARKit motion, with the bundled tracker."""
from __future__ import annotations

import math
import os
import sys

from ..arguments.face import TRACK_EPILOG as EPILOG  # noqa: F401 (re-exported)
from ..arguments.face import add_track_arguments as add_arguments  # noqa: F401 (the command's arguments)


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

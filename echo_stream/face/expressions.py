"""From mesh points to head pose and ARKit blendshape estimates.

Three steps, each a plain function of arrays:

1. :func:`face_frame` — the face's own axes from the mesh (x along the outer
   eye corners, y from forehead to chin made orthogonal, z = x cross y, into
   the head) give the head rotation (:func:`pose_angles`, the project's
   conventions of :mod:`echo_stream.motion` / :mod:`echo_stream.render`:
   ``headYaw > 0`` turns the face toward the image right, ``headPitch > 0``
   tilts it down, ``headRoll > 0`` turns it clockwise in the image).
2. :func:`measures` — distances in the *frontalised* face (points expressed in
   that frame, in units of the outer-eye-corner distance), so turning the head
   does not read as an expression: lip gap, jaw drop, mouth width and corner
   height, eye apertures, lower-lid height, brow heights, cheek height, gaze
   (iris against the eye corners), and the face's position and size.
3. :func:`blendshapes` — each estimated channel is ``clip((m - m0) / g, 0, 1)``
   of its measures ``m`` against the *neutral* ``m0`` of the same person
   (:func:`neutral_of`), where ``g`` (:data:`GAINS`) is the change that makes
   the channel reach 1, fixed from human proportions; then a small dead band.

Estimated channels: :data:`ESTIMATED`. The others — tongueOut, cheekPuff,
noseSneer*, mouthRoll*, mouthShrug*, mouthPress*, mouthDimple*, mouthStretch*,
mouthUpperUp*, mouthLowerDown*, jawForward — are left at 0: the mesh gives no
reliable signal for them (they need the lips' inner contact, the tongue or
skin texture), and inventing one would teach a model noise.
"""
from __future__ import annotations

import math

import numpy as np

from .. import motion
from .mesh import IDX, LID_BOTTOM, LID_TOP

#: Names of the measures, in the order of the rows :func:`measures` returns.
MEASURES: tuple[str, ...] = (
    "lip_gap", "jaw_drop", "mouth_width", "corner_up_R", "corner_up_L", "mouth_x", "jaw_x",
    "aperture_R", "aperture_L", "lower_lid_R", "lower_lid_L",
    "brow_inner_R", "brow_inner_L", "brow_outer_R", "brow_outer_L", "cheek_R", "cheek_L",
    "gaze_x_R", "gaze_x_L", "gaze_y_R", "gaze_y_L",
    "pitch", "yaw", "roll", "centre_x", "centre_y", "size",
)
M = {name: i for i, name in enumerate(MEASURES)}

#: Which statistic of a person's measures over time is their neutral: most faces rest with the
#: mouth closed (low percentile of the openings), the eyes open (upper percentile of the aperture:
#: blinks pull the median down), and everything else at its median.
NEUTRAL_PERCENTILE = {"lip_gap": 10.0, "jaw_drop": 10.0, "aperture_R": 70.0, "aperture_L": 70.0}

#: Measure change (in outer-eye-corner distances, or as stated) that makes a channel reach 1.
GAINS = {
    "jaw_drop": 0.30, "lip_gap": 0.40, "corner_up": 0.08, "corner_down": 0.06, "widen": 0.15,
    "narrow": 0.12, "mouth_x": 0.08, "jaw_x": 0.08,
    "blink": 0.8,      # fraction of the neutral aperture lost at a full blink
    "wide": 0.4,       # fraction of the neutral aperture gained
    "squint": 0.03, "brow_up": 0.08, "brow_down": 0.07, "cheek": 0.04,
    "gaze_x": 0.15, "gaze_y": 0.10,
}

#: Smallest neutral eye aperture (outer-eye-corner distances) that eye changes are measured against.
APERTURE_FLOOR = 0.05

#: Blendshape values up to this read as 0 (the rest is stretched back to 0..1).
DEAD_BAND = 0.02

ESTIMATED: tuple[str, ...] = (
    "jawOpen", "mouthClose", "mouthSmileLeft", "mouthSmileRight", "mouthFrownLeft", "mouthFrownRight",
    "mouthPucker", "mouthFunnel", "mouthLeft", "mouthRight", "jawLeft", "jawRight",
    "eyeBlinkLeft", "eyeBlinkRight", "eyeWideLeft", "eyeWideRight", "eyeSquintLeft", "eyeSquintRight",
    "eyeLookInLeft", "eyeLookOutLeft", "eyeLookUpLeft", "eyeLookDownLeft",
    "eyeLookInRight", "eyeLookOutRight", "eyeLookUpRight", "eyeLookDownRight",
    "browInnerUp", "browDownLeft", "browDownRight", "browOuterUpLeft", "browOuterUpRight",
    "cheekSquintLeft", "cheekSquintRight",
    "headPitch", "headYaw", "headRoll", "headTx", "headTy", "headTz",
)
NOT_ESTIMATED: tuple[str, ...] = tuple(c for c in motion.CHANNELS if c not in ESTIMATED)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def face_frame(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(origin (3,), rotation (3, 3) whose rows are the face's x/y/z axes in the image, scale D)."""
    p = np.asarray(points, np.float64)
    ex = _unit(p[IDX["eye_outer_L"]] - p[IDX["eye_outer_R"]])
    down = p[IDX["chin"]] - p[IDX["forehead"]]
    ez = _unit(np.cross(ex, down))
    ey = np.cross(ez, ex)
    scale = float(np.linalg.norm(p[IDX["eye_outer_L"]] - p[IDX["eye_outer_R"]]))
    return p[IDX["nose_bridge"]], np.stack([ex, ey, ez]), max(scale, 1e-6)


def pose_angles(rot: np.ndarray) -> tuple[float, float, float]:
    """(pitch, yaw, roll) radians of a face frame (see the module's conventions)."""
    ex, _, ez = rot
    yaw = math.atan2(-ez[0], ez[2])
    pitch = math.atan2(-ez[1], math.hypot(ez[0], ez[2]))
    roll = math.atan2(ex[1], ex[0])
    return pitch, yaw, roll


def _lift(points2d: np.ndarray, z: float, origin: np.ndarray, rot: np.ndarray, d: float) -> np.ndarray:
    """Image points (K, 2) at depth ``z`` -> frontalised face coordinates (K, 3)."""
    p = np.concatenate([np.asarray(points2d, np.float64), np.full((len(points2d), 1), z)], 1)
    return (p - origin) @ rot.T / d


def measures(points: np.ndarray, eyes: np.ndarray | None = None) -> np.ndarray:
    """(len(MEASURES),) float64 measures of one mesh (image pixels).

    ``eyes`` (2, 19, 2): per eye the iris centre, the 16-point eye contour and two brow points of
    :meth:`echo_stream.face.mesh.Iris.run`; it gives the lids, the brows and the gaze. Without it the
    mesh's own lid and brow points are used (they follow blinks and brow raises only part-way) and
    the gaze is 0.
    """
    origin, rot, d = face_frame(points)
    q = (np.asarray(points, np.float64) - origin) @ rot.T / d      # frontalised, y down
    # mouth corners: outer and inner lip corner averaged (half the jitter of one point)
    for s, inner in (("R", 78), ("L", 308)):
        q[IDX[f"mouth_corner_{s}"]] = (q[IDX[f"mouth_corner_{s}"]] + q[inner]) / 2
    y = lambda name: q[IDX[name], 1]  # noqa: E731
    x = lambda name: q[IDX[name], 0]  # noqa: E731
    m = np.zeros(len(MEASURES))
    m[M["lip_gap"]] = y("lip_bottom_inner") - y("lip_top_inner")
    m[M["jaw_drop"]] = y("chin") - y("nose_tip")
    m[M["mouth_width"]] = x("mouth_corner_L") - x("mouth_corner_R")
    # corners against the middle of the outer lips: the jaw moves both alike, a smile lifts the corners
    lips_mid = (y("lip_top_outer") + y("lip_bottom_outer")) / 2
    m[M["corner_up_R"]] = lips_mid - y("mouth_corner_R")
    m[M["corner_up_L"]] = lips_mid - y("mouth_corner_L")
    m[M["mouth_x"]] = (x("mouth_corner_L") + x("mouth_corner_R")) / 2 - x("nose_tip")
    m[M["jaw_x"]] = x("chin") - x("nose_tip")
    p = np.asarray(points, np.float64)
    for k, s in enumerate(("R", "L")):
        if eyes is not None:
            z = (p[IDX[f"eye_outer_{s}"], 2] + p[IDX[f"eye_inner_{s}"], 2]) / 2
            e = _lift(eyes[k], z, origin, rot, d)
            contour = e[1:17]
            brow_outer, brow_inner = e[17, 1], e[18, 1]
            corners = contour[[0, 8]]
            top = contour[list(LID_TOP), 1].mean()
            bottom = contour[list(LID_BOTTOM), 1].mean()
            mid = corners.mean(0)
            width = max(abs(corners[0, 0] - corners[1, 0]), 1e-6)
            m[M[f"gaze_x_{s}"]] = (e[0, 0] - mid[0]) / width
            m[M[f"gaze_y_{s}"]] = (e[0, 1] - mid[1]) / width
        else:
            top, bottom = y(f"lid_top_{s}"), y(f"lid_bottom_{s}")
            mid = (q[IDX[f"eye_outer_{s}"]] + q[IDX[f"eye_inner_{s}"]]) / 2
            brow_outer, brow_inner = y(f"brow_outer_{s}"), y(f"brow_inner_{s}")
        m[M[f"aperture_{s}"]] = bottom - top
        m[M[f"lower_lid_{s}"]] = bottom - mid[1]
        # brows against the nose tip (rigid; the eye corners move with a brow raise and a look up)
        m[M[f"brow_inner_{s}"]] = y("nose_tip") - brow_inner
        m[M[f"brow_outer_{s}"]] = y("nose_tip") - brow_outer
        m[M[f"cheek_{s}"]] = y(f"cheek_{s}") - mid[1]
    m[M["pitch"]], m[M["yaw"]], m[M["roll"]] = pose_angles(rot)
    m[M["centre_x"]], m[M["centre_y"]] = origin[0], origin[1]
    m[M["size"]] = float(np.linalg.norm(p[IDX["chin"]] - p[IDX["forehead"]]))
    return m


def neutral_of(history: np.ndarray) -> np.ndarray:
    """Neutral measures of one person from their measures over time ``(T, len(MEASURES))``."""
    h = np.asarray(history, np.float64)
    out = np.median(h, axis=0)
    for name, pct in NEUTRAL_PERCENTILE.items():
        out[M[name]] = np.percentile(h[:, M[name]], pct)
    return out


def blendshapes(m: np.ndarray, neutral: np.ndarray) -> np.ndarray:
    """``(T, len(MEASURES))`` measures against the neutral -> ``(T, 58)`` float32 motion (unestimated = 0)."""
    m = np.atleast_2d(np.asarray(m, np.float64))
    d = m - neutral
    g = GAINS
    c = lambda v: np.clip(v, 0.0, 1.0)  # noqa: E731
    out = np.zeros((m.shape[0], motion.NUM_CHANNELS), np.float32)

    def put(name, v):
        out[:, motion.CHANNEL_INDEX[name]] = v

    col = lambda name: d[:, M[name]]  # noqa: E731
    jaw = col("jaw_drop") / g["jaw_drop"]
    gap = col("lip_gap") / g["lip_gap"]
    put("jawOpen", c(0.5 * np.clip(jaw, 0, None) + 0.5 * np.clip(gap, 0, None)))
    put("mouthClose", c(jaw - gap))
    narrow = c(-col("mouth_width") / g["narrow"])
    opened = c(col("lip_gap") / 0.1)
    put("mouthPucker", narrow * (1 - opened))
    put("mouthFunnel", narrow * opened)
    widen = col("mouth_width") / g["widen"]
    for side, s in (("Left", "L"), ("Right", "R")):
        up = col(f"corner_up_{s}")
        put(f"mouthSmile{side}", c(0.5 * up / g["corner_up"] + 0.5 * widen))
        put(f"mouthFrown{side}", c(-up / g["corner_down"]))
        # aperture change as a fraction of the neutral aperture (floored: a person calibrated with their
        # eyes shut must not read as blinking)
        open_ = -col(f"aperture_{s}") / max(float(neutral[M[f"aperture_{s}"]]), APERTURE_FLOOR)
        put(f"eyeBlink{side}", c(open_ / g["blink"]))
        put(f"eyeWide{side}", c(-open_ / g["wide"]))
        put(f"eyeSquint{side}", c(-col(f"lower_lid_{s}") / g["squint"]))
        put(f"browDown{side}", c(-col(f"brow_inner_{s}") / g["brow_down"]))
        put(f"browOuterUp{side}", c(col(f"brow_outer_{s}") / g["brow_up"]))
        put(f"cheekSquint{side}", c(-col(f"cheek_{s}") / g["cheek"]))
        # gaze: +x is the image right = the subject's left; for the left eye that is outward
        # (a closed eye has no gaze: the iris estimate fades out with the blink)
        seen = 1.0 - out[:, motion.CHANNEL_INDEX[f"eyeBlink{side}"]]
        gx, gy = seen * col(f"gaze_x_{s}") / g["gaze_x"], seen * col(f"gaze_y_{s}") / g["gaze_y"]
        out_dir = gx if s == "L" else -gx
        put(f"eyeLookOut{side}", c(out_dir))
        put(f"eyeLookIn{side}", c(-out_dir))
        put(f"eyeLookUp{side}", c(-gy))
        put(f"eyeLookDown{side}", c(gy))
    put("browInnerUp", c((col("brow_inner_R") + col("brow_inner_L")) / 2 / g["brow_up"]))
    put("mouthLeft", c(col("mouth_x") / g["mouth_x"]))
    put("mouthRight", c(-col("mouth_x") / g["mouth_x"]))
    put("jawLeft", c(col("jaw_x") / g["jaw_x"]))
    put("jawRight", c(-col("jaw_x") / g["jaw_x"]))
    size0 = max(float(neutral[M["size"]]), 1e-6)
    # a dead band at the bottom of every blendshape: the mesh's frame-to-frame jitter on a still face
    # is a few hundredths of the range and would otherwise flicker around 0
    bs = [motion.CHANNEL_INDEX[c] for c in ESTIMATED if not c.startswith("head")]
    out[:, bs] = np.clip((out[:, bs] - DEAD_BAND) / (1.0 - DEAD_BAND), 0.0, 1.0)
    put("headPitch", col("pitch"))
    put("headYaw", col("yaw"))
    put("headRoll", col("roll"))
    put("headTx", col("centre_x") / size0)
    put("headTy", col("centre_y") / size0)
    put("headTz", 2.0 * (m[:, M["size"]] / size0 - 1.0))     # the renderer's scale = 1 + headTz / 2
    return motion.clamp_motion(out)

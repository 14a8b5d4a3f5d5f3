"""Placing a portrait's face from its mesh: the renderer's named landmarks from the 468 points.

:func:`mesh_landmarks` reads one photo with the tracker (detection, then the
mesh re-read from its own region until it settles) and returns the
points the renderer animates — eye centres, lids, corners, brows, nose tip,
mouth corners, lips, chin and an 11-point jaw outline — in the renderer's
image-side convention (``left_*`` is the image-left side, the subject's right).
"""
from __future__ import annotations

import threading

import numpy as np

#: Brow points of the subject's right brow (upper edge, then lower edge, outer to inner);
#: the left brow's are the mirrored indices.
_BROW_R = ((70, 63, 105, 66, 107), (46, 53, 52, 65, 55))
_BROW_L = ((300, 293, 334, 296, 336), (276, 283, 282, 295, 285))
#: Face outline from the image-left temple over the chin to the image-right temple.
_JAW = (127, 234, 132, 172, 150, 152, 379, 397, 361, 454, 356)
#: Least mesh presence accepted for a portrait (a photo is one frame: be stricter than for video).
MIN_PRESENCE = 0.8

_TRACKER = None
_LOCK = threading.Lock()


def _tracker():
    global _TRACKER
    if _TRACKER is None:
        from .tracker import FaceTracker

        _TRACKER = FaceTracker(smooth=False, iris=False)
    return _TRACKER


def landmarks_from_mesh(p: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Named landmark points (image pixels) and the (11, 2) jaw outline from a (468, 2+) mesh."""
    p = np.asarray(p, np.float64)[:, :2]

    def mean(idx):
        return p[list(idx)].mean(0)

    known = {}
    for side, outer, inner, top, bottom, brow in (("left", 33, 133, 159, 145, _BROW_R),
                                                  ("right", 263, 362, 386, 374, _BROW_L)):
        # the eye centre as the 68-point convention takes it: the mean of its six contour points
        known[f"{side}_eye"] = (p[outer] + p[inner] + 2 * p[top] + 2 * p[bottom]) / 6
        known[f"{side}_eye_outer"], known[f"{side}_eye_inner"] = p[outer], p[inner]
        known[f"{side}_eye_top"], known[f"{side}_eye_bottom"] = p[top], p[bottom]
        upper, lower = brow
        known[f"{side}_brow"] = (mean(upper) + mean(lower)) / 2
        known[f"{side}_brow_outer"] = (p[upper[0]] + p[lower[0]]) / 2
        known[f"{side}_brow_inner"] = (p[upper[-1]] + p[lower[-1]]) / 2
    known.update(nose=p[1], mouth_left=p[61], mouth_right=p[291], mouth_centre=(p[13] + p[14]) / 2,
                 upper_lip=p[0], lower_lip=p[17], chin=p[152])
    return known, p[list(_JAW)]


class UpsideDown(Exception):
    """The photo's face is upside down (the detector is far surer of it turned by 180 degrees)."""


#: How much surer the detector must be of the photo turned by 180 degrees to call it upside down.
UPSIDE_DOWN_MARGIN = 0.15


def _best_score(tracker, rgb: np.ndarray) -> float:
    dets = tracker.models.detector.detect(rgb)
    return max((d.score for d in dets), default=0.0)


def mesh_landmarks(rgb: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray] | None:
    """(named points, jaw outline, face box x, y, w, h) of the photo's largest face, or None without one.

    Raises :class:`UpsideDown` for a photo whose face is upside down: the mesh would read an upright
    face into it (a false face with the chin on the forehead), so the caller asks for an upright photo.
    """
    with _LOCK:                      # one tracker (and its interpreters) for every caller in this process
        tracker = _tracker()
        upright = _best_score(tracker, rgb)
        if _best_score(tracker, np.ascontiguousarray(rgb[::-1, ::-1])) > upright + UPSIDE_DOWN_MARGIN:
            raise UpsideDown()
        obs = tracker.landmarks(rgb)
    if not obs.present or obs.confidence < MIN_PRESENCE:
        return None
    known, jaw = landmarks_from_mesh(obs.points)
    xy = obs.points[:, :2]
    lo, hi = xy.min(0), xy.max(0)
    return known, jaw, np.array([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]], np.float32)

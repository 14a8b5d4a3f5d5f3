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
    """The photo's face is upside down (the detector is surer of it turned by 180 degrees than of any
    other quarter turn)."""


#: How much surer the detector must be of the photo turned by 180 degrees than of it as it is (and turned by
#: 90 degrees either way) to call it upside down. The detector (like the mesh) reads an upright face into an
#: upside-down photo, with scores only somewhat lower than the true face's; averaged over small rotations and
#: the mirror image (:func:`orientation_score`) the two sides separate: on the 62 stills of the real test video,
#: an upright photo scored at least 0.10 above its 180-degree turn, and the turn at least 0.10 below.
UPSIDE_DOWN_MARGIN = 0.0
#: the views :func:`orientation_score` averages: the photo and its mirror image, each turned by these degrees
_VIEW_DEGREES = (-12.0, 0.0, 12.0)


def _best_score(tracker, rgb: np.ndarray) -> float:
    dets = tracker.models.detector.detect(rgb)
    return max((d.score for d in dets), default=0.0)


def orientation_score(tracker, rgb: np.ndarray) -> float:
    """The detector's mean best score over small rotations of the photo and of its mirror image: how upright
    a face it holds (one view alone is noisy: an upside-down face can outscore its upright self)."""
    import cv2

    h, w = rgb.shape[:2]
    scores = []
    for view in (rgb, np.ascontiguousarray(rgb[:, ::-1])):
        for deg in _VIEW_DEGREES:
            if deg:
                m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0)
                view_r = cv2.warpAffine(view, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
            else:
                view_r = view
            scores.append(_best_score(tracker, view_r))
    return float(np.mean(scores))


def _is_upside_down(tracker, rgb: np.ndarray) -> bool:
    import cv2

    k = 512 / max(rgb.shape[:2])                  # the detector sees 128-256 px: its views need no more
    if k < 1:
        rgb = cv2.resize(rgb, (max(1, round(rgb.shape[1] * k)), max(1, round(rgb.shape[0] * k))),
                         interpolation=cv2.INTER_AREA)
    as_is = orientation_score(tracker, rgb)
    turned = orientation_score(tracker, np.ascontiguousarray(rgb[::-1, ::-1]))
    if turned <= as_is + UPSIDE_DOWN_MARGIN:
        return False
    # a sideways photo: its 180-degree turn is sideways too, and a quarter turn is the upright one
    quarter = max(orientation_score(tracker, np.ascontiguousarray(np.rot90(rgb, k))) for k in (1, 3))
    return turned > quarter + UPSIDE_DOWN_MARGIN


def is_upside_down(rgb: np.ndarray) -> bool:
    """Whether the photo's face is upside down (see :data:`UPSIDE_DOWN_MARGIN`)."""
    with _LOCK:
        return _is_upside_down(_tracker(), rgb)


def mesh_landmarks(rgb: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray] | None:
    """(named points, jaw outline, face box x, y, w, h) of the photo's largest face, or None without one.

    Raises :class:`UpsideDown` for a photo whose face is upside down: the mesh would read an upright
    face into it (a false face with the chin on the forehead), so the caller asks for an upright photo.
    """
    with _LOCK:                      # one tracker (and its interpreters) for every caller in this process
        tracker = _tracker()
        if _is_upside_down(tracker, rgb):
            raise UpsideDown()
        obs = tracker.landmarks(rgb)
    if not obs.present or obs.confidence < MIN_PRESENCE:
        return None
    known, jaw = landmarks_from_mesh(obs.points)
    xy = obs.points[:, :2]
    lo, hi = xy.min(0), xy.max(0)
    return known, jaw, np.array([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]], np.float32)

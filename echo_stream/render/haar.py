"""Haar-cascade portrait placement: the fallback when the face mesh finds no face.

Viola-Jones cascades (frontal face, eyes; OpenCV's classic files, bundled in
``echo_stream/assets/haarcascades``) run by ``cv2.CascadeClassifier`` give a
face box and eye centres; the lower face comes from canonical proportions and
the darkest row between the lips. OpenCV is pinned below 5, which removed the
class; without it there is no fallback (the mesh still places faces). The tests
keep a numpy evaluator of the same cascades as an oracle (``tests/haar_oracle.py``).
"""
from __future__ import annotations

import gzip
import math
from functools import lru_cache

import numpy as np

from ..errors import InputError
from .landmarks import _TEMPLATE, _frame, _from_face, _to_face, refine_mouth_line
from .paths import CASCADE_DIR


@lru_cache(maxsize=None)
def opencv_cascade(name: str):
    """The bundled cascade loaded into ``cv2.CascadeClassifier``, or None where that class is missing."""
    import cv2

    if not hasattr(cv2, "CascadeClassifier"):
        return None
    try:
        with gzip.open(CASCADE_DIR / f"{name}.xml.gz", "rb") as fh:
            text = fh.read().decode("utf-8")
        storage = cv2.FileStorage(text, cv2.FILE_STORAGE_READ | cv2.FILE_STORAGE_MEMORY)
        cc = cv2.CascadeClassifier()
        if not cc.read(storage.getFirstTopLevelNode()) or cc.empty():
            return None
        return cc
    except (cv2.error, OSError, AttributeError):
        return None


def detect(name: str, gray: np.ndarray, min_size: float, max_size: float | None = None,
            scale_factor: float = 1.1, min_neighbors: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Multi-scale detection of cascade ``name`` in uint8 ``gray``; (rects (M, 4) x, y, w, h; support counts)."""
    cc = opencv_cascade(name)
    if cc is None:                      # an OpenCV without CascadeClassifier (5.x): no Haar fallback
        return np.zeros((0, 4)), np.zeros(0, np.int64)
    h, w = gray.shape
    lim = min(h, w) if max_size is None else min(max_size, min(h, w))
    if lim < min_size:
        return np.zeros((0, 4)), np.zeros(0, np.int64)
    mn = int(math.ceil(min_size))
    mx = int(math.floor(lim))
    rects, counts = cc.detectMultiScale2(np.ascontiguousarray(gray), scaleFactor=scale_factor,
                                         minNeighbors=min_neighbors, minSize=(mn, mn), maxSize=(mx, mx))
    rects = np.asarray(rects, np.float64).reshape(-1, 4)
    return rects, np.asarray(counts, np.int64).reshape(-1)


def detect_landmarks(rgb: np.ndarray, what: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Face box and eye centres by Haar cascades; (known landmark points, face box x,y,w,h)."""
    import cv2

    gray_full = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = gray_full.shape
    boxes = np.zeros((0, 4))
    counts = np.zeros(0, np.int64)
    searched_down_to = None          # smallest face size (original pixels) already searched
    # Coarse pass for the usual portrait (face >= ~8% of the short side), then a finer one for small faces.
    for max_side, min_frac in ((480, 0.08), (1000, 0.0)):
        scale = min(1.0, max_side / max(h, w))
        min_face = max(22.0, min_frac * min(h, w) * scale)
        if searched_down_to is not None and min_face >= searched_down_to * scale * 0.9:
            break
        gray = gray_full if scale == 1.0 else cv2.resize(gray_full, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                         interpolation=cv2.INTER_AREA)
        max_face = None if searched_down_to is None else searched_down_to * scale * 1.3
        for name, min_nb in (("haarcascade_frontalface_alt2", 3), ("haarcascade_frontalface_default", 4)):
            boxes, counts = detect(name, gray, min_size=min_face, max_size=max_face, min_neighbors=min_nb)
            if len(boxes):
                break
        if len(boxes):
            boxes = boxes / scale
            break
        searched_down_to = min_face / scale
    if len(boxes) == 0:
        raise InputError(what, "no face found in the image; use a frontal, well-lit portrait, or pass a landmarks "
                               "sidecar (JSON with left_eye, right_eye, nose, mouth_left, mouth_right as [x, y] "
                               "pixels) as <image>.landmarks.json or via landmarks_path")
    # Largest plausible face: well supported (>= a third of the best support), then the biggest.
    ok = counts >= max(4, counts.max() // 3) if counts.max() >= 4 else counts == counts.max()
    cand = np.nonzero(ok)[0]
    best = cand[np.argmax(boxes[cand, 2])]
    box = boxes[best]
    fx, fy, fw, fh = box

    # Eyes: search the upper face half of a face-normalised patch (face ~ 200 px wide).
    s = 200.0 / fw
    x0, y0 = int(max(0, fx)), int(max(0, fy + 0.12 * fh))
    x1, y1 = int(min(w, fx + fw)), int(min(h, fy + 0.6 * fh))
    eyes: dict[str, np.ndarray] = {}
    if x1 - x0 > 8 and y1 - y0 > 8:
        reg = cv2.resize(gray_full[y0:y1, x0:x1], None, fx=s, fy=s, interpolation=cv2.INTER_AREA if s < 1
                         else cv2.INTER_LINEAR)
        reg = cv2.equalizeHist(reg)
        er, ec = detect("haarcascade_eye", reg, min_size=0.12 * 200, max_size=0.42 * 200, min_neighbors=2)
        mid = (fx + fw / 2 - x0) * s
        exp_y = (fy + 0.37 * fh - y0) * s
        for side, expect_x in (("left_eye", (fx + 0.27 * fw - x0) * s), ("right_eye", (fx + 0.73 * fw - x0) * s)):
            best_score, best_c = None, None
            for r, c in zip(er, ec):
                cx, cy = r[0] + r[2] / 2, r[1] + r[3] / 2
                if (side == "left_eye") != (cx < mid):
                    continue
                dist = np.hypot(cx - expect_x, cy - exp_y) / 200.0
                score = c * np.exp(-(dist / 0.12) ** 2)
                if best_score is None or score > best_score:
                    best_score, best_c = score, np.array([cx / s + x0, cy / s + y0])
            if best_c is not None and best_score > 0.3:
                eyes[side] = best_c
    tl = np.array([fx + 0.27 * fw, fy + 0.37 * fh])
    tr = np.array([fx + 0.73 * fw, fy + 0.37 * fh])
    le, re_ = eyes.get("left_eye"), eyes.get("right_eye")
    if le is not None and re_ is not None:
        d = re_ - le
        iod = np.hypot(*d)
        if not (0.3 * fw <= iod <= 0.62 * fw and abs(d[1]) < 0.45 * abs(d[0])):
            le = re_ = None
    if le is None and re_ is None:
        le, re_ = tl, tr
    elif le is None:
        le = re_ + (tl - tr)
    elif re_ is None:
        re_ = le + (tr - tl)
    known = {"left_eye": le, "right_eye": re_}
    # Lower face from the box: mouth line from the image when it is clear, chin from the box.
    frame = _frame(le, re_)
    chin_y = _to_face(np.array([fx + fw / 2, fy + 1.13 * fh]), frame)[1]
    refine_mouth_line(gray_full, known, _TEMPLATE["mouth_centre"][1], 0.32)
    mouth_y = _to_face(known["mouth_centre"], frame)[1]
    known["chin"] = _from_face(np.array([0.0, max(chin_y, mouth_y + 0.45)]), frame)
    for k in ("chin",):
        known[k] = np.clip(known[k], 0, [w - 1, h - 1])
    return known, box.astype(np.float32)

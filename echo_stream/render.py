"""Batched warping renderer: animate one portrait photo from per-frame motion coefficients.

Overview
--------
``load_portrait(path)`` reads a photo (png/jpeg/..., any size, EXIF orientation
honoured) and places the face on it: either from a *landmarks sidecar* (see
below) or, without one, with Viola-Jones Haar cascades (frontal face + eyes)
bundled in ``echo_stream/assets/haarcascades`` (OpenCV's classic cascade files),
run by ``cv2.CascadeClassifier`` where the OpenCV build has it and otherwise by
an equivalent numpy evaluator in this module (OpenCV 5 removed the class). A
small set of 2-D landmarks (eyes, eyelids, brows, nose, mouth corners, lip
centres, chin, jaw outline) is derived from the eyes and face box with
canonical face proportions, refined a little from the image (lip line).

``PortraitRenderer(portrait, size=(256, 256))`` crops a square around the face
(face ~50% of the crop height, eyes level at 44% of the height, edges
replicated where the crop leaves the photo), resizes it to the working size
and precomputes everything that depends only on the portrait:

* a basis of dense backward flows, one per motion channel that moves facial
  geometry (jaw, lips, mouth corners, eyelids, brows, cheeks, nose), built from
  sparse control displacements with smooth Gaussian / lip-line-split influence
  maps, restricted to the face's bounding box;
* per-frame: ``flow = motion @ basis`` (one matmul), one ``grid_sample`` of the
  face box, then appearance layers that warping cannot produce (mouth interior
  with a teeth hint revealed exactly where the warped lips part; eyelid skin
  and lash line covering the eyes with ``eyeBlink``), blended with soft masks;
* head pose (roll, yaw/pitch as depth-weighted shifts with foreshortening,
  translation, scale) as a second sampling grid built by one matmul from
  precomputed maps weighted by a soft head-and-neck mask, so the background
  (image corners) stays put, and one full-frame ``grid_sample``.

``render(motion)`` takes an ``(N, 58)`` array in :mod:`echo_stream.motion`
order and returns ``(N, H, W, 3)`` uint8 frames. Everything per frame is torch
and runs on CPU or CUDA.

Conventions
-----------
* ``...Left`` / ``...Right`` channels follow ARKit: the *subject's* left, which
  is the image right of an unmirrored photo.
* ``headYaw > 0`` turns the face toward the image right, ``headPitch > 0``
  tilts it down (nose toward the chin), ``headRoll > 0`` tilts the head
  clockwise in the image (the top moves to the image right). ``headTx > 0``
  moves right, ``headTy > 0`` moves down, ``headTz > 0`` moves closer (larger);
  translations are in units of the face height (hairline to chin).

Landmarks sidecar
-----------------
A JSON file, picked up automatically when ``<image>.landmarks.json`` (e.g.
``me.jpg.landmarks.json``) sits beside the image, or passed explicitly as
``landmarks_path``. Coordinates are pixels of the image as stored (after EXIF
orientation), x to the right, y down::

    {
      "left_eye":    [x, y],   # eye centre on the image-left side
      "right_eye":   [x, y],   # eye centre on the image-right side
      "nose":        [x, y],   # nose tip
      "mouth_left":  [x, y],   # mouth corner on the image-left side
      "mouth_right": [x, y],   # mouth corner on the image-right side
      "chin":        [x, y]    # optional: lowest point of the chin
    }

or ``{"points68": [[x, y], ... 68 points]}`` in the common iBUG-300W / dlib
68-point order (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67),
which gives the most precise placement. Both forms may be combined (the five
named points then win). Any extra keys are ignored. Left/right are taken from
the image: a file that names them from the subject's side is swapped back.
Every point must lie inside the image and the nose, mouth and chin below the
eyes; otherwise :class:`~echo_stream.errors.InputError` names the bad key.

API
---
``load_portrait(path_or_bytes, landmarks_path=None) -> Portrait`` (detections
are cached per image content); ``crop_portrait(portrait, size) -> FaceCrop``;
``PortraitRenderer(portrait_or_path, size=(256, 256), device="cpu")`` with
``.render(motion) -> uint8 (N, H, W, 3)``, ``.render_torch(motion) -> float32
(N, 3, H, W)`` in 0..255 on the device, ``.crop`` (the FaceCrop). Sizes are
(height, width), even, 64..4096. ``SAMPLE_PORTRAIT`` is the bundled photo.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ._lazy import LazyModule
from .errors import InputError

# torch is needed only to render, not to place a face: importing it lazily keeps
# input validation (load_portrait) fast in processes that never render.
torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
SAMPLE_PORTRAIT = ASSETS_DIR / "portrait.jpg"
_CASCADE_DIR = ASSETS_DIR / "haarcascades"


# ----------------------------------------------------------------------------------------------
# Haar cascade evaluation (Viola-Jones), numpy-vectorised over candidate windows.
# ----------------------------------------------------------------------------------------------

@dataclass
class _Stage:
    threshold: float
    feat: np.ndarray       # (T, K) feature index of each node of each tree
    thr: np.ndarray        # (T, K) node thresholds
    left: np.ndarray       # (T, K) >0: next node, <=0: leaf -value
    right: np.ndarray      # (T, K)
    leaves: np.ndarray     # (T, K + 1)


@dataclass
class _Cascade:
    width: int
    height: int
    rects: np.ndarray      # (F, 3, 5): x, y, w, h, weight (unused rects have weight 0)
    stages: list[_Stage]


_THRESHOLD_EPS = 1e-5


@lru_cache(maxsize=None)
def _load_cascade(name: str) -> _Cascade:
    """Parse one of the bundled OpenCV cascade files (new-style XML, HAAR features, BOOST stages)."""
    path = _CASCADE_DIR / f"{name}.xml.gz"
    with gzip.open(path, "rb") as fh:
        root = ET.parse(fh).getroot()
    casc = root.find("cascade")
    if casc is None or casc.findtext("featureType", "").strip() != "HAAR":
        raise RuntimeError(f"{path}: not a HAAR cascade")
    width = int(casc.findtext("width"))
    height = int(casc.findtext("height"))
    feats = casc.find("features")
    rect_list = []
    for f in feats:
        if (f.findtext("tilted") or "0").strip() == "1":
            raise RuntimeError(f"{path}: tilted features are not supported")
        rs = np.zeros((3, 5), dtype=np.float64)
        for i, r in enumerate(f.find("rects")):
            rs[i] = [float(v) for v in r.text.split()]
        rect_list.append(rs)
    stages = []
    for st in casc.find("stages"):
        trees = []
        for wc in st.find("weakClassifiers"):
            nodes = wc.findtext("internalNodes").split()
            leaves = [float(v) for v in wc.findtext("leafValues").split()]
            k = len(nodes) // 4
            trees.append(([int(nodes[4 * i]) for i in range(k)], [int(nodes[4 * i + 1]) for i in range(k)],
                          [int(nodes[4 * i + 2]) for i in range(k)], [float(nodes[4 * i + 3]) for i in range(k)],
                          leaves))
        kmax = max(len(t[0]) for t in trees)
        n = len(trees)
        feat = np.zeros((n, kmax), np.int64)
        thr = np.zeros((n, kmax), np.float64)
        left = np.zeros((n, kmax), np.int64)
        right = np.zeros((n, kmax), np.int64)
        lv = np.zeros((n, kmax + 1), np.float64)
        for i, (lf, rt, fi, th, lvs) in enumerate(trees):
            k = len(lf)
            left[i, :k], right[i, :k], feat[i, :k], thr[i, :k] = lf, rt, fi, th
            lv[i, :len(lvs)] = lvs
        stages.append(_Stage(float(st.findtext("stageThreshold")) - _THRESHOLD_EPS, feat, thr, left, right, lv))
    return _Cascade(width, height, np.stack(rect_list), stages)


def _cascade_windows(casc: _Cascade, gray: np.ndarray, step: int) -> np.ndarray:
    """Top-left corners (M, 2) of all ``casc`` windows of ``gray`` (already scaled) that pass every stage."""
    import cv2

    h, w = gray.shape
    ww, wh = casc.width, casc.height
    if h < wh or w < ww:
        return np.zeros((0, 2), np.int64)
    ii, ii2 = cv2.integral2(gray, sdepth=cv2.CV_64F, sqdepth=cv2.CV_64F)
    stride = w + 1
    ii = ii.ravel()
    ii2 = ii2.ravel()
    ys, xs = np.mgrid[0:h - wh + 1:step, 0:w - ww + 1:step]
    xs = xs.ravel()
    ys = ys.ravel()
    off = ys * stride + xs

    # Variance normalisation over the window shrunk by one pixel (as OpenCV does).
    a = 1 * stride + 1
    b = 1 * stride + (ww - 1)
    c = (wh - 1) * stride + 1
    d = (wh - 1) * stride + (ww - 1)
    area = float((ww - 2) * (wh - 2))
    s = ii[off + a] - ii[off + b] - ii[off + c] + ii[off + d]
    sq = ii2[off + a] - ii2[off + b] - ii2[off + c] + ii2[off + d]
    nf = area * sq - s * s
    inv = np.where(nf > 0, 1.0 / np.sqrt(np.maximum(nf, 1e-12)), 1.0)

    r = casc.rects
    rx, ry, rw, rh, rwt = (r[..., i] for i in range(5))
    c00 = (ry * stride + rx).astype(np.int64)
    c01 = (ry * stride + rx + rw).astype(np.int64)
    c10 = ((ry + rh) * stride + rx).astype(np.int64)
    c11 = ((ry + rh) * stride + rx + rw).astype(np.int64)

    for stg in casc.stages:
        if off.size == 0:
            break
        used, inverse = np.unique(stg.feat, return_inverse=True)
        inverse = inverse.reshape(stg.feat.shape)
        keep_mask = np.zeros(off.size, bool)
        chunk = max(1, 2_000_000 // max(1, used.size * 4))
        w0, w1, w2 = (rwt[used, i] for i in range(3))
        n_t, n_k = stg.feat.shape
        t_idx = np.arange(n_t)[None, :]
        for lo in range(0, off.size, chunk):
            o = off[lo:lo + chunk, None]
            sums = [ii[o + c00[used, i]] - ii[o + c01[used, i]] - ii[o + c10[used, i]] + ii[o + c11[used, i]]
                    for i in range(3)]
            vals = (sums[0] * w0 + sums[1] * w1 + sums[2] * w2) * inv[lo:lo + chunk, None]   # (n, U)
            if n_k == 1:                                                              # stumps
                v = vals[:, inverse[:, 0]]
                total = np.where(v < stg.thr[:, 0], stg.leaves[:, 0], stg.leaves[:, 1]).sum(1)
            else:                                                                     # small trees
                vals = vals[:, inverse]                                               # (n, T, K)
                dec = np.where(vals < stg.thr, stg.left, stg.right)                   # next node / -leaf
                cur = dec[:, :, 0]
                for _ in range(n_k - 1):
                    deeper = np.take_along_axis(dec, np.maximum(cur, 0)[..., None], axis=2)[..., 0]
                    cur = np.where(cur > 0, deeper, cur)
                total = stg.leaves[t_idx, -cur].sum(1)
            keep_mask[lo:lo + chunk] = total >= stg.threshold
        off = off[keep_mask]
        inv = inv[keep_mask]
    return np.stack([off % stride, off // stride], axis=1)


def _group_rects(rects: np.ndarray, min_neighbors: int, eps: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Cluster similar (x, y, w, h) rectangles (OpenCV's groupRectangles rule); returns (rects, counts)."""
    n = len(rects)
    if n == 0:
        return np.zeros((0, 4)), np.zeros(0, np.int64)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    x, y, w, h = (rects[:, i].astype(np.float64) for i in range(4))
    for i in range(n):
        delta = eps * (np.minimum(w[i], w[i + 1:]) + np.minimum(h[i], h[i + 1:])) * 0.5
        sim = ((np.abs(x[i] - x[i + 1:]) <= delta) & (np.abs(y[i] - y[i + 1:]) <= delta)
               & (np.abs(x[i] + w[i] - x[i + 1:] - w[i + 1:]) <= delta)
               & (np.abs(y[i] + h[i] - y[i + 1:] - h[i + 1:]) <= delta))
        for j in np.nonzero(sim)[0] + i + 1:
            ri, rj = find(i), find(int(j))
            if ri != rj:
                parent[rj] = ri
    labels = np.array([find(i) for i in range(n)])
    out, counts = [], []
    for lab in np.unique(labels):
        m = labels == lab
        if m.sum() > min_neighbors:
            out.append(rects[m].astype(np.float64).mean(0))
            counts.append(int(m.sum()))
    if not out:
        return np.zeros((0, 4)), np.zeros(0, np.int64)
    out = np.array(out)
    counts = np.array(counts)
    # Drop clusters that lie inside a better-supported bigger one.
    keep = np.ones(len(out), bool)
    for i in range(len(out)):
        for j in range(len(out)):
            if i == j or counts[j] <= max(3, counts[i]):
                continue
            dx, dy = eps * out[j, 2], eps * out[j, 3]
            if (out[i, 0] >= out[j, 0] - dx and out[i, 1] >= out[j, 1] - dy
                    and out[i, 0] + out[i, 2] <= out[j, 0] + out[j, 2] + dx
                    and out[i, 1] + out[i, 3] <= out[j, 1] + out[j, 3] + dy):
                keep[i] = False
    return out[keep], counts[keep]


#: Evaluate cascades with OpenCV's CascadeClassifier when this OpenCV build has it (4.x: ~20x faster);
#: the numpy evaluator below is the fallback (OpenCV 5 removed the class) and gives the same detections.
USE_OPENCV_CASCADE = True


@lru_cache(maxsize=None)
def _opencv_cascade(name: str):
    """The bundled cascade loaded into ``cv2.CascadeClassifier``, or None where that class is missing."""
    import cv2

    if not hasattr(cv2, "CascadeClassifier"):
        return None
    try:
        with gzip.open(_CASCADE_DIR / f"{name}.xml.gz", "rb") as fh:
            text = fh.read().decode("utf-8")
        storage = cv2.FileStorage(text, cv2.FILE_STORAGE_READ | cv2.FILE_STORAGE_MEMORY)
        cc = cv2.CascadeClassifier()
        if not cc.read(storage.getFirstTopLevelNode()) or cc.empty():
            return None
        return cc
    except (cv2.error, OSError, AttributeError):
        return None


def _detect(name: str, gray: np.ndarray, min_size: float, max_size: float | None = None,
            scale_factor: float = 1.1, min_neighbors: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Multi-scale detection of cascade ``name`` in uint8 ``gray``; (rects (M, 4) x, y, w, h; support counts)."""
    import cv2

    cc = _opencv_cascade(name) if USE_OPENCV_CASCADE else None
    if cc is not None:
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
    casc = _load_cascade(name)
    h, w = gray.shape
    max_size = min(h, w) if max_size is None else min(max_size, min(h, w))
    found = []
    factor = 1.0                       # OpenCV's schedule: scale_factor**k, skipping windows below min_size
    while True:
        win_w, win_h = round(casc.width * factor), round(casc.height * factor)
        sw, sh = int(round(w / factor)), int(round(h / factor))
        if win_w > max_size or win_h > max_size or sw < casc.width or sh < casc.height:
            break
        if win_w >= min_size and win_h >= min_size:
            scaled = gray if factor == 1.0 else cv2.resize(gray, (sw, sh), interpolation=cv2.INTER_LINEAR)
            step = 1 if factor > 2.0 else 2
            pts = _cascade_windows(casc, scaled, step)
            for px, py in pts:
                found.append((px * factor, py * factor, win_w, win_h))
        factor *= scale_factor
    return _group_rects(np.array(found, np.float64).reshape(-1, 4), min_neighbors)


# ----------------------------------------------------------------------------------------------
# Landmarks: canonical face template, detection, sidecar.
# ----------------------------------------------------------------------------------------------

#: Canonical landmark template in *face units*: origin at the midpoint between the eye centres,
#: x toward the image-right eye, y down, unit = inter-ocular distance (IOD). "l"/"r" = image left/right.
_TEMPLATE: dict[str, tuple[float, float]] = {
    "left_eye": (-0.5, 0.0), "right_eye": (0.5, 0.0),
    "left_eye_top": (-0.5, -0.075), "right_eye_top": (0.5, -0.075),
    "left_eye_bottom": (-0.5, 0.06), "right_eye_bottom": (0.5, 0.06),
    "left_eye_outer": (-0.73, 0.01), "left_eye_inner": (-0.28, 0.02),
    "right_eye_inner": (0.28, 0.02), "right_eye_outer": (0.73, 0.01),
    "left_brow": (-0.52, -0.33), "right_brow": (0.52, -0.33),
    "left_brow_inner": (-0.2, -0.28), "right_brow_inner": (0.2, -0.28),
    "left_brow_outer": (-0.86, -0.25), "right_brow_outer": (0.86, -0.25),
    "nose": (0.0, 0.66),
    "mouth_left": (-0.4, 1.1), "mouth_right": (0.4, 1.1), "mouth_centre": (0.0, 1.12),
    "upper_lip": (0.0, 1.0), "lower_lip": (0.0, 1.26),
    "chin": (0.0, 1.78),
}
#: Face outline from the image-left temple over the chin to the image-right temple (face units).
_TEMPLATE_JAW = np.array([(-1.02, 0.0), (-1.0, 0.45), (-0.94, 0.9), (-0.8, 1.3), (-0.52, 1.62), (0.0, 1.78),
                          (0.52, 1.62), (0.8, 1.3), (0.94, 0.9), (1.0, 0.45), (1.02, 0.0)])
_HAIRLINE_Y = -1.1     # face units; hairline-to-chin defines the "face height"

#: Landmark names of the canonical set, in a fixed order.
LANDMARK_NAMES: tuple[str, ...] = tuple(_TEMPLATE) + ("jaw",)

_SIDECAR_KEYS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass
class Portrait:
    """One reference photo and where its face is.

    ``image`` is (H, W, 3) uint8 RGB as stored (EXIF orientation applied); ``landmarks`` maps each
    name of :data:`LANDMARK_NAMES` to (2,) float32 pixel coordinates (``"jaw"``: (11, 2), image-left
    temple over the chin to the image-right temple); ``source`` is ``"sidecar"`` or ``"detected"``.
    """

    image: np.ndarray
    landmarks: dict[str, np.ndarray]
    source: str
    path: str | None = None
    face_box: np.ndarray | None = None   # (x, y, w, h) of the detected face, when detected
    detector: str | None = None          # "mesh" or "haar" when detected

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    def crop(self, size: int | tuple[int, int] = (256, 256)) -> "FaceCrop":
        """The face-centred crop at working size ``size`` (see :func:`crop_portrait`)."""
        return crop_portrait(self, size)


@dataclass
class FaceCrop:
    """The portrait cropped around its face at the working size; landmarks in crop pixels."""

    image: np.ndarray                  # (H, W, 3) uint8
    landmarks: dict[str, np.ndarray]
    matrix: np.ndarray                 # (2, 3): image pixel -> crop pixel
    iod: float                         # inter-ocular distance in crop pixels
    face_height: float                 # hairline-to-chin in crop pixels


def _frame(left_eye: np.ndarray, right_eye: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(origin, x axis, y axis, IOD) of the face-unit frame defined by the two eye centres."""
    d = right_eye - left_eye
    iod = float(np.hypot(*d))
    ux = d / iod
    uy = np.array([-ux[1], ux[0]])
    return (left_eye + right_eye) / 2, ux, uy, iod


def _to_face(p: np.ndarray, frame) -> np.ndarray:
    o, ux, uy, iod = frame
    q = np.asarray(p, np.float64) - o
    return np.stack([q @ ux, q @ uy], -1) / iod


def _from_face(p: np.ndarray, frame) -> np.ndarray:
    o, ux, uy, iod = frame
    p = np.asarray(p, np.float64)
    return o + (p[..., :1] * ux + p[..., 1:2] * uy) * iod


def _complete_landmarks(known: dict[str, np.ndarray], jaw: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Fill in the canonical landmark set from the eye centres plus whatever else is known.

    Points given in ``known`` are kept; the rest come from the template, placed by the eyes and
    stretched vertically so that the template's mouth (and chin, when known) meet the known ones.
    """
    frame = _frame(known["left_eye"], known["right_eye"])
    tpl = {k: np.array(v, np.float64) for k, v in _TEMPLATE.items()}
    tjaw = _TEMPLATE_JAW.copy()
    face = {k: _to_face(v, frame) for k, v in known.items()}

    # Vertical stretch of the lower face: eyes->mouth from the mouth, mouth->chin from the chin.
    mouth_y = None
    if "mouth_centre" in face:
        mouth_y = face["mouth_centre"][1]
    elif "mouth_left" in face and "mouth_right" in face:
        mouth_y = (face["mouth_left"][1] + face["mouth_right"][1]) / 2 + 0.02
    k1 = 1.0 if mouth_y is None else float(np.clip(mouth_y / tpl["mouth_centre"][1], 0.6, 1.6))
    m_tpl, m_new = tpl["mouth_centre"][1], tpl["mouth_centre"][1] * k1
    c_new = face["chin"][1] if "chin" in face else m_new + (tpl["chin"][1] - m_tpl) * k1
    k2 = float(np.clip((c_new - m_new) / (tpl["chin"][1] - m_tpl), 0.5, 2.0))

    def stretch(p):
        p = p.copy()
        y = p[..., 1]
        lower = y > m_tpl
        mid = (y > 0) & ~lower
        p[..., 1] = np.where(lower, m_new + (y - m_tpl) * k2, np.where(mid, y * k1, y))
        return p

    tpl = {k: stretch(v) for k, v in tpl.items()}
    tjaw = stretch(tjaw)
    # Mouth width from the corners, when known.
    if "mouth_left" in face and "mouth_right" in face:
        half = (face["mouth_right"][0] - face["mouth_left"][0]) / 2
        cx = (face["mouth_right"][0] + face["mouth_left"][0]) / 2
        for k in ("upper_lip", "lower_lip", "mouth_centre"):
            tpl[k][0] = cx
        tpl["mouth_left"][0], tpl["mouth_right"][0] = cx - half, cx + half
        tpl["upper_lip"][1] = tpl["mouth_centre"][1] - 0.12 * max(half / 0.4, 0.5)
        tpl["lower_lip"][1] = tpl["mouth_centre"][1] + 0.14 * max(half / 0.4, 0.5)
    if "nose" in face:
        tpl["nose"] = face["nose"]
    if "chin" in face:
        tjaw[5] = face["chin"]
    tpl.update(face)
    out = {k: _from_face(v, frame).astype(np.float32) for k, v in tpl.items()}
    out["jaw"] = (np.asarray(jaw, np.float32) if jaw is not None else _from_face(tjaw, frame).astype(np.float32))
    return out


def _points68_landmarks(p: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Named landmarks from the iBUG-300W 68-point layout (image-left = subject's right)."""
    p = p.astype(np.float64)
    known = {
        "left_eye": p[36:42].mean(0), "right_eye": p[42:48].mean(0),
        "left_eye_top": p[37:39].mean(0), "left_eye_bottom": p[40:42].mean(0),
        "right_eye_top": p[43:45].mean(0), "right_eye_bottom": p[46:48].mean(0),
        "left_eye_outer": p[36], "left_eye_inner": p[39], "right_eye_inner": p[42], "right_eye_outer": p[45],
        "left_brow": p[17:22].mean(0), "right_brow": p[22:27].mean(0),
        "left_brow_inner": p[21], "right_brow_inner": p[22], "left_brow_outer": p[17], "right_brow_outer": p[26],
        "nose": p[30], "mouth_left": p[48], "mouth_right": p[54],
        "mouth_centre": (p[62] + p[66]) / 2, "upper_lip": p[51], "lower_lip": p[57], "chin": p[8],
    }
    jaw = p[[0, 2, 4, 5, 6, 8, 10, 11, 12, 14, 16]]
    return known, jaw


def _parse_sidecar(path: Path, width: int, height: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Read and validate a landmarks sidecar; (named points, optional 68-point jaw subset)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "landmarks file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read landmarks file ({e})") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"landmarks file is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise InputError(path, "landmarks file must hold a JSON object like "
                               '{"left_eye": [x, y], "right_eye": [x, y], "nose": [x, y], '
                               '"mouth_left": [x, y], "mouth_right": [x, y]}')

    def point(key, value):
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                or not all(math.isfinite(v) for v in value)):
            raise InputError(path, f"'{key}' must be [x, y] with two finite numbers, got {json.dumps(value)[:60]}")
        x, y = float(value[0]), float(value[1])
        if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
            raise InputError(path, f"'{key}' = [{x:g}, {y:g}] lies outside the {width}x{height} image")
        return np.array([x, y], np.float64)

    known: dict[str, np.ndarray] = {}
    jaw = None
    if "points68" in data:
        pts = data["points68"]
        if not isinstance(pts, list) or len(pts) != 68:
            raise InputError(path, f"'points68' must be a list of 68 [x, y] points, got "
                                   f"{len(pts) if isinstance(pts, list) else type(pts).__name__}")
        arr = np.stack([point(f"points68[{i}]", v) for i, v in enumerate(pts)])
        known, jaw = _points68_landmarks(arr)
    missing = [k for k in _SIDECAR_KEYS if k not in data and k not in known]
    if missing:
        raise InputError(path, f"missing key '{missing[0]}' (a landmarks file needs "
                               f"{', '.join(_SIDECAR_KEYS)} as [x, y] pixels, or 'points68')")
    for k in _SIDECAR_KEYS + ("chin",):
        if k in data:
            known[k] = point(k, data[k])
    # Accept either side convention: "left" is whichever point lies further left in the image.
    for a, b in (("left_eye", "right_eye"), ("mouth_left", "mouth_right")):
        if known[a][0] > known[b][0]:
            known[a], known[b] = known[b], known[a]
    iod = float(np.hypot(*(known["right_eye"] - known["left_eye"])))
    if iod < 4:
        raise InputError(path, f"'left_eye' and 'right_eye' are only {iod:.1f} px apart; need two distinct eye centres")
    frame = _frame(known["left_eye"], known["right_eye"])
    for k in ("nose", "mouth_left", "mouth_right", "chin"):
        if k in known and _to_face(known[k], frame)[1] <= 0.1:
            raise InputError(path, f"'{k}' must lie below the eyes (check x/y order and image orientation)")
    return known, jaw


def _refine_mouth_line(gray: np.ndarray, known: dict[str, np.ndarray], prior: float, reach: float,
                       centre_x: float = 0.0) -> None:
    """Set ``known["mouth_centre"]`` to the darkest row between the lips near ``prior`` (face units).

    Searches an upright strip 0.6 IOD wide around ``centre_x`` for rows within ``prior +- reach``;
    falls back to the prior when the strip shows no clear dark line.
    """
    import cv2

    frame = _frame(known["left_eye"], known["right_eye"])
    ppu = 40.0                                                        # samples per face unit
    xs = np.linspace(centre_x - 0.3, centre_x + 0.3, int(0.6 * ppu))
    ys = np.linspace(prior - reach, prior + reach, max(8, int(2 * reach * ppu)))
    gx, gy = np.meshgrid(xs, ys)
    pts = _from_face(np.stack([gx, gy], -1), frame).astype(np.float32)
    patch = cv2.remap(gray.astype(np.float32), pts[..., 0], pts[..., 1], cv2.INTER_LINEAR,
                      borderMode=cv2.BORDER_REPLICATE)
    prof = cv2.GaussianBlur(patch, (0, 0), 1.0).mean(1)
    score = prof - prof.std() * 0.8 * np.exp(-((ys - prior) / (0.7 * reach)) ** 2)   # prefer rows near the prior
    i = int(np.argmin(score))
    y = ys[i] if (0 < i < len(ys) - 1 and prof.max() - prof[i] > 8) else prior
    known["mouth_centre"] = _from_face(np.array([centre_x, y]), frame)


def _detect_landmarks(rgb: np.ndarray, what: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
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
            boxes, counts = _detect(name, gray, min_size=min_face, max_size=max_face, min_neighbors=min_nb)
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
        er, ec = _detect("haarcascade_eye", reg, min_size=0.12 * 200, max_size=0.42 * 200, min_neighbors=2)
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
    _refine_mouth_line(gray_full, known, _TEMPLATE["mouth_centre"][1], 0.32)
    mouth_y = _to_face(known["mouth_centre"], frame)[1]
    known["chin"] = _from_face(np.array([0.0, max(chin_y, mouth_y + 0.45)]), frame)
    for k in ("chin",):
        known[k] = np.clip(known[k], 0, [w - 1, h - 1])
    return known, box.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Loading and cropping.
# ----------------------------------------------------------------------------------------------

def _decode_image(data: bytes, what: str) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB (EXIF orientation applied, alpha over white)."""
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise InputError(what, "empty file, expected a portrait image (png/jpeg)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:          # unreadable EXIF: keep the pixels as stored  # noqa: BLE001
                im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                # High-bit-depth grey: scale to 8 bits instead of letting convert() clip.
                a = np.asarray(im, dtype=np.float64)
                hi = 65535.0 if im.mode != "F" and a.max() > 255 else max(float(a.max()), 1.0)
                if im.mode == "F" and a.max() <= 1.0:
                    hi = 1.0
                g = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
                arr = np.repeat(g[..., None], 3, axis=2)
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except UnidentifiedImageError:
        raise InputError(what, "not a supported image (expected png, jpeg, webp, bmp or tiff)") from None
    except Image.DecompressionBombError as e:
        raise InputError(what, f"image too large ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise InputError(what, f"corrupt or truncated image ({e})") from None
    if arr.ndim != 3 or arr.shape[0] < 32 or arr.shape[1] < 32:
        raise InputError(what, f"image is too small ({arr.shape[1]}x{arr.shape[0]}); need at least 32x32 pixels")
    return arr


def _gray(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


_DETECTION_CACHE: dict[str, tuple[dict[str, np.ndarray], np.ndarray]] = {}
_DETECTION_CACHE_SIZE = 16


def load_portrait(path: str | os.PathLike | bytes, landmarks_path: str | os.PathLike | None = None) -> Portrait:
    """Read a portrait photo (a path, or encoded image bytes) and place its face.

    Landmarks come from the sidecar (``landmarks_path``, or ``<image>.landmarks.json`` beside a
    path) when there is one, else from face detection (results are cached per image content).
    Raises :class:`~echo_stream.errors.InputError` for a missing, unsupported or corrupt image, an
    invalid landmarks sidecar, or when no face is found (the message tells how to pass landmarks).
    """
    import hashlib

    if isinstance(path, (bytes, bytearray, memoryview)):
        data, what, src_path = bytes(path), "portrait", None
    else:
        src_path = Path(path)
        what = str(src_path)
        if not src_path.exists():
            raise InputError(src_path, "portrait image not found")
        if src_path.is_dir():
            raise InputError(src_path, "is a directory, expected a portrait image file (png/jpeg)")
        try:
            data = src_path.read_bytes()
        except OSError as e:
            raise InputError(src_path, f"cannot read the image ({e.strerror or e})") from None
        if landmarks_path is None:
            auto = src_path.with_name(src_path.name + ".landmarks.json")
            landmarks_path = auto if auto.exists() else None
    rgb = _decode_image(data, what)
    h, w = rgb.shape[:2]
    if landmarks_path is not None:
        known, jaw = _parse_sidecar(Path(landmarks_path), w, h)
        if "mouth_centre" not in known:                # five points: find the lip line between the corners
            frame = _frame(known["left_eye"], known["right_eye"])
            ml, mr = _to_face(known["mouth_left"], frame), _to_face(known["mouth_right"], frame)
            half = (mr[0] - ml[0]) / 2
            _refine_mouth_line(_gray(rgb), known, (ml[1] + mr[1]) / 2 + 0.02, float(np.clip(0.3 * half, 0.06, 0.15)),
                               (ml[0] + mr[0]) / 2)
        return Portrait(rgb, _complete_landmarks(known, jaw), "sidecar", what if src_path else None)
    key = (hashlib.sha1(data).hexdigest(), PLACEMENT)
    hit = _DETECTION_CACHE.get(key)
    if hit is None:
        hit = _place_face(rgb, what)
        if len(_DETECTION_CACHE) >= _DETECTION_CACHE_SIZE:
            _DETECTION_CACHE.pop(next(iter(_DETECTION_CACHE)))
        _DETECTION_CACHE[key] = hit
    known, box, jaw, detector = hit
    known = {k: v.copy() for k, v in known.items()}
    return Portrait(rgb, _complete_landmarks(known, jaw), "detected", what if src_path else None, box.copy(),
                    detector)


#: How a portrait without a sidecar is placed: ``"mesh"`` (the face tracker's 468-point mesh, with the
#: Haar cascades as the fallback when the mesh finds no face) or ``"haar"`` (the cascades only).
PLACEMENT = "mesh"


def _place_face(rgb: np.ndarray, what: str):
    """(known points, face box, jaw outline or None, detector name) of the photo's face."""
    if PLACEMENT == "mesh":
        from .face.portrait import mesh_landmarks

        found = mesh_landmarks(rgb)
        if found is not None:
            known, jaw, box = found
            return known, box, jaw.astype(np.float32), "mesh"
    known, box = _detect_landmarks(rgb, what)
    return known, box, None, "haar"


def _parse_size(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    try:
        hh, ww = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError("size", f"expected an int or (height, width), got {size!r}") from None
    if hh % 2 or ww % 2 or hh < 64 or ww < 64 or hh > 4096 or ww > 4096:
        raise InputError("size", f"render size must be even and between 64 and 4096 pixels, got {ww}x{hh} (WxH)")
    if not (0.5 <= ww / hh <= 2.0):
        raise InputError("size", f"aspect ratio {ww}x{hh} is too extreme (width/height must be in 0.5..2)")
    return hh, ww


#: Vertical position of the eye line in the crop, as a fraction of the crop height.
EYE_LINE = 0.44
#: Face height (hairline to chin) as a fraction of the crop height.
FACE_FRACTION = 0.5


def crop_portrait(portrait: Portrait, size: int | tuple[int, int] = (256, 256)) -> FaceCrop:
    """Cut the face-centred, eye-levelled crop (face = 50% of its height, eyes at 44%) at ``size``."""
    import cv2

    hh, ww = _parse_size(size)
    lm = portrait.landmarks
    o, ux, uy, iod = _frame(lm["left_eye"].astype(np.float64), lm["right_eye"].astype(np.float64))
    chin_y = float(_to_face(lm["chin"], (o, ux, uy, iod))[1])
    face_units = chin_y - _HAIRLINE_Y                       # face height in IODs
    crop_h = face_units * iod / FACE_FRACTION                # crop height in image pixels
    k = hh / crop_h                                          # image px -> crop px
    # crop = k * R (p - o) + (ww/2, EYE_LINE*hh), R rows = (ux, uy)
    rot = np.stack([ux, uy])
    mat = np.concatenate([k * rot, (np.array([ww / 2, EYE_LINE * hh]) - k * rot @ o)[:, None]], 1)
    img = portrait.image
    pre = 1.0
    if k < 0.5:                                              # anti-alias strong reductions
        pre = min(1.0, 2.0 * k)
        img = cv2.resize(img, (max(1, round(img.shape[1] * pre)), max(1, round(img.shape[0] * pre))),
                         interpolation=cv2.INTER_AREA)
    m2 = mat.copy()
    m2[:, :2] /= pre
    interp = cv2.INTER_CUBIC if k > 1.2 else cv2.INTER_LINEAR
    crop = cv2.warpAffine(img, m2, (ww, hh), flags=interp, borderMode=cv2.BORDER_REPLICATE)
    lms = {}
    for name, p in lm.items():
        p = np.asarray(p, np.float64)
        lms[name] = (p @ mat[:, :2].T + mat[:, 2]).astype(np.float32)
    return FaceCrop(crop, lms, mat.astype(np.float64), float(iod * k), float(face_units * iod * k))


# ----------------------------------------------------------------------------------------------
# Expression fields: forward displacement (face units) of each geometry-moving channel.
# ----------------------------------------------------------------------------------------------

def _gauss(X, Y, cx, cy, sx, sy):
    return np.exp(-0.5 * (((X - cx) / sx) ** 2 + ((Y - cy) / sy) ** 2))


def _gauss1(Z, c, s):
    return np.exp(-0.5 * ((Z - c) / s) ** 2)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _smoothstep(z):
    z = np.clip(z, 0.0, 1.0)
    return z * z * (3.0 - 2.0 * z)


@dataclass
class _FaceGeometry:
    """Landmarks of the crop in face units (origin eye midpoint, unit IOD, y down)."""

    pts: dict[str, np.ndarray]
    jaw: np.ndarray

    @property
    def mouth(self):
        p = self.pts
        xs, ys = p["mouth_centre"]
        half = max(0.2, (p["mouth_right"][0] - p["mouth_left"][0]) / 2)
        yc = (p["mouth_left"][1] + p["mouth_right"][1]) / 2
        return float(xs), float(ys), float(half), float(yc)

    def lip_line(self, X):
        """Y of the line between the lips (the split of the upper and lower face) at each X."""
        xs, ys, half, yc = self.mouth
        return ys + (yc - ys) * np.minimum(1.0, ((X - xs) / half) ** 2)


_LIP_EDGE = 0.02      # face units: softness of the upper/lower lip split


def _expression_fields(X: np.ndarray, Y: np.ndarray, fg: _FaceGeometry) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Forward displacement (dx, dy) in face units of every geometry channel, evaluated at (X, Y)."""
    p = fg.pts
    xs, ys, half, _ = fg.mouth
    lip = fg.lip_line(X)
    lower = _sigmoid((Y - lip) / _LIP_EDGE)
    upper = 1.0 - lower
    ul, ll = float(p["upper_lip"][1]), float(p["lower_lip"][1])
    chin_y = float(p["chin"][1])
    tp = np.clip(1.0 - ((X - xs) / (half * 1.05)) ** 2, 0.0, 1.0) ** 0.6
    # Jaw region: lateral bounds from the outline (clamped at the jaw's lower corners), fading under the chin.
    jl, jr = fg.jaw[:5], fg.jaw[6:][::-1]
    xl = np.interp(Y, jl[:, 1], jl[:, 0])
    xr = np.interp(Y, jr[:, 1], jr[:, 0])
    side = _sigmoid((X - xl + 0.05) / 0.1) * _sigmoid((xr + 0.05 - X) / 0.1)
    v = _smoothstep((Y - lip) / max(chin_y - ys, 0.3))
    below = 1.0 - _smoothstep((Y - chin_y) / 0.55)
    jaw_shape = lower * (tp + (1.0 - tp) * v) * side * below
    zero = np.zeros_like(X)
    f: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    f["jawOpen"] = (zero, (0.30 + 0.10 * v) * jaw_shape)
    f["jawForward"] = (zero, 0.03 * jaw_shape)
    gy_ul = _gauss1(Y, ul, 0.15)
    gy_ll = _gauss1(Y, ll, 0.2)
    f["mouthClose"] = (zero, -0.24 * lower * tp * gy_ll + 0.05 * upper * tp * gy_ul)
    f["mouthRollLower"] = (zero, -0.04 * lower * tp * _gauss1(Y, ll, 0.14))
    f["mouthRollUpper"] = (zero, 0.035 * upper * tp * _gauss1(Y, ul, 0.12))
    f["mouthShrugLower"] = (zero, -0.05 * lower * np.sqrt(tp) * _gauss1(Y, ll + 0.15, 0.3))
    f["mouthShrugUpper"] = (zero, -0.03 * upper * tp * gy_ul)
    corners = {+1: p["mouth_right"], -1: p["mouth_left"]}          # +1: image right = subject's Left
    gc = {s: _gauss(X, Y, c[0], c[1], 0.2, 0.17) for s, c in corners.items()}
    inward = -(gc[+1] - gc[-1])
    mouth_open = -0.04 * upper * tp * gy_ul + 0.06 * lower * tp * gy_ll
    f["mouthFunnel"] = (0.07 * inward, mouth_open)
    f["mouthPucker"] = (0.12 * inward, 0.02 * upper * tp * gy_ul - 0.02 * lower * tp * gy_ll)
    gm = _gauss(X, Y, xs, ys, 0.5, 0.3)
    for name, s in (("Left", +1), ("Right", -1)):
        g = gc[s]
        gside = _gauss1(X, xs + s * 0.18, 0.2)
        f["jaw" + name] = (s * 0.10 * jaw_shape, zero)
        f["mouth" + name] = (s * 0.10 * gm, zero)
        f["mouthLowerDown" + name] = (zero, 0.12 * lower * tp * gside * gy_ll)
        f["mouthUpperUp" + name] = (zero, -0.10 * upper * tp * gside * _gauss1(Y, ul, 0.16))
        f["mouthPress" + name] = (zero, (0.02 * upper * gy_ul - 0.025 * lower * gy_ll) * _gauss1(X, xs + s * 0.2, 0.2))
        f["mouthStretch" + name] = (s * 0.08 * g, 0.05 * g)
        cheek = _gauss(X, Y, corners[s][0] + s * 0.12, corners[s][1] - 0.45, 0.25, 0.22)
        f["mouthSmile" + name] = (s * 0.12 * g, -0.12 * g - 0.05 * cheek)
        f["mouthFrown" + name] = (s * 0.01 * g, 0.10 * g)
        f["mouthDimple" + name] = (s * 0.05 * g, -0.01 * g)

    # Eyes ("Left" = subject's left = image-right eye) and brows.
    for name, key, s in (("Left", "right", +1), ("Right", "left", -1)):
        ex, ey = p[f"{key}_eye"]
        et = p[f"{key}_eye_top"][1]
        eb = p[f"{key}_eye_bottom"][1]
        a = max(0.12, abs(p[f"{key}_eye_outer"][0] - p[f"{key}_eye_inner"][0]) / 2)
        g_top = _gauss(X, Y, ex, et, a * 0.9, 0.07)
        g_bot = _gauss(X, Y, ex, eb, a * 0.9, 0.06)
        g_iris = _gauss(X, Y, ex, ey, 0.11, 0.055)
        bx, by = p[f"{key}_brow"]
        g_brow = _gauss(X, Y, bx, by, 0.3, 0.15)
        f["eyeBlink" + name] = (zero, 0.035 * g_top - 0.01 * g_bot)
        f["eyeWide" + name] = (zero, -0.05 * _gauss(X, Y, ex, et - 0.02, a * 0.9, 0.08) - 0.02 * g_brow)
        f["eyeSquint" + name] = (zero, -0.035 * _gauss(X, Y, ex, eb + 0.02, a * 0.9, 0.07) + 0.012 * g_top)
        f["eyeLookIn" + name] = (-s * 0.08 * g_iris, zero)
        f["eyeLookOut" + name] = (s * 0.08 * g_iris, zero)
        f["eyeLookUp" + name] = (zero, -0.04 * g_iris - 0.015 * g_top)
        f["eyeLookDown" + name] = (zero, 0.04 * g_iris + 0.02 * g_top)
        bo = p[f"{key}_brow_outer"]
        f["browOuterUp" + name] = (zero, -0.10 * _gauss(X, Y, bo[0], bo[1], 0.2, 0.16))
        f["browDown" + name] = (-s * 0.03 * g_brow, 0.09 * g_brow)
        f["cheekSquint" + name] = (zero, -0.05 * _gauss(X, Y, ex, eb + 0.4, 0.24, 0.15) - 0.02 * g_bot)
        nx, ny = p["nose"]
        f["noseSneer" + name] = (zero, -0.05 * _gauss(X, Y, nx + s * 0.17, ny - 0.05, 0.1, 0.14)
                                 - 0.015 * upper * _gauss(X, Y, xs + s * 0.2, ul, 0.2, 0.12))
    bil, bir = p["left_brow_inner"], p["right_brow_inner"]
    f["browInnerUp"] = (zero, -0.12 * (_gauss(X, Y, bil[0], bil[1], 0.17, 0.16) + _gauss(X, Y, bir[0], bir[1], 0.17, 0.16)))
    puff = _gauss(X, Y, xs + 0.58, ys - 0.12, 0.22, 0.3) - _gauss(X, Y, xs - 0.58, ys - 0.12, 0.22, 0.3)
    f["cheekPuff"] = (0.08 * puff, zero)
    return f


def _geometry_channels() -> tuple[str, ...]:
    """Channels that move geometry (have a flow basis), in motion-vector order."""
    from .motion import CHANNELS

    fg = _FaceGeometry({k: np.array(v, np.float64) for k, v in _TEMPLATE.items()}, _TEMPLATE_JAW)
    names = _expression_fields(np.zeros(1), np.zeros(1), fg)
    return tuple(c for c in CHANNELS if c in names)


# ----------------------------------------------------------------------------------------------
# The renderer.
# ----------------------------------------------------------------------------------------------

class PortraitRenderer:
    """Animates one portrait: ``render(motion (N, 58)) -> (N, H, W, 3) uint8``.

    All portrait-dependent work (crop, flow basis, masks, colours) happens here once; per batch
    the work is a few matmuls, two ``grid_sample`` calls (face box, full frame for head pose) and
    small masked blends. ``device`` may be ``"cpu"`` or ``"cuda"``.
    """

    # Pose model constants (face units).
    _HEAD_CENTRE_Y = 0.3       # scale / pitch centre
    _ROLL_PIVOT = (0.0, 1.0)   # roll about the upper neck
    _DEPTH = 1.0               # depth of the face surface in front of the rotation axis
    _DEPTH_CENTRE = (0.0, 0.2)
    _DEPTH_RADII = (1.3, 1.9)
    _SCALE_PER_TZ = 0.5        # headTz = 1 face height closer -> 1.5x bigger

    def __init__(self, portrait: Portrait | str | os.PathLike, size: int | tuple[int, int] = (256, 256),
                 device: str | torch.device = "cpu"):
        if not isinstance(portrait, Portrait):
            portrait = load_portrait(portrait)
        self.size = _parse_size(size)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("device", "CUDA was requested but torch sees no CUDA device")
        self.portrait = portrait
        self.crop = crop_portrait(portrait, self.size)
        hh, ww = self.size
        c = self.crop
        self._e = c.iod
        self._eye_y = EYE_LINE * hh
        self._eye_x = ww / 2
        pts = {k: self._to_face(v) for k, v in c.landmarks.items() if k != "jaw"}
        jaw = self._to_face(c.landmarks["jaw"])
        self._fg = _FaceGeometry(pts, jaw)
        self._src = torch.from_numpy(c.image.astype(np.float32)).permute(2, 0, 1)[None].contiguous().to(self.device)
        self._build_expression()
        self._build_mouth()
        self._build_eyes()
        self._build_pose()

    # -- coordinates -------------------------------------------------------------------------
    def _to_face(self, p):
        p = np.asarray(p, np.float64)
        return np.stack([(p[..., 0] - self._eye_x) / self._e, (p[..., 1] - self._eye_y) / self._e], -1)

    def _px(self, X, Y):
        return X * self._e + self._eye_x, Y * self._e + self._eye_y

    def _norm(self, x, y):
        hh, ww = self.size
        return (2 * x + 1) / ww - 1, (2 * y + 1) / hh - 1

    # -- expression basis ----------------------------------------------------------------------
    def _build_expression(self):
        from .motion import CHANNEL_INDEX

        hh, ww = self.size
        fg = self._fg
        chin_y = float(fg.pts["chin"][1])
        x0, y0 = self._px(-1.5, -0.85)
        x1, y1 = self._px(1.5, chin_y + 0.7)
        self._roi = (int(max(0, math.floor(y0))), int(min(hh, math.ceil(y1))),
                     int(max(0, math.floor(x0))), int(min(ww, math.ceil(x1))))
        ry0, ry1, rx0, rx1 = self._roi
        yy, xx = np.mgrid[ry0:ry1, rx0:rx1].astype(np.float64)
        X, Y = self._to_face(np.stack([xx, yy], -1))[..., 0], self._to_face(np.stack([xx, yy], -1))[..., 1]
        fields = _expression_fields(X, Y, fg)
        names = [c for c in _geometry_channels() if c in fields]
        # Fade every field out toward the ROI border so the box never shows a seam.
        edge = 4.0
        wx = np.clip(np.minimum(xx - rx0, rx1 - 1 - xx) / edge, 0, 1)
        win = _smoothstep(np.minimum(wx, np.clip(np.minimum(yy - ry0, ry1 - 1 - yy) / edge, 0, 1)))
        basis = np.zeros((len(names), ry1 - ry0, rx1 - rx0, 2), np.float32)
        for i, n in enumerate(names):
            dx, dy = fields[n]
            basis[i, ..., 0] = -dx * win * self._e * 2 / ww
            basis[i, ..., 1] = -dy * win * self._e * 2 / hh
        gx, gy = self._norm(xx, yy)
        base = np.stack([gx, gy], -1).astype(np.float32)
        self.geometry_channels = tuple(names)
        self._geom_idx = torch.tensor([CHANNEL_INDEX[n] for n in names], dtype=torch.long, device=self.device)
        self._basis = torch.from_numpy(basis.reshape(len(names), -1)).to(self.device)
        self._base_roi = torch.from_numpy(base.reshape(1, -1)).to(self.device)

    def _field_dy_px(self, X, Y):
        """(C_geom, ...) vertical forward displacement in pixels of every geometry channel at points (X, Y)."""
        f = _expression_fields(np.asarray(X, np.float64), np.asarray(Y, np.float64), self._fg)
        return np.stack([f[n][1] for n in self.geometry_channels]) * self._e

    # -- mouth interior --------------------------------------------------------------------------
    def _build_mouth(self):
        fg, e = self._fg, self._e
        xs, ys, half, yc = fg.mouth
        ry0, ry1, rx0, rx1 = self._roi
        lip_top = min(ys, yc, float(fg.pts["mouth_left"][1]), float(fg.pts["mouth_right"][1]))
        mx0, _ = self._px(xs - half * 1.15, 0)
        mx1, _ = self._px(xs + half * 1.15, 0)
        _, my0 = self._px(0, lip_top - 0.3)
        _, my1 = self._px(0, max(ys, yc) + 0.6)
        mx0, mx1 = int(max(rx0, math.floor(mx0))), int(min(rx1, math.ceil(mx1)))
        my0, my1 = int(max(ry0, math.floor(my0))), int(min(ry1, math.ceil(my1)))
        self._mouth_box = (my0, my1, mx0, mx1)
        cols = np.arange(mx0, mx1, dtype=np.float64)
        X = (cols - self._eye_x) / e
        lip = fg.lip_line(X)
        d = 3 * _LIP_EDGE
        k_up = self._field_dy_px(X, lip - d)           # (C, Wm)
        k_lo = self._field_dy_px(X, lip + d)
        dev = self.device
        self._mouth_lip = torch.from_numpy((lip * e + self._eye_y).astype(np.float32)).to(dev)      # (Wm,)
        self._mouth_rows = torch.arange(my0, my1, dtype=torch.float32, device=dev)[:, None]          # (Hm, 1)
        u = np.clip(np.abs(X - xs) / half, 0, 2)
        self._mouth_u = torch.from_numpy(u.astype(np.float32)).to(dev)                               # (Wm,)
        self._k_mouth = (k_up.astype(np.float32), k_lo.astype(np.float32))
        # Colours, scaled to the portrait's brightness.
        img = self.crop.image.astype(np.float32)
        cx, cy = self._px(xs, ys)
        cheek = img[int(cy - 1.0 * e):int(cy - 0.5 * e), int(cx - 0.9 * e):int(cx + 0.9 * e)].reshape(-1, 3)
        lum = float(np.median(cheek.mean(1))) / 170.0 if cheek.size else 1.0
        lum = float(np.clip(lum, 0.45, 1.3))
        self._mouth_cols = {
            "dark": torch.tensor([96.0, 36.0, 38.0], device=dev) * lum,
            "teeth": torch.tensor([222.0, 212.0, 196.0], device=dev) * min(lum, 1.1),
            "tongue": torch.tensor([176.0, 84.0, 88.0], device=dev) * lum,
        }

    # -- eyelids ---------------------------------------------------------------------------------
    def _build_eyes(self):
        from .motion import CHANNEL_INDEX

        fg, e = self._fg, self._e
        hh, ww = self.size
        img = self.crop.image.astype(np.float32)
        self._eyes = []
        k_cols = []
        for name, key in (("Left", "right"), ("Right", "left")):
            p = fg.pts
            ex, ey = p[f"{key}_eye"]
            tb = max(0.04, ey - p[f"{key}_eye_top"][1])
            bb = max(0.03, p[f"{key}_eye_bottom"][1] - ey)
            a = max(0.12, abs(p[f"{key}_eye_outer"][0] - p[f"{key}_eye_inner"][0]) / 2)
            x0, y0 = self._px(ex - a * 1.3, ey - tb - 0.14)
            x1, y1 = self._px(ex + a * 1.3, ey + bb + 0.1)
            box = (int(max(0, math.floor(y0))), int(min(hh, math.ceil(y1))),
                   int(max(0, math.floor(x0))), int(min(ww, math.ceil(x1))))
            cols = np.arange(box[2], box[3], dtype=np.float64)
            u = (cols - self._px(ex, 0)[0]) / (a * e)
            prof = np.sqrt(np.clip(1 - u ** 2, 0, 1))
            _, eyp = self._px(ex, ey)
            y_top = eyp - tb * e * prof
            y_bot = eyp + bb * e * prof
            k_cols.append(self._field_dy_px(np.array([ex]), np.array([ey - tb]))[:, 0])
            k_cols.append(self._field_dy_px(np.array([ex]), np.array([ey + bb]))[:, 0])
            # Eyelid skin: median of the skin just above the lid and on the cheek under the eye.
            def patch(yf0, yf1):
                _, py0 = self._px(0, yf0)
                _, py1 = self._px(0, yf1)
                px0, _ = self._px(ex - a, 0)
                px1, _ = self._px(ex + a, 0)
                sl = img[int(max(0, py0)):int(min(hh, py1)), int(max(0, px0)):int(min(ww, px1))]
                return sl.reshape(-1, 3)
            skin = np.concatenate([patch(ey - tb - 0.16, ey - tb - 0.07), patch(ey + bb + 0.12, ey + bb + 0.32)])
            if len(skin) == 0:
                skin = np.array([[190.0, 150.0, 130.0]])
            # Prefer bright-ish pixels (skin rather than lashes, brows or shadows).
            lumv = skin.mean(1)
            skin = skin[lumv >= np.percentile(lumv, 35)]
            colour = np.median(skin, 0) * 0.95
            self._eyes.append({
                "blink": CHANNEL_INDEX["eyeBlink" + name], "squint": CHANNEL_INDEX["eyeSquint" + name],
                "box": box,
                "rows": torch.arange(box[0], box[1], dtype=torch.float32, device=self.device)[:, None],
                "u": torch.from_numpy(np.abs(u).astype(np.float32)).to(self.device),
                "prof": torch.from_numpy(prof.astype(np.float32)).to(self.device),
                "y_top": torch.from_numpy(y_top.astype(np.float32)).to(self.device),
                "y_bot": torch.from_numpy(y_bot.astype(np.float32)).to(self.device),
                "colour": torch.from_numpy(colour.astype(np.float32)).to(self.device)[:, None, None],
            })
        k_up, k_lo = self._k_mouth
        k_all = np.concatenate([k_up, k_lo, np.stack(k_cols, 1)], 1).astype(np.float32)     # (C, 2 Wm + 4)
        self._k_all = torch.from_numpy(k_all).to(self.device)
        self._wm = k_up.shape[1]
        del self._k_mouth

    # -- head pose ---------------------------------------------------------------------------------
    def _build_pose(self):
        from .motion import CHANNEL_INDEX

        hh, ww = self.size
        e = self._e
        yy, xx = np.mgrid[0:hh, 0:ww].astype(np.float64)
        X = (xx - self._eye_x) / e
        Y = (yy - self._eye_y) / e
        # Soft head (with hair) + neck mask: 1 on the head, fading out over the background.
        r = np.sqrt((X / 1.55) ** 2 + ((Y + 0.1) / 2.1) ** 2)
        head = 1.0 - _smoothstep((r - 1.0) / 0.45)
        neck = (1.0 - _smoothstep((np.abs(X) - 0.6) / 0.4)) * (1.0 - _smoothstep((Y - 1.6) / 1.1)) * (Y > 0)
        w = np.maximum(head, neck)
        self.head_mask = w.astype(np.float32)
        # Depth of the face surface (paraboloid cap) and its gradient.
        dcx, dcy = self._DEPTH_CENTRE
        rx, ry = self._DEPTH_RADII
        q = 1.0 - ((X - dcx) / rx) ** 2 - ((Y - dcy) / ry) ** 2
        qp = np.clip(q, 0, None)
        z = self._DEPTH * qp ** 1.5
        dz = self._DEPTH * 1.5 * np.sqrt(qp)
        zx = dz * (-2 * (X - dcx) / rx ** 2)
        zy = dz * (-2 * (Y - dcy) / ry ** 2)
        maps = np.stack([X, Y, np.ones_like(X), z, zx, zx * X, zx * Y, zy, zy * X, zy * Y])   # (10, H, W)
        pb = np.zeros((20, hh, ww, 2), np.float32)
        pb[:10, ..., 0] = maps * w * (e * 2 / ww)
        pb[10:, ..., 1] = maps * w * (e * 2 / hh)
        gx, gy = self._norm(xx, yy)
        base = np.stack([gx, gy], -1).astype(np.float32)
        # Only the mask's bounding box can move; the rest of the frame is left as it is.
        rows, cols = np.nonzero(w > 1e-4)
        if rows.size == 0:
            rows, cols = np.array([0, hh - 1]), np.array([0, ww - 1])
        self._pose_box = (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
        py0, py1, px0, px1 = self._pose_box
        pb = pb[:, py0:py1, px0:px1]
        self._pose_basis = torch.from_numpy(np.ascontiguousarray(pb).reshape(20, -1)).to(self.device)
        self._base_pose = torch.from_numpy(np.ascontiguousarray(base[py0:py1, px0:px1]).reshape(1, -1)).to(self.device)
        self._pose_idx = torch.tensor([CHANNEL_INDEX[c] for c in ("headPitch", "headYaw", "headRoll", "headTx",
                                                                  "headTy", "headTz")], device=self.device)
        self._face_units_per_height = self.crop.face_height / e

    def _pose_coefficients(self, pose: torch.Tensor) -> torch.Tensor:
        """(n, 20) coefficients of the pose maps for (n, 6) pitch, yaw, roll, tx, ty, tz."""
        pitch, yaw, roll, tx, ty, tz = pose.unbind(1)
        fu = self._face_units_per_height
        s = 1.0 + self._SCALE_PER_TZ * tz
        c0y = self._HEAD_CENTRE_Y
        t = torch.stack([tx * fu, ty * fu], 1)                             # (n, 2) face units
        cr, sr = torch.cos(roll), torch.sin(roll)
        # inverse roll R(-roll) = [[c, s], [-s, c]] applied after undoing translation and scale
        a00, a01, a10, a11 = cr / s, sr / s, -sr / s, cr / s
        c0 = torch.tensor([0.0, c0y], device=pose.device)
        b1 = c0[None] - (c0[None] + t) / s[:, None]                        # v1 = v / s + b1
        pv = torch.tensor(self._ROLL_PIVOT, device=pose.device)[None]
        d = b1 - pv
        b0 = cr * d[:, 0] + sr * d[:, 1] + pv[:, 0]
        b1y = -sr * d[:, 0] + cr * d[:, 1] + pv[:, 1]
        zero = torch.zeros_like(pitch)
        one = torch.ones_like(pitch)
        zc = torch.stack([zero, zero, zero, one, b0, a00 - 1, a01, b1y, a10, a11 - 1], 1)
        cy_, sy_ = torch.cos(yaw), torch.sin(yaw)
        cp, sp = torch.cos(pitch), torch.sin(pitch)
        vx = torch.stack([a00, a01, b0, zero, zero, zero, zero, zero, zero, zero], 1)
        vy = torch.stack([a10, a11, b1y - c0y, zero, zero, zero, zero, zero, zero, zero], 1)
        ex = torch.zeros_like(vx)
        ex[:, 0] = 1
        ey = torch.zeros_like(vy)
        ey[:, 1] = 1
        ey[:, 2] = -c0y
        coef_x = (vx - sy_[:, None] * zc) / cy_[:, None] - ex
        coef_y = (vy - sp[:, None] * zc) / cp[:, None] - ey
        return torch.cat([coef_x, coef_y], 1)

    # -- per batch ---------------------------------------------------------------------------------
    def render_torch(self, motion) -> torch.Tensor:
        """Render to a float32 tensor (N, 3, H, W) with values in [0, 255] on the renderer's device."""
        from .motion import NUM_CHANNELS, clamp_motion

        if isinstance(motion, torch.Tensor):
            motion = motion.detach().to("cpu", torch.float32).numpy()
        m = np.asarray(motion, dtype=np.float32)
        if m.ndim == 1 and m.shape[0] == NUM_CHANNELS:
            m = m[None]
        if m.ndim != 2 or m.shape[1] != NUM_CHANNELS:
            raise InputError("motion", f"expected an array of shape (N, {NUM_CHANNELS}), got {tuple(m.shape)}")
        if not np.isfinite(m).all():
            raise InputError("motion", "contains NaN or infinite values")
        hh, ww = self.size
        n = m.shape[0]
        if n == 0:
            return torch.zeros((0, 3, hh, ww), dtype=torch.float32, device=self.device)
        mt = torch.from_numpy(np.ascontiguousarray(clamp_motion(m), dtype=np.float32)).to(self.device)
        return self._render(mt)

    def render(self, motion) -> np.ndarray:
        """Render motion (N, 58) to frames (N, H, W, 3) uint8 (motion is clamped to its valid range)."""
        out = self.render_torch(motion)
        hh, ww = self.size
        if out.shape[0] == 0:
            return np.zeros((0, hh, ww, 3), np.uint8)
        out = out.add_(0.5).clamp_(0, 255).permute(0, 2, 3, 1)
        if out.device.type != "cpu":
            return out.to(torch.uint8).contiguous().cpu().numpy()
        return out.contiguous().numpy().astype(np.uint8)

    def _render(self, mt: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._render_frames(mt)

    def _render_frames(self, mt: torch.Tensor) -> torch.Tensor:
        n = mt.shape[0]
        hh, ww = self.size
        ry0, ry1, rx0, rx1 = self._roi
        mg = mt.index_select(1, self._geom_idx)                                            # (N, Cg)
        grid = torch.addmm(self._base_roi, mg, self._basis).view(n, ry1 - ry0, rx1 - rx0, 2)
        src = self._src.expand(n, -1, -1, -1)
        roi = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
        k = mg @ self._k_all                                                                # (N, 2 Wm + 4)
        self._mouth_layer(roi, k, mt)
        self._eye_layers(roi, k, mt)
        img = src.clone()
        img[:, :, ry0:ry1, rx0:rx1] = roi
        pose = mt.index_select(1, self._pose_idx)                                          # (N, 6)
        moving = (pose != 0).any(1)
        if bool(moving.any()):
            everyone = bool(moving.all())
            idx = None if everyone else torch.nonzero(moving)[:, 0]
            sub_pose = pose if everyone else pose.index_select(0, idx)
            sub = img if everyone else img.index_select(0, idx)
            py0, py1, px0, px1 = self._pose_box
            coef = self._pose_coefficients(sub_pose)
            g = torch.addmm(self._base_pose, coef, self._pose_basis).view(sub_pose.shape[0], py1 - py0, px1 - px0, 2)
            warped = F.grid_sample(sub, g, mode="bilinear", padding_mode="border", align_corners=False)
            if (py1 - py0, px1 - px0) == (hh, ww):
                sub = warped
            else:
                sub[:, :, py0:py1, px0:px1] = warped
            if everyone:
                img = sub
            else:
                img.index_copy_(0, idx, sub)
        return img

    def _mouth_layer(self, roi: torch.Tensor, k: torch.Tensor, mt: torch.Tensor) -> None:
        from .motion import CHANNEL_INDEX

        my0, my1, mx0, mx1 = self._mouth_box
        ry0, _, rx0, _ = self._roi
        wm = self._wm
        top = self._mouth_lip + k[:, :wm]                                                   # (N, Wm)
        bot = self._mouth_lip + k[:, wm:2 * wm]
        gap = (bot - top)[:, None, :]                                                       # (N, 1, Wm)
        if float(gap.max()) <= 0.05:
            return
        rows = self._mouth_rows                                                             # (Hm, 1)
        dt = rows - top[:, None, :]                                                         # (N, Hm, Wm)
        db = bot[:, None, :] - rows
        mask = torch.sigmoid(dt / 0.5) * torch.sigmoid(db / 0.5) * (gap / 1.5).clamp(0, 1)
        u = self._mouth_u
        e = self._e
        teeth_w = ((0.85 - u) / 0.25).clamp(0, 1)                                           # (Wm,)
        th = torch.minimum(gap * 0.42, torch.full_like(gap, 0.085 * e))
        tl = torch.minimum(gap * 0.2, torch.full_like(gap, 0.05 * e))
        t_up = torch.sigmoid((th - dt) / 0.6) * teeth_w
        t_lo = torch.sigmoid((dt - (gap - tl)) / 0.6) * teeth_w * 0.75
        rel = (dt / gap.clamp(min=1.0)).clamp(0, 1)
        # The tongue shows a little at the bottom of any open mouth, fully with tongueOut.
        tongue = (0.35 + 0.65 * mt[:, CHANNEL_INDEX["tongueOut"], None, None]) \
            * ((rel - 0.45) / 0.3).clamp(0, 1) * ((0.75 - u) / 0.25).clamp(0, 1)
        cols = self._mouth_cols
        shade = (0.6 + 0.4 * u.clamp(0, 1)) * (1.0 - 0.35 * (1.0 - (2.0 * rel - 1.0) ** 2))   # darkest deep inside
        col = cols["dark"][None, :, None, None] * shade[:, None]
        col = torch.lerp(col, cols["teeth"][None, :, None, None] * (0.8 + 0.2 * (1 - rel[:, None])), t_up[:, None])
        col = torch.lerp(col, cols["teeth"][None, :, None, None] * 0.78, t_lo[:, None])
        col = torch.lerp(col, cols["tongue"][None, :, None, None], tongue[:, None])
        sl = roi[:, :, my0 - ry0:my1 - ry0, mx0 - rx0:mx1 - rx0]
        sl.lerp_(col, mask[:, None])

    def _eye_layers(self, roi: torch.Tensor, k: torch.Tensor, mt: torch.Tensor) -> None:
        ry0, _, rx0, _ = self._roi
        wm = self._wm
        e = self._e
        for i, eye in enumerate(self._eyes):
            beta = (mt[:, eye["blink"]] + 0.25 * mt[:, eye["squint"]]).clamp(0, 1)           # (N,)
            if float(beta.max()) <= 0.0:
                continue
            d_top = k[:, 2 * wm + 2 * i]
            d_bot = k[:, 2 * wm + 2 * i + 1]
            prof = eye["prof"]
            y_top = eye["y_top"][None] + d_top[:, None] * prof                                # (N, We)
            y_bot = eye["y_bot"][None] + d_bot[:, None] * prof
            lid = y_top + beta[:, None] * (y_bot - y_top)
            rows = eye["rows"]                                                                # (He, 1)
            to_lid = lid[:, None, :] - rows                                                   # (N, He, We)
            hm = torch.sigmoid((1.05 - eye["u"]) / 0.07)
            mask = (torch.sigmoid(to_lid / 0.5) * torch.sigmoid((rows - (y_top[:, None, :] - 0.035 * e)) / 0.7) * hm
                    * (beta / 0.08).clamp(0, 1)[:, None, None])
            lash = torch.exp(-(to_lid / (0.02 * e + 0.6)) ** 2) * (beta * 3).clamp(0, 1)[:, None, None] * hm
            col = eye["colour"][None] * (1 - 0.6 * lash[:, None])
            y0, y1, x0, x1 = eye["box"]
            sl = roi[:, :, y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0]
            sl.lerp_(col, mask[:, None])

"""A numpy Viola-Jones evaluator of the bundled Haar cascades: the oracle that checks OpenCV's detections.

(It served portrait placement where OpenCV lacked ``CascadeClassifier``; OpenCV is pinned below 5 and the
face mesh places portraits now, so it lives with the tests.)
"""
from __future__ import annotations

import gzip
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from echo_stream.render.paths import CASCADE_DIR as _CASCADE_DIR


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


def detect(name: str, gray: np.ndarray, min_size: float, max_size: float | None = None,
           scale_factor: float = 1.1, min_neighbors: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Multi-scale detection with OpenCV's scale schedule; (rects (M, 4) x, y, w, h; support counts)."""
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

"""BlazeFace face detection: where the faces are in a whole frame.

The frame is letterboxed into the model's square input (see
:func:`~echo_stream.face.roi.whole_image`); each anchor regresses a box
(centre, size) and six key points (the two eye centres, nose tip, mouth
centre, the two ear tragions) relative to its position. Scores above
``min_score`` are merged by weighted non-maximum suppression (overlapping
boxes are averaged by score, which steadies the box from frame to frame).
The short-range model is tried first; the full-range one, which sees faces
down to a few percent of the frame, only when it finds nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import roi as roimod
from .models import DETECTOR_FULL, DETECTOR_SHORT, Model, sigmoid

#: (strides, anchors per cell of each stride group) of the two models.
_ANCHOR_SPECS = {
    DETECTOR_SHORT: ((8, 2), (16, 6)),
    DETECTOR_FULL: ((4, 1),),
}


def anchors(input_size: int, spec) -> np.ndarray:
    """(A, 2) anchor centres in [0, 1], in the models' order (row-major cells, repeats innermost)."""
    out = []
    for stride, repeats in spec:
        cells = input_size // stride
        c = (np.arange(cells) + 0.5) / cells
        yy, xx = np.meshgrid(c, c, indexing="ij")
        grid = np.stack([xx.ravel(), yy.ravel()], 1)
        out.append(np.repeat(grid, repeats, axis=0))
    return np.concatenate(out).astype(np.float64)


@dataclass
class Detection:
    box: np.ndarray          # (x0, y0, x1, y1) image pixels
    keypoints: np.ndarray    # (6, 2) image pixels: right eye (image left), left eye, nose, mouth, right ear, left ear
    score: float

    @property
    def eyes(self) -> tuple[np.ndarray, np.ndarray]:
        """(image-left eye, image-right eye)."""
        return self.keypoints[0], self.keypoints[1]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x0 = np.maximum(a[0], b[:, 0])
    y0 = np.maximum(a[1], b[:, 1])
    x1 = np.minimum(a[2], b[:, 2])
    y1 = np.minimum(a[3], b[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda r: (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def weighted_nms(boxes: np.ndarray, points: np.ndarray, scores: np.ndarray, iou: float = 0.3):
    """Greedy clusters of boxes overlapping the best remaining one by >= ``iou``; each averaged by score."""
    order = np.argsort(-scores, kind="stable")
    boxes, points, scores = boxes[order], points[order], scores[order]
    alive = np.ones(len(scores), bool)
    out = []
    for i in range(len(scores)):
        if not alive[i]:
            continue
        members = alive & (_iou(boxes[i], boxes) >= iou)
        members[i] = True
        w = scores[members][:, None]
        out.append((np.sum(boxes[members] * w, 0) / w.sum(),
                    np.sum(points[members] * w[:, :, None], 0) / w.sum(), float(scores[i])))
        alive &= ~members
    return out


class FaceDetector:
    """``detect(rgb) -> list[Detection]``, best first."""

    def __init__(self, min_score: float = 0.5, threads: int = 1):
        self.min_score = float(min_score)
        self._models = {}
        self._threads = threads

    def _model(self, name: str) -> tuple[Model, np.ndarray]:
        if name not in self._models:
            m = Model(name, self._threads)
            self._models[name] = (m, anchors(m.input_size, _ANCHOR_SPECS[name]))
        return self._models[name]

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        for name in (DETECTOR_SHORT, DETECTOR_FULL):
            found = self._detect_with(name, rgb)
            if found:
                return found
        return []

    def _detect_with(self, name: str, rgb: np.ndarray) -> list[Detection]:
        model, anc = self._model(name)
        n = model.input_size
        region = roimod.whole_image(*rgb.shape[:2])
        x = roimod.crop(rgb, region, n).astype(np.float32) / 127.5 - 1.0
        raw, logits = model.run(x[None])
        raw = raw.reshape(-1, 8, 2) / n                        # (A, 8, 2): centre, size, 6 key points
        scores = sigmoid(logits.reshape(-1))
        keep = np.flatnonzero(scores >= self.min_score)
        if keep.size == 0:
            return []
        raw, scores, a = raw[keep], scores[keep], anc[keep]
        centre = raw[:, 0] + a
        half = raw[:, 1] / 2
        boxes = np.concatenate([centre - half, centre + half], 1) * n
        pts = (raw[:, 2:] + a[:, None]) * n
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        out = []
        for box, kp, score in weighted_nms(boxes[ok], pts[ok], scores[ok]):
            corners = region.to_image(box.reshape(2, 2), n).reshape(4)
            out.append(Detection(corners, region.to_image(kp, n), score))
        out.sort(key=lambda d: -(d.box[2] - d.box[0]) * (d.box[3] - d.box[1]) * d.score)
        return out

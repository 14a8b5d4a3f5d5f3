"""Rotated square regions of an image, and the crops the face models read.

A :class:`Roi` is a square of side ``size`` pixels centred at ``(cx, cy)``,
turned by ``angle`` radians (the angle of its x axis in the image, y down).
``Roi.matrix(n)`` is the 2x3 affine map from image pixels to the pixels of an
``n x n`` crop of it; ``Roi.to_image(q, n)`` maps crop points back. Every model
of :mod:`echo_stream.face` reads such a crop, so detection boxes, mesh points
and iris points all come back through the same two functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Roi:
    cx: float
    cy: float
    size: float
    angle: float = 0.0

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        """Unit x and y axes of the region in image coordinates."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.array([c, s]), np.array([-s, c])

    def matrix(self, n: int) -> np.ndarray:
        """(2, 3) affine: image pixel -> crop pixel of an ``n x n`` crop."""
        ux, uy = self.axes()
        k = n / self.size
        rot = np.stack([ux, uy]) * k
        centre = np.array([self.cx, self.cy])
        return np.concatenate([rot, (n / 2.0 - rot @ centre)[:, None]], 1)

    def to_image(self, q: np.ndarray, n: int) -> np.ndarray:
        """Crop points ``(..., 2+)`` of an ``n x n`` crop -> image pixels; a third (depth) column is scaled alike."""
        q = np.asarray(q, np.float64)
        ux, uy = self.axes()
        k = self.size / n
        d = (q[..., :2] - n / 2.0) * k
        xy = self.cx + d[..., :1] * ux[0] + d[..., 1:2] * uy[0], self.cy + d[..., :1] * ux[1] + d[..., 1:2] * uy[1]
        out = np.concatenate([xy[0], xy[1]], -1)
        if q.shape[-1] > 2:
            out = np.concatenate([out, q[..., 2:] * k], -1)
        return out


def crop(image: np.ndarray, roi: Roi, n: int) -> np.ndarray:
    """The ``n x n`` RGB crop of ``roi`` (bilinear; black outside the image), uint8."""
    import cv2

    return cv2.warpAffine(image, roi.matrix(n), (n, n), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def roi_from_points(points: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float,
                    centre: np.ndarray | None = None) -> Roi:
    """Square region around ``points`` (N, 2) turned so that the line ``a -> b`` is horizontal.

    The side is ``scale`` times the longer side of the points' bounding box measured in the turned
    frame; the centre is that box's centre unless ``centre`` is given.
    """
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    angle = math.atan2(d[1], d[0])
    c, s = math.cos(angle), math.sin(angle)
    p = np.asarray(points, np.float64)[:, :2]
    u = p @ np.array([c, s])
    v = p @ np.array([-s, c])
    side = max(u.max() - u.min(), v.max() - v.min()) * scale
    if centre is None:
        mu, mv = (u.max() + u.min()) / 2, (v.max() + v.min()) / 2
        centre = np.array([mu * c - mv * s, mu * s + mv * c])
    return Roi(float(centre[0]), float(centre[1]), float(max(side, 1.0)), angle)


def whole_image(height: int, width: int) -> Roi:
    """The upright square that holds the whole image (the letterbox a detector reads)."""
    return Roi(width / 2.0, height / 2.0, float(max(height, width)), 0.0)

"""The 468-point face mesh and the iris points, read from crops of a frame.

Mesh indices used across :mod:`echo_stream.face` are named in :data:`IDX`
(MediaPipe's canonical face-mesh topology; "R"/"L" are the *subject's* right
and left, so R points lie on the image-left side of an unmirrored frame).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import roi as roimod
from .models import IRIS, MESH, Model, sigmoid

NUM_POINTS = 468

IDX = {
    "forehead": 10, "chin": 152, "nose_tip": 1, "nose_bridge": 168,
    "eye_outer_R": 33, "eye_inner_R": 133, "lid_top_R": 159, "lid_bottom_R": 145,
    "eye_outer_L": 263, "eye_inner_L": 362, "lid_top_L": 386, "lid_bottom_L": 374,
    "brow_inner_R": 107, "brow_mid_R": 105, "brow_outer_R": 70,
    "brow_inner_L": 336, "brow_mid_L": 334, "brow_outer_L": 300,
    "mouth_corner_R": 61, "mouth_corner_L": 291,
    "lip_top_outer": 0, "lip_top_inner": 13, "lip_bottom_inner": 14, "lip_bottom_outer": 17,
    "cheek_R": 118, "cheek_L": 347, "face_side_R": 234, "face_side_L": 454,
}

#: The iris model's first 16 eye-contour points, as mesh indices of the subject's right eye:
#: 0 outer corner, 1-7 lower lid, 8 inner corner, 9-15 upper lid (12 above 4 at the lid centre).
EYE_CONTOUR = (33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173)
LID_TOP = (11, 12, 13)
#: The eye model's brow points above the outer and the inner eye corner, averaged in threes (of its
#: 71 points, the brow arc runs 63-70 from the outer side over the eye to the nose).
IRIS_BROW = ((64, 65, 66), (67, 68, 69))
LID_BOTTOM = (3, 4, 5)

#: Mesh scale: the mesh model reads the face box enlarged 1.5x (MediaPipe's ROI rule).
MESH_ROI_SCALE = 1.5
#: Eye crops for the iris model: the eye-corner span enlarged 2.3x.
IRIS_ROI_SCALE = 2.3
#: Face-presence probability below which a mesh is not trusted (the tracker re-detects).
PRESENCE_THRESHOLD = 0.5


@dataclass
class MeshResult:
    points: np.ndarray       # (468, 3) image pixels (x, y) and depth z on the scale of x (smaller = nearer)
    presence: float          # face-presence probability of the crop
    roi: roimod.Roi


class FaceMesh:
    """``run(rgb, rois) -> list[MeshResult]``: one model call for all regions of one frame."""

    def __init__(self, threads: int = 1):
        self._model = Model(MESH, threads)
        self.size = self._model.input_size

    def run(self, rgb: np.ndarray, rois: list[roimod.Roi]) -> list[MeshResult]:
        if not rois:
            return []
        n = self.size
        x = np.stack([roimod.crop(rgb, r, n) for r in rois]).astype(np.float32) / 255.0
        pts, logit = self._model.run(x)
        out = []
        for r, p, lg in zip(rois, pts, logit):
            presence = float(sigmoid(lg[0]))
            out.append(MeshResult(r.to_image(p.reshape(NUM_POINTS, 3), n), presence, r))
        return out


def roi_from_mesh(points: np.ndarray) -> roimod.Roi:
    """Where to read the next frame's mesh: the mesh's box, turned level with the eyes, enlarged 1.5x."""
    return roimod.roi_from_points(points, points[IDX["eye_outer_R"]], points[IDX["eye_outer_L"]], MESH_ROI_SCALE)


class Iris:
    """Iris centres of both eyes, from 64x64 eye crops (the image-right eye is mirrored: the model knows one side)."""

    def __init__(self, threads: int = 1):
        self._model = Model(IRIS, threads)
        self.size = self._model.input_size

    def run(self, rgb: np.ndarray, points: np.ndarray) -> np.ndarray:
        """(2, 1 + 16 + 2, 2) image pixels per eye [subject's right eye (image left), subject's left eye]:
        the iris centre, the eye contour (:data:`EYE_CONTOUR`: outer corner, lower lid, inner corner,
        upper lid), then the brow above its outer and inner corner (:data:`IRIS_BROW`, each the mean of three points). The eye
        model's lids follow a blink, and its brows a brow raise, much further than the mesh's."""
        n = self.size
        a_r, b_r = points[IDX["eye_outer_R"], :2], points[IDX["eye_inner_R"], :2]
        a_l, b_l = points[IDX["eye_inner_L"], :2], points[IDX["eye_outer_L"], :2]
        rois = [roimod.roi_from_points(np.stack([a_r, b_r]), a_r, b_r, IRIS_ROI_SCALE),
                roimod.roi_from_points(np.stack([a_l, b_l]), a_l, b_l, IRIS_ROI_SCALE)]
        crops = [roimod.crop(rgb, rois[0], n), roimod.crop(rgb, rois[1], n)[:, ::-1]]
        contour, iris = self._model.run(np.stack(crops).astype(np.float32) / 255.0)
        contour = contour.reshape(2, 71, 3)[:, :, :2]
        brows = np.stack([contour[:, list(IRIS_BROW[0])].mean(1), contour[:, list(IRIS_BROW[1])].mean(1)], 1)
        pts = np.concatenate([iris.reshape(2, 5, 3)[:, :1, :2], contour[:, :16], brows], 1)
        pts = pts.astype(np.float64)
        pts[1, :, 0] = n - pts[1, :, 0]                        # undo the mirror
        return np.stack([rois[0].to_image(pts[0], n), rois[1].to_image(pts[1], n)])

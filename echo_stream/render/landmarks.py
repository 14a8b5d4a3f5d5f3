"""The renderer's landmark set: the canonical face template, face units, sidecars and the 68-point layout.

Face units: origin at the midpoint between the eye centres, x toward the image-right eye, y down,
unit = inter-ocular distance. A placement gives some named points (:data:`LANDMARK_NAMES`); the
template fills in the rest (:func:`complete_landmarks`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import InputError

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


def complete_landmarks(known: dict[str, np.ndarray], jaw: np.ndarray | None = None) -> dict[str, np.ndarray]:
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


def parse_sidecar(path: Path, width: int, height: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Read and validate a landmarks sidecar; (named points, optional 68-point jaw subset)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "landmarks file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read landmarks file ({e})") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"landmarks file is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise InputError(path, "landmarks file is nested too deeply: expected one JSON object of [x, y] "
                               "points") from None
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


def refine_mouth_line(gray: np.ndarray, known: dict[str, np.ndarray], prior: float, reach: float,
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

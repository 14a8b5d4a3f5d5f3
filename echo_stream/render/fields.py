"""Expression fields: the forward displacement (face units) of each channel that moves facial geometry."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..blinks import smoothstep
from .landmarks import _TEMPLATE, _TEMPLATE_JAW


def _gauss(X, Y, cx, cy, sx, sy):
    return np.exp(-0.5 * (((X - cx) / sx) ** 2 + ((Y - cy) / sy) ** 2))


def _gauss1(Z, c, s):
    return np.exp(-0.5 * ((Z - c) / s) ** 2)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


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
    v = smoothstep((Y - lip) / max(chin_y - ys, 0.3))
    below = 1.0 - smoothstep((Y - chin_y) / 0.55)
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
    from ..motion import CHANNELS

    fg = _FaceGeometry({k: np.array(v, np.float64) for k, v in _TEMPLATE.items()}, _TEMPLATE_JAW)
    names = _expression_fields(np.zeros(1), np.zeros(1), fg)
    return tuple(c for c in CHANNELS if c in names)

"""The batched warping renderer: one portrait animated from (N, 58) motion (see the package notes)."""
from __future__ import annotations

import math
import os

import numpy as np

from .._lazy import LazyModule
from ..blinks import smoothstep
from ..errors import InputError
from .fields import (
    _LIP_EDGE,
    _expression_fields,
    _FaceGeometry,
    _geometry_channels,
)
from .portrait import EYE_LINE, Portrait, _parse_size, crop_portrait, load_portrait

# torch is needed only to render, not to place a face: importing it lazily keeps input validation
# (load_portrait) fast in processes that never render.
torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")


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
        from ..motion import CHANNEL_INDEX

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
        win = smoothstep(np.minimum(wx, np.clip(np.minimum(yy - ry0, ry1 - 1 - yy) / edge, 0, 1)))
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
        from ..motion import CHANNEL_INDEX

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
        from ..motion import CHANNEL_INDEX

        hh, ww = self.size
        e = self._e
        yy, xx = np.mgrid[0:hh, 0:ww].astype(np.float64)
        X = (xx - self._eye_x) / e
        Y = (yy - self._eye_y) / e
        # Soft head (with hair) + neck mask: 1 on the head, fading out over the background.
        r = np.sqrt((X / 1.55) ** 2 + ((Y + 0.1) / 2.1) ** 2)
        head = 1.0 - smoothstep((r - 1.0) / 0.45)
        neck = (1.0 - smoothstep((np.abs(X) - 0.6) / 0.4)) * (1.0 - smoothstep((Y - 1.6) / 1.1)) * (Y > 0)
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
        from ..motion import NUM_CHANNELS, clamp_motion

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
        from ..motion import CHANNEL_INDEX

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

"""Measuring the rules on any motion track (ground truth or a model's output)."""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy import signal as sps

from ..motion import gaze_distance
from .base import FPS, _CI


def _band(x: np.ndarray, lo: float, hi: float, fs: float = FPS) -> np.ndarray:
    sos = sps.butter(2, [lo / (fs / 2), hi / (fs / 2)], btype="band", output="sos")
    return sps.sosfiltfilt(sos, np.asarray(x, np.float64))


def _windows(n: int, times, window_s: tuple[float, float]) -> np.ndarray:
    t = np.arange(n) / FPS
    inside = np.zeros(n, bool)
    for x in times:
        inside |= (t >= x + window_s[0]) & (t < x + window_s[1])
    return inside


def nod_band_power(head_pitch: np.ndarray, band: tuple[float, float] = (1.5, 3.0)) -> np.ndarray:
    """Per-frame power of ``headPitch`` in the nod band (1.5-3 Hz)."""
    return _band(head_pitch, *band) ** 2


def nod_power_ratio(head_pitch: np.ndarray, pause_times, window_s: tuple[float, float] = (0.2, 1.2),
                    exclude: np.ndarray | None = None) -> float:
    """Mean nod-band power in ``[pause + 0.2, pause + 1.2)`` s after the user's pauses / elsewhere.

    ``exclude``: a frame mask left out of "elsewhere" (the windows of another rule on the same channel).
    """
    p = nod_band_power(head_pitch)
    inside = _windows(p.size, pause_times, window_s)
    rest = ~inside if exclude is None else ~inside & ~exclude
    if not inside.any() or not rest.any():
        return float("nan")
    return float(p[inside].mean() / (p[rest].mean() + 1e-12))


def smile_lag(user_smile: np.ndarray, avatar_smile: np.ndarray, max_lag_s: float = 2.0) -> tuple[float, float]:
    """Lag (s, > 0: the avatar follows) and value of the peak normalised cross-correlation of two smile tracks.

    Both tracks are high-passed first (a 6 s moving average removed) so slow baselines do not count.
    """
    def hp(x):
        x = np.asarray(x, np.float64)
        return x - ndimage.uniform_filter1d(x, 6 * FPS, mode="nearest")

    x, y = hp(user_smile), hp(avatar_smile)
    best, best_lag = -np.inf, 0
    m = int(max_lag_s * FPS)
    for lag in range(-m, m + 1):
        a, b = (x[:x.size - lag], y[lag:]) if lag >= 0 else (x[-lag:], y[:y.size + lag])
        den = math.sqrt(float((a * a).sum() * (b * b).sum())) + 1e-12
        c = float((a * b).sum()) / den
        if c > best:
            best, best_lag = c, lag
    return best_lag / FPS, best


def event_rise(x: np.ndarray, times, window_s: tuple[float, float], exclude=None) -> float:
    """Mean of ``x`` (a 4 s moving median removed) in ``window_s`` after ``times`` minus its mean elsewhere.

    ``exclude``: a frame mask left out of "elsewhere" (e.g. the windows of another rule on the same channel).
    """
    x = np.asarray(x, np.float64)
    hp = x - ndimage.median_filter(x, size=4 * FPS, mode="nearest")
    inside = _windows(x.size, times, window_s)
    rest = ~inside if exclude is None else ~inside & ~exclude
    if not inside.any() or not rest.any():
        return float("nan")
    return float(hp[inside].mean() - hp[rest].mean())


def blink_stats(m: np.ndarray, closed: float = 0.8) -> dict:
    """Full closures (both eyes' mean ``eyeBlink`` crossing ``closed``): rate per minute, mean closure time
    (frames above 0.5 around each), longest gap between closures, and the peak value."""
    b = np.asarray(m[:, [_CI["eyeBlinkLeft"], _CI["eyeBlinkRight"]]], np.float64).mean(1)
    onsets = np.flatnonzero((b[1:] >= closed) & (b[:-1] < closed)) + 1
    half = b >= 0.5
    durs = []
    for i in onsets:
        lo, hi = i, i
        while lo > 0 and half[lo - 1]:
            lo -= 1
        while hi < b.size and half[hi]:
            hi += 1
        durs.append((hi - lo) / FPS)
    gaps = np.diff(onsets) / FPS
    minutes = b.size / FPS / 60
    return {"blinks_per_min": float(onsets.size / minutes) if minutes > 0 else float("nan"),
            "blink_closure_s": float(np.mean(durs)) if durs else float("nan"),
            "blink_max_gap_s": float(gaps.max()) if gaps.size else float("nan"),
            "blink_max": float(b.max()) if b.size else float("nan")}


def rule_metrics(avatar_motion: np.ndarray, *, avatar_audio: np.ndarray | None = None,
                 user_motion: np.ndarray | None = None, events: dict | None = None) -> dict:
    """Measure the corpus rules on an avatar motion track (ground truth or a model's output).

    * ``jaw_rms_corr``: Pearson correlation of ``jawOpen`` and the RMS envelope of ``avatar_audio``;
    * (a) ``nod_power_ratio``: nod-band ``headPitch`` power 0.2-1.2 s after the user's phrase ends / elsewhere;
    * (b) ``micro_nod_power_ratio``: nod-band power 0.1-0.8 s after the user's phrase-internal pauses /
      elsewhere outside the nods of (a);
    * (c) ``smile_lag_s`` / ``smile_xcorr``: peak of the user-smile -> avatar-smile cross-correlation;
    * (d) ``question_brow_rise``: ``browOuterUp`` 0.1-1.3 s after the user's questions minus elsewhere
      (:func:`event_rise`); ``turn_brow_rise`` the same after the user's turn onsets;
    * (e) ``gaze_listening_ratio``: mean gaze distance from the user while the user speaks / otherwise
      (< 1: the avatar looks at the user while they talk); ``gaze_aversion_rise``: gaze distance
      0-1 s after the avatar takes the turn minus elsewhere;
    * blinks (:func:`blink_stats`) and ``head_motion_listening``: std of head rotation (rad) while the user
      speaks;
    * ``late_smile`` / ``late_brow_inner_up`` / ``late_brow_outer_up`` / ``late_frown``: mean of those
      channels after ``events["late_start_s"]`` (the affect's long-range effect).
    """
    from ..features import rms_envelope

    m = np.asarray(avatar_motion, np.float32)
    n = m.shape[0]
    out: dict = {}
    if avatar_audio is not None:
        env = rms_envelope(avatar_audio)[: m.shape[0]]
        jaw = m[: env.size, _CI["jawOpen"]]
        out["jaw_rms_corr"] = float(np.corrcoef(jaw, env)[0, 1]) if jaw.std() > 0 and env.std() > 0 else float("nan")
    ev = events or {}
    pitch = m[:, _CI["headPitch"]]
    if ev.get("user_phrase_ends"):
        out["nod_power_ratio"] = nod_power_ratio(pitch, ev["user_phrase_ends"])
    if ev.get("user_phrase_pauses"):
        nod_w = _windows(n, ev.get("user_phrase_ends", ()), (0.0, 1.6))
        out["micro_nod_power_ratio"] = nod_power_ratio(pitch, ev["user_phrase_pauses"], (0.1, 0.8), exclude=nod_w)
    if user_motion is not None:
        us = np.asarray(user_motion)[:, [_CI["mouthSmileLeft"], _CI["mouthSmileRight"]]].mean(1)
        avs = m[:, [_CI["mouthSmileLeft"], _CI["mouthSmileRight"]]].mean(1)
        out["smile_lag_s"], out["smile_xcorr"] = smile_lag(us, avs)
    brow = m[:, [_CI["browOuterUpLeft"], _CI["browOuterUpRight"]]].mean(1)
    onset_w = _windows(n, ev.get("user_turn_onsets", ()), (0.1, 1.3))
    question_w = _windows(n, ev.get("user_questions", ()), (0.1, 1.3))
    if ev.get("user_questions"):
        out["question_brow_rise"] = event_rise(brow, ev["user_questions"], (0.1, 1.3), exclude=onset_w)
    if ev.get("user_turn_onsets"):
        out["turn_brow_rise"] = event_rise(brow, ev["user_turn_onsets"], (0.1, 1.3), exclude=question_w)
    if ev.get("user_speech"):
        g = gaze_distance(m)
        speaking = np.zeros(n, bool)
        t = np.arange(n) / FPS
        for s, e in ev["user_speech"]:
            speaking |= (t >= s) & (t < e)
        if speaking.any() and (~speaking).any():
            out["gaze_listening_ratio"] = float(g[speaking].mean() / (g[~speaking].mean() + 1e-9))
            rot = m[:, [_CI["headPitch"], _CI["headYaw"], _CI["headRoll"]]][speaking]
            out["head_motion_listening"] = float(rot.std(0).mean())
        if ev.get("avatar_turn_onsets"):
            out["gaze_aversion_rise"] = event_rise(g, ev["avatar_turn_onsets"], (0.0, 1.0))
    out.update(blink_stats(m))
    if "late_start_s" in ev:
        i0 = int(round(ev["late_start_s"] * FPS))
        late = m[i0:]
        if late.shape[0]:
            out["late_smile"] = float(late[:, [_CI["mouthSmileLeft"], _CI["mouthSmileRight"]]].mean())
            out["late_brow_inner_up"] = float(late[:, _CI["browInnerUp"]].mean())
            out["late_brow_outer_up"] = float(late[:, [_CI["browOuterUpLeft"], _CI["browOuterUpRight"]]].mean())
            out["late_frown"] = float(late[:, [_CI["mouthFrownLeft"], _CI["mouthFrownRight"]]].mean())
            out["late_nod_power"] = float(nod_band_power(pitch)[i0:].mean())
    return out

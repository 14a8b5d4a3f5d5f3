"""What every face does whatever the other side does: articulation, blinks, gaze shifts, slow head motion.

Also the small signal helpers the rules are written with (bumps, filters, per-event randomness).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import signal as sps

from .. import blinks, motion
from .base import FPS, _CI
from .phones import _VOWELS
from .synthesis import articulation_targets

HEAD6 = [_CI[c] for c in motion.HEAD_POSE]


# ------------------------------------------------------------------------------------------- helpers

def _bump(t: np.ndarray, t0: float, dur: float, rise: float = 0.3, fall: float = 0.5) -> np.ndarray:
    """0 before ``t0``, rises over ``rise``, holds until ``t0 + dur``, falls over ``fall``."""
    return np.minimum(blinks.smoothstep((t - t0) / rise), 1.0 - blinks.smoothstep((t - t0 - dur) / fall))


def _lowpass(x: np.ndarray, cutoff_hz: float, fs: float = FPS) -> np.ndarray:
    sos = sps.butter(2, min(cutoff_hz / (fs / 2), 0.99), output="sos")
    return sps.sosfiltfilt(sos, x, axis=0)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / (x.std(0) + 1e-12)


def _event_rng(seed: int, group: int, kind: int, t: float) -> np.random.Generator:
    """Randomness of one event, keyed by its time: the same event in matched conversations draws the same."""
    return np.random.default_rng([int(seed), int(group), int(kind), int(round(t * 1000))])


def _spans_track(t: np.ndarray, spans, rise: float = 0.15, fall: float = 0.3) -> np.ndarray:
    """Smooth 0..1 indicator of the ``(start, end)`` spans."""
    out = np.zeros_like(t)
    for s, e in spans:
        out = np.maximum(out, _bump(t, s, max(0.0, e - s), rise, fall))
    return out


# ------------------------------------------------------------------------------------------- behaviour

def _blinks(rng: np.random.Generator, duration: float, mean_interval: float) -> list[float]:
    """Blink times: the intervals of :mod:`echo_stream.blinks` (gamma, mean ``mean_interval``, 1-9 s)."""
    out, t = [], rng.uniform(0.3, 2.5)
    while t < duration - 0.3:
        out.append(float(t))
        t += blinks.next_interval(rng, mean_interval)
    return out


def _blink_track(t: np.ndarray, times: list[float]) -> np.ndarray:
    """Full closures (peak 1.0) of the shape generation uses (:func:`echo_stream.blinks.blink_shape`)."""
    return blinks.blink_shape(t, times)


def _gaze(rng: np.random.Generator, t: np.ndarray, duration: float, amp: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaze shifts: a new fixation every 1.2-4 s, horizontal within +-amp, vertical within +-0.6 amp."""
    h = np.zeros_like(t)
    v = np.zeros_like(t)
    s = 0.0
    while s < duration:
        e = s + rng.uniform(1.2, 4.0)
        sel = (t >= s) & (t < e)
        h[sel] = rng.uniform(-amp, amp)
        v[sel] = rng.uniform(-0.6 * amp, 0.6 * amp)
        s = e
    k = np.array([0.25, 0.5, 0.25])
    return np.convolve(h, k, "same"), np.convolve(v, k, "same")


def apply_gaze(m: np.ndarray, h: np.ndarray, v: np.ndarray) -> None:
    """Add a gaze direction (h > 0: to the face's left, v > 0: up) to the eyeLook channels of ``m``."""
    pos, neg = np.clip(h, 0, None), np.clip(-h, 0, None)
    m[:, _CI["eyeLookOutLeft"]] += pos
    m[:, _CI["eyeLookInRight"]] += pos
    m[:, _CI["eyeLookInLeft"]] += neg
    m[:, _CI["eyeLookOutRight"]] += neg
    up, down = np.clip(v, 0, None), np.clip(-v, 0, None)
    m[:, _CI["eyeLookUpLeft"]] += up
    m[:, _CI["eyeLookUpRight"]] += up
    m[:, _CI["eyeLookDownLeft"]] += down
    m[:, _CI["eyeLookDownRight"]] += down


def speaking_face(phones, t: np.ndarray, duration: float, rng, blink_interval_s: float, gaze_amp: float):
    """One speaker's base motion (float64), blink times and gaze track ``(h, v)`` -- the gaze not yet applied
    (the listener rules modulate it; :func:`apply_gaze` adds it): neutral face + articulation + blinks.

    Draws from ``rng`` in a fixed order (blinks, then gaze), so callers' later draws are unchanged.
    """
    n = len(t)
    m = motion.neutral_motion(n).astype(np.float64)
    m += articulation_targets(phones, n)
    blinks = _blinks(rng, duration, blink_interval_s)
    b = _blink_track(t, blinks)
    m[:, _CI["eyeBlinkLeft"]] += b
    m[:, _CI["eyeBlinkRight"]] += b
    return m, blinks, _gaze(rng, t, duration, gaze_amp)


def vowel_envelope(phones, n: int) -> np.ndarray:
    """1.0 on the frames where a vowel sounds, else 0 (the speaking activity that drives gestures)."""
    env = np.zeros(n)
    for p in phones:
        if p.symbol in _VOWELS:
            env[int(p.start * FPS):int(math.ceil(p.end * FPS))] = 1.0
    return env


def head_idle(base_noise: np.ndarray, speed: float, amps: np.ndarray) -> np.ndarray:
    """Slow head motion: noise low-passed at 0.35 x speed Hz (< 0.5 Hz), unit variance, x amps."""
    return _unit(_lowpass(base_noise, 0.35 * speed))[: len(base_noise)] * amps

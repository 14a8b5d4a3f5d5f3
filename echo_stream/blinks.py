"""Spontaneous blinks: one definition for the corpus's ground truth and for generation.

Why generation adds them instead of the model: a spontaneous blink's timing is not caused by
anything the model sees (neither side's audio, the user's face, the transcript), so the best a
regression-like few-step sampler can do is their average -- in the default checkpoint before this
layer, ``eyeBlink`` never rose above 0.14 in 14 s of ``make demo``: the eyes never closed. Blinks are
therefore drawn per session from a renewal process and combined with the model's output by
``max``, so a blink the model does produce (e.g. from the known frames) is kept:

* intervals: gamma (shape 2.5) with a mean of ``mean_interval_s`` (3.5 s: ~17 per minute, the human
  resting rate during conversation), clipped to 1-9 s -- so the eyes close every 1-9 s;
* shape: 100 ms closing, 60 ms shut (1.0), 200 ms opening.

Deterministic in ``(seed, frame)``: the same session seed gives the same blinks however the frames
are cut into windows, batched, or resumed from a checkpoint.
"""
from __future__ import annotations

import numpy as np

from . import motion

MEAN_INTERVAL_S = 3.5
INTERVAL_RANGE_S = (1.0, 9.0)
CLOSE_S, SHUT_S, OPEN_S = 0.1, 0.06, 0.2
CHANNELS = (motion.CHANNEL_INDEX["eyeBlinkLeft"], motion.CHANNEL_INDEX["eyeBlinkRight"])


def smoothstep(x):
    """0 below 0, 1 above 1, 3x^2 - 2x^3 between (the ease of every rise and fall here and in the corpus)."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def next_interval(rng: np.random.Generator, mean_interval_s: float = MEAN_INTERVAL_S) -> float:
    """Seconds to the next blink."""
    return float(np.clip(rng.gamma(2.5, mean_interval_s / 2.5), *INTERVAL_RANGE_S))


def blink_shape(t: np.ndarray, times) -> np.ndarray:
    """Eyelid closure (0..1) at times ``t`` (s) for blinks starting at ``times`` (s)."""
    t = np.asarray(t, np.float64)
    out = np.zeros_like(t)
    for t0 in times:
        sel = (t > t0 - 0.02) & (t < t0 + CLOSE_S + SHUT_S + OPEN_S + 0.02)
        if sel.any():
            x = t[sel] - t0
            b = np.minimum(smoothstep(x / CLOSE_S), 1.0 - smoothstep((x - CLOSE_S - SHUT_S) / OPEN_S))
            out[sel] = np.maximum(out[sel], b)
    return out


class BlinkTrack:
    """The blinks of one session, frame by frame (see the module docstring)."""

    def __init__(self, seed: int, fps: int = motion.FPS, mean_interval_s: float = MEAN_INTERVAL_S):
        self.fps = fps
        self.mean_interval_s = mean_interval_s
        self._rng = np.random.default_rng([int(seed) & 0x7FFFFFFFFFFFFFFF, 0xB11])
        self._times: list[float] = []
        self._next = float(self._rng.uniform(0.5, 2.5))

    def values(self, f0: int, f1: int) -> np.ndarray:
        """(f1 - f0,) closure of frames [f0, f1); calls go forward (blinks more than 2 s before f0 are dropped)."""
        end_s = f1 / self.fps
        while self._next < end_s + 1.0:
            self._times.append(self._next)
            self._next += next_interval(self._rng, self.mean_interval_s)
        start_s = f0 / self.fps
        self._times = [t for t in self._times if t > start_s - 2.0]     # bounded state
        return blink_shape(np.arange(f0, f1) / self.fps, self._times)

    def apply(self, m: np.ndarray, f0: int) -> np.ndarray:
        """``m`` (frames f0.., channels) with its ``eyeBlink`` channels raised to the blinks (a copy)."""
        m = np.array(m, copy=True)
        b = self.values(f0, f0 + len(m)).astype(m.dtype)
        for c in CHANNELS:
            m[:, c] = np.maximum(m[:, c], b)
        return m

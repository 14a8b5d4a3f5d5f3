"""The One-Euro filter (Casiez, Roussel & Vogel, CHI 2012), vectorised over channels.

A low-pass filter whose cut-off rises with the signal's speed: a still face
gives still numbers (cut-off ``min_cutoff`` Hz removes the mesh's frame-to-frame
jitter) while a blink or a nod passes with little lag (``beta`` raises the
cut-off in proportion to the filtered speed). Deterministic; ``reset()`` starts over.
"""
from __future__ import annotations

import math

import numpy as np


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuro:
    def __init__(self, rate: float, min_cutoff: np.ndarray | float = 1.0, beta: np.ndarray | float = 0.0,
                 d_cutoff: float = 1.0):
        self.dt = 1.0 / float(rate)
        self.min_cutoff = np.asarray(min_cutoff, np.float64)
        self.beta = np.asarray(beta, np.float64)
        self.d_cutoff = float(d_cutoff)
        self.reset()

    def reset(self) -> None:
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self._x is None:
            self._x, self._dx = x.copy(), np.zeros_like(x)
            return x.copy()
        dx = (x - self._x) / self.dt
        self._dx = self._dx + _alpha(self.d_cutoff, self.dt) * (dx - self._dx)
        cutoff = self.min_cutoff + self.beta * np.abs(self._dx)
        self._x = self._x + _alpha(cutoff, self.dt) * (x - self._x)
        return self._x.copy()

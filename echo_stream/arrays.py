"""Row taking with zero padding: the windows and buffers of the stages and of the training sampler."""
from __future__ import annotations

import numpy as np


def take_rows(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rows ``[lo, hi)`` of ``a``, zeros where that range leaves ``[0, len(a))`` (a view when it does not)."""
    n = len(a)
    if lo >= 0 and hi <= n:
        return a[lo:hi]
    out = np.zeros((hi - lo, *a.shape[1:]), a.dtype)
    s0, s1 = max(lo, 0), min(hi, n)
    if s1 > s0:
        out[s0 - lo:s1 - lo] = a[s0:s1]
    return out


def pop_rows(pending: list, n: int, shape: tuple[int, ...] = ()) -> tuple[np.ndarray, int]:
    """Take up to ``n`` rows (each of ``shape``) off the front of ``pending``, a queue of arrays (consumed
    in place); returns ``(n rows as float32, zeros after the real ones; how many were real)``."""
    out = np.zeros((n, *shape), np.float32)
    got = 0
    while pending and got < n:
        head = pending[0]
        k = min(n - got, len(head))
        out[got:got + k] = head[:k]
        got += k
        if k == len(head):
            pending.pop(0)
        else:
            pending[0] = head[k:]
    return out, got

"""Few-step streaming sampler for one window per session (flow matching, x0 prediction).

Formulation
-----------
Flow time ``tau`` runs from 0 (pure noise) to 1 (data):
``x_tau = tau * x + (1 - tau) * eps``. The denoiser predicts ``x0_hat`` (the
clean normalised motion) from ``x_tau``; the implied velocity is
``(x0_hat - x_tau) / (1 - tau)``. The sampler takes deterministic Euler steps on
the uniform grid ``tau_i = i / steps`` (``steps = cfg.sampler_steps``, 4 by
default); the last step lands on ``tau = 1`` and returns ``x0_hat``. The only
randomness is the initial noise ``eps``.

Windows and seams
-----------------
A window covers frames ``[t0 - K, t0 + S)``: ``K = cfg.overlap_frames`` known
frames (the previous window's last output frames) and ``S = cfg.new_frames``
new ones. The known frames enter twice:

* as conditioning (known-context channel + flag, every step);
* inpainting-style: after every step the overlap of the state is reset to
  ``tau * known + (1 - tau) * eps``, and the final window holds ``known``
  exactly on the overlap.

Then a *seam correction* removes whatever offset the model's own prediction
had at the last known frame: ``d = known[K-1] - x0_hat[K-1]`` is added to the new
frames with a raised-cosine weight that is 1 at the first new frame and fades
to 0 over ``cfg.seam_blend_frames`` frames. The jump from the last known frame
to the first new frame is thus exactly the model's own frame-to-frame step
``x0_hat[K] - x0_hat[K-1]``; for a well-trained model ``d`` is ~0 and the
correction is a no-op.

Determinism
-----------
Each batch item draws its noise from its own CPU ``torch.Generator`` seeded with
its own seed (derive it with :func:`window_seed` from the session seed and the
window index), so an item's result does not depend on which other sessions
share the batch (up to floating-point reassociation in batched matmuls).
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Sequence

import torch


def window_seed(session_seed: int, window_index: int) -> int:
    """A 63-bit seed for one window of one session (stable across processes and batch compositions)."""
    h = hashlib.blake2b(f"{int(session_seed)}:{int(window_index)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def make_noise(seeds: Sequence[int], shape: tuple[int, ...], device=None, dtype=torch.float32) -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, item i from its own generator seeded with seeds[i]."""
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    for i, s in enumerate(seeds):
        g = torch.Generator(device="cpu")
        g.manual_seed(int(s) & ((1 << 63) - 1))
        out[i] = torch.randn(shape, generator=g)
    return out.to(device=device, dtype=dtype)


def flow_schedule(steps: int) -> list[float]:
    """The deterministic grid tau_0 = 0 < ... < tau_steps = 1."""
    if steps < 1:
        raise ValueError(f"steps: must be at least 1, got {steps}")
    return [i / steps for i in range(steps + 1)]


def seam_weights(new_frames: int, blend_frames: int, device=None) -> torch.Tensor:
    """(new_frames,) raised-cosine fade: 1 at the first new frame, 0 from frame ``blend_frames`` on."""
    j = torch.arange(new_frames, dtype=torch.float32, device=device)
    if blend_frames <= 0:
        return torch.zeros(new_frames, device=device)
    w = 0.5 * (1.0 + torch.cos(math.pi * j / blend_frames))
    return torch.where(j < blend_frames, w, torch.zeros_like(w))


def sample_window(denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                  known: torch.Tensor, noise: torch.Tensor, steps: int, seam_blend_frames: int = 0,
                  seam_channels: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one window per batch item.

    ``denoise(x_tau, tau (B,), known_full (B,W,C), known_mask (B,W)) -> x0_hat (B,W,C)``;
    ``known``: (B, K, C) normalised previous motion; ``noise``: (B, W, C); ``seam_channels``: optional
    (C,) bool, the channels the seam correction applies to (None: all).
    Returns the (B, W, C) normalised window whose first K frames equal ``known``.
    """
    b, w, c = noise.shape
    k = known.shape[1]
    known_full = noise.new_zeros(b, w, c)
    known_full[:, :k] = known
    mask = noise.new_zeros(b, w)
    mask[:, :k] = 1.0
    taus = flow_schedule(steps)
    x = noise.clone()
    x0 = x
    for tau, tau_next in zip(taus[:-1], taus[1:]):
        x0 = denoise(x, noise.new_full((b,), tau), known_full, mask)
        if tau_next >= 1.0:
            x = x0.clone()
        else:
            eps_hat = (x - tau * x0) / (1.0 - tau)
            x = tau_next * x0 + (1.0 - tau_next) * eps_hat
            x[:, :k] = tau_next * known + (1.0 - tau_next) * noise[:, :k]
    if k > 0 and seam_blend_frames > 0 and w > k:
        offset = known[:, -1] - x0[:, k - 1]
        if seam_channels is not None:
            offset = offset * seam_channels.to(offset.dtype)
        x[:, k:] += offset[:, None, :] * seam_weights(w - k, seam_blend_frames, x.device)[None, :, None]
    x[:, :k] = known
    return x

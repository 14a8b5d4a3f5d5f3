"""Listener reactions: *when* the avatar nods or raises its brows at the user, learned as event hazards.

Why a head of its own. The diffusion model learns the listener's slow, level-like reactions from the
user branch (mirrored smiles, gaze held on the speaker) but not the short gestures timed by the user's
voice: a nod 0.2-0.5 s after the user ends a sentence, a micro-nod after a comma, brows up after a
question. Those are brief (0.4-0.9 s), rare (a nod in 5 % of the frames), and their timing is only
known to within a few hundred milliseconds from what the user did -- so they carry a tiny share of
the denoising loss, and any timing spread averages an oscillating nod into nothing. The README
measures it: with the cue in the user features (a probe reads it), the diffusion model's nod response
stayed under a fifth of the ground truth's whatever the gate, steps, history or auxiliary loss.

So the reaction is split the way its data is: **when** is learned, **what** is measured.

* :class:`ReactionHead` -- a small causal network over the user's voice (the same per-frame log-mel +
  prosody features as the user branch, and whether there is a voice) -> per-frame onset
  probabilities of :data:`KINDS`, trained with binary
  cross-entropy on onsets found in the ground-truth motion (``echo-stream train --stage reactions``).
  Causal: a frame's probability depends on the user up to that frame only, so it streams.
* Gesture templates -- the event-triggered mean of the ground-truth motion after each kind's onsets
  (in the kind's own region: head pose for nods, brows for brow raises; the lips stay with the avatar's
  own speech, the eyes with its gaze) and the spread of the events'
  sizes, measured on the training data and stored with the head.
* :class:`ReactionTrack` -- one per session at generation: draws onsets from the probabilities
  (deterministic in the session seed and the frame, like the blinks) and adds the scaled templates to
  the model's motion, carrying a gesture's tail into the next window.

With the user's voice absent (``user_present[..., 0]`` 0: the eval's "user branch off") the
probabilities are 0: no user, no reactions. (Reactions to the user's *face* -- mirrored smiles -- are
the diffusion model's own: a level it can regress, not an instant.)

Onset detection (:func:`detect_onsets`) uses matched filters on the high-passed ``headPitch``
(nod: two cycles near 2 Hz; micro-nod: one dip) and brow height (raise: large; flash: small), so any
motion corpus -- not only the bundled synthetic one -- gives training targets.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from .. import motion
from .encoders import CausalConvStack

FPS = motion.FPS
KINDS = ("nod", "micro_nod", "brow_raise", "brow_flash")
#: frames of each kind's gesture template (1.2 s: the longest nod with its return)
TEMPLATE_FRAMES = 30
#: kinds that move the same channels: one at a time within a group
GROUPS = {"nod": "head", "micro_nod": "head", "brow_raise": "brow", "brow_flash": "brow"}

_PITCH = motion.CHANNEL_INDEX["headPitch"]
_BROWS = [motion.CHANNEL_INDEX[c] for c in ("browOuterUpLeft", "browOuterUpRight")]
#: the channels each group's gestures move (the event-triggered mean elsewhere -- eyes, mouth -- is left out)
_REGION = {"head": motion.REGION_SLICES["head"], "brow": motion.REGION_SLICES["brows"]}

# ---------------------------------------------------------------------------------------- detection


def _nod_shape(n: int = 18, freq: float = 2.0) -> np.ndarray:
    tau = np.arange(n) / FPS
    return np.sin(np.pi * freq * tau) ** 2 * np.sin(np.pi * tau / (n / FPS))


def _dip_shape(n: int = 11) -> np.ndarray:
    return np.sin(np.pi * np.arange(n) / n) ** 2


def _filter(shape: np.ndarray) -> np.ndarray:
    """A zero-mean matched filter whose response to ``a * shape`` is ``a``."""
    f = shape - shape.mean()
    return f / float((f * shape).sum())


def _rise(x: np.ndarray, before: int = 6, after: tuple[int, int] = (3, 9)) -> np.ndarray:
    """Size of a step up starting at each frame: mean of ``x`` over ``after`` frames later minus over the ``before``."""
    c = np.concatenate([[0.0], np.cumsum(x)])
    n = len(x)
    out = np.zeros(n)
    i = np.arange(before, n - after[1])
    out[i] = (c[i + after[1]] - c[i + after[0]]) / (after[1] - after[0]) - (c[i] - c[i - before]) / before
    return out


def _response(x: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Amplitude of ``shape`` starting at each frame (matched filter; 0 where it does not fit)."""
    f = _filter(shape)
    n = len(f)
    out = np.zeros(len(x))
    if len(x) >= n:
        out[: len(x) - n + 1] = np.correlate(x, f, mode="valid")
    return out


def _peaks(r: np.ndarray, lo: float, hi: float, gap: int) -> np.ndarray:
    """Frames where ``r`` has a local maximum in ``[lo, hi)``, at least ``gap`` frames apart (greedy, biggest first)."""
    cand = np.flatnonzero((r >= lo) & (r < hi) & (r >= np.roll(r, 1)) & (r >= np.roll(r, -1)))
    taken: list[int] = []
    for i in cand[np.argsort(-r[cand])]:
        if all(abs(int(i) - j) >= gap for j in taken):
            taken.append(int(i))
    return np.array(sorted(taken), dtype=np.int64)


def detect_onsets(m: np.ndarray, *, nod_min: float = 0.03, micro_min: float = 0.008, micro_max: float = 0.03,
                  raise_min: float = 0.18, flash_min: float = 0.06) -> dict[str, np.ndarray]:
    """Onset frames of each of :data:`KINDS` in a motion track (T, 58) (ground truth or generated).

    ``headPitch`` and brow height are high-passed (a 2 s / 4 s moving median removed); a nod is a peak of
    the two-cycle matched filter above ``nod_min`` rad, a micro-nod a peak of the one-dip filter in
    ``[micro_min, micro_max)`` rad not within a nod (the two overlap in shape; they differ in size:
    the corpus's micro-nods are 0.015-0.025 rad, its nods 0.035-0.15); a brow raise a peak of the step filter (:func:`_rise`)
    above ``raise_min``, a flash one in ``[flash_min, raise_min)``.
    """
    m = np.asarray(m, np.float64)
    pitch = m[:, _PITCH] - ndimage.median_filter(m[:, _PITCH], size=2 * FPS, mode="nearest")
    brow = m[:, _BROWS].mean(1)
    brow = brow - ndimage.median_filter(brow, size=4 * FPS, mode="nearest")
    nods = _peaks(_response(pitch, _nod_shape()), nod_min, np.inf, gap=int(0.8 * FPS))
    micro = _peaks(_response(pitch, _dip_shape()), micro_min, micro_max, gap=int(0.5 * FPS))
    near_nod = np.zeros(len(m), bool)
    for i in nods:
        near_nod[max(0, i - int(0.4 * FPS)): i + int(0.9 * FPS)] = True
    micro = micro[~near_nod[micro]] if len(micro) else micro
    rb = _rise(brow)
    raises = _peaks(rb, raise_min, np.inf, gap=int(0.8 * FPS))
    flashes = _peaks(rb, flash_min, raise_min, gap=int(0.8 * FPS))
    near_raise = np.zeros(len(m), bool)
    for i in raises:
        near_raise[max(0, i - int(0.5 * FPS)): i + int(0.8 * FPS)] = True
    flashes = flashes[~near_raise[flashes]] if len(flashes) else flashes
    return {"nod": nods, "micro_nod": micro, "brow_raise": raises, "brow_flash": flashes}


def variance_share(tracks, onsets, motion_std: np.ndarray) -> dict[str, float]:
    """Share of the target's variance, in the normalised units the denoising loss sees, that each kind's
    gestures carry: the high-passed motion of its channels over :data:`TEMPLATE_FRAMES` from each onset,
    over the whole tracks' variance (every channel). The README's "why the diffusion model does not
    learn them": a few percent of what it is asked to fit, at times it can only know to within ~0.3 s."""
    std = np.asarray(motion_std, np.float64)
    total, share = 0.0, dict.fromkeys(KINDS, 0.0)
    for m, on in zip(tracks, onsets):
        m = np.asarray(m, np.float64)
        z = m / std
        total += float(((z - z.mean(0)) ** 2).sum())
        hp = m - ndimage.median_filter(m, size=(2 * FPS, 1), mode="nearest")
        for kind in KINDS:
            ch = [_PITCH] if GROUPS[kind] == "head" else _BROWS + [motion.CHANNEL_INDEX["browInnerUp"]]
            for i in on[kind]:
                share[kind] += float(((hp[i: i + TEMPLATE_FRAMES, ch] / std[ch]) ** 2).sum())
    return {k: v / total for k, v in share.items()} if total > 0 else share


def measure_templates(tracks, onsets) -> tuple[np.ndarray, np.ndarray]:
    """Event-triggered mean motion of each kind and the spread of the events' sizes.

    ``tracks``: motion arrays (T, 58); ``onsets``: for each, :func:`detect_onsets`' dict. Returns
    ``templates`` (len(KINDS), TEMPLATE_FRAMES, 58) -- motion relative to the frame before the onset, in
    the kind's own region only (head pose for nods, brows for brow raises: the lips stay with the avatar's
    speech and the eyes with its gaze), faded to 0 over its last third -- and ``gain_std`` (len(KINDS),): the standard
    deviation of each event's size relative to the template (its projection on it, in the kind's own
    channels: ``headPitch`` or the outer brows).
    """
    n, c = TEMPLATE_FRAMES, motion.NUM_CHANNELS
    templates = np.zeros((len(KINDS), n, c), np.float32)
    gain_std = np.zeros(len(KINDS), np.float32)
    fade = np.ones(n)
    k3 = n // 3
    fade[-k3:] = 0.5 * (1 + np.cos(np.linspace(0, np.pi, k3)))
    for k, kind in enumerate(KINDS):
        segs = []
        for m, on in zip(tracks, onsets):
            for i in on[kind]:
                if i >= 1 and i + n <= len(m):
                    segs.append(np.asarray(m[i: i + n], np.float64) - m[i - 1])
        if not segs:
            continue
        segs = np.stack(segs)
        mean = np.zeros((n, c))
        own = _REGION[GROUPS[kind]]          # a nod moves the head, a brow raise the brows: nothing else
        mean[:, own] = segs.mean(0)[:, own] * fade[:, None]
        templates[k] = mean
        ch = [_PITCH] if GROUPS[kind] == "head" else _BROWS
        main = mean[:, ch].ravel()
        denom = float(main @ main)
        if denom > 0 and len(segs) > 1:
            g = (segs[:, :, ch] * fade[None, :, None]).reshape(len(segs), -1) @ main / denom
            gain_std[k] = float(np.std(g))
    return templates, gain_std


# -------------------------------------------------------------------------------------- the network


class ReactionHead(nn.Module):
    """User features per frame -> onset logits of :data:`KINDS` per frame (causal, ~1 s of context)."""

    def __init__(self, cfg, width: int = 64, dilations=(1, 2, 4, 4), dropout: float = 0.2):
        super().__init__()
        self.audio_dim = cfg.mels_per_frame * cfg.audio_dim
        in_dim = self.audio_dim + 1
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        self.drop = nn.Dropout(dropout)         # training only: 21 conversations are easy to memorise
        self.proj = nn.Linear(in_dim, width)
        self.stack = CausalConvStack(width, dilations=dilations)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, len(KINDS))
        nn.init.constant_(self.out.bias, -5.0)       # rare events: start from ~0.7 % a frame
        self.register_buffer("templates", torch.zeros(len(KINDS), TEMPLATE_FRAMES, cfg.motion_dim))
        self.register_buffer("gain_std", torch.zeros(len(KINDS)))
        #: 1 once trained (``train --stage reactions``); an untrained head never fires
        self.register_buffer("trained", torch.zeros(()))

    @property
    def receptive_field(self) -> int:
        return self.stack.receptive_field

    def features(self, audio, video, blend, present) -> torch.Tensor:
        """(B, T, in_dim) raw inputs: the user's voice features and whether there is a voice (zeros, NaN
        included, where there is none). The face (``video``, ``blend``) is not read: every reaction kind
        here follows the voice, and with the face as well the held-out loss was higher at every step
        (the README)."""
        b, t = audio.shape[:2]
        on = present[..., 0:1] > 0.5
        return torch.cat([torch.where(on, audio.reshape(b, t, self.audio_dim), audio.new_zeros(())),
                          on.to(audio.dtype)], dim=-1)

    def set_input_stats(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).double()
        self.in_mean.copy_(flat.mean(0).float())
        self.in_std.copy_(flat.std(0).clamp_min(1e-3).float())

    def forward(self, audio, video, blend, present) -> torch.Tensor:
        """Logits (B, T, len(KINDS)); ``audio`` (B,T,2,83), ``video`` (B,T,16), ``blend`` (B,T,58), ``present`` (B,T,3)."""
        x = (self.features(audio, video, blend, present) - self.in_mean) / self.in_std
        return self.out(self.drop(self.norm(self.stack(self.proj(self.drop(x))))))

    @torch.no_grad()
    def probabilities(self, audio, video, blend, present) -> torch.Tensor:
        """Per-frame onset probabilities (B, T, len(KINDS)); 0 for frames without the user's voice."""
        if float(self.trained) < 0.5:
            return audio.new_zeros(audio.shape[:2] + (len(KINDS),))
        p = torch.sigmoid(self.forward(audio, video, blend, present))
        voice = present[..., 0:1] > 0.5
        return torch.where(voice, p, torch.zeros_like(p))


def onset_targets(onsets: dict[str, np.ndarray], frames: int) -> np.ndarray:
    """(frames, len(KINDS)) soft onset labels: 0.5 at the onset frame, 0.25 either side."""
    y = np.zeros((frames, len(KINDS)), np.float32)
    for k, kind in enumerate(KINDS):
        for i in onsets[kind]:
            for d, w in ((-1, 0.25), (0, 0.5), (1, 0.25)):
                if 0 <= i + d < frames:
                    y[i + d, k] = max(y[i + d, k], w)
    return y


# ------------------------------------------------------------------------------------ at generation


class ReactionTrack:
    """One session's reactions, frame by frame (see the module docstring).

    ``p`` is a per-frame onset probability (density: an event spread over several frames has
    probabilities summing to its chance). Within an episode (frames since ``p`` last stayed below
    ``floor`` for :attr:`QUIET` frames, or since the last onset of the group) the chance not yet spent,
    ``1 - F``, turns the density into a hazard ``p / (1 - F)``: a reaction spread over 8 frames at
    0.1 each fires with chance 0.8, not ``1 - 0.9^8``. An onset draws the event's size from
    ``1 + gain_std * N(0, 1)`` (clipped to 0.4-1.8) and adds the template from that frame on. Random
    draws are keyed by ``(seed, kind, frame)``: the same session gives the same reactions however its
    frames are cut into windows.
    """

    QUIET = 4

    def __init__(self, seed: int, templates: np.ndarray, gain_std: np.ndarray, floor: float = 0.02):
        self.seed = int(seed) & 0x7FFFFFFFFFFFFFFF
        self.templates = np.asarray(templates, np.float32)
        self.gain_std = np.asarray(gain_std, np.float32)
        self.floor = floor
        groups = sorted(set(GROUPS.values()))
        self._group = [groups.index(GROUPS[k]) for k in KINDS]
        self.spent = np.zeros(len(KINDS))          # F per kind
        self.quiet = np.zeros(len(KINDS), np.int64)
        self.busy_until = np.full(len(groups), -1, np.int64)   # a group's gesture runs until this frame
        self.active: list[tuple[int, int, float]] = []          # (kind, onset frame, gain)
        self.events: list[dict] = []                            # fired onsets (bounded: the last 256)

    def _u(self, kind: int, frame: int, what: int) -> float:
        return float(np.random.default_rng([self.seed, 0x5EAC7, kind, int(frame), what]).random())

    def _g(self, kind: int, frame: int) -> float:
        z = np.random.default_rng([self.seed, 0x5EAC7, kind, int(frame), 2]).standard_normal()
        return float(np.clip(1.0 + self.gain_std[kind] * z, 0.4, 1.8))

    def step(self, p: np.ndarray, f0: int) -> None:
        """Decide onsets for frames ``f0 .. f0 + len(p)`` from their probabilities ``p`` (frames, kinds)."""
        n_frames = self.templates.shape[1]
        for j, row in enumerate(np.asarray(p, np.float64)):
            f = f0 + j
            for k, pk in enumerate(row):
                if pk < self.floor:
                    self.quiet[k] += 1
                    if self.quiet[k] >= self.QUIET:
                        self.spent[k] = 0.0
                    continue
                self.quiet[k] = 0
                g = self._group[k]
                hazard = min(1.0, pk / max(1e-3, 1.0 - self.spent[k]))
                self.spent[k] = min(1.0, self.spent[k] + pk)
                if f <= self.busy_until[g] or self._u(k, f, 1) >= hazard:
                    continue
                self.active.append((k, f, self._g(k, f)))
                self.events.append({"kind": KINDS[k], "frame": f})
                del self.events[:-256]
                self.busy_until[g] = f + int(0.8 * n_frames)
                self.spent[k] = 1.0      # this episode's chance is spent

    def apply(self, m: np.ndarray, f0: int) -> np.ndarray:
        """``m`` (frames f0.., channels) plus the active gestures over those frames (a copy)."""
        out = np.array(m, copy=True)
        n = self.templates.shape[1]
        f1 = f0 + len(out)
        for k, onset, gain in self.active:
            a, b = max(f0, onset), min(f1, onset + n)
            if a < b:
                out[a - f0: b - f0] += gain * self.templates[k, a - onset: b - onset].astype(out.dtype)
        self.active = [x for x in self.active if x[1] + n > f1]
        return np.clip(out, motion.CHANNEL_MIN, motion.CHANNEL_MAX).astype(np.asarray(m).dtype)

    def state(self) -> dict:
        return {"spent": self.spent.tolist(), "quiet": self.quiet.tolist(), "busy_until": self.busy_until.tolist(),
                "active": [list(a) for a in self.active]}

    def restore(self, st: dict) -> None:
        self.spent = np.asarray(st["spent"], np.float64)
        self.quiet = np.asarray(st["quiet"], np.int64)
        self.busy_until = np.asarray(st["busy_until"], np.int64)
        self.active = [(int(k), int(f), float(g)) for k, f, g in st["active"]]

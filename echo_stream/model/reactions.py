"""Listener reactions: *when* the avatar nods, raises its brows or glances away, learned as event hazards.

Why a head of its own. The diffusion model learns the listener's slow, level-like reactions from the
user branch (mirrored smiles, gaze held on the speaker) but not the short gestures timed by the user's
voice: a nod 0.2-0.5 s after the user ends a sentence, a micro-nod after a comma, brows up after a
question, a glance away as it takes the turn. Those are brief (0.4-1.2 s), rare (a nod in 5 % of the
frames), and their timing is only known to within a few hundred milliseconds from what the user did -- so
they carry a tiny share of the denoising loss, and any timing spread averages an oscillating nod into
nothing. The README measures it: with the cue in the user features (a probe reads it), the diffusion
model's nod response stayed under a fifth of the ground truth's whatever the gate, steps, history or auxiliary loss.

So the reaction is split the way its data is: **when** is learned, **what** is measured.

* :class:`ReactionHead` -- a small causal network over the user's voice (the same per-frame log-mel +
  prosody features as the user branch, and whether there is a voice), joined frame by frame by the
  avatar's own voice around that frame (:func:`own_voice`: has it just started speaking?) -> per-frame onset
  probabilities of :data:`KINDS`, trained with binary
  cross-entropy on onsets found in the ground-truth motion (``echo-stream train --stage reactions``).
  Causal: a frame's probability depends on the user up to that frame only (and on the avatar's own audio
  up to the lookahead the diffusion model reads anyway), so it streams. Optionally (``train
  --calibration-convs``, off by default) each kind's probabilities are scaled so that their sum matches
  the onsets of training conversations held out of the fit (``calibration``).
* Gesture templates -- the event-triggered mean of the ground-truth motion after each kind's onsets
  (in the kind's own region: head pose for nods, brows for brow raises, the ``eyeLook*`` channels for a
  glance, measured towards one side; the lips stay with the avatar's own speech) and the spread of the
  events' sizes, measured on the training data and stored with the head.
* :class:`ReactionTrack` -- one per session at generation: draws onsets from the probabilities
  (deterministic in the session seed and the frame, like the blinks) and adds the scaled templates to
  the model's motion (a glance is a floor under the gaze channels, as a blink is under the lids: where the
  model's own gaze already looks away at the turn, the two do not add up), carrying a gesture's tail into
  the next window (a glance goes to a side drawn the same way).

With the user's voice absent (``user_present[..., 0]`` 0: the eval's "user branch off") the
probabilities are 0: no user, no reactions -- nor a turn to take. (Reactions to the user's *face* --
mirrored smiles -- are the diffusion model's own: a level it can regress, not an instant.)

Onset detection (:func:`detect_onsets`) uses matched filters on the high-passed ``headPitch``
(nod: two cycles near 2 Hz; micro-nod: one dip), brow height (raise: large; flash: small) and the gaze's
distance from straight ahead (glance away: a step up), so any
motion corpus -- not only the bundled synthetic one -- gives training targets.
"""
from __future__ import annotations

import re

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from .. import config, motion
from .encoders import CausalConvStack

FPS = motion.FPS
KINDS = ("nod", "micro_nod", "brow_raise", "brow_flash", "gaze_away")
#: frames of each kind's gesture template (1.2 s: the longest nod with its return)
TEMPLATE_FRAMES = 30
#: kinds that move the same channels: one at a time within a group
GROUPS = {"nod": "head", "micro_nod": "head", "brow_raise": "brow", "brow_flash": "brow", "gaze_away": "gaze"}

_PITCH = motion.CHANNEL_INDEX["headPitch"]
_BROWS = [motion.CHANNEL_INDEX[c] for c in ("browOuterUpLeft", "browOuterUpRight")]
_LOOK = [motion.CHANNEL_INDEX[c] for c in motion.LOOK_CHANNELS]
#: the channels each group's gestures move (the event-triggered mean elsewhere -- eyes, mouth -- is left out);
#: a glance moves the gaze only (``eyeLook*``), never the lids
_REGION = {"head": motion.REGION_SLICES["head"], "brow": motion.REGION_SLICES["brows"], "gaze": np.array(_LOOK)}
#: the channel order of a motion vector mirrored left <-> right (``...Left`` and ``...Right`` swapped): a glance
#: is measured towards one side and drawn towards either
_SWAP = {"Left": "Right", "Right": "Left"}
MIRROR = np.array([motion.CHANNEL_INDEX.get(re.sub("Left|Right", lambda m: _SWAP[m[0]], c), i)
                   for i, c in enumerate(motion.CHANNELS)], dtype=np.int64)
#: frames of the avatar's own voice before a frame that the head reads (the known frames of a full-stride
#: window: ``window_frames - new_frames`` of the tiny config), and the feature columns it reads
OWN_BEFORE = 4
assert KINDS[-1] == "gaze_away"       # the head's last logit is the glance's (``ReactionHead.own``)
ENERGY, VOICING = config.MEL_BINS, config.MEL_BINS + 2     # features.AUDIO_FEATURE_COLUMNS: log_energy, voicing
#: silence's values of those columns (features.py: log energy of a silent frame, no voicing)
SILENT = (-11.5, 0.0)

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


def gaze_side(m: np.ndarray) -> np.ndarray:
    """Per-frame horizontal gaze, positive towards the avatar's right (right eye out, left eye in)."""
    ci = motion.CHANNEL_INDEX
    m = np.asarray(m, np.float64)
    return (m[:, ci["eyeLookOutRight"]] + m[:, ci["eyeLookInLeft"]] - m[:, ci["eyeLookOutLeft"]]
            - m[:, ci["eyeLookInRight"]]) / 2


def detect_onsets(m: np.ndarray, *, nod_min: float = 0.03, micro_min: float = 0.008, micro_max: float = 0.03,
                  raise_min: float = 0.18, flash_min: float = 0.06, away_min: float = 0.15) -> dict[str, np.ndarray]:
    """Onset frames of each of :data:`KINDS` in a motion track (T, 58) (ground truth or generated).

    ``headPitch`` and brow height are high-passed (a 2 s / 4 s moving median removed); a nod is a peak of
    the two-cycle matched filter above ``nod_min`` rad, a micro-nod a peak of the one-dip filter in
    ``[micro_min, micro_max)`` rad not within a nod (the two overlap in shape; they differ in size:
    the corpus's micro-nods are 0.015-0.025 rad, its nods 0.035-0.15); a brow raise a peak of the step filter (:func:`_rise`)
    above ``raise_min``, a flash one in ``[flash_min, raise_min)``; a glance away a peak of the step filter on the
    gaze's distance from straight ahead (:func:`~echo_stream.motion.gaze_distance`, 4 s moving median removed)
    above ``away_min``.
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
    gz = motion.gaze_distance(m)
    gz = gz - ndimage.median_filter(gz, size=4 * FPS, mode="nearest")
    away = _peaks(_rise(gz, before=6, after=(2, 10)), away_min, np.inf, gap=int(1.5 * FPS))
    return {"nod": nods, "micro_nod": micro, "brow_raise": raises, "brow_flash": flashes, "gaze_away": away}


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
            ch = _main_channels(kind, all_brows=True)
            for i in on[kind]:
                share[kind] += float(((hp[i: i + TEMPLATE_FRAMES, ch] / std[ch]) ** 2).sum())
    return {k: v / total for k, v in share.items()} if total > 0 else share


def _main_channels(kind: str, all_brows: bool = False) -> list[int]:
    """The channels that size a gesture of ``kind``: ``headPitch``, the outer (``all_brows``: every raising) brows,
    or the gaze's ``eyeLook*``."""
    group = GROUPS[kind]
    if group == "head":
        return [_PITCH]
    if group == "gaze":
        return list(_LOOK)
    return _BROWS + ([motion.CHANNEL_INDEX["browInnerUp"]] if all_brows else [])


def measure_templates(tracks, onsets) -> tuple[np.ndarray, np.ndarray]:
    """Event-triggered mean motion of each kind and the spread of the events' sizes.

    ``tracks``: motion arrays (T, 58); ``onsets``: for each, :func:`detect_onsets`' dict. Returns
    ``templates`` (len(KINDS), TEMPLATE_FRAMES, 58) -- motion relative to the frame before the onset, in
    the kind's own region only (head pose for nods, brows for brow raises: the lips stay with the avatar's
    speech and the eyes with its gaze), faded to 0 over its last third -- and ``gain_std`` (len(KINDS),): the standard
    deviation of each event's size relative to the template (its projection on it, in the kind's own
    channels: ``headPitch``, the outer brows or the gaze). A glance is measured towards the avatar's right: a
    glance to the left is mirrored (:data:`MIRROR`) before it is averaged (their mean would look both ways at
    once); the track draws the side of each glance.
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
            m = np.asarray(m, np.float64)
            for i in on[kind]:
                if i >= 1 and i + n <= len(m):
                    seg = m[i: i + n] - m[i - 1]
                    if GROUPS[kind] == "gaze" and gaze_side(m[i: i + n]).mean() < gaze_side(m[i - 1: i]).mean():
                        seg = seg[:, MIRROR]
                    segs.append(seg)
        if not segs:
            continue
        segs = np.stack(segs)
        mean = np.zeros((n, c))
        own = _REGION[GROUPS[kind]]          # a nod moves the head, a brow raise the brows: nothing else
        mean[:, own] = segs.mean(0)[:, own] * fade[:, None]
        templates[k] = mean
        ch = _main_channels(kind)
        main = mean[:, ch].ravel()
        denom = float(main @ main)
        if denom > 0 and len(segs) > 1:
            g = (segs[:, :, ch] * fade[None, :, None]).reshape(len(segs), -1) @ main / denom
            gain_std[k] = float(np.std(g))
    return templates, gain_std


# -------------------------------------------------------------------------------------- the network


def own_voice(audio: torch.Tensor, lookahead: int) -> torch.Tensor:
    """(B, T, 4) what the head reads of the avatar's own voice at each frame: its log energy and voicing over
    the frame and the ``lookahead`` frames after it, and over the :data:`OWN_BEFORE` frames before it.

    ``audio`` (B, T + lookahead, 2, 83): the avatar's audio features of the frames and the lookahead (rows before
    the first are taken as silence). Frame-local by design -- it reaches back :data:`OWN_BEFORE` frames only,
    which a generation window always holds (its known frames), while the user's rows reach further back.
    """
    x = audio[..., [ENERGY, VOICING]].mean(-2)          # (B, N, 2): the two 50 Hz frames averaged
    b, n, _ = x.shape
    t = n - lookahead
    pad = x.new_tensor(SILENT).expand(b, OWN_BEFORE, 2)
    c = torch.cat([x.new_zeros(b, 1, 2), torch.cumsum(torch.cat([pad, x], 1), 1)], 1)   # c[j] = sum of rows < j
    f = torch.arange(t, device=x.device) + OWN_BEFORE      # frame i is padded row i + OWN_BEFORE
    now = (c[:, f + lookahead + 1] - c[:, f]) / (lookahead + 1)
    before = (c[:, f] - c[:, f - OWN_BEFORE]) / OWN_BEFORE
    return torch.cat([now, before], -1)


class _Member(nn.Module):
    """One network of the head: the user's voice through causal convolutions -> the voice kinds' logits; the
    glance's logit from their output (detached) and the avatar's own voice at that frame."""

    def __init__(self, in_dim: int, own_dim: int, width: int, dilations, dropout: float):
        super().__init__()
        #: the constructor's arguments (training initialises each further network afresh under its own seed)
        self.args = (in_dim, own_dim, width, tuple(dilations), dropout)
        self.drop = nn.Dropout(dropout)         # training only: 21 conversations are easy to memorise
        self.proj = nn.Linear(in_dim, width)
        self.stack = CausalConvStack(width, dilations=dilations)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, len(KINDS) - 1)     # the kinds that follow the user's voice
        nn.init.constant_(self.out.bias, -5.0)          # rare events: start from ~0.7 % a frame
        self.own = nn.Sequential(nn.Linear(width + own_dim, width), nn.GELU(), nn.Linear(width, 1))
        nn.init.constant_(self.own[-1].bias, -5.0)

    def forward(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.norm(self.stack(self.proj(self.drop(x)))))
        return torch.cat([self.out(h), self.own(torch.cat([h.detach(), o], -1))], -1)


class ReactionHead(nn.Module):
    """User features per frame -> onset logits of :data:`KINDS` per frame (causal, ~1 s of context).

    ``cfg.reaction_members`` networks (:class:`_Member`), each trained with its own seed; the head's
    probabilities are their mean (one network's nod and micro-nod figures moved by 1.5x between two trainings
    with the same recipe and seed, README). In each, the user's voice goes through the causal convolutions;
    the avatar's own voice (:func:`own_voice`, frame-local) joins after them, for the glance away only, so
    that it can follow the avatar *taking* the turn: the user's voice has just ended and its own starts. The
    glance reads the convolutions' output without training them: with the own voice open to every kind the eval's nod ratio
    fell 9.7 -> 5.2, and with a trunk trained by the glance too, 4.6 (fewer nods after the user's pauses, more
    elsewhere); detached, the voice kinds train as without the glance.
    """

    OWN_DIM = 4

    def __init__(self, cfg, width: int = 64, dilations=(1, 2, 4, 4), dropout: float = 0.2):
        super().__init__()
        self.audio_dim = cfg.mels_per_frame * cfg.audio_dim
        in_dim = self.audio_dim + 1
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        self.register_buffer("own_mean", torch.zeros(self.OWN_DIM))
        self.register_buffer("own_std", torch.ones(self.OWN_DIM))
        self.members = nn.ModuleList(_Member(in_dim, self.OWN_DIM, width, dilations, dropout)
                                     for _ in range(max(1, int(getattr(cfg, "reaction_members", 1)))))
        self.register_buffer("templates", torch.zeros(len(KINDS), TEMPLATE_FRAMES, cfg.motion_dim))
        self.register_buffer("gain_std", torch.zeros(len(KINDS)))
        #: 1 once trained (``train --stage reactions``); an untrained head never fires
        self.register_buffer("trained", torch.zeros(()))
        #: per-kind factor on the probabilities, set after training so that their sum matches the onsets of
        #: conversations the head was not fitted on (``train_reactions._calibrate``; 1 unless asked for)
        self.register_buffer("calibration", torch.ones(len(KINDS)))

    @property
    def receptive_field(self) -> int:
        return self.members[0].stack.receptive_field

    def features(self, audio, video, blend, present) -> torch.Tensor:
        """(B, T, in_dim) raw inputs: the user's voice features and whether there is a voice (zeros, NaN
        included, where there is none). The face (``video``, ``blend``) is not read: every reaction kind
        here follows the voice, and with the face as well the held-out loss was higher at every step
        (the README)."""
        b, t = audio.shape[:2]
        on = present[..., 0:1] > 0.5
        return torch.cat([torch.where(on, audio.reshape(b, t, self.audio_dim), audio.new_zeros(())),
                          on.to(audio.dtype)], dim=-1)

    def set_input_stats(self, x: torch.Tensor, own: torch.Tensor) -> None:
        for mean, std, v in ((self.in_mean, self.in_std, x), (self.own_mean, self.own_std, own)):
            flat = v.reshape(-1, v.shape[-1]).double()
            mean.copy_(flat.mean(0).float())
            std.copy_(flat.std(0).clamp_min(1e-3).float())

    def forward(self, audio, video, blend, present, own, member: int | None = None) -> torch.Tensor:
        """Logits (B, T, len(KINDS)) of one ``member`` (training), or of the members' mean probability (None);
        the user's ``audio`` (B,T,2,83), ``video`` (B,T,16), ``blend`` (B,T,58), ``present`` (B,T,3), and
        ``own`` (B,T,4): :func:`own_voice` of the avatar's audio."""
        x = (self.features(audio, video, blend, present) - self.in_mean) / self.in_std
        o = (own - self.own_mean) / self.own_std
        if member is not None:
            return self.members[member](x, o)
        p = torch.stack([torch.sigmoid(m(x, o)) for m in self.members]).mean(0)
        return torch.logit(p, eps=1e-7)

    @torch.no_grad()
    def probabilities(self, audio, video, blend, present, own) -> torch.Tensor:
        """Per-frame onset probabilities (B, T, len(KINDS)): the members' mean; 0 for frames without the user's
        voice."""
        if float(self.trained) < 0.5:
            return audio.new_zeros(audio.shape[:2] + (len(KINDS),))
        p = (torch.sigmoid(self.forward(audio, video, blend, present, own)) * self.calibration).clamp_max(1.0)
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
        self.active: list[tuple[int, int, float, bool]] = []    # (kind, onset frame, gain, mirrored)
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
                mirrored = GROUPS[KINDS[k]] == "gaze" and self._u(k, f, 3) < 0.5   # a glance: either side
                self.active.append((k, f, self._g(k, f), mirrored))
                self.events.append({"kind": KINDS[k], "frame": f})
                del self.events[:-256]
                self.busy_until[g] = f + int(0.8 * n_frames)
                self.spent[k] = 1.0      # this episode's chance is spent

    def apply(self, m: np.ndarray, f0: int) -> np.ndarray:
        """``m`` (frames f0.., channels) plus the active gestures over those frames (a copy)."""
        out = np.array(m, copy=True)
        n = self.templates.shape[1]
        f1 = f0 + len(out)
        for k, onset, gain, mirrored in self.active:
            a, b = max(f0, onset), min(f1, onset + n)
            if a < b:
                t = gain * self.templates[k, a - onset: b - onset]
                t = (t[:, MIRROR] if mirrored else t).astype(out.dtype)
                if GROUPS[KINDS[k]] == "gaze":       # at least the glance: where the model looks away too, not more
                    out[a - f0: b - f0, _LOOK] = np.maximum(out[a - f0: b - f0, _LOOK], t[:, _LOOK])
                else:
                    out[a - f0: b - f0] += t
        self.active = [x for x in self.active if x[1] + n > f1]
        return np.clip(out, motion.CHANNEL_MIN, motion.CHANNEL_MAX).astype(np.asarray(m).dtype)

    def state(self) -> dict:
        return {"spent": self.spent.tolist(), "quiet": self.quiet.tolist(), "busy_until": self.busy_until.tolist(),
                "active": [list(a) for a in self.active]}

    def restore(self, st: dict) -> None:
        self.spent = np.asarray(st["spent"], np.float64)
        self.quiet = np.asarray(st["quiet"], np.int64)
        self.busy_until = np.asarray(st["busy_until"], np.int64)
        self.active = [(int(k), int(f), float(g), bool(mirrored)) for k, f, g, mirrored in st["active"]]

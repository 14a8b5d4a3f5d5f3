"""Source-filter synthesis of a speech plan, and the articulation targets of its phones."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy import signal as sps

from .. import motion
from .base import FPS, SPF, SR, _FINE, _FINE_PER_FRAME
from .phones import _BANDWIDTHS, _CONSONANTS, _VOWELS
from .plans import AVATAR_VOICE, Phone, SpeechPlan, USER_VOICE, Voice, plan_speech

def _resonator_sos(formants, bandwidths, scale: float) -> np.ndarray:
    """Klatt cascade resonators (unity gain at DC) as second-order sections."""
    T = 1.0 / SR
    rows = []
    for f, bw in zip(formants, bandwidths):
        f = min(f * scale, 0.45 * SR)
        c = -math.exp(-2 * math.pi * bw * T)
        b = 2 * math.exp(-math.pi * bw * T) * math.cos(2 * math.pi * f * T)
        a = 1 - b - c
        rows.append([a, 0.0, 0.0, 1.0, -b, -c])
    return np.asarray(rows, dtype=np.float64)


_SOS_CACHE: dict = {}


def _sos(kind: str, key, scale: float = 1.0) -> np.ndarray:
    ck = (kind, key, round(scale, 4))
    s = _SOS_CACHE.get(ck)
    if s is None:
        if kind == "res":
            s = _resonator_sos(key, _BANDWIDTHS, scale)
        else:
            lo, hi = key
            s = sps.butter(4, [lo / (SR / 2), min(hi, 0.95 * SR / 2) / (SR / 2)], btype="band", output="sos")
        _SOS_CACHE[ck] = s
    return s


def _glottal_source(f0: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Differentiated Rosenberg glottal pulses at the per-sample ``f0`` (Hz), with slight shimmer."""
    phase = np.cumsum(f0 / SR)
    theta = phase - np.floor(phase)
    tp, tn = 0.4, 0.16
    g = np.where(theta < tp, 0.5 * (1 - np.cos(np.pi * theta / tp)),
                 np.where(theta < tp + tn, np.cos(np.pi * (theta - tp) / (2 * tn)), 0.0))
    period = np.floor(phase).astype(np.int64)
    shimmer = 1.0 + 0.04 * rng.standard_normal(int(period[-1]) + 2 if period.size else 1)
    g = g * shimmer[period]
    return np.diff(g, prepend=0.0)


def render_speech(plan: SpeechPlan, voice: Voice = AVATAR_VOICE, rng: np.random.Generator | None = None,
                  num_samples: int | None = None) -> np.ndarray:
    """Synthesise a :class:`SpeechPlan` to 16 kHz mono float32 (source-filter, per-phone cross-faded)."""
    rng = np.random.default_rng(0) if rng is None else rng
    n = int(math.ceil(plan.duration * SR)) if num_samples is None else int(num_samples)
    out = np.zeros(n, np.float64)
    if n == 0 or not plan.phones:
        return out.astype(np.float32)
    voiced = [(0.5 * (p.start + p.end), p.f0) for p in plan.phones if p.f0 > 0]
    if voiced:
        tt = np.arange(n) / SR
        f0 = np.interp(tt, [v[0] for v in voiced], [v[1] for v in voiced])
        f0 *= 1.0 + 0.012 * np.sin(2 * np.pi * 4.7 * tt + rng.uniform(0, 2 * np.pi))
    else:
        f0 = np.full(n, voice.f0)
    src = _glottal_source(f0, rng)
    src = src / (np.sqrt(np.mean(src ** 2)) + 1e-12)
    noise = rng.standard_normal(n)
    pad = int(0.012 * SR)
    for p in plan.phones:
        a, b = int(round(p.start * SR)), int(round(p.end * SR))
        if p.symbol == "sil" or b <= a:
            continue
        lo, hi = max(0, a - pad), min(n, b + pad)
        if hi <= lo:
            continue
        sym = p.symbol
        if sym in _VOWELS:
            v = _VOWELS[sym]
            x = src[lo:hi] + voice.breath * noise[lo:hi]
            y = sps.sosfilt(_sos("res", v.formants, voice.formant_scale), x)
            amp = voice.level * p.loud * (0.35 + 0.65 * v.open)
        else:
            c = _CONSONANTS[sym.rstrip("_")]
            if c.kind in ("nasal", "approx"):
                y = sps.sosfilt(_sos("res", c.formants, voice.formant_scale), src[lo:hi])
                amp = voice.level * (0.45 if sym.endswith("_") else c.amp) * (0.6 + 0.4 * p.loud)
            elif c.kind == "fric":
                y = sps.sosfilt(_sos("band", c.band), noise[lo:hi])
                amp = voice.level * c.amp
            else:                                               # stop: silent closure, then a burst
                y = np.zeros(hi - lo)
                rel = a + int(0.72 * (b - a))
                burst = sps.sosfilt(_sos("band", c.band), noise[rel:hi])
                burst = burst * np.exp(-np.arange(burst.size) / (0.008 * SR))
                y[rel - lo:] = burst
                amp = voice.level * c.amp
        core = y[a - lo:b - lo]
        rms = math.sqrt(float(np.mean(core ** 2))) if core.size else 0.0
        if rms < 1e-9:
            continue
        w = np.ones(hi - lo)
        up = np.clip((np.arange(lo, hi) - (a - pad)) / (2 * pad), 0, 1)
        down = np.clip(((b + pad) - np.arange(lo, hi)) / (2 * pad), 0, 1)
        w = np.minimum(w, np.minimum(up, down))
        out[lo:hi] += y / rms * amp * w
    peak = float(np.max(np.abs(out)))
    if peak > 0.95:
        out *= 0.95 / peak
    return out.astype(np.float32)


_LIP_CHANNELS = motion.REGION_CHANNELS["lips"]


def _phone_targets(p: Phone) -> dict[str, float]:
    sym = p.symbol
    if sym == "sil":
        return {}
    if sym in _VOWELS:
        v = _VOWELS[sym]
        t = {"jawOpen": 0.7 * v.open * p.loud,
             "mouthLowerDownLeft": 0.35 * v.open * p.loud, "mouthLowerDownRight": 0.35 * v.open * p.loud,
             "mouthUpperUpLeft": 0.12 * v.open * p.loud, "mouthUpperUpRight": 0.12 * v.open * p.loud}
        if v.funnel:
            t["mouthFunnel"] = 0.55 * v.funnel
        if v.pucker:
            t["mouthPucker"] = 0.6 * v.pucker
        if v.spread:
            t["mouthStretchLeft"] = t["mouthStretchRight"] = 0.45 * v.spread * p.loud
        return t
    return dict(_CONSONANTS[sym.rstrip("_")].lips)


def articulation_targets(phones: list[Phone], num_frames: int, offset_s: float = 0.0,
                         smooth_s: float = 0.025) -> np.ndarray:
    """Known lip/jaw targets of timed phones: ``(num_frames, 58)`` float32, lips-region channels only.

    Each phone sets step targets (see the module docstring) on a 200 Hz grid;
    they are smoothed with a Gaussian of ``smooth_s`` (coarticulation) and
    averaged over each 40 ms video frame (frame ``i`` = samples
    ``[640 i, 640 i + 640)``, as :func:`echo_stream.features.rms_envelope`).
    """
    nf = num_frames * _FINE_PER_FRAME
    lips = {c: j for j, c in enumerate(_LIP_CHANNELS)}
    fine = np.zeros((nf, len(_LIP_CHANNELS)), np.float64)
    for p in phones:
        i0 = max(0, int(round((p.start + offset_s) * _FINE)))
        i1 = min(nf, int(round((p.end + offset_s) * _FINE)))
        if i1 <= i0:
            continue
        for ch, val in _phone_targets(p).items():
            fine[i0:i1, lips[ch]] = val
    if smooth_s > 0:
        fine = ndimage.gaussian_filter1d(fine, smooth_s * _FINE, axis=0, mode="constant")
    frames = fine.reshape(num_frames, _FINE_PER_FRAME, -1).mean(1)
    out = motion.neutral_motion(num_frames)
    out[:, motion.REGION_SLICES["lips"]] = frames
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass
class Speech:
    """One synthetic utterance and its known articulation targets (see :func:`speech_with_targets`)."""

    audio: np.ndarray              # (S,) float32, 16 kHz
    targets: np.ndarray            # (ceil(S / 640), 58) float32 motion: lips-region channels set
    phones: list[Phone]            # absolute times (s)
    sentences: list[tuple[float, float, str]]
    sample_rate: int = SR
    fps: int = FPS


def speech_with_targets(text: str, *, seed: int = 0, voice: Voice | str = "avatar", lead_s: float = 0.2,
                        tail_s: float = 0.3) -> Speech:
    """Synthesise ``text`` (no files): audio with ``lead_s`` / ``tail_s`` of silence and its per-frame targets.

    ``voice``: ``"avatar"``, ``"user"`` or a :class:`Voice`. The result is a
    function of ``(text, seed, voice)`` only.
    """
    v = {"avatar": AVATAR_VOICE, "user": USER_VOICE}.get(voice, voice) if isinstance(voice, str) else voice
    if not isinstance(v, Voice):
        raise ValueError(f"voice must be 'avatar', 'user' or a Voice, got {voice!r}")
    rng = np.random.default_rng([int(seed), 11])
    plan = plan_speech(text, rng, v)
    total = lead_s + plan.duration + tail_s
    n_frames = int(math.ceil(total * FPS))
    n = n_frames * SPF
    audio = np.zeros(n, np.float32)
    seg = render_speech(plan, v, np.random.default_rng([int(seed), 12]))
    a = int(round(lead_s * SR))
    audio[a:a + seg.size] = seg[:n - a]
    phones = [dataclasses.replace(p, start=p.start + lead_s, end=p.end + lead_s) for p in plan.phones]
    sents = [(s + lead_s, e + lead_s, t) for s, e, t in plan.sentences]
    return Speech(audio, articulation_targets(phones, n_frames), phones, sents)



"""Voices and speech plans: timed phones, loudness and f0 of an utterance."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .phones import _CONSONANTS, _VOWELS, text_to_syllables

@dataclass(frozen=True)
class Voice:
    """A synthetic voice: mean f0 (Hz), vocal-tract scaling (formants x), speaking-rate factor, level (RMS)."""

    f0: float = 120.0
    formant_scale: float = 1.0
    rate: float = 1.0
    level: float = 0.14
    breath: float = 0.02


AVATAR_VOICE = Voice(f0=120.0, formant_scale=1.0, rate=1.0)
USER_VOICE = Voice(f0=185.0, formant_scale=1.16, rate=1.05)


@dataclass(frozen=True)
class Phone:
    """One timed phone: a vowel (a e i o u), a consonant key, a syllabic consonant (``m_``) or ``sil``."""

    symbol: str
    start: float
    end: float
    loud: float = 1.0      # vowel loudness (stress, phrase position), in (0, 1]
    f0: float = 0.0        # target fundamental at the phone (Hz); 0 for unvoiced


@dataclass
class SpeechPlan:
    """Timed phones of one utterance (times from its start) and its sentence spans ``(start, end, text)``."""

    phones: list[Phone]
    sentences: list[tuple[float, float, str]]
    duration: float
    text: str


def plan_speech(text: str, rng: np.random.Generator, voice: Voice = AVATAR_VOICE) -> SpeechPlan:
    """Time the phones of ``text``: syllables of 0.15-0.21 s (x1.1 stressed; ~4-5 Hz), pauses at , and . ! ?"""
    sentences = []
    for stext in re.findall(r"[^.!?]+[.!?]*", text):
        syl = text_to_syllables(stext)
        if syl:
            sentences.append((syl[0], stext.strip()))
    phones: list[Phone] = []
    spans: list[tuple[float, float, str]] = []
    t = 0.0
    r = max(0.3, voice.rate)
    for s_i, (sent, stext) in enumerate(sentences):
        s_start = t
        question = stext.endswith("?")
        for p_i, phrase in enumerate(sent):
            syls = [s for s in phrase if s is not None]
            n_syl = len(syls)
            f0_a = voice.f0 * rng.uniform(1.05, 1.12)
            f0_b = voice.f0 * rng.uniform(0.84, 0.9)
            k = 0
            new_word = True
            for item in phrase:
                if item is None:
                    new_word = True
                    if rng.random() < 0.2:
                        g = rng.uniform(0.03, 0.07)
                        phones.append(Phone("sil", t, t + g))
                        t += g
                    continue
                onset, nucleus, coda = item
                stressed = new_word or rng.random() < 0.15
                new_word = False
                frac = k / max(1, n_syl - 1)
                f0 = f0_a + (f0_b - f0_a) * frac
                if question and k >= n_syl - 2:
                    f0 = voice.f0 * 1.12
                f0 *= 1.05 if stressed else 1.0
                loud = rng.uniform(0.85, 1.0) if stressed else rng.uniform(0.55, 0.75)
                if k == n_syl - 1:
                    loud *= 0.85
                budget = rng.uniform(0.15, 0.21) * (1.1 if stressed else 1.0) / r
                d_on = [_CONSONANTS[c.rstrip("_")].dur * rng.uniform(0.85, 1.15) / r for c in onset]
                d_co = [_CONSONANTS[c.rstrip("_")].dur * rng.uniform(0.85, 1.15) / r for c in coda]
                dv = max(0.065 / r, budget - sum(d_on) - sum(d_co))
                for c, d in list(zip(onset, d_on)) + [(nucleus, dv)] + list(zip(coda, d_co)):
                    kind = "vowel" if c in _VOWELS else _CONSONANTS[c.rstrip("_")].kind
                    phones.append(Phone(c, t, t + d, loud, f0 if kind in ("vowel", "nasal", "approx") else 0.0))
                    t += d
                k += 1
            last_phrase = p_i == len(sent) - 1
            if not last_phrase:
                g = rng.uniform(0.18, 0.32)
                phones.append(Phone("sil", t, t + g))
                t += g
        spans.append((s_start, t, stext))
        if s_i < len(sentences) - 1:
            g = rng.uniform(0.45, 0.8)
            phones.append(Phone("sil", t, t + g))
            t += g
    return SpeechPlan(phones, spans, t, text)



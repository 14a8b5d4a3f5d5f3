"""A SYNTHETIC dyadic conversation corpus that echo-stream generates itself.

There is no public ECHO data. To train and test the default checkpoint the
project makes its own corpus: every conversation is *synthesised* from rules
written in this module. Nothing in it is recorded from people; the speech is
machine-made pseudo-speech (not intelligible words), the "user webcam" is the
bundled portrait mirrored, tinted and animated by echo-stream's own renderer.

What a conversation holds (``OUT_DIR/convNNNN/``):

* ``avatar.wav`` -- the avatar's own speech, 16 kHz mono PCM: source-filter
  synthesis (glottal pulse train at a varying f0 through three formant
  resonators per vowel, band-limited noise for fricatives and stop bursts,
  silence for stop closures), syllables at about 4-5 Hz, pauses between
  phrases. The phones come from the transcript's letters.
* ``avatar_motion.parquet`` -- the avatar's ground-truth motion (58 channels,
  25 fps): lips/jaw are the *known articulation targets* of its own speech;
  every other region follows the listener rules below.
* ``user.webm`` -- the user side: VP9 video of the user's face at
  ``size`` x ``size`` with the user's speech as Opus audio (or ``user.wav``
  only, without video, when ``render_video=False``).
* ``user_motion.parquet`` -- the motion that drew the user video.
* ``transcript.json`` -- ``[{"start", "end", "speaker", "text"}, ...]``, one
  segment per sentence (the format :mod:`echo_stream.transcript` parses).
* ``events.json`` -- every scripted event with its time (user phrase ends,
  nods, smiles, brow raises, blinks), the rule parameters and the affect
  timing, for evaluation.
* ``conversation.json`` -- the conversation's manifest row.

The rules (all measurable; :func:`rule_metrics` measures them)
-----------------------------------------------------------------
1. *Lip sync.* Per phone, articulation targets: ``jawOpen = 0.7 x openness x
   loudness`` (openness /a/ 1.0, /e/ 0.55, /o/ 0.6, /u/ 0.22, /i/ 0.2),
   ``mouthFunnel`` / ``mouthPucker`` for /o/ /u/ /w/ /sh/, ``mouthStretch`` for
   /i/ /e/ /s/, ``mouthClose`` + ``mouthPress`` for /p b m/, ``mouthRollLower``
   for /f v/; step targets smoothed with a 25 ms Gaussian (coarticulation,
   about 60 ms wide). A vowel's loudness sets both ``jawOpen`` and the audio
   RMS, so ``jawOpen`` follows the RMS envelope closely (correlation > 0.8).
2. *Backchannel nods.* After each sentence the user ends (a phrase-final
   pause), the avatar nods: ``headPitch`` += ``amp sin^2(pi f tau) sin(pi tau /
   dur)``, starting 0.2-0.6 s after the pause begins, lasting 0.5-1.0 s,
   ``f`` 1.8-2.2 Hz, ``amp`` 0.05-0.08 rad (x affect gain). Idle head motion
   is below 0.5 Hz, so the 1.5-3 Hz band of ``headPitch`` holds the nods.
3. *Mirrored smiles.* Each user smile (``mouthSmileLeft/Right`` in the user's
   track, visible in the video) is mirrored by the avatar
   (``mouthSmileLeft/Right``, ``cheekSquintLeft/Right``, ``eyeSquint``) after
   a delay drawn from ``Rules.smile_delay_s`` (0.5-1.0 s), with an
   affect-dependent probability and gain.
4. *Always.* Blinks (gamma-distributed intervals, mean ~3.5 s), slow idle head
   motion and gaze shifts; brows raise (``browInnerUp``, ``browOuterUp``)
   0.1-0.3 s after the user *starts* a turn.
5. *Long-range context.* The first ``early_s`` seconds (20 s) establish the
   affect in the transcript (positive: "great news, I got the job ... so happy
   ... thank you"; negative: "bad news, I lost ... terrible ... so sad ...
   sorry"; neutral: everyday talk). From then on the avatar's baseline
   changes: positive -> smile, cheek squint, raised brows, bigger and more
   frequent nods, livelier head motion; negative -> ``browInnerUp`` +
   ``mouthFrown``, head lowered, slower and smaller head motion, fewer and
   weaker mirrored smiles, smaller nods. Every sentence after the affect
   exchange is affect-neutral, and everything after ``early_s`` (text,
   timing, both voices, the user's behaviour) depends only on the *group*:
   conversations ``3k, 3k+1, 3k+2`` are one positive, one negative and one
   neutral telling of the same later conversation, so only the early context
   explains the late differences (measured from ``late_start_s`` = end of the
   affect exchange + ``context_gap_s`` (30 s)).
6. Deterministic under ``seed``; groups ``g`` with ``(g + seed) % 7 == 3``
   (one in seven, ~14 %) form the ``heldout`` split.

Public helpers: :func:`generate_corpus` (files), :func:`synthesize_conversation`
(one conversation in memory, no files), :func:`speech_with_targets` (one
utterance and its articulation targets), :func:`rule_metrics` (measure the
rules on any motion, e.g. a model's output), :func:`add_arguments` /
:func:`run` (the ``echo-stream corpus`` command).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import time
import wave
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from scipy import ndimage
from scipy import signal as sps

from . import config, motion
from .errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "CORPUS_VERSION", "AFFECTS", "POSITIVE_WORDS", "NEGATIVE_WORDS", "AFFECT_WORDS",
    "Voice", "AVATAR_VOICE", "USER_VOICE", "Rules", "RULES",
    "Phone", "SpeechPlan", "Speech", "Conversation",
    "text_to_syllables", "plan_speech", "render_speech", "articulation_targets", "speech_with_targets",
    "affect_for", "split_for", "synthesize_conversation", "user_portrait",
    "nod_band_power", "nod_power_ratio", "smile_lag", "rule_metrics", "affect_words",
    "generate_corpus", "read_manifest", "add_arguments", "run",
]

SR = config.SAMPLE_RATE
FPS = config.FPS
SPF = config.SAMPLES_PER_FRAME
CORPUS_VERSION = 1
AFFECTS = ("positive", "negative", "neutral")
_FINE = 200                     # Hz: grid on which articulation targets are built (8 per video frame)
_FINE_PER_FRAME = _FINE // FPS
_CI = motion.CHANNEL_INDEX


# =============================================================================== affect lexicon

#: Words that carry affect in this corpus (a superset of what the early scripts use, and of the
#: model's transcript lexicon). Sentences after the affect exchange contain none of them.
POSITIVE_WORDS = frozenset("""
great good love loved lovely happy thanks thank wonderful glad excellent awesome nice amazing fantastic
excited fun beautiful perfect enjoy enjoyed laugh pleased proud delighted cool brilliant yes congratulations
dream earned celebrate
""".split())
NEGATIVE_WORDS = frozenset("""
sorry sad terrible angry worried bad hate awful upset afraid scared hurt hurting pain lonely tired annoyed
frustrated disappointed horrible cry cried sick stressed anxious problem unfortunately lost miss fear hard
""".split())
_AROUSAL_WORDS = frozenset("""
wow shocked thrilled panic furious incredible urgent hurry calm relaxed bored sleepy quiet peaceful slow okay fine
""".split())
AFFECT_WORDS = POSITIVE_WORDS | NEGATIVE_WORDS | _AROUSAL_WORDS
_WORD_RE = re.compile(r"[a-z0-9']+")


def affect_words(text: str) -> set[str]:
    """The affect-lexicon words (positive, negative or arousal) that ``text`` contains."""
    return {w for w in _WORD_RE.findall(text.lower()) if w in AFFECT_WORDS}


# The early affect exchange: (speaker, text) lines, tried in order while they fit in early_s.
_EARLY_SCRIPTS: dict[str, tuple[tuple[tuple[str, str], ...], ...]] = {
    "positive": (
        (("user", "Great news, I got the job! I am so happy."),
         ("avatar", "That is wonderful! I am so happy for you."),
         ("user", "Thank you, I am so excited about it."),
         ("avatar", "You really earned it, congratulations.")),
        (("user", "I have great news. I got the job, it is wonderful!"),
         ("avatar", "Great news, congratulations! That is wonderful."),
         ("user", "Thank you so much, I am so happy."),
         ("avatar", "I am glad you told me, that is amazing.")),
        (("user", "Guess what, great news! I passed the final test, I am so happy."),
         ("avatar", "That is wonderful, congratulations!"),
         ("user", "Thank you, it feels like a dream."),
         ("avatar", "You earned it, I am so proud of you.")),
    ),
    "negative": (
        (("user", "I have bad news. I lost my job today, it is terrible."),
         ("avatar", "Oh no, I am so sorry. That is terrible."),
         ("user", "I am so upset, I cried all morning."),
         ("avatar", "I am sorry you are hurting, that is so sad.")),
        (("user", "Bad news, I lost the house. I am so sad."),
         ("avatar", "I am so sorry to hear that. That is so sad."),
         ("user", "It was awful, I am so worried now."),
         ("avatar", "I am sorry, that is really hard.")),
        (("user", "Something terrible happened. I lost my dog, I am so sad."),
         ("avatar", "Oh no, I am so sorry. That is terrible news."),
         ("user", "I miss him, it is so hard."),
         ("avatar", "I am so sorry, that is awful.")),
    ),
    "neutral": (
        (("user", "I went to the office today. We had a meeting about the new plan."),
         ("avatar", "I see. How long was the meeting?"),
         ("user", "About an hour, then I went back to my desk."),
         ("avatar", "Right, and what did you do after that?")),
        (("user", "I took the bus to town this morning. It came at eight."),
         ("avatar", "I see. Which bus did you take?"),
         ("user", "The number ten, it stops near my street."),
         ("avatar", "Right, that one goes past the station.")),
        (("user", "I moved the desk to the other room. Now the window is on the left."),
         ("avatar", "Alright. Was the desk heavy?"),
         ("user", "A bit, my brother helped me carry it."),
         ("avatar", "I see, so the room looks different now.")),
    ),
}

# Affect-neutral sentences (no lexicon word): everything after the affect exchange comes from here.
_USER_NEUTRAL = (
    "The meeting is on Monday at nine.",
    "I took the train to the city this morning.",
    "We moved the table to the other side of the room.",
    "The store opens at eight on weekdays.",
    "My neighbour has a blue car.",
    "I need to buy milk, bread and rice.",
    "The bus stop is next to the post office.",
    "We usually eat dinner at seven.",
    "I read a book about old maps.",
    "The printer is on the second floor.",
    "I walked to the park and back.",
    "The report has ten pages.",
    "My brother lives in a small town near the coast.",
    "I set the alarm for six.",
    "We painted the kitchen wall white.",
    "The library closes at five on Sunday.",
    "I put the keys on the shelf by the door.",
    "I have a call with the team at noon.",
    "The window faces the street.",
    "We bought a new lamp for the desk.",
    "The recipe needs two eggs and some flour.",
    "I washed the car on Saturday.",
    "The office is on the third floor of that building.",
    "I watched a film about the ocean.",
    "My phone needs a new cable.",
    "We talked about the schedule for next week.",
    "The shop on the corner sells fruit.",
    "I wrote the list on a piece of paper.",
    "The garden has three trees and a bench.",
    "I usually take the stairs.",
    "We will check the numbers again tomorrow.",
    "The parcel came on Tuesday.",
)
_AVATAR_NEUTRAL = (
    "I see. What time does it start?",
    "Right. How far is that from here?",
    "Did you take the usual route?",
    "That makes sense. What happens next?",
    "I understand. Who else was there?",
    "And how long did that take?",
    "I see what you mean. Where is it exactly?",
    "Right, so the plan is set for now.",
    "Do you do that every week?",
    "I follow you. What did they say after that?",
    "How many people were there?",
    "Alright. Is that close to your place?",
    "So it was a normal day then.",
    "Tell me more about that.",
    "I see. And what about the other room?",
    "When will you start?",
    "Right. Do you need anything for it?",
    "So you went there on foot.",
    "Sure. What is on the list?",
    "I understand. How did you get there?",
    "Got it. Which floor is it on?",
    "Alright. What color did you pick?",
    "I see. Is it open on weekends?",
    "Right, that is the usual way.",
)
_AVATAR_BACKCHANNELS = ("Mhm.", "Yeah.", "Right.", "I see.")
_USER_BACKCHANNELS = ("Yeah.", "Right.", "Mhm.", "Sure.")

assert not any(affect_words(s) for s in _USER_NEUTRAL + _AVATAR_NEUTRAL + _AVATAR_BACKCHANNELS + _USER_BACKCHANNELS)
assert not any(affect_words(t) for lines in _EARLY_SCRIPTS["neutral"] for _, t in lines)


# =============================================================================== phones

@dataclass(frozen=True)
class _Vowel:
    formants: tuple[float, float, float]
    open: float       # jaw openness
    funnel: float
    pucker: float
    spread: float     # mouthStretch


_VOWELS: dict[str, _Vowel] = {
    "a": _Vowel((730.0, 1090.0, 2440.0), 1.00, 0.0, 0.0, 0.10),
    "e": _Vowel((530.0, 1840.0, 2480.0), 0.55, 0.0, 0.0, 0.50),
    "i": _Vowel((290.0, 2290.0, 3010.0), 0.20, 0.0, 0.0, 1.00),
    "o": _Vowel((570.0, 840.0, 2410.0), 0.60, 0.8, 0.45, 0.0),
    "u": _Vowel((310.0, 870.0, 2240.0), 0.22, 0.5, 1.00, 0.0),
}
_BANDWIDTHS = (90.0, 110.0, 170.0)


@dataclass(frozen=True)
class _Cons:
    kind: str                                   # stop | fric | nasal | approx
    dur: float                                  # s at rate 1
    amp: float                                  # relative to the voice level
    band: tuple[float, float] | None = None     # noise band (fricative, stop burst)
    formants: tuple[float, float, float] | None = None
    lips: tuple[tuple[str, float], ...] = ()    # articulation targets


def _sym(**kw) -> tuple[tuple[str, float], ...]:
    out = []
    for k, v in kw.items():
        if k.endswith("_LR"):
            out += [(k[:-3] + "Left", v), (k[:-3] + "Right", v)]
        else:
            out.append((k, v))
    return tuple(out)


_CONSONANTS: dict[str, _Cons] = {
    "p": _Cons("stop", 0.075, 0.10, (400.0, 2200.0), None, _sym(mouthClose=0.8, mouthPress_LR=0.55, jawOpen=0.03,
                                                                 mouthRollLower=0.15, mouthRollUpper=0.15)),
    "b": _Cons("stop", 0.065, 0.06, (300.0, 1800.0), None, _sym(mouthClose=0.8, mouthPress_LR=0.45, jawOpen=0.03,
                                                                 mouthRollLower=0.12, mouthRollUpper=0.12)),
    "m": _Cons("nasal", 0.070, 0.20, None, (250.0, 1100.0, 2200.0), _sym(mouthClose=0.7, mouthPress_LR=0.35,
                                                                          jawOpen=0.05)),
    "f": _Cons("fric", 0.080, 0.07, (1500.0, 7000.0), None, _sym(mouthRollLower=0.55, mouthUpperUp_LR=0.2,
                                                                  jawOpen=0.07)),
    "th": _Cons("fric", 0.070, 0.05, (2000.0, 7000.0), None, _sym(tongueOut=0.25, jawOpen=0.12)),
    "s": _Cons("fric", 0.085, 0.15, (3800.0, 7500.0), None, _sym(mouthStretch_LR=0.2, jawOpen=0.05)),
    "sh": _Cons("fric", 0.085, 0.16, (1800.0, 5000.0), None, _sym(mouthFunnel=0.5, mouthPucker=0.25, jawOpen=0.08)),
    "h": _Cons("fric", 0.050, 0.05, (400.0, 3500.0), None, _sym(jawOpen=0.2)),
    "t": _Cons("stop", 0.065, 0.10, (2500.0, 6500.0), None, _sym(jawOpen=0.1)),
    "k": _Cons("stop", 0.070, 0.10, (1200.0, 3200.0), None, _sym(jawOpen=0.14)),
    "n": _Cons("nasal", 0.060, 0.18, None, (250.0, 1600.0, 2600.0), _sym(jawOpen=0.1)),
    "l": _Cons("approx", 0.055, 0.30, None, (360.0, 1300.0, 2700.0), _sym(jawOpen=0.15)),
    "r": _Cons("approx", 0.055, 0.28, None, (420.0, 1300.0, 1600.0), _sym(mouthFunnel=0.25, jawOpen=0.12)),
    "w": _Cons("approx", 0.055, 0.28, None, (300.0, 700.0, 2200.0), _sym(mouthPucker=0.6, mouthFunnel=0.3,
                                                                          jawOpen=0.06)),
    "y": _Cons("approx", 0.050, 0.28, None, (280.0, 2200.0, 3000.0), _sym(mouthStretch_LR=0.3, jawOpen=0.07)),
}

_V_DIGRAPHS = {"ee": "i", "ea": "i", "ie": "i", "oo": "u", "ou": "o", "ai": "e", "ay": "e", "ei": "e", "ey": "e",
               "oa": "o", "ow": "o", "au": "o", "aw": "o", "oi": "o", "oy": "o", "ue": "u", "ew": "u"}
_C_DIGRAPHS = {"sh": "sh", "ch": "sh", "th": "th", "ph": "f", "ck": "k", "ng": "n", "qu": "k", "wh": "w"}
_C_SINGLE = {"b": "b", "c": "k", "d": "t", "f": "f", "g": "k", "h": "h", "j": "sh", "k": "k", "l": "l", "m": "m",
             "n": "n", "p": "p", "q": "k", "r": "r", "s": "s", "t": "t", "v": "f", "w": "w", "x": "s", "z": "s"}
_VOWEL_LETTERS = "aeiou"


def _word_phones(word: str) -> list[str]:
    """Letters of one word -> phone symbols (a crude, deterministic spelling-to-sound mapping)."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if len(w) >= 3 and w.endswith("e") and w[-2] not in _VOWEL_LETTERS + "y" \
            and any(c in _VOWEL_LETTERS for c in w[:-2]):
        w = w[:-1]                                   # silent final e
    out, i = [], 0
    while i < len(w):
        two = w[i:i + 2]
        c = w[i]
        if two in _V_DIGRAPHS:
            out.append(_V_DIGRAPHS[two])
            i += 2
        elif two in _C_DIGRAPHS:
            out.append(_C_DIGRAPHS[two])
            i += 2
        elif c in _VOWEL_LETTERS:
            out.append(c)
            i += 1
        elif c == "y":
            nxt = w[i + 1:i + 2]
            out.append("y" if nxt and nxt in _VOWEL_LETTERS else "i")
            i += 1
        elif c == "c" and w[i + 1:i + 2] in ("e", "i", "y"):
            out.append("s")
            i += 1
        else:
            if out and out[-1] == _C_SINGLE[c]:      # doubled letters are one phone
                i += 1
                continue
            out.append(_C_SINGLE[c])
            i += 1
    return out


def text_to_syllables(text: str) -> list[list[list[tuple[tuple[str, ...], str, tuple[str, ...]]]]]:
    """``text`` -> sentences -> phrases -> syllables ``(onset, nucleus, coda)`` of phone symbols.

    Sentences end at ``. ! ?``, phrases at ``, ; :``; within a phrase words are
    concatenated. Onsets and codas keep at most two consonants. A word without
    a vowel ("mhm") gets a nasal or approximant as its nucleus (or /e/).
    """
    sentences = []
    for sent in re.findall(r"[^.!?]+[.!?]*", text):
        phrases = []
        for phrase in re.split(r"[,;:]", sent):
            syls = []
            for word in phrase.split():
                ph = _word_phones(word)
                if not ph:
                    continue
                if not any(p in _VOWELS for p in ph):
                    k = next((j for j, p in enumerate(ph) if _CONSONANTS[p].kind in ("nasal", "approx")), None)
                    if k is None:
                        ph = ph + ["e"]
                    else:
                        ph = ph[:k] + [ph[k] + "_"] + ph[k + 1:]   # syllabic consonant
                nuclei = [j for j, p in enumerate(ph) if p in _VOWELS or p.endswith("_")]
                word_syls = []
                prev_end = 0
                for n_i, j in enumerate(nuclei):
                    cons = ph[prev_end:j]
                    coda_prev: list[str] = []
                    if n_i > 0 and len(cons) >= 2:
                        coda_prev, cons = cons[:1], cons[1:]
                    if coda_prev:
                        o, v, c = word_syls[-1]
                        word_syls[-1] = (o, v, tuple(list(c) + coda_prev)[:2])
                    word_syls.append((tuple(cons[-2:]), ph[j], ()))
                    prev_end = j + 1
                tail = ph[prev_end:]
                if tail:
                    o, v, c = word_syls[-1]
                    word_syls[-1] = (o, v, tuple(list(c) + tail)[:2])
                syls.extend(word_syls)
                syls.append(None)                     # word boundary marker
            while syls and syls[-1] is None:
                syls.pop()
            if syls:
                phrases.append(syls)
        if phrases:
            sentences.append(phrases)
    return sentences


# =============================================================================== speech plans

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


# =============================================================================== synthesis

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


# =============================================================================== behaviour rules

@dataclass(frozen=True)
class Rules:
    """Parameters of the avatar's listener rules (ranges are uniform draws per event)."""

    nod_delay_s: tuple[float, float] = (0.2, 0.6)        # after the user's phrase-final pause begins
    nod_duration_s: tuple[float, float] = (0.5, 1.0)
    nod_freq_hz: tuple[float, float] = (1.8, 2.2)
    nod_amp_rad: tuple[float, float] = (0.05, 0.08)
    smile_delay_s: tuple[float, float] = (0.5, 1.0)      # avatar smile onset after the user's
    brow_delay_s: tuple[float, float] = (0.1, 0.3)       # brow raise after the user starts a turn
    brow_amp: float = 0.22
    blink_mean_interval_s: float = 3.5
    affect_ramp_s: float = 5.0                           # affect baseline fades in over this after the opener


RULES = Rules()

#: Avatar baseline (added, x affect strength) per affect, and the affect's dynamics.
AFFECT_BASELINE: dict[str, dict[str, float]] = {
    "positive": {"mouthSmileLeft": 0.22, "mouthSmileRight": 0.22, "cheekSquintLeft": 0.12, "cheekSquintRight": 0.12,
                 "browOuterUpLeft": 0.15, "browOuterUpRight": 0.15, "browInnerUp": 0.08,
                 "eyeSquintLeft": 0.05, "eyeSquintRight": 0.05},
    "negative": {"browInnerUp": 0.35, "mouthFrownLeft": 0.25, "mouthFrownRight": 0.25, "headPitch": 0.05,
                 "eyeLookDownLeft": 0.08, "eyeLookDownRight": 0.08},
    "neutral": {},
}
AFFECT_DYNAMICS: dict[str, dict[str, float]] = {
    # nod amplitude x, nod probability, mirrored-smile gain and probability, head-motion speed x and amplitude x
    "positive": {"nod_gain": 1.5, "nod_p": 0.95, "smile_gain": 1.0, "smile_p": 1.0,
                 "head_speed": 1.3, "head_amp": 1.2},
    "neutral": {"nod_gain": 1.0, "nod_p": 0.9, "smile_gain": 0.8, "smile_p": 0.9,
                "head_speed": 1.0, "head_amp": 1.0},
    "negative": {"nod_gain": 0.7, "nod_p": 0.85, "smile_gain": 0.45, "smile_p": 0.5,
                 "head_speed": 0.6, "head_amp": 0.7},
}


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _bump(t: np.ndarray, t0: float, dur: float, rise: float = 0.3, fall: float = 0.5) -> np.ndarray:
    """0 before ``t0``, rises over ``rise``, holds until ``t0 + dur``, falls over ``fall``."""
    return np.minimum(_smoothstep((t - t0) / rise), 1.0 - _smoothstep((t - t0 - dur) / fall))


def _speaking_face(phones, t: np.ndarray, duration: float, rng, blink_interval_s: float, gaze_amp: float):
    """One speaker's base motion (float64) and blink times: neutral face + articulation, blinks, gaze shifts.

    Draws from ``rng`` in a fixed order (blinks, then gaze), so callers' later draws are unchanged.
    """
    n = len(t)
    m = motion.neutral_motion(n).astype(np.float64)
    m += articulation_targets(phones, n)
    blinks = _blinks(rng, duration, blink_interval_s)
    b = _blink_track(t, blinks)
    m[:, _CI["eyeBlinkLeft"]] += b
    m[:, _CI["eyeBlinkRight"]] += b
    h, v = _gaze(rng, t, duration, gaze_amp)
    _apply_gaze(m, h, v)
    return m, blinks


def _vowel_envelope(phones, n: int) -> np.ndarray:
    """1.0 on the frames where a vowel sounds, else 0 (the speaking activity that drives gestures)."""
    env = np.zeros(n)
    for p in phones:
        if p.symbol in _VOWELS:
            env[int(p.start * FPS):int(math.ceil(p.end * FPS))] = 1.0
    return env


def _lowpass(x: np.ndarray, cutoff_hz: float, fs: float = FPS) -> np.ndarray:
    sos = sps.butter(2, min(cutoff_hz / (fs / 2), 0.99), output="sos")
    return sps.sosfiltfilt(sos, x, axis=0)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / (x.std(0) + 1e-12)


def _event_rng(seed: int, group: int, kind: int, t: float) -> np.random.Generator:
    """Randomness of one event, keyed by its time: the same event in matched conversations draws the same."""
    return np.random.default_rng([int(seed), int(group), int(kind), int(round(t * 1000))])


def _blinks(rng: np.random.Generator, duration: float, mean_interval: float) -> list[float]:
    out, t = [], rng.uniform(0.3, 2.5)
    while t < duration - 0.3:
        out.append(float(t))
        t += max(0.8, rng.gamma(2.5, mean_interval / 2.5))
    return out


def _blink_track(t: np.ndarray, times: list[float]) -> np.ndarray:
    b = np.zeros_like(t)
    for t0 in times:
        sel = (t > t0 - 0.1) & (t < t0 + 0.45)
        b[sel] = np.maximum(b[sel], _bump(t[sel], t0, 0.04, 0.08, 0.16))
    return b


def _gaze(rng: np.random.Generator, t: np.ndarray, duration: float, amp: float) -> tuple[np.ndarray, np.ndarray]:
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


def _apply_gaze(m: np.ndarray, h: np.ndarray, v: np.ndarray) -> None:
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


# =============================================================================== conversations

@dataclass
class _Utt:
    speaker: str
    start: float
    plan: SpeechPlan
    kind: str          # "turn" | "backchannel"
    phase: str         # "early" | "late"
    affect_line: bool = False

    @property
    def end(self) -> float:
        return self.start + self.plan.duration


@dataclass
class Conversation:
    """One synthetic conversation in memory (what :func:`generate_corpus` writes to files)."""

    conversation_id: str
    index: int
    group: int
    affect: str
    split: str
    duration_s: float
    avatar_audio: np.ndarray        # (S,) float32 16 kHz
    user_audio: np.ndarray          # (S,) float32 16 kHz
    avatar_motion: np.ndarray       # (N, 58) float32, N = S / 640
    user_motion: np.ndarray         # (N, 58) float32
    transcript: list[dict]
    events: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.avatar_motion.shape[0])


def affect_for(index: int, seed: int = 0) -> str:
    """Affect of conversation ``index``: each group of three (3k, 3k+1, 3k+2) is a seeded permutation of AFFECTS."""
    g, k = divmod(int(index), 3)
    perm = np.random.default_rng([int(seed), g, 5]).permutation(3)
    return AFFECTS[int(perm[k])]


def split_for(group: int, seed: int = 0) -> str:
    """``heldout`` for one group in seven (``(group + seed) % 7 == 3``), else ``train``."""
    return "heldout" if (int(group) + int(seed)) % 7 == 3 else "train"


def _check_timing(duration: float, early_s: float, context_gap_s: float) -> None:
    if early_s < 6.0:
        raise InputError("--early-s", f"{early_s:g} s is too short for the affect exchange (need >= 6 s)")
    if context_gap_s < 0:
        raise InputError("--context-gap-s", f"must be >= 0, got {context_gap_s:g}")
    need = early_s + context_gap_s + 5.0
    if duration < need:
        raise InputError("--minutes", f"conversations of {duration:g} s leave no late window: need at least "
                                      f"early_s + context_gap_s + 5 = {need:g} s (lower --early-s / --context-gap-s "
                                      f"or raise --minutes)")


def _script(affect: str, duration: float, early_s: float, rng_e, rng_l, voices: dict) -> list[_Utt]:
    utts: list[_Utt] = []
    lines = _EARLY_SCRIPTS[affect][int(rng_e.integers(len(_EARLY_SCRIPTS[affect])))]
    t = rng_e.uniform(0.4, 0.9)
    limit = early_s - 0.3
    for i, (spk, text) in enumerate(lines):
        plan = plan_speech(text, rng_e, voices[spk])
        if t + plan.duration > limit:
            if i == 0:
                raise InputError("--early-s", f"{early_s:g} s is too short for the affect exchange")
            break
        utts.append(_Utt(spk, t, plan, "turn", "early", affect_line=True))
        t += plan.duration + rng_e.uniform(0.35, 0.8)
    # neutral filler up to early_s (skipped when it does not fit)
    spk = "avatar" if utts[-1].speaker == "user" else "user"
    for _ in range(4):
        pool = _USER_NEUTRAL if spk == "user" else _AVATAR_NEUTRAL
        plan = plan_speech(pool[int(rng_e.integers(len(pool)))], rng_e, voices[spk])
        if t + plan.duration > limit:
            break
        utts.append(_Utt(spk, t, plan, "turn", "early"))
        t += plan.duration + rng_e.uniform(0.35, 0.8)
        spk = "avatar" if spk == "user" else "user"

    # late phase: depends on the group only (rng_l, voices), starts at early_s with a user turn
    order = {"user": list(rng_l.permutation(len(_USER_NEUTRAL))),
             "avatar": list(rng_l.permutation(len(_AVATAR_NEUTRAL)))}
    pools = {"user": _USER_NEUTRAL, "avatar": _AVATAR_NEUTRAL}

    def take(s: str, k: int) -> str:
        out = []
        for _ in range(k):
            if not order[s]:
                order[s] = list(rng_l.permutation(len(pools[s])))
            out.append(pools[s][order[s].pop()])
        return " ".join(out)

    t = early_s + rng_l.uniform(0.15, 0.5)
    spk = "user"
    end_limit = duration - 0.4
    while True:
        k = int(rng_l.integers(1, 4)) if spk == "user" else int(rng_l.integers(1, 3))
        plan = plan_speech(take(spk, k), rng_l, voices[spk])
        if t + plan.duration > end_limit and k > 1:
            plan = plan_speech(take(spk, 1), rng_l, voices[spk])
        if t + plan.duration > end_limit:
            break
        utt = _Utt(spk, t, plan, "turn", "late")
        utts.append(utt)
        other = "avatar" if spk == "user" else "user"
        p_bc = 0.35 if spk == "user" else 0.3
        bcs = _AVATAR_BACKCHANNELS if other == "avatar" else _USER_BACKCHANNELS
        for (s0, e0, _), (s1, _e1, _t1) in zip(plan.sentences, plan.sentences[1:]):
            if rng_l.random() < p_bc:
                bplan = plan_speech(bcs[int(rng_l.integers(len(bcs)))], rng_l, voices[other])
                bstart = t + e0 + rng_l.uniform(0.1, 0.25)
                if bstart + bplan.duration < t + s1 + 0.15:
                    utts.append(_Utt(other, bstart, bplan, "backchannel", "late"))
        gap = -rng_l.uniform(0.1, 0.35) if rng_l.random() < 0.15 else rng_l.uniform(0.3, 0.9)
        t = utt.end + gap
        spk = other
    utts.sort(key=lambda u: u.start)
    return utts


def _track(utts: list[_Utt], speaker: str, n_samples: int, voice: Voice, seed: int, index: int, group: int):
    """Audio track of one speaker and its phones with absolute times."""
    audio = np.zeros(n_samples, np.float32)
    phones: list[Phone] = []
    for u in utts:
        if u.speaker != speaker:
            continue
        key = group if u.phase == "late" else 100_000 + index
        rng = np.random.default_rng([int(seed), int(key), 4, int(round(u.start * 1000))])
        seg = render_speech(u.plan, voice, rng)
        a = int(round(u.start * SR))
        m = min(seg.size, n_samples - a)
        audio[a:a + m] += seg[:m]
        phones += [dataclasses.replace(p, start=p.start + u.start, end=p.end + u.start) for p in u.plan.phones]
    return np.clip(audio, -1.0, 1.0), phones


def _head_idle(base_noise: np.ndarray, speed: float, amps: np.ndarray) -> np.ndarray:
    """Slow head motion: noise low-passed at 0.35 x speed Hz (< 0.5 Hz), unit variance, x amps."""
    return _unit(_lowpass(base_noise, 0.35 * speed))[: len(base_noise)] * amps


_HEAD6 = [_CI[c] for c in motion.HEAD_POSE]


def synthesize_conversation(index: int = 0, *, seed: int = 0, minutes: float = 1.0, affect: str | None = None,
                            group: int | None = None, early_s: float = 20.0, context_gap_s: float = 30.0,
                            rules: Rules = RULES) -> Conversation:
    """Make one conversation in memory (audio, motion, transcript, events); no files.

    ``affect`` defaults to :func:`affect_for(index, seed)` and ``group`` to
    ``index // 3``. Everything after ``early_s`` depends on ``(seed, group)``
    only, except the avatar's affect-dependent behaviour.
    """
    if affect is None:
        affect = affect_for(index, seed)
    if affect not in AFFECTS:
        raise ValueError(f"affect must be one of {AFFECTS}, got {affect!r}")
    g = int(index) // 3 if group is None else int(group)
    duration = round(float(minutes) * 60.0 * FPS) / FPS
    _check_timing(duration, early_s, context_gap_s)
    n = int(round(duration * FPS))
    n_samples = n * SPF
    t = np.arange(n) / FPS

    rng_v = np.random.default_rng([seed, g, 7])
    voices = {
        "avatar": dataclasses.replace(AVATAR_VOICE, f0=float(rng_v.uniform(108, 132))),
        "user": dataclasses.replace(USER_VOICE, f0=float(rng_v.uniform(170, 195)),
                                    formant_scale=float(rng_v.uniform(1.12, 1.2)),
                                    rate=float(rng_v.uniform(0.98, 1.08))),
    }
    rng_e = np.random.default_rng([seed, 100_000 + index, 1])
    rng_l = np.random.default_rng([seed, g, 2])
    utts = _script(affect, duration, early_s, rng_e, rng_l, voices)

    avatar_audio, avatar_phones = _track(utts, "avatar", n_samples, voices["avatar"], seed, index, g)
    user_audio, user_phones = _track(utts, "user", n_samples, voices["user"], seed, index, g)

    # ---- timing facts
    user_turns = [u for u in utts if u.speaker == "user" and u.kind == "turn"]
    avatar_turns = [u for u in utts if u.speaker == "avatar" and u.kind == "turn"]
    phrase_ends = sorted(u.start + e for u in user_turns for (_, e, _) in u.plan.sentences)
    phrase_ends = [p for p in phrase_ends if p < duration - 0.3]
    # a user turn onset: after the avatar's turn, after >= 1 s of user silence, or the first late turn
    turn_onsets = []
    prev_spk, prev_phase, prev_user_end = None, None, -np.inf
    for u in (u for u in utts if u.kind == "turn"):
        if u.speaker == "user":
            if prev_spk != "user" or u.start - prev_user_end >= 1.0 or u.phase != prev_phase:
                turn_onsets.append(u.start)
            prev_user_end = u.end
        prev_spk, prev_phase = u.speaker, u.phase
    affect_lines = [u for u in utts if u.affect_line]
    affect_onset = affect_lines[0].start + 1.0
    affect_established = max(u.end for u in affect_lines)
    late_start = max(early_s, affect_established + context_gap_s)
    alpha = _smoothstep((t - affect_onset) / rules.affect_ramp_s)
    dyn_a, dyn_n = AFFECT_DYNAMICS[affect], AFFECT_DYNAMICS["neutral"]

    def dyn(name: str, at: float) -> float:
        a = float(_smoothstep((at - affect_onset) / rules.affect_ramp_s))
        return dyn_n[name] + a * (dyn_a[name] - dyn_n[name])

    # ---- user smiles (scripted): early ones depend on the affect line, late ones on the group
    user_smiles: list[dict] = []
    if affect in ("positive", "neutral"):
        first = affect_lines[0]
        k_smiles = 2 if affect == "positive" else 1
        ts = first.start + first.plan.duration * 0.4
        for _ in range(k_smiles):
            d = float(rng_e.uniform(1.8, 3.0))
            if ts + d + 2.0 > early_s:
                break
            user_smiles.append({"start_s": round(float(ts), 3), "duration_s": round(d, 3),
                                "amp": round(float(rng_e.uniform(0.55, 0.8) if affect == "positive"
                                                   else rng_e.uniform(0.4, 0.6)), 3)})
            ts += d + float(rng_e.uniform(3.0, 5.0))
    ts = early_s + float(rng_l.uniform(1.0, 4.0))
    while True:
        d = float(rng_l.uniform(1.5, 3.0))
        if ts + d + 2.5 > duration:
            break
        user_smiles.append({"start_s": round(ts, 3), "duration_s": round(d, 3),
                            "amp": round(float(rng_l.uniform(0.5, 0.8)), 3)})
        ts += d + float(rng_l.uniform(4.0, 9.0))

    # ================================================================ user motion
    rng_b = np.random.default_rng([seed, g, 3])        # continuous processes: identical in a group
    um, user_blinks = _speaking_face(user_phones, t, duration, rng_b, 3.0, 0.12)
    noise_u = rng_b.standard_normal((n, 6))
    um[:, _HEAD6] += _head_idle(noise_u, 1.0, np.array([0.03, 0.05, 0.02, 0.01, 0.008, 0.01]))
    user_env = _vowel_envelope(user_phones, n)
    speak_u = _lowpass(user_env, 0.6)
    gest_u = _unit(_lowpass(rng_b.standard_normal(n), 0.5))
    um[:, _CI["headYaw"]] += 0.04 * speak_u * gest_u
    um[:, _CI["headPitch"]] -= 0.02 * speak_u
    um[:, _CI["browOuterUpLeft"]] += 0.08 * speak_u
    um[:, _CI["browOuterUpRight"]] += 0.08 * speak_u
    user_nods = []
    for u in avatar_turns:
        for (_, e, _) in u.plan.sentences:
            te = u.start + e
            r = _event_rng(seed, g, 21, te)
            if r.random() < 0.4 and te + 1.5 < duration:
                t0, d, f = te + r.uniform(0.2, 0.5), r.uniform(0.5, 0.9), r.uniform(1.6, 2.2)
                tau = t - t0
                sel = (tau >= 0) & (tau <= d)
                um[sel, _CI["headPitch"]] += 0.05 * np.sin(np.pi * f * tau[sel]) ** 2 * np.sin(np.pi * tau[sel] / d)
                user_nods.append(round(float(t0), 3))
    user_smile_track = np.zeros(n)
    for s in user_smiles:
        user_smile_track = np.maximum(user_smile_track, s["amp"] * _bump(t, s["start_s"], s["duration_s"], 0.3, 0.5))
    for ch, k in (("mouthSmileLeft", 1.0), ("mouthSmileRight", 1.0), ("cheekSquintLeft", 0.5),
                  ("cheekSquintRight", 0.5), ("eyeSquintLeft", 0.25), ("eyeSquintRight", 0.25),
                  ("mouthDimpleLeft", 0.2), ("mouthDimpleRight", 0.2)):
        um[:, _CI[ch]] += k * user_smile_track
    # early affect expression of the user (over by early_s)
    first_user = [u for u in affect_lines if u.speaker == "user"]
    e_start = first_user[0].start
    e_end = min(max(u.end for u in first_user) + 1.0, early_s - 1.5)
    expr = _bump(t, e_start, max(0.5, e_end - e_start - 1.0), 0.6, 1.0)
    if affect == "negative":
        um[:, _CI["browInnerUp"]] += 0.4 * expr
        um[:, _CI["mouthFrownLeft"]] += 0.3 * expr
        um[:, _CI["mouthFrownRight"]] += 0.3 * expr
        um[:, _CI["headPitch"]] += 0.06 * expr
    elif affect == "positive":
        um[:, _CI["browOuterUpLeft"]] += 0.2 * expr
        um[:, _CI["browOuterUpRight"]] += 0.2 * expr
    user_motion = motion.clamp_motion(um.astype(np.float32))

    # ================================================================ avatar motion
    rng_ab = np.random.default_rng([seed, g, 6])
    am, avatar_blinks = _speaking_face(avatar_phones, t, duration, rng_ab, rules.blink_mean_interval_s, 0.08)
    noise_a = rng_ab.standard_normal((n, 6))
    amps = np.array([0.02, 0.035, 0.015, 0.006, 0.004, 0.008])
    idle_n = _head_idle(noise_a, dyn_n["head_speed"], amps * dyn_n["head_amp"])
    idle_a = _head_idle(noise_a, dyn_a["head_speed"], amps * dyn_a["head_amp"])
    am[:, _HEAD6] += (1 - alpha)[:, None] * idle_n + alpha[:, None] * idle_a
    avatar_env = _vowel_envelope(avatar_phones, n)
    speak_a = _lowpass(avatar_env, 0.6)
    gest_a = _unit(_lowpass(rng_ab.standard_normal(n), 0.4))
    am[:, _CI["headYaw"]] += 0.03 * speak_a * gest_a
    am[:, _CI["headPitch"]] -= 0.015 * speak_a

    # rule (a): backchannel nods after the user's phrase-final pauses
    nods = []
    for te in phrase_ends:
        r = _event_rng(seed, g, 31, te)
        u_p, delay, d, f, amp = (r.random(), r.uniform(*rules.nod_delay_s), r.uniform(*rules.nod_duration_s),
                                 r.uniform(*rules.nod_freq_hz), r.uniform(*rules.nod_amp_rad))
        if u_p >= dyn("nod_p", te) or te + delay + d > duration:
            continue
        amp *= dyn("nod_gain", te)
        t0 = te + delay
        tau = t - t0
        sel = (tau >= 0) & (tau <= d)
        shape = np.sin(np.pi * f * tau[sel]) ** 2 * np.sin(np.pi * tau[sel] / d)
        am[sel, _CI["headPitch"]] += amp * shape
        am[sel, _CI["headTy"]] += 0.1 * amp * shape
        nods.append({"trigger_s": round(te, 3), "start_s": round(t0, 3), "duration_s": round(d, 3),
                     "freq_hz": round(f, 3), "amp_rad": round(amp, 4)})

    # rule (b): mirrored smiles
    avatar_smiles = []
    smile = np.zeros(n)
    for s in user_smiles:
        r = _event_rng(seed, g, 41, s["start_s"])
        u_p, delay, dd = r.random(), r.uniform(*rules.smile_delay_s), r.uniform(-0.15, 0.15)
        if u_p >= dyn("smile_p", s["start_s"]):
            continue
        amp = s["amp"] * dyn("smile_gain", s["start_s"])
        t0 = s["start_s"] + delay
        smile = np.maximum(smile, amp * _bump(t, t0, max(0.8, s["duration_s"] + dd), 0.3, 0.5))
        avatar_smiles.append({"trigger_s": s["start_s"], "start_s": round(t0, 3), "delay_s": round(delay, 3),
                              "duration_s": round(max(0.8, s["duration_s"] + dd), 3), "amp": round(amp, 3)})
    for ch, k in (("mouthSmileLeft", 1.0), ("mouthSmileRight", 1.0), ("cheekSquintLeft", 0.6),
                  ("cheekSquintRight", 0.6), ("eyeSquintLeft", 0.3), ("eyeSquintRight", 0.3)):
        am[:, _CI[ch]] += k * smile

    # rule (c): brows raise when the user starts a turn
    brows = []
    for ts_ in turn_onsets:
        r = _event_rng(seed, g, 51, ts_)
        t0, d = ts_ + r.uniform(*rules.brow_delay_s), r.uniform(0.5, 0.9)
        bb = rules.brow_amp * _bump(t, t0, d, 0.15, 0.4)
        am[:, _CI["browInnerUp"]] += 0.8 * bb
        am[:, _CI["browOuterUpLeft"]] += bb
        am[:, _CI["browOuterUpRight"]] += bb
        brows.append({"trigger_s": round(ts_, 3), "start_s": round(t0, 3), "duration_s": round(d, 3)})

    # rule (4): affect baseline (long-range context), with a slow +-15 % fluctuation
    wobble = 1.0 + 0.15 * _unit(_lowpass(rng_ab.standard_normal(n), 0.1))
    for ch, val in AFFECT_BASELINE[affect].items():
        am[:, _CI[ch]] += val * alpha * wobble
    avatar_motion = motion.clamp_motion(am.astype(np.float32))

    # ================================================================ transcript / events
    transcript = []
    for u in utts:
        for s0, e0, text in u.plan.sentences:
            transcript.append({"start": round(u.start + s0, 3), "end": round(u.start + e0, 3),
                               "speaker": u.speaker, "text": text})
    transcript.sort(key=lambda d: (d["start"], d["speaker"]))

    def spans(spk):
        return [[round(u.start, 3), round(u.end, 3)] for u in utts if u.speaker == spk]

    cid = f"conv{index:04d}"
    events = {
        "conversation_id": cid, "synthetic": True, "affect": affect, "group": g, "seed": int(seed),
        "duration_s": duration, "fps": FPS, "sample_rate": SR,
        "early_end_s": float(early_s), "affect_onset_s": round(affect_onset, 3),
        "affect_established_s": round(affect_established, 3), "late_start_s": round(late_start, 3),
        "context_gap_s": float(context_gap_s),
        "rules": dataclasses.asdict(rules),
        "affect_baseline": AFFECT_BASELINE[affect], "affect_dynamics": AFFECT_DYNAMICS[affect],
        "voices": {k: dataclasses.asdict(v) for k, v in voices.items()},
        "user_speech": spans("user"), "avatar_speech": spans("avatar"),
        "user_turn_onsets": [round(x, 3) for x in turn_onsets],
        "user_phrase_ends": [round(x, 3) for x in phrase_ends],
        "avatar_nods": nods, "user_smiles": user_smiles, "avatar_smiles": avatar_smiles,
        "avatar_brow_raises": brows, "user_nods": user_nods,
        "avatar_blinks": [round(x, 3) for x in avatar_blinks], "user_blinks": [round(x, 3) for x in user_blinks],
    }
    return Conversation(cid, int(index), g, affect, split_for(g, seed), duration, avatar_audio, user_audio,
                        avatar_motion, user_motion, transcript, events)


# =============================================================================== measuring the rules

def _band(x: np.ndarray, lo: float, hi: float, fs: float = FPS) -> np.ndarray:
    sos = sps.butter(2, [lo / (fs / 2), hi / (fs / 2)], btype="band", output="sos")
    return sps.sosfiltfilt(sos, np.asarray(x, np.float64))


def nod_band_power(head_pitch: np.ndarray, band: tuple[float, float] = (1.5, 3.0)) -> np.ndarray:
    """Per-frame power of ``headPitch`` in the nod band (1.5-3 Hz)."""
    return _band(head_pitch, *band) ** 2


def nod_power_ratio(head_pitch: np.ndarray, pause_times, window_s: tuple[float, float] = (0.2, 1.2)) -> float:
    """Mean nod-band power in ``[pause + 0.2, pause + 1.2)`` s after the user's pauses / elsewhere."""
    p = nod_band_power(head_pitch)
    t = np.arange(p.size) / FPS
    inside = np.zeros(p.size, bool)
    for tp in pause_times:
        inside |= (t >= tp + window_s[0]) & (t < tp + window_s[1])
    if not inside.any() or inside.all():
        return float("nan")
    return float(p[inside].mean() / (p[~inside].mean() + 1e-12))


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


def rule_metrics(avatar_motion: np.ndarray, *, avatar_audio: np.ndarray | None = None,
                 user_motion: np.ndarray | None = None, events: dict | None = None) -> dict:
    """Measure the corpus rules on an avatar motion track (ground truth or a model's output).

    * ``jaw_rms_corr``: Pearson correlation of ``jawOpen`` and the RMS envelope of ``avatar_audio``;
    * ``nod_power_ratio``: nod-band ``headPitch`` power 0.2-1.2 s after the user's phrase ends / elsewhere;
    * ``smile_lag_s`` / ``smile_xcorr``: peak of the user-smile -> avatar-smile cross-correlation;
    * ``late_smile`` / ``late_brow_inner_up`` / ``late_brow_outer_up`` / ``late_frown``: mean of those
      channels after ``events["late_start_s"]`` (the affect's long-range effect).
    """
    from .features import rms_envelope

    m = np.asarray(avatar_motion, np.float32)
    out: dict = {}
    if avatar_audio is not None:
        env = rms_envelope(avatar_audio)[: m.shape[0]]
        jaw = m[: env.size, _CI["jawOpen"]]
        out["jaw_rms_corr"] = float(np.corrcoef(jaw, env)[0, 1]) if jaw.std() > 0 and env.std() > 0 else float("nan")
    if events is not None and events.get("user_phrase_ends"):
        out["nod_power_ratio"] = nod_power_ratio(m[:, _CI["headPitch"]], events["user_phrase_ends"])
    if user_motion is not None:
        us = np.asarray(user_motion)[:, [_CI["mouthSmileLeft"], _CI["mouthSmileRight"]]].mean(1)
        avs = m[:, [_CI["mouthSmileLeft"], _CI["mouthSmileRight"]]].mean(1)
        out["smile_lag_s"], out["smile_xcorr"] = smile_lag(us, avs)
    if events is not None and "late_start_s" in events:
        i0 = int(round(events["late_start_s"] * FPS))
        late = m[i0:]
        if late.shape[0]:
            out["late_smile"] = float(late[:, [_CI["mouthSmileLeft"], _CI["mouthSmileRight"]]].mean())
            out["late_brow_inner_up"] = float(late[:, _CI["browInnerUp"]].mean())
            out["late_brow_outer_up"] = float(late[:, [_CI["browOuterUpLeft"], _CI["browOuterUpRight"]]].mean())
            out["late_frown"] = float(late[:, [_CI["mouthFrownLeft"], _CI["mouthFrownRight"]]].mean())
            out["late_nod_power"] = float(nod_band_power(m[:, _CI["headPitch"]])[i0:].mean())
    return out


# =============================================================================== files

_CONV_RE = re.compile(r"^conv(\d{4,})$")
_TMP_RE = re.compile(r"^\.conv\d{4,}\.tmp-[0-9a-f]+$")
_TINT = np.array([1.07, 0.96, 0.88], np.float32)


def _write_wav(path: str, audio: np.ndarray) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(pcm.tobytes())


def user_portrait(path: str | os.PathLike | None = None):
    """The "user": the portrait (default: the bundled one) mirrored and tinted warmer, as a placed Portrait."""
    import io

    from PIL import Image

    from . import media
    from .render import SAMPLE_PORTRAIT, load_portrait

    rgb = media.load_image(path or SAMPLE_PORTRAIT)[:, ::-1].astype(np.float32)
    rgb = np.clip(rgb * _TINT + np.array([4.0, 0.0, -6.0], np.float32) + 0.5, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return load_portrait(buf.getvalue())


def _write_user_webm(path: str, user_motion: np.ndarray, user_audio: np.ndarray, renderer, size: int,
                     chunk: int = 100) -> None:
    """Render the user's face from its motion and mux it with the user's audio: VP9 + Opus in WebM."""
    import av

    n = user_motion.shape[0]
    with av.open(path, "w", format="webm") as c:
        vs = c.add_stream("libvpx-vp9", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = size, size, "yuv420p"
        vs.codec_context.time_base = Fraction(1, FPS)
        vs.options = {"crf": "36", "b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "1",
                      "lag-in-frames": "0", "g": str(2 * FPS)}
        aus = c.add_stream("libopus", rate=48000)
        aus.layout = "mono"
        aus.bit_rate = 32_000
        res = av.AudioResampler(format="s16", layout="mono", rate=48000)
        a_out = 0

        def encode_audio(frames):
            nonlocal a_out
            for rf in frames:
                rf.pts = a_out
                rf.time_base = Fraction(1, 48000)
                a_out += rf.samples
                for pkt in aus.encode(rf):
                    c.mux(pkt)

        for f0 in range(0, n, chunk):
            f1 = min(n, f0 + chunk)
            seg = user_audio[f0 * SPF:f1 * SPF]
            af = av.AudioFrame.from_ndarray((np.clip(seg, -1, 1) * 32767).round().astype(np.int16)[None],
                                            format="s16", layout="mono")
            af.sample_rate, af.pts, af.time_base = SR, f0 * SPF, Fraction(1, SR)
            encode_audio(res.resample(af))
            for i, img in enumerate(renderer.render(user_motion[f0:f1])):
                vf = av.VideoFrame.from_ndarray(img, format="rgb24")
                vf.pts = f0 + i
                vf.time_base = Fraction(1, FPS)
                for pkt in vs.encode(vf):
                    c.mux(pkt)
        encode_audio(res.resample(None))
        for pkt in aus.encode(None):
            c.mux(pkt)
        for pkt in vs.encode(None):
            c.mux(pkt)


def _row(conv: Conversation, user_media: str) -> dict:
    cid = conv.conversation_id
    return {
        "conversation_id": cid,
        "avatar_media": f"{cid}/avatar.wav",
        "user_media": f"{cid}/{user_media}",
        "transcript": f"{cid}/transcript.json",
        "avatar_motion": f"{cid}/avatar_motion.parquet",
        "user_motion": f"{cid}/user_motion.parquet",
        "events": f"{cid}/events.json",
        "duration_s": conv.duration_s,
        "split": conv.split,
        "synthetic": True,
        "affect": conv.affect,
        "group": conv.group,
    }


def _write_json_atomic(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_conversation(out_dir: str, conv: Conversation, renderer, size: int, render_video: bool) -> None:
    """Write one conversation into a temp dir, then rename it into place (all or nothing)."""
    import pyarrow.parquet as pq
    from .generate import motion_table

    final = os.path.join(out_dir, conv.conversation_id)
    tmp = os.path.join(out_dir, f".{conv.conversation_id}.tmp-{secrets.token_hex(4)}")
    os.makedirs(tmp)
    try:
        _write_wav(os.path.join(tmp, "avatar.wav"), conv.avatar_audio)
        frames = np.arange(conv.num_frames)
        pq.write_table(motion_table(frames, conv.avatar_motion), os.path.join(tmp, "avatar_motion.parquet"),
                       compression="zstd")
        pq.write_table(motion_table(frames, conv.user_motion), os.path.join(tmp, "user_motion.parquet"),
                       compression="zstd")
        with open(os.path.join(tmp, "transcript.json"), "w", encoding="utf-8") as f:
            json.dump(conv.transcript, f, indent=1)
        with open(os.path.join(tmp, "events.json"), "w", encoding="utf-8") as f:
            json.dump(conv.events, f, indent=1)
        if render_video:
            user_media = "user.webm"
            _write_user_webm(os.path.join(tmp, user_media), conv.user_motion, conv.user_audio, renderer, size)
        else:
            user_media = "user.wav"
            _write_wav(os.path.join(tmp, user_media), conv.user_audio)
        with open(os.path.join(tmp, "conversation.json"), "w", encoding="utf-8") as f:
            json.dump(_row(conv, user_media), f, indent=1)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):     # not "finished by someone else meanwhile"
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _complete_rows(out_dir: str) -> dict[int, dict]:
    rows = {}
    for name in os.listdir(out_dir):
        m = _CONV_RE.match(name)
        if not m:
            continue
        p = os.path.join(out_dir, name, "conversation.json")
        try:
            with open(p, encoding="utf-8") as f:
                rows[int(m.group(1))] = json.load(f)
        except (OSError, ValueError):
            continue
    return rows


def _write_manifest(out_dir: str) -> tuple[str, int]:
    rows = _complete_rows(out_dir)
    text = "".join(json.dumps(rows[i], sort_keys=False) + "\n" for i in sorted(rows))
    path = os.path.join(out_dir, "manifest.jsonl")
    _write_json_atomic(path, text)
    return path, len(rows)


def read_manifest(path: str) -> list[dict]:
    """Rows of a ``manifest.jsonl`` (a corpus directory or the file itself)."""
    if os.path.isdir(path):
        path = os.path.join(path, "manifest.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


_README = """\
# SYNTHETIC dyadic conversation corpus

**Everything here is synthetic.** It was generated by `echo_stream.corpus`
(echo-stream's own generator, `echo-stream corpus`), not recorded from people:

* speech is machine-made pseudo-speech (source-filter synthesis: glottal pulses
  through formant resonators, noise for fricatives, silence for stop closures),
  with phones derived from the transcript's spelling; it is not intelligible;
* the user's "webcam" video is the bundled portrait, mirrored and tinted,
  animated by echo-stream's own renderer from `user_motion.parquet`;
* the avatar's motion (`avatar_motion.parquet`) is ground truth written by rules.

Settings: {settings}

## Layout

`manifest.jsonl`: one JSON object per conversation (paths relative to this
directory): `conversation_id`, `avatar_media` (16 kHz WAV), `user_media`
(WebM: VP9 video + Opus audio; or WAV without video), `transcript` (JSON list
of `{{start, end, speaker, text}}`), `avatar_motion` / `user_motion` (Parquet:
`frame`, `pts`, then the 58 motion channels in `echo_stream.motion.CHANNELS`
order, 25 fps), `events` (JSON: every scripted event and rule parameter),
`duration_s`, `split` (train / heldout), `synthetic` (true), `affect`
(positive / negative / neutral), `group` (matched triple).

## Rules (what a model can learn from it)

1. Lips: avatar lip/jaw channels are the known articulation targets of its own
   speech (jawOpen = 0.7 x vowel openness x loudness; funnel/pucker for rounded
   vowels; mouthClose/mouthPress for p b m; stretch for i), smoothed 25 ms.
2. Nods: 0.2-0.6 s after each sentence the user ends, the avatar nods
   (headPitch, 1.8-2.2 Hz, 0.5-1.0 s).
3. Mirrored smiles: each user smile is mirrored by the avatar 0.5-1.0 s later
   (probability and strength depend on the affect).
4. Always: blinks, slow idle head motion, gaze shifts; brows raise 0.1-0.3 s
   after the user starts a turn.
5. Long-range context: the first {early_s:g} s establish an affect in the
   transcript (positive / negative / neutral). From then on the avatar's
   baseline differs (positive: smile, raised brows, bigger nods, livelier head;
   negative: inner brows up, frown, lowered and slower head, fewer smiles).
   All later text is affect-neutral, and conversations 3k, 3k+1, 3k+2 share
   everything after {early_s:g} s except the avatar's affect-dependent behaviour.
   Measure the effect from `late_start_s` (events.json) = end of the affect
   exchange + {context_gap_s:g} s.
6. Deterministic under the seed; one group in seven is `heldout`.

See docs/corpus.md in the echo-stream repository for details.
"""


def _settings(minutes, seed, size, render_video, early_s, context_gap_s, portrait) -> dict:
    return {"generator": "echo_stream.corpus", "version": CORPUS_VERSION, "synthetic": True,
            "minutes": float(minutes), "seed": int(seed), "size": int(size), "render_video": bool(render_video),
            "early_s": float(early_s), "context_gap_s": float(context_gap_s),
            "portrait": os.path.abspath(portrait) if portrait else "bundled"}


def generate_corpus(out_dir: str | os.PathLike, n_conversations: int = 20, minutes: float = 1.0, seed: int = 0,
                    size: int = 192, progress: bool = True, *, render_video: bool = True, early_s: float = 20.0,
                    context_gap_s: float = 30.0, portrait: str | os.PathLike | None = None) -> str:
    """Write (or complete) a synthetic corpus of ``n_conversations`` conversations of ``minutes`` each.

    Returns the path of ``OUT_DIR/manifest.jsonl``. Each conversation is
    written into a temporary directory and renamed into place; the manifest
    is rewritten atomically after each one, so an interrupted run leaves a
    consistent corpus and running again resumes (conversations already
    present are skipped). A directory holding a corpus made with different
    settings is refused.
    """
    out_dir = os.fspath(out_dir)
    if int(n_conversations) < 1:
        raise InputError("--conversations", f"must be >= 1, got {n_conversations}")
    if not (minutes > 0):
        raise InputError("--minutes", f"must be > 0, got {minutes}")
    if render_video and (size < 64 or size % 2):
        raise InputError("--size", f"{size} is not an even number of pixels >= 64")
    duration = round(float(minutes) * 60.0 * FPS) / FPS
    _check_timing(duration, early_s, context_gap_s)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(out_dir, "exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise InputError(out_dir, "output directory is not writable")

    done = _complete_rows(out_dir)
    todo = [i for i in range(int(n_conversations)) if i not in done]
    renderer = None
    if todo and render_video:                        # first: a bad portrait fails before anything is written
        from .render import PortraitRenderer
        renderer = PortraitRenderer(user_portrait(portrait), size=(size, size))

    settings = _settings(minutes, seed, size, render_video, early_s, context_gap_s, portrait)
    spath = os.path.join(out_dir, "corpus.json")
    if os.path.exists(spath):
        try:
            with open(spath, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            raise InputError(spath, "unreadable corpus settings file; remove it or use a new directory") from None
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            what = ", ".join(f"{k}={old.get(k)!r} (now {settings[k]!r})" for k in diff)
            raise InputError(out_dir, f"holds a corpus made with other settings: {what}; "
                                      "use a new directory or the same settings")
    elif done:
        raise InputError(out_dir, "holds conversations but no corpus.json; use a new directory")
    else:
        _write_json_atomic(spath, json.dumps(settings, indent=1) + "\n")
    for name in os.listdir(out_dir):                 # leftovers of an interrupted run
        if _TMP_RE.match(name):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    _write_json_atomic(os.path.join(out_dir, "README.md"),
                       _README.format(settings=json.dumps(settings), early_s=early_s, context_gap_s=context_gap_s))

    manifest, _ = _write_manifest(out_dir)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=int(n_conversations), initial=int(n_conversations) - len(todo), unit="conv",
                   desc="corpus")
    try:
        for i in todo:
            conv = synthesize_conversation(i, seed=seed, minutes=minutes, early_s=early_s,
                                           context_gap_s=context_gap_s)
            _write_conversation(out_dir, conv, renderer, size, render_video)
            manifest, _ = _write_manifest(out_dir)
            if bar is not None:
                bar.set_postfix_str(f"{conv.conversation_id} {conv.affect}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return manifest


# =============================================================================== CLI

def add_arguments(p) -> None:
    """Arguments of ``echo-stream corpus OUT_DIR``."""
    p.add_argument("out_dir", metavar="OUT_DIR", help="corpus directory (created; a re-run resumes)")
    p.add_argument("--conversations", type=int, default=20, metavar="N", help="number of conversations (default 20)")
    p.add_argument("--minutes", type=float, default=1.0, metavar="M",
                   help="length of each conversation in minutes (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (same seed = same corpus)")
    p.add_argument("--size", type=int, default=192, help="user video size in pixels (square, even; default 192)")
    p.add_argument("--no-video", action="store_true", help="write the user side as audio only (user.wav)")
    p.add_argument("--portrait", metavar="IMAGE",
                   help="photo for the user's face (mirrored and tinted; default: the bundled portrait)")
    p.add_argument("--early-s", type=float, default=20.0,
                   help="seconds at the start that establish the affect (default 20)")
    p.add_argument("--context-gap-s", type=float, default=30.0,
                   help="the long-range effect is measured this many seconds after the affect exchange (default 30)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    """Run ``echo-stream corpus`` with parsed ``args``; returns the exit status."""
    import sys

    t0 = time.perf_counter()
    path = generate_corpus(args.out_dir, n_conversations=args.conversations, minutes=args.minutes, seed=args.seed,
                           size=args.size, progress=not args.quiet, render_video=not args.no_video,
                           early_s=args.early_s, context_gap_s=args.context_gap_s,
                           portrait=getattr(args, "portrait", None))
    rows = read_manifest(path)
    held = sum(r["split"] == "heldout" for r in rows)
    print(f"wrote {path}: {len(rows)} SYNTHETIC conversations ({held} heldout), "
          f"{sum(r['duration_s'] for r in rows) / 60:.1f} min, in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0

"""The avatar's listener rules: how it reacts to the user. Read this file first.

Every reaction is triggered by something the model can perceive of the user (their voice through
the user audio features, their face through the tracked ``user_blend``) and is drawn per event with
randomness keyed by the event's time (:func:`~.idle._event_rng`), so that the three tellings of one
conversation group react to the same later events in the same way. Each rule writes its events
into the conversation's ``events.json``; :mod:`.metrics` measures each rule from those events, on
the ground truth and on any model's output alike.

=====================  ===============================  ==================================================
rule                   trigger (what the model sees)    reaction (avatar channels)
=====================  ===============================  ==================================================
(a) backchannel nod    the user ends a sentence: the    ``headPitch`` (+ a little ``headTy``): 1-2 nod
                       voice stops (falling f0)         cycles at 1.8-2.2 Hz, 0.2-0.5 s after the pause
                                                        begins, bigger at the end of the user's turn
(b) micro-nod          a phrase-internal pause (a       one small dip of ``headPitch`` (~0.02 rad), 0.1-0.3
                       comma) in the user's sentence    s later, after 7 pauses in 10: a silent "mhm"
(c) mirrored smile     the user smiles (face)           ``mouthSmile``, ``cheekSquint``, ``eyeSquint``
                                                        0.5-1.0 s later, for about as long
(d) brow raise         the user asks a question         ``browInnerUp`` + ``browOuterUp`` 0.1-0.3 s after
                       (rising f0 at the end)           the question ends (0.3); a smaller flash (0.12)
                                                        when the user starts a turn
(e) gaze               the user is speaking             the avatar's gaze stays on the user (its gaze
                                                        shifts shrink to 0.3x); when the avatar takes the
                                                        turn it looks away (up, to one side) for 0.6-1.2 s
=====================  ===============================  ==================================================

The affect of the early exchange (long-range context, see :mod:`.conversation`) scales (a) and (c)
through :data:`AFFECT_DYNAMICS` and sets the baseline of :data:`AFFECT_BASELINE`. What every face
does whatever the user does (blinks, gaze shifts, slow head motion) lives in :mod:`.idle`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .base import _CI
from .idle import _bump, _event_rng


@dataclass(frozen=True)
class Rules:
    """Parameters of the listener rules (ranges are uniform draws per event)."""

    # (a) backchannel nods after the user's sentence ends
    nod_delay_s: tuple[float, float] = (0.2, 0.5)        # after the user's phrase-final pause begins
    nod_duration_s: tuple[float, float] = (0.5, 0.9)
    nod_freq_hz: tuple[float, float] = (1.8, 2.2)
    nod_amp_rad: tuple[float, float] = (0.05, 0.08)
    turn_end_nod_gain: float = 1.25                      # the user's last sentence before the avatar speaks
    # (b) micro-nods at the user's phrase-internal pauses
    micro_nod_p: float = 0.7
    micro_nod_delay_s: tuple[float, float] = (0.1, 0.3)
    micro_nod_duration_s: tuple[float, float] = (0.35, 0.5)
    micro_nod_amp_rad: tuple[float, float] = (0.015, 0.025)
    # (c) mirrored smiles
    smile_delay_s: tuple[float, float] = (0.5, 1.0)      # avatar smile onset after the user's
    # (d) brows
    question_brow_delay_s: tuple[float, float] = (0.1, 0.3)
    question_brow_duration_s: tuple[float, float] = (0.6, 1.0)
    question_brow_amp: float = 0.3
    brow_delay_s: tuple[float, float] = (0.1, 0.3)       # brow flash after the user starts a turn
    brow_amp: float = 0.12
    # (e) gaze
    listen_gaze_scale: float = 0.3                       # gaze shifts x this while the user speaks
    aversion_p: float = 0.7                              # look away when taking the turn
    aversion_duration_s: tuple[float, float] = (0.6, 1.2)
    aversion_amp: float = 0.22
    # always (see .idle)
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

# event kinds of _event_rng (stable numbers: changing one changes the corpus)
_K_NOD, _K_SMILE, _K_BROW, _K_MICRO, _K_QUESTION, _K_AVERT = 31, 41, 51, 61, 71, 81


@dataclass
class Cues:
    """What the user did, with times in seconds: the triggers of the rules."""

    phrase_ends: list[float]             # the user ends a sentence (a phrase-final pause begins)
    turn_ends: set[float]                # those phrase ends after which the avatar takes the turn
    phrase_pauses: list[float]           # phrase-internal pauses (commas) begin
    questions: list[float]               # the user's questions end
    turn_onsets: list[float]             # the user starts a turn
    user_speech: list[tuple[float, float]]
    avatar_turn_onsets: list[float]      # the avatar starts a turn after the user's
    smiles: list[dict] = field(default_factory=list)   # {"start_s", "duration_s", "amp"}


def _nod_shape(tau: np.ndarray, dur: float, freq: float) -> np.ndarray:
    return np.sin(np.pi * freq * tau) ** 2 * np.sin(np.pi * tau / dur)


def backchannel_nods(am, t, cues: Cues, rules: Rules, dyn, seed: int, group: int) -> list[dict]:
    """(a): add nods to ``am`` (in place) after the user's sentence ends; returns their events."""
    out = []
    duration = t[-1] + (t[1] - t[0])
    for te in cues.phrase_ends:
        r = _event_rng(seed, group, _K_NOD, te)
        u_p, delay, d, f, amp = (r.random(), r.uniform(*rules.nod_delay_s), r.uniform(*rules.nod_duration_s),
                                 r.uniform(*rules.nod_freq_hz), r.uniform(*rules.nod_amp_rad))
        if u_p >= dyn("nod_p", te) or te + delay + d > duration:
            continue
        amp *= dyn("nod_gain", te) * (rules.turn_end_nod_gain if te in cues.turn_ends else 1.0)
        t0 = te + delay
        tau = t - t0
        sel = (tau >= 0) & (tau <= d)
        shape = _nod_shape(tau[sel], d, f)
        am[sel, _CI["headPitch"]] += amp * shape
        am[sel, _CI["headTy"]] += 0.1 * amp * shape
        out.append({"trigger_s": round(te, 3), "start_s": round(t0, 3), "duration_s": round(d, 3),
                    "freq_hz": round(f, 3), "amp_rad": round(amp, 4), "turn_end": te in cues.turn_ends})
    return out


def micro_nods(am, t, cues: Cues, rules: Rules, seed: int, group: int) -> list[dict]:
    """(b): one small head dip after some of the user's phrase-internal pauses."""
    out = []
    duration = t[-1] + (t[1] - t[0])
    for tp in cues.phrase_pauses:
        r = _event_rng(seed, group, _K_MICRO, tp)
        u_p, delay, d, amp = (r.random(), r.uniform(*rules.micro_nod_delay_s), r.uniform(*rules.micro_nod_duration_s),
                              r.uniform(*rules.micro_nod_amp_rad))
        if u_p >= rules.micro_nod_p or tp + delay + d > duration:
            continue
        t0 = tp + delay
        tau = t - t0
        sel = (tau >= 0) & (tau <= d)
        am[sel, _CI["headPitch"]] += amp * np.sin(np.pi * tau[sel] / d) ** 2
        out.append({"trigger_s": round(tp, 3), "start_s": round(t0, 3), "duration_s": round(d, 3),
                    "amp_rad": round(amp, 4)})
    return out


SMILE_CHANNELS = (("mouthSmileLeft", 1.0), ("mouthSmileRight", 1.0), ("cheekSquintLeft", 0.6),
                  ("cheekSquintRight", 0.6), ("eyeSquintLeft", 0.3), ("eyeSquintRight", 0.3))


def mirrored_smiles(am, t, cues: Cues, rules: Rules, dyn, seed: int, group: int) -> list[dict]:
    """(c): the avatar smiles back after the user smiles."""
    out = []
    smile = np.zeros(len(t))
    for s in cues.smiles:
        r = _event_rng(seed, group, _K_SMILE, s["start_s"])
        u_p, delay, dd = r.random(), r.uniform(*rules.smile_delay_s), r.uniform(-0.15, 0.15)
        if u_p >= dyn("smile_p", s["start_s"]):
            continue
        amp = s["amp"] * dyn("smile_gain", s["start_s"])
        t0 = s["start_s"] + delay
        d = max(0.8, s["duration_s"] + dd)
        smile = np.maximum(smile, amp * _bump(t, t0, d, 0.3, 0.5))
        out.append({"trigger_s": s["start_s"], "start_s": round(t0, 3), "delay_s": round(delay, 3),
                    "duration_s": round(d, 3), "amp": round(amp, 3)})
    for ch, k in SMILE_CHANNELS:
        am[:, _CI[ch]] += k * smile
    return out


def _brow(am, t, t0: float, d: float, amp: float) -> None:
    bb = amp * _bump(t, t0, d, 0.15, 0.4)
    am[:, _CI["browInnerUp"]] += 0.8 * bb
    am[:, _CI["browOuterUpLeft"]] += bb
    am[:, _CI["browOuterUpRight"]] += bb


def brow_raises(am, t, cues: Cues, rules: Rules, seed: int, group: int) -> tuple[list[dict], list[dict]]:
    """(d): brows go up after the user's questions, and flash when the user starts a turn."""
    questions, onsets = [], []
    for tq in cues.questions:
        r = _event_rng(seed, group, _K_QUESTION, tq)
        t0, d = tq + r.uniform(*rules.question_brow_delay_s), r.uniform(*rules.question_brow_duration_s)
        _brow(am, t, t0, d, rules.question_brow_amp)
        questions.append({"trigger_s": round(tq, 3), "start_s": round(t0, 3), "duration_s": round(d, 3)})
    for ts in cues.turn_onsets:
        r = _event_rng(seed, group, _K_BROW, ts)
        t0, d = ts + r.uniform(*rules.brow_delay_s), r.uniform(0.5, 0.9)
        _brow(am, t, t0, d, rules.brow_amp)
        onsets.append({"trigger_s": round(ts, 3), "start_s": round(t0, 3), "duration_s": round(d, 3)})
    return questions, onsets


def listening_gaze(h: np.ndarray, v: np.ndarray, t, user_speaking: np.ndarray, cues: Cues, rules: Rules,
                   seed: int, group: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(e): the avatar's gaze track ``(h, v)`` held on the user while they speak, averted when it takes the turn."""
    scale = 1.0 - (1.0 - rules.listen_gaze_scale) * user_speaking
    h, v = h * scale, v * scale
    out = []
    for ta in cues.avatar_turn_onsets:
        r = _event_rng(seed, group, _K_AVERT, ta)
        u_p, d, side, lead = (r.random(), r.uniform(*rules.aversion_duration_s), r.choice([-1.0, 1.0]),
                              r.uniform(0.0, 0.2))
        if u_p >= rules.aversion_p:
            continue
        b = _bump(t, ta - lead, d, 0.15, 0.3)
        h = h * (1 - b) + side * rules.aversion_amp * b
        v = v * (1 - b) + 0.6 * rules.aversion_amp * b
        out.append({"trigger_s": round(ta, 3), "start_s": round(ta - lead, 3), "duration_s": round(d, 3),
                    "side": side})
    return h, v, out

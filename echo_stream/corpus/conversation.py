"""One conversation: the script, both speakers' audio and motion, the transcript and the events."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .. import blinks, motion
from ..errors import InputError
from .base import AFFECTS, FPS, SPF, SR, _CI
from .lexicon import _AVATAR_BACKCHANNELS, _AVATAR_NEUTRAL, _EARLY_SCRIPTS, _USER_BACKCHANNELS, _USER_NEUTRAL
from .plans import AVATAR_VOICE, Phone, SpeechPlan, USER_VOICE, Voice, plan_speech
from .idle import (HEAD6, _bump, _event_rng, _lowpass, _spans_track, _unit, apply_gaze, head_idle,
                   speaking_face, vowel_envelope)
from .listener import (AFFECT_BASELINE, AFFECT_DYNAMICS, RULES, Cues, Rules, backchannel_nods, brow_raises,
                       listening_gaze, micro_nods, mirrored_smiles)
from .synthesis import render_speech

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
    turn_ends = set()          # the user's last sentence end before the avatar's next turn
    questions, phrase_pauses = [], []
    kinds = [u for u in utts if u.kind == "turn"]
    for i, u in enumerate(kinds):
        if u.speaker != "user":
            continue
        if i + 1 < len(kinds) and kinds[i + 1].speaker == "avatar":
            turn_ends.add(u.start + u.plan.sentences[-1][1])
        questions += [u.start + e for (_, e, text) in u.plan.sentences if text.endswith("?")]
        sent_ends = [e for (_, e, _) in u.plan.sentences]
        # a phrase-internal pause: silence of 0.15-0.4 s inside a sentence (word gaps are < 0.08 s)
        phrase_pauses += [u.start + p.start for p in u.plan.phones
                          if p.symbol == "sil" and 0.15 <= p.end - p.start < 0.4
                          and not any(abs(p.start - e) < 1e-9 for e in sent_ends)]
    avatar_turn_onsets = [b.start for a, b in zip(kinds, kinds[1:]) if a.speaker == "user" and b.speaker == "avatar"]
    affect_lines = [u for u in utts if u.affect_line]
    affect_onset = affect_lines[0].start + 1.0
    affect_established = max(u.end for u in affect_lines)
    late_start = max(early_s, affect_established + context_gap_s)
    alpha = blinks.smoothstep((t - affect_onset) / rules.affect_ramp_s)
    dyn_a, dyn_n = AFFECT_DYNAMICS[affect], AFFECT_DYNAMICS["neutral"]

    def dyn(name: str, at: float) -> float:
        a = float(blinks.smoothstep((at - affect_onset) / rules.affect_ramp_s))
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
    um, user_blinks, (gh, gv) = speaking_face(user_phones, t, duration, rng_b, 3.0, 0.12)
    apply_gaze(um, gh, gv)
    noise_u = rng_b.standard_normal((n, 6))
    um[:, HEAD6] += head_idle(noise_u, 1.0, np.array([0.03, 0.05, 0.02, 0.01, 0.008, 0.01]))
    user_env = vowel_envelope(user_phones, n)
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
    am, avatar_blinks, (gh, gv) = speaking_face(avatar_phones, t, duration, rng_ab, rules.blink_mean_interval_s,
                                                0.08)
    noise_a = rng_ab.standard_normal((n, 6))
    amps = np.array([0.02, 0.035, 0.015, 0.006, 0.004, 0.008])
    idle_n = head_idle(noise_a, dyn_n["head_speed"], amps * dyn_n["head_amp"])
    idle_a = head_idle(noise_a, dyn_a["head_speed"], amps * dyn_a["head_amp"])
    am[:, HEAD6] += (1 - alpha)[:, None] * idle_n + alpha[:, None] * idle_a
    avatar_env = vowel_envelope(avatar_phones, n)
    speak_a = _lowpass(avatar_env, 0.6)
    gest_a = _unit(_lowpass(rng_ab.standard_normal(n), 0.4))
    am[:, _CI["headYaw"]] += 0.03 * speak_a * gest_a
    am[:, _CI["headPitch"]] -= 0.015 * speak_a

    # the listener rules (listener.py)
    user_spans = [(u.start, u.end) for u in utts if u.speaker == "user"]
    cues = Cues(phrase_ends=phrase_ends, turn_ends=turn_ends, phrase_pauses=sorted(phrase_pauses),
                questions=sorted(q for q in questions if q < duration - 0.3), turn_onsets=turn_onsets,
                user_speech=user_spans, avatar_turn_onsets=avatar_turn_onsets, smiles=user_smiles)
    nods = backchannel_nods(am, t, cues, rules, dyn, seed, g)
    micro = micro_nods(am, t, cues, rules, seed, g)
    avatar_smiles = mirrored_smiles(am, t, cues, rules, dyn, seed, g)
    question_brows, brows = brow_raises(am, t, cues, rules, seed, g)
    gh, gv, aversions = listening_gaze(gh, gv, t, _spans_track(t, user_spans), cues, rules, seed, g)
    apply_gaze(am, gh, gv)

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
        "user_questions": [round(x, 3) for x in cues.questions],
        "user_phrase_pauses": [round(x, 3) for x in cues.phrase_pauses],
        "user_turn_ends": sorted(round(x, 3) for x in turn_ends),
        "avatar_turn_onsets": [round(x, 3) for x in avatar_turn_onsets],
        "avatar_micro_nods": micro, "avatar_question_brows": question_brows, "avatar_gaze_aversions": aversions,
        "avatar_blinks": [round(x, 3) for x in avatar_blinks], "user_blinks": [round(x, 3) for x in user_blinks],
    }
    return Conversation(cid, int(index), g, affect, split_for(g, seed), duration, avatar_audio, user_audio,
                        avatar_motion, user_motion, transcript, events)



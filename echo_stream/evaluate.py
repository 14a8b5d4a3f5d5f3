"""``echo-stream eval``: lip sync, SDCM interference, listener responsiveness, long-range context, Fréchet distance.

Every rollout goes through the pipeline's own stage cores (``MemoryStage`` and
``DiffusionStage``, fed with the shared feature code), so the figures describe
what ``generate`` and ``serve`` produce. Writes ``eval.json`` and ``eval.png``.

Metrics
-------
* ``lip_sync``: Pearson correlation between mouth opening (``jawOpen``) and the
  avatar audio's smoothed RMS envelope, per clip, averaged — on held-out
  synthetic conversations and on real TTS speech (espeak-ng clips kept in
  ``tests/data/tts``).
* ``sdcm_interference``: lip sync per 10-s segment with the user stream
  present vs silent (same seed), for the model and for an entangled-fusion
  ablation checkpoint (single cross-attention over concatenated audio + user
  keys): the mean drop and |difference| with 95 % bootstrap intervals over
  segments, and the ablation's drop minus the model's (paired).
* ``listener``: for the model, the model with its user branch off (user
  features silenced) and the ground truth: non-lip motion energy while the
  user speaks or just after vs during silence; nod energy (``headPitch``
  1.2-3 Hz band) in the 1.5 s after user pauses (found in the user's audio)
  vs elsewhere; smile mirroring: max cross-correlation (lags 0-1.5 s)
  between the user's smile and the avatar's.
* ``rules``: every listener rule of :mod:`echo_stream.corpus.listener`
  measured from the conversation's events (:func:`echo_stream.corpus.rule_metrics`)
  on the same three, plus blinks.
  ``listener`` and ``rules`` of the model (and with its user branch off) are means over
  ``reaction_seeds`` sampling seeds (``seed``, ``seed + 1``, ...): a reaction is drawn, and three
  held-out conversations hold few events (9 questions), so one seed's brow figure moves by ±40 %;
  ``rules_seed_sd`` gives the spread of the per-seed means.
* ``real_user``: the same avatar audio and seed with and without a real
  person's face (the Pexels test video, tracked) and voice (espeak-ng clips):
  mean |difference| of non-lip and lip channels.
* ``long_range``: the same media with two different early transcripts
  (positive vs negative affect, ≥ 30 s before the end); mean absolute
  difference of the avatar's motion over the last 10 s, with LCU on and with
  LCU off (memory frozen at its initial state).
* ``frechet``: Fréchet distance between Gaussians fitted to per-frame
  [motion, velocity] of generated and held-out ground-truth motion.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from . import config, features, media, motion, schemas
from .arguments.training import add_eval_arguments as add_arguments  # noqa: F401 (the command's arguments)
from .manifest import read_manifest
from .chain import local_call, run_chain
from .errors import InputError
from .stages import Packet
from .stages.diffusion import DiffusionStage
from .stages.memory import MemoryStage
from .transcript import Segment

LIP = motion.REGION_SLICES["lips"]
NON_LIP = np.array([i for i in range(motion.NUM_CHANNELS) if i not in set(LIP.tolist())])
SMILE = [motion.CHANNEL_INDEX["mouthSmileLeft"], motion.CHANNEL_INDEX["mouthSmileRight"]]


def rollout(model, feats: dict, transcript: list[Segment] = (), seed: int = 0, use_memory: bool = True,
            chunk_frames: int = 8, stride: int | None = None, blinks: bool = True,
            user_guidance: float = 1.0, reactions: bool = True) -> np.ndarray:
    """Motion (T, 58) for per-frame features, streamed through the memory and diffusion stage cores
    (``blinks=False``: without the spontaneous blinks generation adds, ``reactions=False``: without the
    reaction head's gestures; both off: the diffusion model's own output)."""
    T = len(feats["avatar_audio"])
    ms = MemoryStage(model=model, use_memory=use_memory, stride=stride)
    ds = DiffusionStage(model=model, stride=stride, blinks=blinks, user_guidance=user_guidance, reactions=reactions)
    call = local_call({"memory": ms, "diffusion": ds})   # the pipeline's chain, from the features on, to motion
    sid = "eval"
    ds.set_seed(sid, seed)
    if transcript:
        from .pipeline import transcript_batch
        ms.add_transcript(transcript_batch(sid, transcript))
    out = np.zeros((T, motion.NUM_CHANNELS), np.float32)
    for f0 in range(0, T, chunk_frames):
        f1 = min(T, f0 + chunk_frames)
        frames = np.arange(f0, f1)
        p = Packet(sid, end=f1 == T)
        p.put(schemas.make_batch(schemas.FEATURES, {
            "session_id": [sid] * len(frames), "seq": frames, "pts": frames / config.FPS, "frame": frames,
            **{c: feats[c][f0:f1] for c in schemas.FEATURE_COLUMNS}}), schemas.FEATURES)
        for q in run_chain(call, p, first="memory", last="diffusion"):
            mw = q.get(schemas.MOTION_WINDOW)
            if mw is not None and mw.num_rows:
                out[schemas.column(mw, "frame")] = schemas.column(mw, "motion")
    return out


def silence_user(feats: dict) -> dict:
    out = dict(feats)
    for c in ("user_audio", "user_video", "user_blend", "user_present"):
        out[c] = np.zeros_like(feats[c])
    return out


def audio_only_features(samples: np.ndarray) -> dict:
    av = features.offline_audio_features(samples)
    T = len(av)
    return {"avatar_audio": av, "user_audio": np.zeros_like(av),
            "user_video": np.zeros((T, config.USER_VIDEO_DIM), np.float32),
            "user_blend": np.zeros((T, motion.NUM_CHANNELS), np.float32),
            "user_present": np.zeros((T, 3), np.float32)}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = min(len(a), len(b))
    a, b = a[:n] - a[:n].mean(), b[:n] - b[:n].mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else 0.0


def lip_sync(m: np.ndarray, samples: np.ndarray) -> float:
    return pearson(m[:, motion.CHANNEL_INDEX["jawOpen"]], features.rms_envelope(samples))


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to rows of a and b."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    eps = 1e-6 * np.eye(a.shape[1])  # constant channels make the covariances singular
    s1, s2 = np.cov(a, rowvar=False) + eps, np.cov(b, rowvar=False) + eps
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _with_velocity(m: np.ndarray) -> np.ndarray:
    return np.concatenate([m, np.diff(m, axis=0, prepend=m[:1]) * config.FPS], 1)


def band_energy(x: np.ndarray, lo: float = 1.2, hi: float = 3.0, win: int = 25) -> np.ndarray:
    """Per-frame energy of x in a frequency band (sliding FFT window of ``win`` frames)."""
    x = x - np.convolve(x, np.ones(win) / win, mode="same")
    freqs = np.fft.rfftfreq(win, 1 / config.FPS)
    band = (freqs >= lo) & (freqs <= hi)
    out = np.zeros(len(x))
    for i in range(len(x)):
        seg = x[max(0, i - win // 2): i + win // 2 + 1]
        if len(seg) == win:
            out[i] = np.abs(np.fft.rfft(seg * np.hanning(win)))[band].sum()
    return out


def user_speech_mask(user_samples: np.ndarray, T: int) -> np.ndarray:
    env = features.rms_envelope(user_samples)[:T]
    env = np.pad(env, (0, max(0, T - len(env))))
    return env > 0.1 * (env.max() + 1e-9)


def listener_metrics(m: np.ndarray, user_samples: np.ndarray, user_smile: np.ndarray | None) -> dict:
    T = len(m)
    speaking = user_speech_mask(user_samples, T)
    vel = np.abs(np.diff(m[:, NON_LIP], axis=0, prepend=m[:1, NON_LIP])).mean(1)
    # during user speech or within 1 s after it, vs the rest
    after = np.convolve(speaking.astype(float), np.ones(config.FPS), mode="full")[:T] > 0
    res = {"nonlip_motion_user_active": float(vel[after].mean()) if after.any() else None,
           "nonlip_motion_user_silent": float(vel[~after].mean()) if (~after).any() else None}
    ends = np.flatnonzero(speaking[:-1] & ~speaking[1:]) + 1  # user pause onsets
    post = np.zeros(T, bool)
    for e in ends:
        post[e: e + int(1.5 * config.FPS)] = True
    nod = band_energy(m[:, motion.CHANNEL_INDEX["headPitch"]])
    res["nod_energy_after_pauses"] = float(nod[post].mean()) if post.any() else None
    res["nod_energy_elsewhere"] = float(nod[~post].mean()) if (~post).any() else None
    res["user_pauses"] = int(len(ends))
    if user_smile is not None and np.std(user_smile) > 0:
        av = m[:, SMILE].mean(1)
        n = min(len(av), len(user_smile))
        res["smile_mirroring_corr"] = max(pearson(user_smile[: n - lag], av[lag:n])
                                          for lag in range(0, int(1.5 * config.FPS)))
    return res


# ------------------------------------------------------------------------------------------------------
def _load_manifest(corpus: Path, split: str) -> list[dict]:
    return [r for r in read_manifest(corpus) if r.get("split") == split]


def _read_motion(path: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    return np.stack([t.column(c).to_numpy() for c in motion.CHANNELS], 1).astype(np.float32)


#: the listener-rule metrics of :func:`echo_stream.corpus.rule_metrics` reported per variant
RULE_METRICS = ("nod_power_ratio", "micro_nod_power_ratio", "smile_xcorr", "smile_lag_s", "question_brow_rise",
                "turn_brow_rise", "gaze_listening_ratio", "gaze_aversion_rise", "head_motion_listening",
                "blinks_per_min", "blink_closure_s", "blink_max_gap_s", "blink_max")
SEGMENT_S = 10.0


def segment_lip_sync(m: np.ndarray, samples: np.ndarray, seconds: float = SEGMENT_S) -> np.ndarray:
    """Lip sync (:func:`lip_sync`) of consecutive ``seconds``-long segments (the units of the bootstrap)."""
    env = features.rms_envelope(samples)
    n = min(len(m), len(env))
    step = int(seconds * config.FPS)
    return np.array([pearson(m[i:i + step, motion.CHANNEL_INDEX["jawOpen"]], env[i:i + step])
                     for i in range(0, n - step + 1, step)])


def bootstrap_ci(x: np.ndarray, n: int = 2000, seed: int = 0, stat=np.mean) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of ``stat`` over the rows of ``x``."""
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = np.array([stat(x[rng.integers(0, len(x), len(x))]) for _ in range(n)])
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def _mean_table(rows: list[dict], keys) -> dict:
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None and np.isfinite(r[k])]
        if vals:
            out[k] = float(np.mean(vals))
    return out


def _interference(present: list[np.ndarray], silent: list[np.ndarray]) -> dict:
    """Lip sync with the user present vs silent, per 10-s segment: mean drop and |difference|, 95 % CIs."""
    p, q = np.concatenate(present), np.concatenate(silent)
    drop, absdiff = q - p, np.abs(q - p)
    return {"segments": int(p.size), "lip_sync_user_present": float(p.mean()), "lip_sync_user_silent": float(q.mean()),
            "drop": float(drop.mean()), "drop_ci95": bootstrap_ci(drop),
            "abs_diff": float(absdiff.mean()), "abs_diff_ci95": bootstrap_ci(absdiff)}


def evaluate(checkpoint: str | None, corpus: str, out_dir: str, ablation: str | None = None,
             tts_dir: str | None = None, max_clips: int = 4, seed: int = 0, progress: bool = True,
             stride: int | None = None, user_guidance: float = 1.0, reaction_seeds: int = 3) -> dict:
    """Every metric of the module docstring; ``reaction_seeds``: sampling seeds the listener and rule metrics
    of the model are averaged over; ``stride``: new frames per window of every rollout (None: the
    config's own ``new_frames``; serving's low-latency windows use fewer); ``user_guidance``: see
    ``EchoModel.sample`` (every rollout)."""
    from .corpus import rule_metrics
    from .featurize import featurize_conversation
    from .pipeline import load_model
    from .transcript import load as load_transcript

    if reaction_seeds < 1:
        raise InputError("--reaction-seeds", f"{reaction_seeds}: give 1 or more seeds")
    model = load_model(checkpoint, None)
    abl = load_model(ablation, None) if ablation else None
    corpus_p = Path(corpus)
    rows = _load_manifest(corpus_p, "heldout")[:max_clips] or _load_manifest(corpus_p, "train")[:max_clips]
    def roll(*a, **kw):    # every rollout of this evaluation at the chosen stride and guidance
        return rollout(*a, stride=stride, user_guidance=user_guidance, **kw)

    res: dict = {"checkpoint": checkpoint or "default", "ablation": ablation, "corpus": corpus, "stride": stride,
                 "user_guidance": user_guidance, "clips": [r["conversation_id"] for r in rows],
                 "reaction_seeds": list(range(seed, seed + reaction_seeds))}
    per_seed: dict = {"model": {}, "user_branch_off": {}}     # name -> seed -> rule rows
    t0 = time.perf_counter()
    ls, seg = [], {"model": ([], []), "ablation": ([], [])}
    listener = {"ground_truth": [], "model": [], "user_branch_off": []}
    rules = {"ground_truth": [], "model": [], "user_branch_off": []}
    gen_all, gt_all = [], []
    tts_dir = tts_dir or str(Path(__file__).resolve().parents[1] / "tests" / "data" / "tts")
    tts = sorted(Path(tts_dir).glob("*.ogg")) if os.path.isdir(tts_dir) else []
    it = rows
    if progress:
        from tqdm import tqdm
        it = tqdm(rows, desc="eval clips")
    for r in it:
        feats = featurize_conversation(r, corpus_p)
        samples = media.decode_audio(corpus_p / r["avatar_media"])
        user_samples = media.decode_audio(corpus_p / r["user_media"]) if media.probe(
            corpus_p / r["user_media"]).has_audio else np.zeros(1, np.float32)
        segs = load_transcript(str(corpus_p / r["transcript"])) if r.get("transcript") else []
        events = json.loads((corpus_p / r["events"]).read_text()) if r.get("events") else None
        user_motion = _read_motion(corpus_p / r["user_motion"]) if r.get("user_motion") else None
        user_smile = None if user_motion is None else user_motion[:, SMILE].mean(1)
        m = roll(model, feats, segs, seed)
        m_off = roll(model, silence_user(feats), segs, seed)
        ls.append(lip_sync(m, samples))
        seg["model"][0].append(segment_lip_sync(m, samples))
        seg["model"][1].append(segment_lip_sync(m_off, samples))
        if abl is not None:
            seg["ablation"][0].append(segment_lip_sync(roll(abl, feats, segs, seed), samples))
            seg["ablation"][1].append(segment_lip_sync(roll(abl, silence_user(feats), segs, seed), samples))
        variants = {"model": m, "user_branch_off": m_off}
        if r.get("avatar_motion"):
            gt = _read_motion(corpus_p / r["avatar_motion"])[: len(m)]
            variants["ground_truth"] = gt
            gen_all.append(_with_velocity(m))
            gt_all.append(_with_velocity(gt))
        for name, x in variants.items():
            listener[name].append(listener_metrics(x, user_samples, user_smile))
            rules[name].append(rule_metrics(x, user_motion=user_motion, events=events))
            if name in per_seed:
                per_seed[name].setdefault(seed, []).append(rules[name][-1])
        for k in res["reaction_seeds"][1:]:       # the drawn reactions under other seeds
            for name, f in (("model", feats), ("user_branch_off", silence_user(feats))):
                x = roll(model, f, segs, k)
                listener[name].append(listener_metrics(x, user_samples, user_smile))
                rules[name].append(rule_metrics(x, user_motion=user_motion, events=events))
                per_seed[name].setdefault(k, []).append(rules[name][-1])
    res["lip_sync_heldout_synthetic"] = float(np.mean(ls))
    res["lip_sync_per_clip"] = ls
    sdcm = {"model": _interference(*seg["model"])}
    if abl is not None:
        sdcm["entangled_ablation"] = _interference(*seg["ablation"])
        d = np.concatenate(seg["ablation"][1]) - np.concatenate(seg["ablation"][0]) \
            - (np.concatenate(seg["model"][1]) - np.concatenate(seg["model"][0]))
        sdcm["entangled_minus_sdcm_drop"] = float(d.mean())
        sdcm["entangled_minus_sdcm_drop_ci95"] = bootstrap_ci(d)
    sdcm["note"] = (f"lip sync per {SEGMENT_S:g}-s segment of the held-out clips, user present vs silent (same "
                    "seed); drop = silent - present; 95 % bootstrap intervals over segments")
    res["sdcm_interference"] = sdcm
    keys = ("nonlip_motion_user_active", "nonlip_motion_user_silent", "nod_energy_after_pauses",
            "nod_energy_elsewhere", "user_pauses", "smile_mirroring_corr")
    res["listener"] = {name: _mean_table(v, keys) for name, v in listener.items() if v}
    for v in res["listener"].values():
        if v.get("nod_energy_elsewhere"):
            v["nod_energy_ratio"] = v["nod_energy_after_pauses"] / v["nod_energy_elsewhere"]
    res["rules"] = {name: _mean_table(v, RULE_METRICS) for name, v in rules.items() if v}
    res["rules_seed_sd"] = {}
    for name, by_seed in per_seed.items():
        means = [_mean_table(v, RULE_METRICS) for v in by_seed.values()]
        res["rules_seed_sd"][name] = {k: float(np.std([m_[k] for m_ in means if k in m_]))
                                      for k in RULE_METRICS if all(k in m_ for m_ in means)}
    if gt_all:
        res["frechet_motion"] = frechet(np.concatenate(gen_all), np.concatenate(gt_all))
    # real speech
    tts_scores = {}
    for p in tts:
        s_ = media.decode_audio(p)
        tts_scores[p.name] = lip_sync(roll(model, audio_only_features(s_), (), seed), s_)
    if tts_scores:
        res["lip_sync_real_tts"] = float(np.mean(list(tts_scores.values())))
        res["lip_sync_real_tts_per_clip"] = tts_scores
    res["long_range"] = long_range(model, corpus_p, rows, seed, stride, user_guidance)
    real = real_user_effect(model, tts, seed, stride, user_guidance)
    if real:
        res["real_user"] = real
    res["eval_seconds"] = time.perf_counter() - t0
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(res, f, indent=2)
    plot(res, os.path.join(out_dir, "eval.png"))
    return res


REAL_USER_VIDEO = Path(__file__).resolve().parents[1] / "tests" / "data" / "real" / "WolfgangLanger_Pexels.mp4"


def real_user_effect(model, tts: list[Path], seed: int = 0, stride: int | None = None,
                     user_guidance: float = 1.0) -> dict:
    """The same avatar audio and seed with and without a real user: a real person's face (Pexels video,
    tracked by the bundled face tracker) and a real voice (the espeak-ng clips in another order).

    Mean |difference| of the avatar's motion, non-lip channels vs lip channels (blinks excluded: they
    follow the seed only)."""
    import tempfile

    from .corpus.files import _write_wav
    from .featurize import featurize_conversation

    if len(tts) < 2 or not REAL_USER_VIDEO.is_file():
        return {}
    clips = [media.decode_audio(p) for p in tts]
    gap = np.zeros(int(0.6 * config.SAMPLE_RATE), np.float32)
    avatar = np.concatenate([x for c in clips for x in (c, gap)])
    user = np.concatenate([x for c in clips[1:] + clips[:1] for x in (gap, c)])
    with tempfile.TemporaryDirectory() as d:
        _write_wav(os.path.join(d, "avatar.wav"), avatar)
        feats = featurize_conversation({"avatar_media": "avatar.wav", "user_media": str(REAL_USER_VIDEO)}, d)
    T = len(feats["avatar_audio"])
    aligned = np.zeros(T * config.SAMPLES_PER_FRAME, np.float32)
    aligned[:min(user.size, aligned.size)] = user[:aligned.size]
    feats["user_audio"] = features.offline_audio_features(aligned)
    feats["user_present"][:, 0] = 1.0
    with_user = rollout(model, feats, (), seed, stride=stride, blinks=False, user_guidance=user_guidance)
    without = rollout(model, silence_user(feats), (), seed, stride=stride, blinks=False, user_guidance=user_guidance)
    diff = np.abs(with_user - without)
    blink = [motion.CHANNEL_INDEX["eyeBlinkLeft"], motion.CHANNEL_INDEX["eyeBlinkRight"]]
    nonlip = np.array([c for c in NON_LIP if c not in blink])
    return {"seconds": T / config.FPS, "user_face_frames": int(feats["user_present"][:, 2].sum()),
            "nonlip_mean_abs_diff": float(diff[:, nonlip].mean()), "lip_mean_abs_diff": float(diff[:, LIP].mean()),
            "head_pose_mean_abs_diff": float(diff[:, [motion.CHANNEL_INDEX[c] for c in motion.HEAD_POSE]].mean()),
            "lip_sync_with_user": lip_sync(with_user, avatar), "lip_sync_without_user": lip_sync(without, avatar)}


POSITIVE = "I got the job! This is wonderful news, I am so happy, thank you so much, it is great."
NEGATIVE = "I lost my job. This is terrible news, I am so sad and worried, I am sorry, it is awful."


def long_range(model, corpus: Path, rows: list[dict], seed: int, stride: int | None = None,
               user_guidance: float = 1.0) -> dict:
    """Same media, early transcript positive vs negative; behaviour difference in the last 10 s."""
    from .featurize import featurize_conversation

    rows = [r for r in rows if r.get("duration_s", 0) >= 40] or rows
    if not rows:
        return {}
    feats = featurize_conversation(rows[0], corpus)
    T = len(feats["avatar_audio"])
    late = slice(max(0, T - 10 * config.FPS), T)
    out = {"clip": rows[0]["conversation_id"], "seconds": T / config.FPS}
    for name, use_memory in (("lcu_on", True), ("lcu_off", False)):
        runs = []
        for text in (POSITIVE, NEGATIVE):
            segs = [Segment(1.0, 5.0, "user", text)]
            runs.append(rollout(model, feats, segs, seed, use_memory=use_memory, stride=stride,
                                user_guidance=user_guidance)[late])
        out[name] = {"mean_abs_diff_last10s": float(np.abs(runs[0] - runs[1]).mean()),
                     "smile_diff_last10s": float(runs[0][:, SMILE].mean() - runs[1][:, SMILE].mean())}
    return out


#: reactions shown in the plot, as (metric, label, neutral value: what "no reaction" measures)
PLOT_REACTIONS = (("nod_power_ratio", "nods after\nsentence ends", 1.0),
                  ("micro_nod_power_ratio", "micro-nods\nat commas", 1.0),
                  ("smile_xcorr", "mirrored\nsmiles", 0.0),
                  ("question_brow_rise", "brows after\nquestions", 0.0),
                  ("gaze_aversion_rise", "gaze away\ntaking turn", 0.0),
                  ("gaze_listening_ratio", "gaze on the\nspeaking user", 1.0))


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.6))
    ax = axes[0, 0]
    names = ["synthetic", "real TTS"]
    vals = [res.get("lip_sync_heldout_synthetic", 0), res.get("lip_sync_real_tts", 0)]
    ax.bar(names, vals, color=["#4c72b0", "#55a868"])
    ax.axhline(0.65, ls="--", c="k", lw=0.8)
    ax.set_title("lip sync (Pearson r; dashed: 0.65)")
    ax.set_ylim(min(0, *vals) - 0.05, 1)
    ax = axes[0, 1]
    si = res.get("sdcm_interference", {})
    labels, vals, errs = [], [], []
    for key, label in (("model", "SDCM"), ("entangled_ablation", "entangled")):
        if key in si:
            lo, hi = si[key]["abs_diff_ci95"]
            labels.append(label)
            vals.append(si[key]["abs_diff"])
            errs.append([si[key]["abs_diff"] - lo, hi - si[key]["abs_diff"]])
    if labels:
        ax.bar(labels, vals, yerr=np.array(errs).T, capsize=6, color=["#4c72b0", "#c44e52"][:len(labels)])
    ax.set_title("interference: |lip sync, user present - silent|\n(per 10-s segment; 95 % bootstrap)")
    ax = axes[0, 2]
    lr = res.get("long_range", {})
    ax.bar(["LCU on", "LCU off"], [lr.get("lcu_on", {}).get("smile_diff_last10s", 0),
                                   lr.get("lcu_off", {}).get("smile_diff_last10s", 0)], color=["#4c72b0", "#8172b2"])
    ax.set_title("affect 30 s+ earlier: smile difference, last 10 s")
    # reactions: each variant's effect (metric - its no-reaction value) as a share of the ground truth's
    ax = plt.subplot2grid((2, 3), (1, 0), colspan=2, fig=fig)
    axes[1, 0].remove()
    axes[1, 1].remove()
    rules = res.get("rules", {})
    gt = rules.get("ground_truth", {})
    shown = [(k, lab, z) for k, lab, z in PLOT_REACTIONS if k in gt and abs(gt[k] - z) > 1e-9]
    x = np.arange(len(shown))
    for i, (variant, color) in enumerate((("ground_truth", "#999999"), ("model", "#4c72b0"),
                                          ("user_branch_off", "#dd8452"))):
        v = rules.get(variant, {})
        ax.bar(x + (i - 1) * 0.27, [(v.get(k, z) - z) / (gt[k] - z) for k, _, z in shown], 0.27, color=color,
               label=variant.replace("_", " "))
    ax.axhline(0.5, ls="--", c="k", lw=0.8)
    ax.set_xticks(x, [lab for _, lab, _ in shown], fontsize=8)
    ax.set_ylabel("effect / ground truth's effect")
    ax.set_title("listener reactions on held-out conversations (dashed: half the ground truth's)")
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.25)
    ax = axes[1, 2]
    ru = res.get("real_user", {})
    ax.bar(["non-lip", "lips"], [ru.get("nonlip_mean_abs_diff", 0), ru.get("lip_mean_abs_diff", 0)],
           color=["#4c72b0", "#55a868"])
    ax.set_title("real user's face + voice on vs off:\nmean |motion difference|")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    res = evaluate(args.checkpoint, args.corpus, args.out, ablation=args.ablation, tts_dir=args.tts,
                   max_clips=args.clips, seed=args.seed, reaction_seeds=args.reaction_seeds,
                   progress=not args.quiet, stride=args.stride, user_guidance=args.user_guidance)
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("per_clip")}, indent=2))
    return 0

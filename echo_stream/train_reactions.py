"""``echo-stream train --stage reactions``: the listener-reaction head of a trained model.

Starts from a trained checkpoint (``--init-from``, stage 2), adds :class:`~echo_stream.model.reactions.ReactionHead`
(everything else frozen and unchanged) and trains it on the shards:

1. onsets of each reaction kind are found in every conversation's ground-truth motion
   (:func:`~echo_stream.model.reactions.detect_onsets`), and the gesture templates measured there
   (:func:`~echo_stream.model.reactions.measure_templates`);
2. the head reads random crops of the user's per-frame features (the same columns serving computes)
   and learns the onsets' soft labels with binary cross-entropy; the held-out split's loss and each kind's
   average precision are logged;
3. the model is saved with the head marked trained (``<out>/reactions/final``; ``--export`` as for the other stages),
   with ``reactions.json`` beside it: onset counts, the validation figures, the loss curve.

A few minutes on 2 CPU cores for the bundled corpus's 36 minutes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import ShardDataset, audio_draw, augment_audio
from .errors import InputError
from .model import reactions as R
from .model.checkpoint import default_checkpoint_path, load_checkpoint, save_checkpoint
from .model.echo import EchoModel

log = logging.getLogger(__name__)

USER_COLUMNS = ("user_audio", "user_video", "user_blend", "user_present")


def own_track(conv, lookahead: int) -> torch.Tensor:
    """(frames, 4): :func:`~echo_stream.model.reactions.own_voice` over a whole conversation (rows past its end
    taken as silence, as a window's lookahead there)."""
    own = np.array(conv.arrays["avatar_audio"], np.float32)
    pad = np.zeros((lookahead,) + own.shape[1:], np.float32)
    pad[..., R.ENERGY] = R.SILENT[0]
    return R.own_voice(torch.from_numpy(np.concatenate([own, pad]))[None], lookahead)[0]


def _tensors(conv, a: int, b: int, own: torch.Tensor) -> list[torch.Tensor]:
    """The head's inputs over frames ``[a, b)``: the user columns, then the avatar's ``own`` voice
    (:func:`own_track`)."""
    return [torch.from_numpy(np.array(conv.arrays[c][a:b], np.float32)) for c in USER_COLUMNS] + [own[a:b]]


def _val_bce(head, ds, ys, own, member: int | None = None) -> float:
    head.eval()
    with torch.no_grad():
        logits = torch.cat([head(*(t[None] for t in _tensors(c, 0, c.frames, own[id(c)])), member=member)[0]
                            for c in ds.conversations])
    return round(float(F.binary_cross_entropy_with_logits(logits, torch.cat(ys))), 5)


def _calibrate(head, convs, own) -> dict:
    """Scale each kind's onset probabilities so that their sum -- the expected number of onsets -- matches the
    onsets found in conversations the head was not fitted on (``head.calibration``, clipped to 0.5-3). A head
    trained on 21 conversations is under-confident on new ones (held-out sums 0.6-0.8 of the true counts), so
    the track fires too few reactions; but 4 conversations of the bundled corpus give factors too noisy to
    use (``--calibration-convs``, off by default; the README). Returns the counts and the factors."""
    onsets = [R.detect_onsets(c.arrays["motion"]) for c in convs]
    with torch.no_grad():
        p = torch.cat([head.probabilities(*(t[None] for t in _tensors(c, 0, c.frames, own[id(c)])))[0] for c in convs])
    out = {}
    for k, kind in enumerate(R.KINDS):
        true, expected = sum(len(o[kind]) for o in onsets), float(p[:, k].sum())
        factor = float(np.clip(true / expected, 0.5, 3.0)) if expected > 0 and true > 0 else 1.0
        head.calibration[k] = factor
        out[kind] = {"true_onsets": true, "expected_onsets": round(expected, 2), "factor": round(factor, 3)}
    return out


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve of ``scores`` for binary ``labels`` (NaN without positives)."""
    pos = labels > 0
    if not pos.any():
        return float("nan")
    order = np.argsort(-scores)
    hits = pos[order]
    prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(prec[hits].mean())


def train_reactions(shards_dir, out_dir, init_from, *, steps: int = 1500, batch_size: int = 16, crop_s: float = 16.0,
                    lr: float = 2e-3, seed: int = 0, export=None, progress: bool = True,
                    weight_decay: float = 0.05, val_every: int = 100, calibration_convs: int = 0) -> Path:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    base = load_checkpoint(init_from)
    cfg = dataclasses.replace(base.cfg, reactions=True)
    model = EchoModel(cfg)
    # the base's own reaction head (if any) is replaced: only the diffusion weights carry over
    missing, unexpected = model.load_state_dict({k: v for k, v in base.state_dict().items()
                                                 if not k.startswith("reactions.")}, strict=False)
    if unexpected or not all(k.startswith("reactions.") for k in missing):
        raise InputError(init_from, f"its weights do not fit the model with a reaction head (missing "
                                    f"{missing[:5]}, unexpected {unexpected[:5]}); pass a checkpoint that "
                                    f"`echo-stream train --stage 2` wrote")
    model.checkpoint_meta = dict(base.checkpoint_meta)
    head = model.reactions
    train_ds = ShardDataset(shards_dir, "train", cfg)
    # the last conversations of the training split calibrate the head's onset counts (not fitted on)
    n_cal = calibration_convs
    if n_cal and len(train_ds.conversations) <= 2 * n_cal:
        raise InputError("--calibration-convs", f"{n_cal}: the training split has {len(train_ds.conversations)} "
                                                f"conversations; hold out fewer than half of them (or 0: off)")
    cal_convs = train_ds.conversations[len(train_ds.conversations) - n_cal:] if n_cal else []
    fit_convs = train_ds.conversations[:len(train_ds.conversations) - n_cal]
    try:
        val_ds = ShardDataset(shards_dir, "heldout", cfg)
    except Exception:  # noqa: BLE001 - no held-out split: validate on nothing
        val_ds = None

    def labelled(convs):
        onsets = [R.detect_onsets(c.arrays["motion"]) for c in convs]
        return onsets, [torch.from_numpy(R.onset_targets(o, c.frames)) for o, c in zip(onsets, convs)]

    t_start = time.perf_counter()
    own = {id(c): own_track(c, cfg.lookahead_frames)
           for c in train_ds.conversations + (val_ds.conversations if val_ds is not None else [])}
    train_on, train_y = labelled(fit_convs)
    templates, gain_std = R.measure_templates([c.arrays["motion"] for c in fit_convs], train_on)
    head.templates.copy_(torch.from_numpy(templates))
    head.gain_std.copy_(torch.from_numpy(gain_std))
    with torch.no_grad():
        head.set_input_stats(torch.cat([head.features(*(t[None] for t in _tensors(c, 0, c.frames, own[id(c)])[:4]))[0]
                                        for c in fit_convs]), torch.cat([own[id(c)] for c in fit_convs]))
    counts = {k: int(sum(len(o[k]) for o in train_on)) for k in R.KINDS}
    share = R.variance_share([c.arrays["motion"] for c in fit_convs], train_on,
                             model.motion_std.numpy())
    log.info("reaction onsets in the training motion: %s", counts)

    crop = int(crop_s * cfg.fps)
    frozen = [p for n, p in model.named_parameters() if not n.startswith("reactions.")]
    for p in frozen:
        p.requires_grad_(False)
    val_on, val_y = labelled(val_ds.conversations) if val_ds is not None else (None, None)
    weights = np.array([c.frames for c in fit_convs], np.float64)
    weights /= weights.sum()
    n_members = len(head.members)
    curves, val_curve = [], []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps * n_members, desc="train reactions", unit="step")
    for member in range(n_members):     # each network with its own seed: its own init, crops and dropout
        torch.manual_seed(seed + member)
        rng = np.random.default_rng(seed + member)
        net = head.members[member]
        if member:
            net.load_state_dict(type(net)(*net.args).state_dict())   # initialised afresh under its own seed
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        curve: list[float] = []
        for step in range(steps):
            xs, ys = [], []
            for _ in range(batch_size):
                i = int(rng.choice(len(weights), p=weights))
                c = fit_convs[i]
                a = int(rng.integers(0, max(1, c.frames - crop)))
                b = min(c.frames, a + crop)
                t = _tensors(c, a, b, own[id(c)])
                ua = t[0].numpy().copy()        # another microphone or voice: level and spectral tilt (as stage 2)
                augment_audio(ua, *audio_draw(rng))
                t[0] = torch.from_numpy(ua)
                if b - a < crop:    # a short conversation: pad with "no user" frames (labels 0)
                    t = [torch.cat([x, x.new_zeros((crop - (b - a),) + x.shape[1:])]) for x in t]
                y = train_y[i][a:b]
                xs.append(t)
                ys.append(torch.cat([y, y.new_zeros((crop - (b - a), y.shape[1]))]))
            batch = [torch.stack([x[j] for x in xs]) for j in range(len(xs[0]))]
            logits, y = head(*batch, member=member), torch.stack(ys)
            # the voice kinds' mean loss, plus the glance's (its own path only: the trunk is detached there)
            loss = (F.binary_cross_entropy_with_logits(logits[..., :-1], y[..., :-1])
                    + F.binary_cross_entropy_with_logits(logits[..., -1], y[..., -1]))
            opt.zero_grad()
            loss.backward()
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
            opt.step()
            curve.append(float(loss.detach()))
            if val_ds is not None and val_every and (step + 1) % val_every == 0:
                val_curve.append((member, step + 1, _val_bce(head, val_ds, val_y, own, member)))
                net.train()
            if bar is not None:
                bar.update()
                if step % 50 == 0:
                    bar.set_postfix(member=member, loss=f"{np.mean(curve[-50:]):.4f}")
        curves.append(curve)
    if bar is not None:
        bar.close()
    head.eval()
    head.trained.fill_(1.0)
    calibration = _calibrate(head, cal_convs, own) if cal_convs else {}
    val: dict = {}
    if val_ds is not None:
        with torch.no_grad():
            probs = [head.probabilities(*(t[None] for t in _tensors(c, 0, c.frames, own[id(c)])))[0]
                     for c in val_ds.conversations]
            logit_all = torch.cat([head(*(t[None] for t in _tensors(c, 0, c.frames, own[id(c)])))[0]
                                   for c in val_ds.conversations])
        y_all = torch.cat(val_y)
        val["bce"] = float(F.binary_cross_entropy_with_logits(logit_all, y_all))
        p_all = torch.cat(probs).numpy()
        for k, kind in enumerate(R.KINDS):
            # an onset counts as found when a frame within 2 of it scores: dilate the labels
            lab = np.convolve((y_all[:, k].numpy() >= 0.5).astype(float), np.ones(5), "same") > 0
            val[f"{kind}_average_precision"] = average_precision(p_all[:, k], lab)
            val[f"{kind}_chance"] = float(lab.mean())
            val[f"{kind}_expected_onsets"] = float(p_all[:, k].sum())
            val[f"{kind}_true_onsets"] = int(sum(len(o[kind]) for o in val_on))
    dest = Path(out_dir) / "reactions" / "final"
    dest.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in base.checkpoint_meta.items() if k not in ("format", "code_version", "config_name")}
    meta["reactions"] = {"steps": steps, "init_from": str(init_from), "train_onsets": counts}
    save_checkpoint(model, dest, extra_meta=meta)
    summary = {"init_from": str(init_from), "steps": steps, "batch_size": batch_size, "crop_s": crop_s, "lr": lr,
               "seed": seed, "train_onsets": counts, "fitted_on": len(fit_convs),
               "calibration": calibration,
               "share_of_normalised_target_variance": share, "gain_std": dict(zip(R.KINDS, map(float, gain_std))),
               "validation": val, "seconds": round(time.perf_counter() - t_start, 1),
               "members": len(head.members), "validation_bce": val_curve,
               "loss_every_50": [[round(float(np.mean(c[i:i + 50])), 5) for i in range(0, len(c), 50)] for c in curves]}
    (dest.parent / "reactions.json").write_text(json.dumps(summary, indent=1))
    if export is not None:
        out = default_checkpoint_path() if str(export) == "default" else Path(export)
        save_checkpoint(model, out, extra_meta=meta)
        log.info("exported to %s", out)
    return dest

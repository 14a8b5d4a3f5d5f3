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


def _tensors(conv, a: int, b: int) -> list[torch.Tensor]:
    return [torch.from_numpy(np.array(conv.arrays[c][a:b], np.float32)) for c in USER_COLUMNS]


def _val_bce(head, ds, ys) -> float:
    head.eval()
    with torch.no_grad():
        logits = torch.cat([head(*(t[None] for t in _tensors(c, 0, c.frames)))[0] for c in ds.conversations])
    return round(float(F.binary_cross_entropy_with_logits(logits, torch.cat(ys))), 5)


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
                    weight_decay: float = 0.05, val_every: int = 100) -> Path:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    base = load_checkpoint(init_from)
    cfg = dataclasses.replace(base.cfg, reactions=True)
    model = EchoModel(cfg)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or not all(k.startswith("reactions.") for k in missing):
        raise InputError(init_from, f"its weights do not fit the model with a reaction head (missing "
                                    f"{missing[:5]}, unexpected {unexpected[:5]}); pass a checkpoint that "
                                    f"`echo-stream train --stage 2` wrote")
    model.checkpoint_meta = dict(base.checkpoint_meta)
    head = model.reactions
    train_ds = ShardDataset(shards_dir, "train", cfg)
    try:
        val_ds = ShardDataset(shards_dir, "heldout", cfg)
    except Exception:  # noqa: BLE001 - no held-out split: validate on nothing
        val_ds = None

    def labelled(ds):
        onsets = [R.detect_onsets(c.arrays["motion"]) for c in ds.conversations]
        return onsets, [torch.from_numpy(R.onset_targets(o, c.frames)) for o, c in zip(onsets, ds.conversations)]

    t_start = time.perf_counter()
    train_on, train_y = labelled(train_ds)
    templates, gain_std = R.measure_templates([c.arrays["motion"] for c in train_ds.conversations], train_on)
    head.templates.copy_(torch.from_numpy(templates))
    head.gain_std.copy_(torch.from_numpy(gain_std))
    with torch.no_grad():
        head.set_input_stats(torch.cat([head.features(*(t[None] for t in _tensors(c, 0, c.frames)))[0]
                                        for c in train_ds.conversations]))
    counts = {k: int(sum(len(o[k]) for o in train_on)) for k in R.KINDS}
    share = R.variance_share([c.arrays["motion"] for c in train_ds.conversations], train_on,
                             model.motion_std.numpy())
    log.info("reaction onsets in the training motion: %s", counts)

    crop = int(crop_s * cfg.fps)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    frozen = [p for n, p in model.named_parameters() if not n.startswith("reactions.")]
    for p in frozen:
        p.requires_grad_(False)
    val_on, val_y = labelled(val_ds) if val_ds is not None else (None, None)
    head.train()
    curve, val_curve = [], []
    it = range(steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="train reactions", unit="step")
    weights = np.array([c.frames for c in train_ds.conversations], np.float64)
    weights /= weights.sum()
    for step in it:
        xs, ys = [], []
        for _ in range(batch_size):
            i = int(rng.choice(len(weights), p=weights))
            c = train_ds.conversations[i]
            a = int(rng.integers(0, max(1, c.frames - crop)))
            b = min(c.frames, a + crop)
            t = _tensors(c, a, b)
            ua = t[0].numpy().copy()        # another microphone or voice: level and spectral tilt (as stage 2)
            augment_audio(ua, *audio_draw(rng))
            t[0] = torch.from_numpy(ua)
            if b - a < crop:    # a short conversation: pad with "no user" frames (labels 0)
                t = [torch.cat([x, x.new_zeros((crop - (b - a),) + x.shape[1:])]) for x in t]
            y = train_y[i][a:b]
            xs.append(t)
            ys.append(torch.cat([y, y.new_zeros((crop - (b - a), y.shape[1]))]))
        batch = [torch.stack([x[j] for x in xs]) for j in range(4)]
        logits = head(*batch)
        loss = F.binary_cross_entropy_with_logits(logits, torch.stack(ys))
        opt.zero_grad()
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        opt.step()
        curve.append(float(loss.detach()))
        if val_ds is not None and val_every and (step + 1) % val_every == 0:
            val_curve.append((step + 1, _val_bce(head, val_ds, val_y)))
            head.train()
        if progress and step % 50 == 0:
            it.set_postfix(loss=f"{np.mean(curve[-50:]):.4f}")
    head.eval()
    head.trained.fill_(1.0)
    val: dict = {}
    if val_ds is not None:
        with torch.no_grad():
            probs = [head.probabilities(*(t[None] for t in _tensors(c, 0, c.frames)))[0] for c in val_ds.conversations]
            logit_all = torch.cat([head(*(t[None] for t in _tensors(c, 0, c.frames)))[0]
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
               "seed": seed, "train_onsets": counts,
               "share_of_normalised_target_variance": share, "gain_std": dict(zip(R.KINDS, map(float, gain_std))),
               "validation": val, "seconds": round(time.perf_counter() - t_start, 1),
               "validation_bce": val_curve, "loss_every_50": [round(float(np.mean(curve[i:i + 50])), 5) for i in range(0, len(curve), 50)]}
    (dest.parent / "reactions.json").write_text(json.dumps(summary, indent=1))
    if export is not None:
        out = default_checkpoint_path() if str(export) == "default" else Path(export)
        save_checkpoint(model, out, extra_meta=meta)
        log.info("exported to %s", out)
    return dest

"""``echo-stream train``: two-stage training of the ECHO model from Parquet shards.

Stage 1 trains own audio -> motion (the user/context branch of SDCM off, no
memory); stage 2 trains the full model (SDCM user branch + LCU memory rolled
over each window's history, with gradients) starting from stage 1's weights.
Both minimise :meth:`EchoModel.loss` on batches from
:class:`echo_stream.dataset.ShardDataset` with AdamW, linear warm-up + cosine
decay and gradient clipping. The model's motion / audio normalisation comes
from the shards' ``dataset.json``.

Output directory::

    OUT/stage1/step-0001500/     a checkpoint: model.safetensors + config.json + meta.json
                                 (load_checkpoint reads it) + optimizer.safetensors (AdamW
                                 moments and RNG states) + trainer_state.json (step, schedule,
                                 sampler RNG state, optimizer scalars)
    OUT/stage1/LATEST            name of the newest complete checkpoint (replaced atomically)
    OUT/stage2/...               the same for stage 2
    OUT/final/                   the final model only (what ships: ~10 MB for tiny)
    OUT/loss.csv                 one row per step (train) and per evaluation (heldout)
    OUT/loss.png                 the loss curves
    OUT/train_summary.json       per stage: steps, seconds, steps/s, batch size; machine and versions

Every file is written under a temporary name and renamed into place; a step
directory becomes visible to ``--resume`` only once ``LATEST`` names it, so an
interrupted run resumes from its last complete checkpoint. Resuming restores
the weights, the AdamW state, the step, the learning-rate schedule and every
random state (batch sampler, noise generator), so a resumed run continues
exactly as an uninterrupted one would (same losses, bit for bit on the same
machine and thread count). Nothing is pickled: tensors go to safetensors,
scalars to JSON.

The default checkpoint
----------------------
``echo_stream/assets/checkpoints/tiny`` is produced by ONE command from
SYNTHETIC data that the project generates itself (:mod:`echo_stream.corpus`)::

    echo-stream train --make-corpus 20 --corpus out/corpus --out out/train --export default

which generates the synthetic corpus (20 one-minute conversations, when
``out/corpus`` has none), writes the shards (``out/train/shards``), runs stage
1 then stage 2 with the default settings of :data:`DEFAULTS` and writes
``out/train/final`` (10 MB) to the default checkpoint path. On 2 CPU cores
(measured): corpus ~1.5 min, shards ~1.5 min, stage 1 2000 steps x 32
windows at ~3.3 steps/s (~10 min, uncontended), stage 2 700 steps x 16 windows
with up to 47 history windows (30 s; back-propagation through the last 12 of
them, the transcript traces in closed form over the whole past) at ~0.73
steps/s with ``--threads 1`` while other jobs shared the cores (~16 min):
under 30 minutes in all. Add ``--time-budget 20m`` to cap the training part
on a slower machine (the schedules shrink to fit).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from . import __version__
from .arguments.training import add_train_arguments as add_arguments  # noqa: F401 (the command's arguments)
from .config import TRAIN_BPTT_WINDOWS, TRAIN_DEFAULTS, TRAIN_HISTORY_S, ModelConfig, StageSettings, get_config
from .dataset import FEATURE_COLUMNS, ShardDataset, read_dataset_info, write_shards
from .errors import CheckpointError, InputError
from . import atomic
from .model import read_checkpoint_config, EchoModel, default_checkpoint_path, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

STATE_FORMAT = "echo-stream/trainer-state"
STATE_VERSION = 1
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"
LATEST_NAME = "LATEST"
FINAL_DIR = "final"
LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"
SUMMARY_JSON = "train_summary.json"
CSV_FIELDS = ("stage", "step", "split", "loss", "fm", "vel", "lip_mse", "lr", "grad_norm", "history",
              "steps_per_s", "elapsed_s")


#: The default recipe (tiny config, 2 CPU cores): see the module docstring and docs.
DEFAULTS: dict[int, StageSettings] = TRAIN_DEFAULTS
DEFAULT_HISTORY_S = TRAIN_HISTORY_S
#: windows of each stage-2 history rolled through the LCU with gradients (the rest without): None = all
DEFAULT_BPTT_WINDOWS: int | None = TRAIN_BPTT_WINDOWS
#: learning-rate multiplier of the SDCM gate biases (a few scalars that must travel several logits)
GATE_LR_SCALE = 20.0
#: the user path is new in stage 2 (stage 1 never uses it) while the rest fine-tunes: it learns at this
#: multiple of the stage-2 rate (x4: 1.6e-3, near stage 1's 1e-3). At x1 the default checkpoint's
#: nods were still a tenth of the ground truth's after 400 stage-2 steps
USER_PATH_LR_SCALE = 4.0
USER_PATH_PREFIXES = ("user_encoder.", "denoiser.user_add.", "denoiser.user_hist_pos", "user_aux.")
#: share of --time-budget given to stage 1 when both stages run
STAGE1_BUDGET_SHARE = 0.45


# ============================================================================ small helpers

def _atomic_json(path: Path, obj: Any) -> None:
    atomic.write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def lr_at(step: int, total: int, base: float, warmup: int, min_frac: float) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up over ``warmup`` steps, then cosine to ``min_frac``."""
    warmup = max(0, min(int(warmup), max(total - 1, 0)))
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    prog = min(1.0, (step - warmup) / span)
    return base * (min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * prog)))


def _per_stage(value, stage: int, name: str):
    """A per-stage setting: a scalar (both stages), a (stage1, stage2) pair, or a {stage: value} dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get(stage, value.get(str(stage)))
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return value[0]
        if len(value) != 2:
            raise InputError(f"--{name}", f"give one value or two (stage 1, stage 2), got {len(value)}")
        return value[stage - 1]
    return value


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds from ``"1200"``, ``"1200s"``, ``"20m"``, ``"1.5h"`` (None stays None)."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text)
    t = str(text).strip().lower()
    mult = 1.0
    if t.endswith("h"):
        mult, t = 3600.0, t[:-1]
    elif t.endswith("m"):
        mult, t = 60.0, t[:-1]
    elif t.endswith("s"):
        t = t[:-1]
    try:
        v = float(t) * mult
    except ValueError:
        raise InputError("--time-budget", f"{text!r} is not a duration (e.g. 1200, 1200s, 20m, 1.5h)") from None
    if v <= 0:
        raise InputError("--time-budget", f"must be positive, got {text!r}")
    return v


# ============================================================================ optimizer / RNG state

def _param_groups(model: EchoModel, weight_decay: float) -> tuple[list[dict], list[str]]:
    """AdamW groups (matrices decay; biases, norms, gains and 1-d parameters do not) and the parameter
    names in the optimizer's flat index order."""
    decay, no_decay, gates, user_d, user_n, dn, nn_, gn, udn, unn = [], [], [], [], [], [], [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("cross.gate_bias"):
            gates.append(p)
            gn.append(name)
        elif name.startswith(USER_PATH_PREFIXES):
            (user_d if p.dim() >= 2 else user_n).append(p)
            (udn if p.dim() >= 2 else unn).append(name)
        elif p.dim() >= 2:
            decay.append(p)
            dn.append(name)
        else:
            no_decay.append(p)
            nn_.append(name)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0, "lr_scale": GATE_LR_SCALE})
    if user_d:
        groups.append({"params": user_d, "weight_decay": weight_decay, "lr_scale": USER_PATH_LR_SCALE})
    if user_n:
        groups.append({"params": user_n, "weight_decay": 0.0, "lr_scale": USER_PATH_LR_SCALE})
    return groups, dn + nn_ + gn + udn + unn


def optimizer_to_safetensors(opt: torch.optim.Optimizer, names: list[str],
                             extra: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (``state/<param name>/<key>``) and JSON scalars."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        pname = names[idx]
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state/{pname}/{k}"] = v.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(pname, {})[k] = v
    for k, v in extra.items():
        tensors[k] = v.contiguous().clone()
    groups = []
    for g in sd["param_groups"]:
        gg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
        gg["params"] = [names[i] for i in g["params"]]
        groups.append(gg)
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def optimizer_from_safetensors(opt: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor],
                               meta: dict) -> None:
    """Inverse of :func:`optimizer_to_safetensors` (checks that the parameter sets agree)."""
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if not key.startswith("state/"):
            continue
        pname, k = key[len("state/"):].rsplit("/", 1)
        if pname not in index:
            raise CheckpointError(f"optimizer state: unknown parameter '{pname}'")
        state.setdefault(index[pname], {})[k] = v
    for pname, sc in meta.get("scalar_state", {}).items():
        state.setdefault(index[pname], {}).update(sc)
    groups = []
    cur = opt.state_dict()["param_groups"]
    saved = meta["param_groups"]
    if len(saved) != len(cur):
        raise CheckpointError("optimizer state: parameter groups differ from the model's")
    for g, c in zip(saved, cur):
        if [index.get(n) for n in g["params"]] != c["params"]:
            raise CheckpointError("optimizer state: parameters differ from the model's")
        gg = {k: (tuple(v) if k == "betas" else v) for k, v in g.items() if k != "params"}
        gg["params"] = c["params"]
        groups.append(gg)
    opt.load_state_dict({"state": state, "param_groups": groups})


# ============================================================================ checkpoints

def latest_checkpoint(stage_dir: str | os.PathLike) -> Path | None:
    """The step directory ``LATEST`` names in a stage directory (None when there is none)."""
    d = Path(stage_dir)
    f = d / LATEST_NAME
    if not f.is_file():
        return None
    name = f.read_text().strip()
    p = d / name
    if not name or not (p / STATE_NAME).is_file():
        raise CheckpointError(f"{f}: names '{name}', which is not a complete checkpoint")
    return p


def read_trainer_state(ckpt_dir: str | os.PathLike) -> dict:
    p = Path(ckpt_dir) / STATE_NAME
    try:
        st = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: unreadable trainer state: {e}") from None
    if st.get("format") != STATE_FORMAT or st.get("version") != STATE_VERSION:
        raise CheckpointError(f"{p}: not a trainer state this code reads (format {st.get('format')!r}, "
                              f"version {st.get('version')!r})")
    return st


def _save_training_checkpoint(stage_dir: Path, model: EchoModel, opt, names: list[str], state: dict,
                              gen: torch.Generator, keep: int = 2) -> Path:
    from safetensors.torch import save

    step = int(state["step"])
    d = stage_dir / f"step-{step:07d}"
    if d.exists():  # a leftover of an interrupted save (LATEST never named it) or a re-save of this step
        shutil.rmtree(d)
    d.mkdir(parents=True)
    save_checkpoint(model, d, extra_meta={"stage": state["stage"], "step": step, "trainer": "echo-stream train",
                                          "dataset": state.get("dataset")})
    rng = {"rng/torch_global": torch.get_rng_state(), "rng/loss_generator": gen.get_state()}
    tensors, meta = optimizer_to_safetensors(opt, names, rng)
    atomic.write_bytes(d / OPTIMIZER_NAME, save(tensors, metadata={"format": STATE_FORMAT, "meta": json.dumps(meta)}))
    _atomic_json(d / STATE_NAME, state)
    atomic.write_bytes(stage_dir / LATEST_NAME, (d.name + "\n").encode())
    olds = sorted(p for p in stage_dir.iterdir() if p.is_dir() and p.name.startswith("step-") and p != d)
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return d


def _load_optimizer_file(d: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    p = d / OPTIMIZER_NAME
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any failure is a corrupt file
        raise CheckpointError(f"{p}: missing or corrupt optimizer state: {e}") from None
    return tensors, meta


# ============================================================================ CSV / plot

class _LossLog:
    """``loss.csv``: appended per step; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path):
        self.path = path
        self._f = None
        self._w = None

    def truncate_after(self, stage: int, step: int) -> None:
        rows = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                for r in csv.DictReader(f):
                    try:
                        s, st = int(r["stage"]), int(r["step"])
                    except (KeyError, ValueError):
                        continue
                    if s < stage or (s == stage and st <= step):
                        rows.append(r)
        text = [",".join(CSV_FIELDS)]
        for r in rows:
            text.append(",".join(str(r.get(k, "")) for k in CSV_FIELDS))
        atomic.write_bytes(self.path, ("\n".join(text) + "\n").encode())

    def open(self) -> None:
        if not self.path.is_file():
            atomic.write_bytes(self.path, (",".join(CSV_FIELDS) + "\n").encode())
        self._f = open(self.path, "a", newline="")
        self._w = csv.writer(self._f)

    def write(self, row: dict) -> None:
        self._w.writerow([_fmt(row.get(k, "")) for k in CSV_FIELDS])

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def read_loss_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a ``loss.csv`` with numbers parsed."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                if k == "split":
                    row[k] = v
                elif v in ("", None):
                    row[k] = None
                else:
                    row[k] = float(v) if k not in ("stage", "step", "history") else int(float(v))
            out.append(row)
    return out


def plot_losses(csv_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """``loss.png``: train loss (raw and smoothed) and heldout loss per stage, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_loss_csv(csv_path)
    stages = sorted({r["stage"] for r in rows}) or [1]
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    for ax, st in zip(axes[0], stages):
        tr = [(r["step"], r["loss"]) for r in rows if r["stage"] == st and r["split"] == "train" and r["loss"]]
        va = [(r["step"], r["loss"]) for r in rows if r["stage"] == st and r["split"] == "heldout" and r["loss"]]
        if tr:
            x, y = np.array(tr).T
            ax.plot(x, y, color="tab:blue", alpha=0.25, lw=0.8, label="train")
            ema, sm = y[0], []
            for v in y:
                ema = 0.95 * ema + 0.05 * v
                sm.append(ema)
            ax.plot(x, sm, color="tab:blue", lw=1.8, label="train (smoothed)")
        if va:
            x, y = np.array(va).T
            ax.plot(x, y, "o-", color="tab:orange", lw=1.5, ms=4, label="heldout")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (flow matching + velocity)")
        ax.set_title(f"stage {st}: " + ("own audio -> motion" if st == 1 else "full model (SDCM + LCU)"))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    try:
        with atomic.atomic_path(png_path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


# ============================================================================ one stage

def _roll_memory(model: EchoModel, batch: dict, grad_windows: int) -> dict:
    """Replace ``context_*`` by ``memory``: the first windows rolled without gradients, the last
    ``grad_windows`` with them (truncated back-propagation through the LCU)."""
    texts = batch.pop("context_texts")
    ctx = {name: batch.pop("context_" + name) for name in FEATURE_COLUMNS}
    b, n = ctx["avatar_audio"].shape[:2]
    mem = model.memory_init(b)

    def step(m, j):
        emb = model.encode_transcript([row[j] for row in texts])
        return model.memory_update(m, ctx["avatar_audio"][:, j], ctx["user_audio"][:, j], ctx["user_video"][:, j],
                                   ctx["user_blend"][:, j], ctx["user_present"][:, j], emb)

    with torch.no_grad():
        for j in range(n - grad_windows):
            mem = step(mem, j)
    mem = mem.detach()
    for j in range(max(0, n - grad_windows), n):
        mem = step(mem, j)
    batch["memory"] = mem
    return batch


@dataclass
class _StageRun:
    stage: int
    settings: StageSettings
    out_dir: Path
    seed: int
    checkpoint_every: int
    eval_batches: int
    history: int
    bptt: int | None
    progress: bool
    deadline: float | None
    dataset_summary: dict


def _evaluate(model: EchoModel, ds: ShardDataset, run: _StageRun) -> dict:
    """Mean loss over fixed heldout batches (same batches and noise every time)."""
    rng = np.random.Generator(np.random.PCG64([run.seed, run.stage, 7]))
    gen = torch.Generator().manual_seed(run.seed * 1000 + run.stage + 500)
    was = model.training
    model.eval()
    logs: dict[str, list] = {}
    try:
        with torch.no_grad():
            for _ in range(run.eval_batches):
                if run.stage == 1:
                    batch = ds.stage1_batch(rng, run.settings.batch_size)
                else:
                    batch = ds.stage2_batch(rng, run.settings.batch_size, run.history)
                batch.pop("history_windows", None)
                _, lg = model.loss(batch, run.stage, known_drop=run.settings.known_drop,
                                       long_known=run.settings.long_known, generator=gen)
                for k, v in lg.items():
                    if k != "stage":
                        logs.setdefault(k, []).append(v)
    finally:
        model.train(was)
    return {k: float(np.mean(v)) for k, v in logs.items()}


def _train_stage(model: EchoModel, train_ds: ShardDataset, val_ds: ShardDataset | None, run: _StageRun,
                 loss_log: _LossLog, resume_dir: Path | None) -> tuple[EchoModel, dict]:
    if resume_dir is not None:  # a resumed stage keeps the settings it started with
        saved = read_trainer_state(resume_dir)
        sv = dict(saved["settings"], betas=tuple(saved["settings"]["betas"]))
        saved_settings = StageSettings(**sv)
        if saved_settings != run.settings or saved.get("history_windows") != run.history \
                or saved.get("bptt_windows") != run.bptt:
            log.warning("stage %d: resuming with the settings of %s (%s), not the ones given now", run.stage,
                        resume_dir, saved_settings)
        run = dataclasses.replace(run, settings=saved_settings, history=int(saved["history_windows"]),
                                  bptt=saved.get("bptt_windows"))
    st = run.settings
    stage_dir = run.out_dir / f"stage{run.stage}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    groups, names = _param_groups(model, st.weight_decay)
    opt = torch.optim.AdamW(groups, lr=st.lr, betas=st.betas, eps=1e-8, weight_decay=st.weight_decay)
    gen = torch.Generator().manual_seed(run.seed * 1000 + run.stage)
    rng = np.random.Generator(np.random.PCG64([run.seed, run.stage]))
    step, total, elapsed0 = 0, int(st.steps), 0.0
    if resume_dir is not None:
        state = read_trainer_state(resume_dir)
        tensors, meta = _load_optimizer_file(resume_dir)
        optimizer_from_safetensors(opt, names, tensors, meta)
        torch.set_rng_state(tensors["rng/torch_global"])
        gen.set_state(tensors["rng/loss_generator"])
        rng.bit_generator.state = state["sampler_rng"]
        step, total, elapsed0 = int(state["step"]), int(state["total_steps"]), float(state.get("elapsed_s", 0.0))
        log.info("stage %d: resumed from %s at step %d of %d", run.stage, resume_dir, step, total)
        loss_log.truncate_after(run.stage, step)
    else:
        loss_log.truncate_after(run.stage, 0)
    loss_log.open()
    model.train()

    def state_dict(done: bool) -> dict:
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "code_version": __version__,
                "stage": run.stage, "step": step, "total_steps": total, "done": done,
                "settings": dataclasses.asdict(st), "seed": run.seed, "history_windows": run.history,
                "bptt_windows": run.bptt, "sampler_rng": rng.bit_generator.state,
                "elapsed_s": elapsed0 + (time.perf_counter() - t_start), "config": model.cfg.name,
                "dataset": run.dataset_summary}

    bar = None
    if run.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc=f"stage {run.stage}", unit="step", dynamic_ncols=True)
    t_start = time.perf_counter()
    t_rate, n_rate = time.perf_counter(), 0
    sec_per_step = None
    calibrated_at = step + 6
    ema = None
    params = [p for g in groups for p in g["params"]]
    stopped_by_budget = False
    try:
        while step < total:
            lr = lr_at(step, total, st.lr, st.warmup, st.min_lr_frac)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            if run.stage == 1:
                batch = train_ds.stage1_batch(rng, st.batch_size)
            else:
                batch = train_ds.stage2_batch(rng, st.batch_size, run.history)
            n_hist = int(batch.pop("history_windows", 0))
            if run.stage == 2 and run.bptt is not None and n_hist > run.bptt:
                batch = _roll_memory(model, batch, run.bptt)
            loss, logs = model.loss(batch, run.stage, known_drop=st.known_drop, long_known=st.long_known,
                                    generator=gen)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"stage {run.stage} step {step}: loss is {float(loss)} "
                                         "(lower the learning rate)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, st.clip))
            opt.step()
            step += 1
            n_rate += 1
            now = time.perf_counter()
            rate = n_rate / max(now - t_rate, 1e-9)
            ema = logs["loss"] if ema is None else 0.95 * ema + 0.05 * logs["loss"]
            loss_log.write({"stage": run.stage, "step": step, "split": "train", "loss": logs["loss"],
                            "fm": logs["fm"], "vel": logs["vel"], "lip_mse": logs["lip_mse"], "lr": lr,
                            "grad_norm": gnorm, "history": n_hist, "steps_per_s": rate,
                            "elapsed_s": elapsed0 + now - t_start})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr:.2e}", steps_s=f"{rate:.2f}")
            # time budget: estimate the step time after a few steps, then shrink the schedule to fit
            if run.deadline is not None:
                if step == calibrated_at or (step > calibrated_at and step % 50 == 0):
                    sec_per_step = (now - t_rate) / max(n_rate, 1)
                    reserve = 3.0 + (0.0 if val_ds is None else 0.05 * run.eval_batches * sec_per_step)
                    fit = step + int(max(0.0, run.deadline - now - reserve) / sec_per_step)
                    if fit < total:
                        total = max(step, fit)
                        if bar is not None:
                            bar.total = total
                            bar.refresh()
                if now >= run.deadline and step < total:
                    total = step
                    stopped_by_budget = True
            last = step >= total
            if step % run.checkpoint_every == 0 or last:
                if val_ds is not None and run.eval_batches > 0:
                    vl = _evaluate(model, val_ds, run)
                    loss_log.write({"stage": run.stage, "step": step, "split": "heldout", **vl,
                                    "history": run.history if run.stage == 2 else 0,
                                    "elapsed_s": elapsed0 + time.perf_counter() - t_start})
                loss_log.flush()
                _save_training_checkpoint(stage_dir, model, opt, names, state_dict(done=last), gen)
                with contextlib.suppress(Exception):
                    plot_losses(loss_log.path, loss_log.path.parent / LOSS_PNG)
    finally:
        if bar is not None:
            bar.close()
        loss_log.close()
    if stopped_by_budget:
        log.warning("stage %d: time budget reached at step %d", run.stage, step)
    seconds = time.perf_counter() - t_start
    return model, {"step": step, "total": total, "ema_loss": ema, "seconds": seconds,
                   "steps_this_run": n_rate, "steps_per_s": n_rate / max(seconds, 1e-9),
                   "batch_size": st.batch_size, "history_windows": run.history if run.stage == 2 else 0,
                   "stopped_by_time_budget": stopped_by_budget}


# ============================================================================ the function API

def _load_for_training(path: str | os.PathLike, cfg: ModelConfig | None, seed: int = 0) -> EchoModel:
    """A checkpoint to train on; with ``cfg`` differing only in name, fusion, transcript traces or user
    history, its weights in a ``cfg`` model.

    Switching the fusion (SDCM <-> the entangled ablation) keeps every tensor, so the ablation can start
    from the same stage-1 weights as the SDCM model and differ only in stage 2. Adding transcript traces
    or user history (``user_history_frames``) to a checkpoint without them (stage 1 never uses either)
    starts their weights as a fresh ``seed``-ed model would, so a stage-1 checkpoint of any of these
    configs can start stage 2 of another.
    """
    if cfg is not None:
        src_cfg = read_checkpoint_config(path)
        same = dict(name=cfg.name, fusion=cfg.fusion, text_trace_decays=cfg.text_trace_decays,
                    user_history_frames=cfg.user_history_frames, user_aux_weight=cfg.user_aux_weight)
        if src_cfg != cfg and dataclasses.replace(src_cfg, **same) == cfg:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = EchoModel(cfg)
            src = load_checkpoint(path).state_dict()
            if src_cfg.text_traces and src_cfg.text_trace_decays != cfg.text_trace_decays:
                raise CheckpointError(f"{path}: has transcript traces {src_cfg.text_trace_decays}, the config "
                                      f"asks for {cfg.text_trace_decays}; traces can only be added")
            if src_cfg.user_history_frames and src_cfg.user_history_frames != cfg.user_history_frames:
                raise CheckpointError(f"{path}: has {src_cfg.user_history_frames} user history frames, the config "
                                      f"asks for {cfg.user_history_frames}; user history can only be added")
            missing = set(model.state_dict()) - set(src)
            if not all(k.startswith(("text_trace.", "user_aux.")) or k == "denoiser.user_hist_pos" for k in missing):
                raise CheckpointError(f"{path}: missing weights {sorted(missing)[:5]}")
            model.load_state_dict(src, strict=not missing)
            return model.train()
    return load_checkpoint(path, config=cfg).train()


def train(shards_dir: str | os.PathLike, out_dir: str | os.PathLike, config: str | ModelConfig | None = "tiny",
          stage: int | str = "both", steps=None, batch_size=None, lr=None, seed: int = 0, resume: bool = True,
          init_from: str | os.PathLike | None = None, checkpoint_every: int | None = None, progress: bool = True,
          time_budget_s: float | None = None, *, history_s: float = DEFAULT_HISTORY_S,
          bptt_windows: int | None = DEFAULT_BPTT_WINDOWS, eval_batches: int = 4,
          export: str | os.PathLike | None = None, threads: int | None = None,
          long_known: float | None = None) -> Path:
    """Train (stage 1, stage 2 or both) and return the final checkpoint directory (``OUT/final``).

    ``steps``, ``batch_size``, ``lr``: one value for every stage, a ``(stage1, stage2)`` pair or a
    ``{stage: value}`` dict; None takes :data:`DEFAULTS`. ``resume``: continue from the newest
    checkpoint in ``out_dir`` (a finished stage is skipped); False starts over (earlier checkpoints
    in ``out_dir`` are replaced). ``init_from``: a checkpoint to start the first stage that runs
    from (stage 2 alone otherwise starts from ``out_dir``'s stage-1 result). ``checkpoint_every``:
    steps between checkpoints (default: about 10 per stage). ``time_budget_s``: wall-clock limit
    for the whole call; each stage shrinks its schedule to fit its share (stage 1 gets
    :data:`STAGE1_BUDGET_SHARE` when both run). ``history_s``: stage-2 history length (windows
    ``ceil(history_s / 0.64 s)`` for tiny); ``bptt_windows``: windows of that history rolled with
    gradients (None = all). ``export``: also write the final model there (``"default"`` = the
    packaged default checkpoint path). ``long_known``: stage-2 share of windows trained with more
    known frames than ``overlap_frames`` (what low-latency serving strides use; None: the default).
    """
    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(int(threads) if threads else _threads())
    try:
        return _train(shards_dir, out_dir, config, stage, steps, batch_size, lr, seed, resume, init_from,
                      checkpoint_every, progress, time_budget_s, history_s, bptt_windows, eval_batches, export, t0,
                      long_known)
    finally:
        torch.set_num_threads(threads_before)


def _train(shards_dir, out_dir, config, stage, steps, batch_size, lr, seed, resume, init_from, checkpoint_every,
           progress, time_budget_s, history_s, bptt_windows, eval_batches, export, t0, long_known=None) -> Path:
    stages = {"both": [1, 2], "1": [1], "2": [2], 1: [1], 2: [2]}.get(stage if isinstance(stage, int) else str(stage))
    if stages is None:
        raise InputError("--stage", f"must be 1, 2 or both, got {stage!r}")
    if long_known is not None:      # checked before any training, whatever the stages
        if not 0.0 <= long_known <= 1.0:
            raise InputError("--long-known", f"must be a probability in [0, 1], got {long_known}")
        if 2 not in stages:
            raise InputError("--long-known", "applies to stage 2 only; this run trains stage 1 only")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = read_dataset_info(shards_dir)
    cfg = None if config is None else (config if isinstance(config, ModelConfig) else get_config(config))
    summary = {"shards": str(Path(shards_dir).resolve()), "splits": info.get("splits"),
               "hours": info.get("total", {}).get("hours"), "source": info.get("source")}
    if not resume:
        for d in (out / "stage1", out / "stage2", out / FINAL_DIR):
            if d.exists():
                shutil.rmtree(d)
        with contextlib.suppress(OSError):
            (out / LOSS_CSV).unlink()
    loss_log = _LossLog(out / LOSS_CSV)
    model: EchoModel | None = None
    results = {}
    for i, n in enumerate(stages):
        base = DEFAULTS[n]
        settings = dataclasses.replace(
            base,
            steps=int(_per_stage(steps, n, "steps") or base.steps),
            batch_size=int(_per_stage(batch_size, n, "batch-size") or base.batch_size),
            lr=float(_per_stage(lr, n, "lr") or base.lr))
        if long_known is not None and n == 2:
            settings = dataclasses.replace(settings, long_known=float(long_known))
        settings = dataclasses.replace(settings, warmup=min(settings.warmup, max(1, settings.steps // 10)))
        if settings.steps < 1 or settings.batch_size < 1 or settings.lr <= 0:
            raise InputError("train", f"stage {n}: steps, batch size and lr must be positive ({settings})")
        stage_dir = out / f"stage{n}"
        resume_dir = latest_checkpoint(stage_dir) if resume else None
        if resume_dir is not None:
            state = read_trainer_state(resume_dir)
            model = _load_for_training(resume_dir, cfg, seed)
            if state.get("done"):
                log.info("stage %d: already finished (%s)", n, resume_dir)
                results[n] = {"step": state["step"], "total": state["total_steps"], "skipped": True}
                continue
        elif i == 0 and init_from is not None:
            model = _load_for_training(init_from, cfg, seed)
        elif n == 2 and model is None:
            prev = latest_checkpoint(out / "stage1")
            if prev is None:
                raise InputError("--stage 2", f"stage 2 starts from a stage-1 model: pass --init-from CHECKPOINT "
                                              f"or train stage 1 into {out} first")
            model = _load_for_training(prev, cfg, seed)
        elif model is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = EchoModel(cfg or "tiny")
            s = info["stats"]
            model.set_motion_stats(*_floor_motion_std(s["motion_mean"], s["motion_std"]))
            model.set_audio_stats(s["audio_mean"], np.maximum(np.asarray(s["audio_std"]), 1e-3))
        model.train()
        if resume_dir is None:  # (training draws its randomness from its own generators; this is belt and braces)
            torch.manual_seed(seed * 7919 + n)
        ds = ShardDataset(shards_dir, "train", model.cfg, augment=True)
        val = None
        if eval_batches > 0:
            splits = {s_["split"] for s_ in info["shards"]}
            if "heldout" in splits:
                val = ShardDataset(shards_dir, "heldout", model.cfg)
        deadline = None
        if time_budget_s is not None:
            remaining = [m for m in stages[i:]]
            share = STAGE1_BUDGET_SHARE if (n == 1 and 2 in remaining) else 1.0
            left = float(time_budget_s) - (time.perf_counter() - t0)
            deadline = time.perf_counter() + max(1.0, left * share)
        every = int(checkpoint_every) if checkpoint_every else max(10, settings.steps // 10)
        run = _StageRun(stage=n, settings=settings, out_dir=out, seed=seed, checkpoint_every=every,
                        eval_batches=eval_batches, history=ShardDataset.history_windows(model.cfg, history_s),
                        bptt=(None if not bptt_windows else int(bptt_windows)), progress=progress,
                        deadline=deadline, dataset_summary=summary)
        model, results[n] = _train_stage(model, ds, val, run, loss_log, resume_dir)
    if model is None:  # pragma: no cover - stages is never empty
        raise InputError("train", "nothing to train")
    final = out / FINAL_DIR
    meta = {"stage": stages[-1], "step": results[stages[-1]]["step"], "trainer": "echo-stream train",
            "dataset": summary, "synthetic_data": True if _all_synthetic(shards_dir, info) else None,
            "seed": seed, "stages": {str(k): v for k, v in results.items()}}
    model.eval()
    save_checkpoint(model, final, extra_meta=meta)
    if export is not None:
        dest = default_checkpoint_path() if str(export) == "default" else Path(export)
        save_checkpoint(model, dest, extra_meta=meta)
        log.info("exported the final checkpoint to %s", dest)
    if (out / LOSS_CSV).is_file():
        with contextlib.suppress(Exception):
            plot_losses(out / LOSS_CSV, out / LOSS_PNG)
    _atomic_json(out / SUMMARY_JSON, {
        "final": str(final), "config": model.cfg.name, "seed": seed, "threads": torch.get_num_threads(),
        "stages": {str(k): v for k, v in results.items()}, "total_seconds": time.perf_counter() - t0,
        "machine": _machine(), "versions": {"echo_stream": __version__, "torch": torch.__version__,
                                            "numpy": np.__version__}, "dataset": summary})
    return final


def _machine() -> dict:
    import platform

    from .machine import cpu_name

    return {"cpu": cpu_name(), "cores_usable": _threads(), "python": platform.python_version(),
            "platform": platform.platform()}


def _floor_motion_std(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """Corpus motion statistics with each std floored at 1 % of the channel's range (a channel that barely
    moves in the corpus must not blow up in normalised units)."""
    from . import motion

    rng = motion.CHANNEL_MAX - motion.CHANNEL_MIN
    return np.asarray(mean, np.float32), np.maximum(np.asarray(std, np.float32), 0.01 * rng)


def _all_synthetic(shards_dir, info: dict) -> bool:
    try:
        import pyarrow.parquet as pq

        for s in info["shards"]:
            col = pq.read_table(Path(shards_dir) / s["file"], columns=["synthetic"]).column("synthetic")
            if not all(col.to_pylist()):
                return False
        return True
    except Exception:  # noqa: BLE001 - metadata only
        return False


# ============================================================================ CLI

def run(args) -> int:
    """``echo-stream train``."""
    out = Path(args.out)
    shards = Path(args.shards) if args.shards else out / "shards"
    progress = not args.quiet
    if args.corpus:
        corpus = Path(args.corpus)
        manifest = corpus if corpus.suffix == ".jsonl" else corpus / "manifest.jsonl"
        if not manifest.is_file():
            if not args.make_corpus:
                raise InputError(str(manifest), "no manifest: pass --make-corpus N to generate a synthetic corpus")
            from . import corpus as corpus_mod

            t = time.perf_counter()
            corpus_mod.generate_corpus(str(manifest.parent), n_conversations=int(args.make_corpus),
                                       minutes=float(args.corpus_minutes), seed=int(args.seed), progress=progress)
            print(f"generated a SYNTHETIC corpus of {args.make_corpus} conversations in {manifest.parent} "
                  f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)
        if args.rewrite_shards or not (shards / "dataset.json").is_file():
            t = time.perf_counter()
            info = write_shards(manifest, shards, chunk_seconds=args.chunk_seconds, shard_rows=args.shard_rows,
                                progress=progress)
            print(f"wrote {len(info['shards'])} shards to {shards}: {info['total']['conversations']} conversations, "
                  f"{info['total']['hours'] * 60:.1f} min ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    elif not (shards / "dataset.json").is_file():
        raise InputError(str(shards), "no dataset.json: pass --shards DIR (written shards) or --corpus DIR")
    t = time.perf_counter()
    if args.stage == "reactions":
        return _run_reactions(args, shards, out, progress)
    final = train(shards, out, config=args.config, stage=args.stage, steps=args.steps, batch_size=args.batch_size,
                  lr=args.lr, seed=args.seed, resume=args.resume, init_from=args.init_from,
                  checkpoint_every=args.checkpoint_every, progress=progress,
                  time_budget_s=parse_duration(args.time_budget), history_s=args.history_s,
                  bptt_windows=args.bptt_windows or None, eval_batches=args.eval_batches, export=args.export,
                  threads=args.threads, long_known=args.long_known)
    size = sum(f.stat().st_size for f in final.iterdir() if f.is_file())
    return _report(args, f"final checkpoint: {final} ({size / 1e6:.1f} MB) after "
                         f"{(time.perf_counter() - t) / 60:.1f} min; losses in {out / LOSS_CSV} and {out / LOSS_PNG}")


def _report(args, line: str) -> int:
    print(line, file=sys.stderr)
    if args.export:
        dest = default_checkpoint_path() if args.export == "default" else Path(args.export)
        print(f"exported to {dest}", file=sys.stderr)
    return 0


def _run_reactions(args, shards: Path, out: Path, progress: bool) -> int:
    from .train_reactions import train_reactions

    if not args.init_from:
        raise InputError("--stage reactions", "needs the trained model to add the head to: pass --init-from "
                         "CHECKPOINT (e.g. OUT/final)")
    if args.calibration_convs < 0:
        raise InputError("--calibration-convs", f"{args.calibration_convs}: give 0 (off) or more conversations")
    steps = (args.steps or [1500])[-1]
    bs = (args.batch_size or [16])[-1]
    lr = (args.lr or [2e-3])[-1]
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    final = train_reactions(shards, out, args.init_from, steps=steps, batch_size=bs, lr=lr, seed=args.seed,
                            export=args.export, progress=progress, calibration_convs=args.calibration_convs)
    return _report(args, f"final checkpoint with the reaction head: {final} after "
                         f"{(time.perf_counter() - t) / 60:.1f} min; figures in {final.parent / 'reactions.json'}")


def main(argv: Iterable[str] | None = None) -> int:  # pragma: no cover - the package CLI wires run()
    parser = argparse.ArgumentParser(prog="echo-stream train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(list(argv) if argv is not None else None))

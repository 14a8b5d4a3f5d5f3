"""Checkpoints: ``model.safetensors`` + ``config.json`` (+ ``meta.json``); never pickle.

Layout of a checkpoint directory::

    config.json         ModelConfig fields only (so ``config.get_config(path)`` reads it too)
    model.safetensors   every persistent tensor of EchoModel (weights + normalisation buffers);
                        its metadata repeats the config (key ``config``) and the meta fields
    meta.json           code version, training stage, step, and any extra metadata

Every file is written to a temporary name in the same directory, flushed,
fsynced and renamed into place, so a crash never leaves a half-written file
under a final name. ``model.safetensors`` is renamed last.

Loading checks, each failure raising :class:`~echo_stream.errors.CheckpointError`
with a message naming the problem: missing / unreadable / corrupt files;
``config.json`` fields unknown to this code; ``config.json`` disagreeing with the
config embedded in the weights file; a requested config that differs from the
checkpoint's (naming each differing field); missing or unexpected tensor names;
tensor shape mismatches.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from .. import __version__
from ..config import ModelConfig, get_config
from .. import atomic
from ..errors import CheckpointError
from .echo import EchoModel, validate_config

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
META_NAME = "meta.json"
FORMAT = "echo-stream/checkpoint"


def default_checkpoint_path() -> Path:
    """The checkpoint shipped with the package: ``echo_stream/assets/checkpoints/tiny``."""
    return Path(__file__).resolve().parent.parent / "assets" / "checkpoints" / "tiny"


def _resolve(path: str | os.PathLike) -> tuple[Path, Path]:
    """(directory, weights file) for a checkpoint directory or a ``.safetensors`` path."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return p.parent, p
    return p, p / WEIGHTS_NAME


def save_checkpoint(model: EchoModel, dir_or_path: str | os.PathLike, extra_meta: dict | None = None) -> Path:
    """Write a checkpoint (see the module docstring); returns the weights file path.

    ``extra_meta`` (JSON-able) may carry e.g. ``{"stage": 2, "step": 12000}``.
    """
    from safetensors.torch import save

    directory, weights = _resolve(dir_or_path)
    directory.mkdir(parents=True, exist_ok=True)
    cfg_dict = dataclasses.asdict(model.cfg)
    extra = dict(extra_meta or {})
    meta = {
        "format": FORMAT,
        "code_version": __version__,
        "config_name": model.cfg.name,
        "stage": extra.pop("stage", None),
        "step": extra.pop("step", None),
        **extra,
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    st_meta = {"format": FORMAT, "config": json.dumps(cfg_dict, sort_keys=True),
               "meta": json.dumps(meta, sort_keys=True, default=str)}
    blob = save(tensors, metadata=st_meta)
    atomic.write_bytes(directory / CONFIG_NAME, (model.cfg.to_json() + "\n").encode())
    atomic.write_bytes(directory / META_NAME, (json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n").encode())
    atomic.write_bytes(weights, blob)
    return weights


def _config_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return [f"{k}: {da[k]!r} != {db[k]!r}" for k in da if da[k] != db.get(k)]


def _read_weights(weights: Path):
    from safetensors import safe_open

    if not weights.is_file():
        raise CheckpointError(f"{weights}: checkpoint weights file not found")
    try:
        tensors = {}
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{weights}: corrupt or unreadable safetensors file: {e}") from None
    return tensors, meta


def _config_from_dict(d, where: str) -> ModelConfig:
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected a JSON object of model config fields")
    try:
        return ModelConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: config does not match this code: {e}") from None


def _json_problem(e: BaseException) -> str:
    return "JSON nested too deeply" if isinstance(e, RecursionError) else str(e)


def read_checkpoint_config(path: str | os.PathLike) -> ModelConfig:
    """The config of a checkpoint (``config.json``, else the one embedded in the weights file)."""
    directory, weights = _resolve(path)
    cfg_file = directory / CONFIG_NAME
    if cfg_file.is_file():
        try:
            d = json.loads(cfg_file.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{cfg_file}: corrupt config file: {_json_problem(e)}") from None
        return _config_from_dict(d, str(cfg_file))
    _, meta = _read_weights(weights)
    if "config" not in meta:
        raise CheckpointError(f"{directory}: no {CONFIG_NAME} and no config embedded in {weights.name}")
    try:
        d = json.loads(meta["config"])
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{weights}: corrupt embedded config: {_json_problem(e)}") from None
    return _config_from_dict(d, f"{weights} (embedded config)")


def load_checkpoint(path: str | os.PathLike, config: ModelConfig | str | None = None,
                    device: str | torch.device = "cpu") -> EchoModel:
    """Load an EchoModel from a checkpoint directory or its ``.safetensors`` file.

    With ``config`` (a ModelConfig, a name or a JSON path), the checkpoint's config must equal it.
    Raises CheckpointError naming the mismatch or the broken file. The model is returned in eval mode.
    """
    directory, weights = _resolve(path)
    if not directory.exists():
        raise CheckpointError(f"{directory}: checkpoint not found")
    tensors, meta = _read_weights(weights)
    cfg_file = directory / CONFIG_NAME
    embedded = None
    if "config" in meta:
        try:
            embedded = _config_from_dict(json.loads(meta["config"]), f"{weights} (embedded config)")
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{weights}: corrupt embedded config: {_json_problem(e)}") from None
    if cfg_file.is_file():
        ckpt_cfg = read_checkpoint_config(directory)
        if embedded is not None and embedded != ckpt_cfg:
            raise CheckpointError(f"{cfg_file}: disagrees with the config stored in {weights.name}: "
                                  + "; ".join(_config_diff(ckpt_cfg, embedded)))
    elif embedded is not None:
        ckpt_cfg = embedded
    else:
        raise CheckpointError(f"{directory}: {CONFIG_NAME} not found (and no config embedded in {weights.name})")

    if config is not None:
        want = config if isinstance(config, ModelConfig) else get_config(config)
        diff = _config_diff(want, ckpt_cfg)
        if diff:
            raise CheckpointError(f"{directory}: checkpoint config does not match the requested config "
                                  f"'{want.name}' (requested != checkpoint): " + "; ".join(diff))
    try:
        validate_config(ckpt_cfg)
    except ValueError as e:
        raise CheckpointError(f"{directory}: invalid model config: {e}") from None

    model = EchoModel(ckpt_cfg)
    expected = model.state_dict()
    head = {k for k in expected if k.startswith("reactions.")}
    saved = {k for k in tensors if k.startswith("reactions.")}
    if head and saved and (head != saved or any(tuple(expected[k].shape) != tuple(tensors[k].shape) for k in head)):
        # a reaction head of an earlier layout (fewer kinds, no own-voice input): the rest of the model loads, the
        # head stays untrained (it never fires) until `train --stage reactions` fits one again
        log.warning("%s: its reaction head is of an earlier layout; loaded without reactions -- run `echo-stream "
                    "train --stage reactions --init-from %s` to fit a current one", directory, directory)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("reactions.")}
        tensors.update({k: expected[k] for k in head})
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    problems = []

    def listing(names: list[str]) -> str:
        return ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")

    if missing:
        problems.append(f"missing tensors: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {listing(unexpected)}")
    for name in sorted(set(expected) & set(tensors)):
        if tuple(expected[name].shape) != tuple(tensors[name].shape):
            problems.append(f"tensor '{name}': shape {tuple(tensors[name].shape)} in checkpoint, "
                            f"{tuple(expected[name].shape)} expected by config")
        elif tensors[name].dtype != expected[name].dtype:
            problems.append(f"tensor '{name}': dtype {tensors[name].dtype} in checkpoint, "
                            f"{expected[name].dtype} expected")
    if problems:
        raise CheckpointError(f"{weights}: does not match model config '{ckpt_cfg.name}': " + "; ".join(problems))
    model.load_state_dict(tensors, strict=True)
    model.checkpoint_meta = _parse_meta(meta)
    return model.to(device).eval()


def _parse_meta(meta: dict) -> dict:
    try:
        return json.loads(meta.get("meta", "{}"))
    except ValueError:
        return {}


def load_default_model(cfg: ModelConfig | str | None = None, device: str | torch.device = "cpu") -> EchoModel:
    """The shipped default checkpoint, or -- if none is there yet -- a seeded random model (with a WARNING)."""
    path = default_checkpoint_path()
    if (path / WEIGHTS_NAME).is_file():
        return load_checkpoint(path, config=cfg, device=device)
    want = cfg if isinstance(cfg, ModelConfig) or cfg is None else get_config(cfg)
    log.warning("no trained checkpoint at %s: using a randomly initialised (seed 0) %s model -- its motion is "
                "UNTRAINED; run `echo-stream train` to produce the default checkpoint",
                path, (want.name if want else "tiny"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = EchoModel(want)
    model.checkpoint_meta = {"untrained": True}
    return model.to(device).eval()

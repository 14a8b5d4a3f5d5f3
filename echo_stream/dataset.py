"""Training data: a conversation manifest -> Parquet shards of per-frame features and motion targets,
and the sampler that turns shards into training batches.

Features are computed by the *same* code the streaming pipeline runs
(:mod:`echo_stream.featurize`), so the model trains on exactly what it will see
when serving.

Manifest
--------
``manifest.jsonl`` (what :mod:`echo_stream.corpus` writes; any corpus with the
same fields works): one JSON object per conversation with paths relative to
the manifest's directory::

    {"conversation_id": "conv0000", "avatar_media": "conv0000/avatar.wav",
     "user_media": "conv0000/user.webm", "transcript": "conv0000/transcript.json",
     "avatar_motion": "conv0000/avatar_motion.parquet", "split": "train", ...}

``avatar_media`` (required) is the avatar's speech; ``user_media`` (optional)
is the user's webcam recording (its video stream gives the user's face as motion, its
audio stream the user audio) or an audio-only file; ``avatar_motion``
(required for training) is a Parquet motion table (``frame``, ``pts``, one
float column per :data:`echo_stream.motion.CHANNELS` name, the layout of
:func:`echo_stream.generate.motion_table`); ``transcript`` (optional) any file
:func:`echo_stream.transcript.load` reads.

Shards
------
The Parquet shard format (columns, ``dataset.json``) is documented and defined in
:mod:`echo_stream.shards`; :func:`featurize_conversation` (:mod:`echo_stream.featurize`) makes a
conversation's rows. Both are re-exported here.

Reading
-------
:class:`ShardDataset` loads one split into memory, re-joins each
conversation's chunks, and samples training batches (see its docstring).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from . import config, motion, tracks
from .arrays import take_rows
from .arguments.data import add_shards_arguments as add_arguments  # noqa: F401 (the command's arguments)
from .errors import InputError
from .featurize import featurize_conversation  # noqa: F401 (re-exported)
from .shards import (DATASET_JSON, DEFAULT_CHUNK_SECONDS, DEFAULT_SHARD_ROWS, FEATURE_COLUMNS,  # noqa: F401
                     FORMAT, FRAME_COLUMNS, SCHEMA_VERSION, TRANSCRIPT_TYPE, chunk_bounds, frame_column,
                     read_dataset_info, read_shard, shard_schema)

log = logging.getLogger(__name__)

read_motion_track = tracks.read_motion_track  # (re-exported: the one implementation is in tracks)


# ============================================================================ writing

def read_manifest(manifest: str | os.PathLike) -> tuple[list[dict], Path]:
    """``(rows, root)`` of a manifest (``.jsonl`` / ``.csv``), a directory holding one, or a directory laid out
    by the convention of ``docs/preprocess.md`` (see :func:`echo_stream.preprocess.read_inputs`)."""
    from .preprocess import read_inputs

    return read_inputs(manifest)


def write_shards(manifest: str | os.PathLike | Sequence[dict], out_dir: str | os.PathLike,
                 chunk_seconds: float = DEFAULT_CHUNK_SECONDS, shard_rows: int = DEFAULT_SHARD_ROWS,
                 progress: bool = True, *, root: str | os.PathLike | None = None,
                 on_error: str = "raise") -> dict:
    """Featurise every conversation of ``manifest`` and write training shards + ``dataset.json`` to ``out_dir``,
    sequentially in this process, from scratch.

    The same job as ``echo-stream preprocess`` (:func:`echo_stream.preprocess.preprocess`, which also
    runs on Ray and resumes) with its in-process executor and ``fresh=True``: earlier output in
    ``out_dir`` is discarded first. ``manifest``: a manifest path, a directory, or a list of rows (then
    ``root`` is the directory their relative paths start from). ``on_error="skip"`` quarantines a
    conversation whose files are unusable (listed under ``quarantined`` in ``dataset.json``);
    ``"raise"`` stops at it. Returns the ``dataset.json`` content.
    """
    from .preprocess import Settings, preprocess

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if shard_rows < 1:
        raise InputError("--shard-rows", f"must be >= 1, got {shard_rows}")
    info = preprocess(manifest, out_dir, root=root, settings=Settings(chunk_seconds=float(chunk_seconds)),
                      shard_size=shard_rows, executor="local", progress=progress, fresh=True,
                      on_error="quarantine" if on_error == "skip" else "raise")
    info.pop("run", None)
    return info

# ============================================================================ reading / sampling

@dataclass
class Conversation:
    """One conversation re-joined from its chunks (arrays over all its frames)."""

    conversation_id: str
    split: str
    arrays: dict[str, np.ndarray]
    transcript: list[dict]
    affect: str | None = None
    synthetic: bool = False
    window_texts: list[str] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return len(self.arrays["motion"])


def _window_texts(segs: list[dict], frames: int, new_frames: int) -> list[str]:
    """Text per generation window, as the memory stage assigns it: segment starting at ``p`` goes to the
    first window ``w`` with ``p < (w + 1) * S / fps`` (window 0 also takes segments before 0 s)."""
    n = max(1, -(-frames // new_frames))
    out: list[list[str]] = [[] for _ in range(n)]

    def end(w: int) -> float:  # the memory stage's ``until_pts`` of window w
        return (w * new_frames + new_frames) / config.FPS

    for s in segs:
        p = float(s["start"])
        w = min(n - 1, max(0, int(math.floor(p * config.FPS / new_frames))))
        while w > 0 and p < end(w - 1):
            w -= 1
        while w < n - 1 and not p < end(w):
            w += 1
        if p < end(w):           # segments starting after the last window are never consumed
            out[w].append(s["text"])
    return [" ".join(t) for t in out]


#: training augmentation of audio features: level (natural log of an amplitude factor) and spectral tilt
#: (log-power change from the lowest to the highest mel bin) drawn uniformly in +- these
AUGMENT_GAIN, AUGMENT_TILT = 0.5, 0.8


def audio_draw(rng: np.random.Generator) -> tuple[float, float]:
    """One augmentation draw (gain, tilt) for :func:`augment_audio`."""
    return float(rng.uniform(-AUGMENT_GAIN, AUGMENT_GAIN)), float(rng.uniform(-AUGMENT_TILT, AUGMENT_TILT))


def augment_audio(feats: np.ndarray, gain: float, tilt: float) -> None:
    """In place, audio features ``(..., 2, 83)`` as if the signal were ``exp(gain)`` times louder and tilted:
    log-mel + 2 gain + tilt (bin / 79 - 0.5), log-energy + gain; f0 and voicing unchanged."""
    mb = config.MEL_BINS
    feats[..., :mb] += 2.0 * gain + tilt * (np.arange(mb, dtype=np.float32) / (mb - 1) - 0.5)
    feats[..., mb] += gain


class ShardDataset:
    """Training batches from a shard directory (one split, held in memory).

    Window geometry follows :meth:`EchoModel.loss` and the streaming memory stage
    (``K = overlap``, ``S = new frames``, ``W = K + S``, ``L = lookahead`` of the model config):

    * **stage 1** (:meth:`stage1_batch`): a random window start ``s`` in ``[-K, F - W]``:
      ``motion`` = frames ``[s, s + W)`` (its first K frames are the known context),
      ``avatar_audio`` = ``[s, s + W + L)``. Frames before 0 / after the end are zeros,
      as in serving (a session starts from the neutral face and silence; audio after the end is silence).
    * **stage 2** (:meth:`stage2_batch`): windows on the serving grid, ``t0 = w * S``,
      ``motion`` = ``[t0 - K, t0 + S)``, ``avatar_audio`` = ``[t0 - K, t0 + S + L)``, ``user_*`` =
      ``[t0 - K, t0 + S)``; preceded by a history of ``n = min(w, max_history)`` windows
      (``context_*`` of shape ``(B, n, S, ...)`` = frames ``[t0 - (n - j) S, t0 - (n - j - 1) S)``)
      and ``context_texts`` (the transcript text the memory stage would feed each of them). So the
      history is the session's whole past (what the LCU memory has seen when serving window ``w``),
      cut to the last ``max_history`` windows for windows later than that. All items of a batch
      share ``n``: a batch either has ``w < max_history`` for all items (same ``w``: the first windows
      of different conversations) or ``w >= max_history`` for all (any later window); the first
      item's ``w`` is drawn uniformly over all windows of the split, so every window is a target
      equally often.

    Arrays are float32 torch tensors. ``rng`` is a ``numpy.random.Generator`` (its state is what
    a resumed training run restores).

    ``augment=True`` (training) changes each item's level and spectral tilt, as another microphone or
    voice would (:func:`augment_audio`): the avatar's audio with one draw, the user's with another,
    the same draw over an item's window and its history.
    """

    def __init__(self, shards_dir: str | os.PathLike, split: str = "train", model_config=None,
                 augment: bool = False):
        self.augment = augment
        from .config import get_config

        self.dir = Path(shards_dir)
        self.info = read_dataset_info(self.dir)
        self.split = split
        cfg = model_config if model_config is not None else get_config("tiny")
        if isinstance(cfg, str):
            cfg = get_config(cfg)
        self.cfg = cfg
        chunks: dict[str, list] = {}
        for s in self.info["shards"]:
            if s["split"] != split:
                continue
            table = read_shard(self.dir / s["file"])
            cols = {name: frame_column(table, name) for name in FRAME_COLUMNS}
            meta = table.select(["conversation_id", "chunk_index", "num_chunks", "split", "start_frame", "frames",
                                 "transcript", "synthetic", "affect"]).to_pylist()
            for i, m in enumerate(meta):
                chunks.setdefault(m["conversation_id"], []).append((m, {k: v[i] for k, v in cols.items()}))
        self.conversations: list[Conversation] = []
        for cid in sorted(chunks):
            parts = sorted(chunks[cid], key=lambda x: x[0]["chunk_index"])
            first = parts[0][0]
            if [p[0]["chunk_index"] for p in parts] != list(range(first["num_chunks"])):
                raise InputError(str(self.dir), f"conversation {cid}: chunks missing from the shards")
            expect = 0
            for m, _ in parts:
                if m["start_frame"] != expect:
                    raise InputError(str(self.dir), f"conversation {cid}: chunk {m['chunk_index']} starts at "
                                                    f"frame {m['start_frame']}, expected {expect}")
                expect += m["frames"]
            arrays = {k: np.concatenate([p[1][k] for p in parts]) if len(parts) > 1 else parts[0][1][k]
                      for k in FRAME_COLUMNS}
            segs = [s for p in parts for s in p[0]["transcript"]]
            conv = Conversation(cid, split, arrays, segs, first["affect"], bool(first["synthetic"]))
            conv.window_texts = _window_texts(segs, conv.frames, cfg.new_frames)
            self.conversations.append(conv)
        if not self.conversations:
            raise InputError(str(self.dir), f"no conversations in split '{split}'")
        S = cfg.new_frames
        self._n_windows = np.array([max(1, -(-c.frames // S)) for c in self.conversations])
        self._frames = np.array([c.frames for c in self.conversations])

    # ------------------------------------------------------------------ facts
    def __len__(self) -> int:
        return len(self.conversations)

    @property
    def frames(self) -> int:
        return int(self._frames.sum())

    @property
    def stats(self) -> dict:
        """Normalisation statistics from ``dataset.json``."""
        return self.info["stats"]

    @staticmethod
    def history_windows(cfg, history_s: float = 30.0, cap: int = 128) -> int:
        """``N = ceil(history_s / (S / fps))`` windows (capped): the history length for stage 2."""
        return int(min(cap, max(1, math.ceil(history_s * cfg.fps / cfg.new_frames - 1e-9))))

    # ------------------------------------------------------------------ stage 1
    def stage1_batch(self, rng: np.random.Generator, batch_size: int) -> dict:
        """Own-audio -> motion windows (see the class docstring)."""
        cfg = self.cfg
        K, W, L = cfg.overlap_frames, cfg.window_frames, cfg.lookahead_frames
        weights = np.maximum(self._frames - W + K + 1, 1).astype(np.float64)
        idx = rng.choice(len(self.conversations), size=batch_size, p=weights / weights.sum())
        motion_b = np.empty((batch_size, W, motion.NUM_CHANNELS), np.float32)
        audio_b = np.empty((batch_size, W + L, *FRAME_COLUMNS["avatar_audio"]), np.float32)
        for i, ci in enumerate(idx):
            c = self.conversations[ci]
            s = int(rng.integers(-K, max(-K, c.frames - W) + 1))
            motion_b[i] = take_rows(c.arrays["motion"], s, s + W)
            audio_b[i] = take_rows(c.arrays["avatar_audio"], s, s + W + L)
        if self.augment:                  # drawn after the windows: augmenting does not change which
            for i in range(batch_size):
                augment_audio(audio_b[i], *audio_draw(rng))
        import torch
        return {"motion": torch.from_numpy(motion_b), "avatar_audio": torch.from_numpy(audio_b)}

    # ------------------------------------------------------------------ stage 2
    def stage2_batch(self, rng: np.random.Generator, batch_size: int, max_history: int) -> dict:
        """Full-model windows with their history (see the class docstring)."""
        import torch

        cfg = self.cfg
        K, S, W, L = cfg.overlap_frames, cfg.new_frames, cfg.window_frames, cfg.lookahead_frames
        max_history = max(0, int(max_history))
        total = self._n_windows.astype(np.float64)
        first_c = int(rng.choice(len(self.conversations), p=total / total.sum()))
        w0 = int(rng.integers(0, self._n_windows[first_c]))
        if w0 < max_history:
            n = w0
            ok = np.flatnonzero(self._n_windows > w0)
            items = [(first_c, w0)] + [(int(c), w0) for c in rng.choice(ok, size=batch_size - 1)]
        else:
            n = max_history
            late = np.maximum(self._n_windows - max_history, 0).astype(np.float64)
            cs = rng.choice(len(self.conversations), size=batch_size - 1, p=late / late.sum())
            items = [(first_c, w0)] + [(int(c), int(rng.integers(max_history, self._n_windows[c]))) for c in cs]
        B = batch_size
        U = cfg.user_frames                 # the user's last U frames up to the window's end
        out = {name: np.empty((B, W + L if name == "avatar_audio" else U, *FRAME_COLUMNS[name]), np.float32)
               for name in FEATURE_COLUMNS}
        out["motion"] = np.empty((B, W, motion.NUM_CHANNELS), np.float32)
        ctx = {name: np.empty((B, n, S, *FRAME_COLUMNS[name]), np.float32) for name in FEATURE_COLUMNS} if n else {}
        texts, all_texts = [], []
        for i, (ci, w) in enumerate(items):
            c = self.conversations[ci]
            t0 = w * S
            out["motion"][i] = take_rows(c.arrays["motion"], t0 - K, t0 + S)
            out["avatar_audio"][i] = take_rows(c.arrays["avatar_audio"], t0 - K, t0 + S + L)
            for name in ("user_audio", "user_video", "user_blend", "user_present"):
                out[name][i] = take_rows(c.arrays[name], t0 + S - U, t0 + S)
            if n:
                h0 = t0 - n * S
                for name in FEATURE_COLUMNS:
                    ctx[name][i] = take_rows(c.arrays[name], h0, t0).reshape(n, S, *FRAME_COLUMNS[name])
                texts.append([c.window_texts[j] if j < len(c.window_texts) else "" for j in range(w - n, w)])
            all_texts.append([c.window_texts[j] if j < len(c.window_texts) else "" for j in range(w)])
        if self.augment:
            for i in range(B):
                for name in ("avatar_audio", "user_audio"):
                    draw = audio_draw(rng)
                    augment_audio(out[name][i], *draw)
                    if n:
                        augment_audio(ctx[name][i], *draw)
        batch = {k: torch.from_numpy(v) for k, v in out.items()}
        if n:
            for name in FEATURE_COLUMNS:
                batch["context_" + name] = torch.from_numpy(ctx[name])
            batch["context_texts"] = texts
        batch["context_all_texts"] = all_texts
        batch["history_windows"] = n
        return batch

    def batches(self, stage: int, batch_size: int, rng: np.random.Generator,
                max_history: int | None = None) -> Iterator[dict]:
        """An endless iterator of batches for ``stage`` (1 or 2)."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if max_history is None:
            max_history = self.history_windows(self.cfg)
        while True:
            yield self.stage1_batch(rng, batch_size) if stage == 1 else self.stage2_batch(rng, batch_size,
                                                                                         max_history)


def iter_conversation_features(shards_dir: str | os.PathLike, split: str | None = None) -> Iterable[Conversation]:
    """Every conversation of a shard directory (all splits when ``split`` is None)."""
    info = read_dataset_info(shards_dir)
    splits = sorted({s["split"] for s in info["shards"]}) if split is None else [split]
    for sp in splits:
        yield from ShardDataset(shards_dir, sp).conversations


# ============================================================================ CLI

def run(args) -> int:
    """``echo-stream shards``."""
    import sys

    info = write_shards(args.manifest, args.out, chunk_seconds=args.chunk_seconds, shard_rows=args.shard_rows,
                        progress=not args.quiet, on_error="skip" if args.skip_bad else "raise")
    tot = info["total"]
    splits = ", ".join(f"{k}: {v['conversations']}" for k, v in sorted(info["splits"].items()))
    print(f"wrote {len(info['shards'])} shards to {args.out}: {tot['conversations']} conversations ({splits}), "
          f"{tot['chunks']} chunks, {tot['hours'] * 60:.1f} min, in {info['seconds']:.0f} s"
          + (f"; quarantined {len(info['quarantined'])} (see outcomes.jsonl)" if info["quarantined"] else ""),
          file=sys.stderr)
    return 0

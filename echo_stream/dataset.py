"""Training data: a conversation manifest -> Parquet shards of per-frame features and motion targets,
and the sampler that turns shards into training batches.

Features are computed by the *same* code the streaming pipeline runs
(:mod:`echo_stream.features`, with the decode stage's video geometry), so the
model trains on exactly what it will see when serving; ``tests/test_train.py``
checks this against ``DecodeStage`` + ``FeaturesStage`` frame by frame.

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

Shards (``schema_version`` 1)
-----------------------------
``OUT/{split}-{NNNNN}.parquet`` (zstd), one row per conversation *chunk* of
``chunk_seconds`` (a conversation's last chunk absorbs a tail shorter than
half a chunk, so chunks are 0.5-1.5 x ``chunk_seconds`` long, or the whole
conversation when it is shorter). Columns:

=====================  =================================================  ==========================================
column                 type                                               meaning
=====================  =================================================  ==========================================
conversation_id        string                                             manifest ``conversation_id``
chunk_index            int32                                              0, 1, ... within the conversation
num_chunks             int32                                              chunks of this conversation
split                  string                                             ``train`` / ``heldout`` / ...
start_frame            int64                                              first 25 fps frame of the chunk
frames                 int32                                              frames in the chunk (``F``)
avatar_audio           list<fixed_size_list<float32, 166>>                ``F`` x (2, 83) log-mel + prosody
user_audio             list<fixed_size_list<float32, 166>>                ``F`` x (2, 83); zeros without user audio
user_video             list<fixed_size_list<float32, 16>>                 ``F`` x 16 zeros (reserved: the hand-made
                                                                          behaviour features of earlier shards)
user_blend             list<fixed_size_list<float32, 58>>                 ``F`` x 58 the user's face as motion
                                                                          (the face tracker on the user video)
user_present           list<fixed_size_list<float32, 3>>                  ``F`` x (audio, video, blend) flags
motion                 list<fixed_size_list<float32, 58>>                 ``F`` x 58 avatar motion targets
has_user_audio         bool                                               the conversation has user audio
has_user_video         bool                                               the conversation has user video
has_user_blend         bool                                               user face motion was tracked
transcript             list<struct<start: double, end: double,            segments whose start falls in the chunk
                       speaker: string, text: string>>                    (chunk 0 also takes those before 0 s)
synthetic              bool                                               manifest ``synthetic`` (false if absent)
affect                 string (nullable)                                  manifest ``affect``
=====================  =================================================  ==========================================

Each per-frame column's field metadata holds ``shape`` (the per-frame shape as
JSON, e.g. ``[2, 83]``); the schema metadata holds ``echo_stream.schema_version``
and ``echo_stream.format``. Per-frame arrays are rows of the same 25 fps grid
as the streaming pipeline: frame ``i`` covers audio samples ``[640 i, 640 i + 640)``
of the avatar track, ``T = ceil(avatar samples / 640)`` frames per conversation.

``OUT/dataset.json`` (written last, atomically) lists the shards with their
row counts, counts/hours per split and the feature statistics the trainer
sets as the model's normalisation: per-channel mean/std of ``motion`` (58)
and per-feature mean/std of the audio features (83; avatar audio plus user
audio where present), over the ``train`` split (all rows when it is empty).

Reading
-------
:class:`ShardDataset` loads one split into memory, re-joins each
conversation's chunks, and samples training batches (see its docstring).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import config, features, media, motion, tracks, transcript
from .arguments.data import add_shards_arguments as add_arguments  # noqa: F401 (the command's arguments)
from .errors import InputError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2   # 2: the user's face tracked into user_blend; user_video zeros
FORMAT = "echo-stream/training-shards"
DATASET_JSON = "dataset.json"
DEFAULT_CHUNK_SECONDS = config.SHARD_CHUNK_SECONDS
DEFAULT_SHARD_ROWS = config.SHARD_ROWS

#: per-frame columns and their per-frame shapes, in shard order
FRAME_COLUMNS: dict[str, tuple[int, ...]] = {
    "avatar_audio": (config.MELS_PER_FRAME, config.AUDIO_FEAT_DIM),
    "user_audio": (config.MELS_PER_FRAME, config.AUDIO_FEAT_DIM),
    "user_video": (config.USER_VIDEO_DIM,),
    "user_blend": (motion.NUM_CHANNELS,),
    "user_present": (3,),
    "motion": (motion.NUM_CHANNELS,),
}
#: the feature columns the pipeline's FeaturesStage produces (same names, same shapes)
FEATURE_COLUMNS = ("avatar_audio", "user_audio", "user_video", "user_blend", "user_present")

read_motion_track = tracks.read_motion_track  # (re-exported: the one implementation is in tracks)

_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{5})\.parquet$")

TRANSCRIPT_TYPE = pa.list_(pa.struct([("start", pa.float64()), ("end", pa.float64()),
                                      ("speaker", pa.string()), ("text", pa.string())]))


def _frame_type(shape: tuple[int, ...]) -> pa.DataType:
    return pa.list_(pa.list_(pa.float32(), int(np.prod(shape))))


def shard_schema() -> pa.Schema:
    """The Arrow schema of a training shard (see the module docstring)."""
    fields = [
        pa.field("conversation_id", pa.string(), nullable=False),
        pa.field("chunk_index", pa.int32(), nullable=False),
        pa.field("num_chunks", pa.int32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("start_frame", pa.int64(), nullable=False),
        pa.field("frames", pa.int32(), nullable=False),
    ]
    for name, shape in FRAME_COLUMNS.items():
        fields.append(pa.field(name, _frame_type(shape), nullable=False,
                               metadata={b"shape": json.dumps(list(shape)).encode()}))
    fields += [
        pa.field("has_user_audio", pa.bool_(), nullable=False),
        pa.field("has_user_video", pa.bool_(), nullable=False),
        pa.field("has_user_blend", pa.bool_(), nullable=False),
        pa.field("transcript", TRANSCRIPT_TYPE, nullable=False),
        pa.field("synthetic", pa.bool_(), nullable=False),
        pa.field("affect", pa.string(), nullable=True),
    ]
    return pa.schema(fields, metadata={b"echo_stream.schema_version": str(SCHEMA_VERSION).encode(),
                                       b"echo_stream.format": FORMAT.encode(),
                                       b"echo_stream.fps": str(config.FPS).encode()})


# ============================================================================ featurisation

def _resolve(root: str | os.PathLike, rel) -> str | None:
    if rel is None or rel == "":
        return None
    p = Path(rel)
    return str(p if p.is_absolute() else Path(root) / p)


def _user_face(path: str, num_frames: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``((T, 58) user face motion, (T,) face flags, source frames used)`` exactly as the streaming decode +
    features stages compute them: frames on the 25 fps grid at the decode stage's working size through
    the bundled face tracker (streaming, as in a session), the last frame repeated after the video
    ends, frames past the avatar's end ignored."""
    from .face.tracker import FaceTracker, shared_models
    from .stages.decode import user_video_size
    from .stages.features import face_rows

    tracker = FaceTracker(models=shared_models())
    out = np.zeros((num_frames, motion.NUM_CHANNELS + 1), np.float32)
    it = media.iter_video_frames(path, fps=config.FPS, size=user_video_size(path))
    done, last, block = 0, None, []

    def flush_block():
        nonlocal done
        if block:
            out[done:done + len(block)] = face_rows(tracker, np.stack(block))
            done += len(block)
            block.clear()

    for _, _, rgb in it:
        if done + len(block) >= num_frames:
            break
        block.append(rgb)
        last = rgb
        if len(block) == 32:
            flush_block()
    if last is None:
        raise InputError(path, "video stream has no decodable frames")
    decoded = done + len(block)
    while done + len(block) < num_frames:
        block.append(last)
        if len(block) == 32:
            flush_block()
    flush_block()
    return np.ascontiguousarray(out[:, :motion.NUM_CHANNELS]), out[:, motion.NUM_CHANNELS], decoded


def featurize_conversation(row: dict, root: str | os.PathLike, *, tracker=None,
                           livelink_fps: float | None = None) -> dict:
    """Per-frame features and targets of one conversation (a pure function of the manifest row and root).

    Returns a dict over ``T = ceil(avatar samples / 640)`` frames of the 25 fps grid:

    * ``avatar_audio`` (T, 2, 83), ``user_audio`` (T, 2, 83), ``user_video`` (T, 16: zeros),
      ``user_blend`` (T, 58: the user's face tracked on the user video, flag 2 where a face was found),
      ``user_present`` (T, 3) float32: exactly what the pipeline's
      ``FeaturesStage`` emits for the same files (user audio/video aligned to the avatar track: cut
      when longer, silence / last frame repeated when shorter; no user track: zeros, flag 0);
    * ``motion`` (T, 58) float32: the avatar's motion targets from ``avatar_motion`` (project motion
      Parquet or Live Link Face CSV, see :mod:`echo_stream.tracks`; shifted by the row's optional
      ``avatar_motion_offset_s``), else from ``tracker`` (a :class:`~echo_stream.tracks.FaceTracker`, or
      the bundled :class:`~echo_stream.face.VideoMotionTracker`) over the avatar media's video stream,
      else zeros (``has_motion`` says which);
    * ``transcript``: list of ``{"start", "end", "speaker", "text"}`` dicts, sorted by start;
    * ``frames`` (int), ``has_user_audio``, ``has_user_video``, ``has_user_blend``, ``has_motion`` (bool);
    * ``media``: facts for quality checks: ``avatar_s`` (seconds), ``avatar_peak`` (max |sample|),
      ``user_audio_s``, ``user_video_s`` (None without that track; video counted up to ``T`` frames),
      ``motion_s`` (seconds the motion track covers), ``motion_source``.

    Raises :class:`~echo_stream.errors.InputError` naming the file for unusable media.
    """
    if not isinstance(row, dict) or not row.get("avatar_media"):
        raise InputError(str(row.get("conversation_id", "<row>")) if isinstance(row, dict) else "<row>",
                         "manifest row needs 'avatar_media'")
    avatar_path = _resolve(root, row["avatar_media"])
    samples = media.decode_audio(avatar_path)
    T = features.num_video_frames(samples.size)
    facts = {"avatar_s": samples.size / config.SAMPLE_RATE, "avatar_peak": float(np.abs(samples).max()),
             "user_audio_s": None, "user_video_s": None, "motion_s": None, "motion_source": None}
    avatar_audio = features.offline_audio_features(samples)
    del samples
    user_audio = np.zeros_like(avatar_audio)
    user_video = np.zeros((T, config.USER_VIDEO_DIM), np.float32)
    user_blend = np.zeros((T, motion.NUM_CHANNELS), np.float32)
    present = np.zeros((T, 3), np.float32)
    has_ua = has_uv = False
    user_path = _resolve(root, row.get("user_media"))
    if user_path is not None:
        info = media.probe(user_path)
        if info.has_audio:
            u = media.decode_audio(user_path)
            facts["user_audio_s"] = u.size / config.SAMPLE_RATE
            aligned = np.zeros(T * config.SAMPLES_PER_FRAME, np.float32)
            n = min(u.size, aligned.size)
            aligned[:n] = u[:n]
            user_audio = features.offline_audio_features(aligned)
            present[:, 0] = 1.0
            has_ua = True
        if info.has_video:
            user_blend, present[:, 2], used = _user_face(user_path, T)
            facts["user_video_s"] = used / config.FPS
            has_uv = True
    motion_path = _resolve(root, row.get("avatar_motion"))
    if motion_path is not None:
        pts, cols = tracks.load_track(motion_path, livelink_fps=livelink_fps)
        pts = pts + float(row.get("avatar_motion_offset_s") or 0.0)
        targets = tracks.resample_to_grid(pts, cols, T, motion_path)
        facts["motion_s"], facts["motion_source"] = tracks.track_span(pts), os.path.basename(motion_path)
    elif tracker is not None and media.probe(avatar_path).has_video:
        if hasattr(tracker, "track_video"):          # the bundled tracker: whole-video calibration
            targets, used = tracker.track_video(avatar_path, T)
        else:
            targets, used = tracks.extract_motion(tracker, avatar_path, T)
        facts["motion_s"], facts["motion_source"] = used / config.FPS, f"tracker:{type(tracker).__name__}"
    else:
        targets = np.zeros((T, motion.NUM_CHANNELS), np.float32)
    segs = []
    tpath = _resolve(root, row.get("transcript"))
    if tpath is not None:
        segs = [{"start": float(s.start), "end": float(s.end), "speaker": s.speaker, "text": s.text}
                for s in transcript.load(tpath)]
    return {
        "avatar_audio": avatar_audio.astype(np.float32, copy=False),
        "user_audio": user_audio.astype(np.float32, copy=False),
        "user_video": user_video,
        "user_blend": user_blend,
        "user_present": present,
        "motion": targets,
        "transcript": segs,
        "frames": int(T),
        "has_user_audio": has_ua,
        "has_user_video": has_uv,
        "has_user_blend": bool(present[:, 2].any()),
        "has_motion": facts["motion_source"] is not None,
        "media": facts,
    }


# ============================================================================ writing

def chunk_bounds(frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` chunks of ``chunk_frames``; a tail under half a chunk joins the last chunk."""
    chunk_frames = max(1, int(chunk_frames))
    n = max(1, frames // chunk_frames)
    if frames - n * chunk_frames >= chunk_frames / 2:
        n += 1
    bounds = [(i * chunk_frames, min(frames, (i + 1) * chunk_frames)) for i in range(n)]
    bounds[-1] = (bounds[-1][0], frames)
    return bounds


def _frame_array(values: np.ndarray, shape: tuple[int, ...]) -> pa.Array:
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    width = int(np.prod(shape))
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), width)
    offsets = pa.array(np.array([0, len(values)], np.int32))
    return pa.ListArray.from_arrays(offsets, inner)


def _chunk_rows(row: dict, feats: dict, split: str, chunk_frames: int) -> list[dict]:
    T = feats["frames"]
    bounds = chunk_bounds(T, chunk_frames)
    out = []
    for ci, (a, b) in enumerate(bounds):
        lo = -math.inf if ci == 0 else a / config.FPS
        hi = math.inf if ci == len(bounds) - 1 else b / config.FPS
        segs = [s for s in feats["transcript"] if lo <= s["start"] < hi]
        out.append({
            "conversation_id": str(row["conversation_id"]), "chunk_index": ci, "num_chunks": len(bounds),
            "split": split, "start_frame": a, "frames": b - a,
            **{name: feats[name][a:b] for name in FRAME_COLUMNS},
            "has_user_audio": bool(feats["has_user_audio"]), "has_user_video": bool(feats["has_user_video"]),
            "has_user_blend": bool(feats["has_user_blend"]), "transcript": segs,
            "synthetic": bool(row.get("synthetic", False)),
            "affect": None if row.get("affect") is None else str(row["affect"]),
        })
    return out


def _rows_to_table(rows: list[dict]) -> pa.Table:
    schema = shard_schema()
    cols = {}
    for f in schema:
        name = f.name
        if name in FRAME_COLUMNS:
            parts = [_frame_array(r[name], FRAME_COLUMNS[name]) for r in rows]
            cols[name] = pa.concat_arrays(parts)
        elif name == "transcript":
            cols[name] = pa.array([r["transcript"] for r in rows], TRANSCRIPT_TYPE)
        else:
            cols[name] = pa.array([r[name] for r in rows], f.type)
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


class _Moments:
    """Streaming per-column mean / std (float64 sums)."""

    def __init__(self, dim: int):
        self.n = 0
        self.s = np.zeros(dim)
        self.ss = np.zeros(dim)

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, self.s.size)
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.ss += (x * x).sum(0)

    def result(self) -> tuple[list[float], list[float]]:
        if self.n == 0:
            return [0.0] * self.s.size, [1.0] * self.s.size
        mean = self.s / self.n
        var = np.maximum(self.ss / self.n - mean * mean, 0.0)
        return mean.tolist(), np.sqrt(var).tolist()


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


def read_dataset_info(shards_dir: str | os.PathLike) -> dict:
    """``dataset.json`` of a shard directory, checked for format and schema version."""
    p = Path(shards_dir) / DATASET_JSON
    if not p.is_file():
        raise InputError(str(shards_dir), f"no {DATASET_JSON}: not a finished shard directory "
                                          "(run write_shards / `echo-stream train --corpus ...` first)")
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(str(p), f"corrupt dataset description: {e}") from None
    if info.get("format") != FORMAT:
        raise InputError(str(p), f"not an echo-stream shard description (format {info.get('format')!r})")
    if info.get("schema_version") != SCHEMA_VERSION:
        raise InputError(str(p), f"shard schema version {info.get('schema_version')} is not supported by this "
                                 f"code (version {SCHEMA_VERSION}): rewrite the shards")
    return info


def read_shard(path: str | os.PathLike) -> pa.Table:
    """One shard as an Arrow table, checked against :func:`shard_schema`."""
    p = str(path)
    try:
        table = pq.read_table(p)
    except (OSError, pa.ArrowException) as e:
        raise InputError(p, f"cannot read shard: {e}") from None
    meta = table.schema.metadata or {}
    version = meta.get(b"echo_stream.schema_version", b"?").decode()
    if version != str(SCHEMA_VERSION):
        raise InputError(p, f"shard schema version {version} is not supported (expected {SCHEMA_VERSION})")
    want = shard_schema()
    for f in want:
        if f.name not in table.column_names:
            raise InputError(p, f"shard has no column '{f.name}'")
        if not table.schema.field(f.name).type.equals(f.type):
            raise InputError(p, f"shard column '{f.name}' has type {table.schema.field(f.name).type}, "
                                f"expected {f.type}")
    return table


def frame_column(table: pa.Table, name: str) -> list[np.ndarray]:
    """Per-row ``(frames, *shape)`` float32 arrays of a per-frame column."""
    shape = FRAME_COLUMNS[name]
    arr = table.column(name).combine_chunks()
    if isinstance(arr, pa.ChunkedArray):  # pragma: no cover - empty tables
        arr = pa.concat_arrays(arr.chunks) if arr.num_chunks else pa.array([], _frame_type(shape))
    offsets = arr.offsets.to_numpy()
    inner = arr.values
    flat = inner.values.to_numpy(zero_copy_only=False)
    width = int(np.prod(shape))
    base = inner.offset * width
    out = []
    for i in range(len(arr)):
        a, b = int(offsets[i]), int(offsets[i + 1])
        out.append(flat[base + a * width: base + b * width].reshape(b - a, *shape))
    return out


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


def _slice(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rows ``[lo, hi)`` of ``a``, zeros outside ``[0, len(a))``."""
    n = len(a)
    if lo >= 0 and hi <= n:
        return a[lo:hi]
    out = np.zeros((hi - lo, *a.shape[1:]), a.dtype)
    s0, s1 = max(lo, 0), min(hi, n)
    if s1 > s0:
        out[s0 - lo:s1 - lo] = a[s0:s1]
    return out


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
            motion_b[i] = _slice(c.arrays["motion"], s, s + W)
            audio_b[i] = _slice(c.arrays["avatar_audio"], s, s + W + L)
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
               for name in ("avatar_audio", "user_audio", "user_video", "user_blend", "user_present")}
        out["motion"] = np.empty((B, W, motion.NUM_CHANNELS), np.float32)
        ctx = {name: np.empty((B, n, S, *FRAME_COLUMNS[name]), np.float32) for name in FEATURE_COLUMNS} if n else {}
        texts, all_texts = [], []
        for i, (ci, w) in enumerate(items):
            c = self.conversations[ci]
            t0 = w * S
            out["motion"][i] = _slice(c.arrays["motion"], t0 - K, t0 + S)
            out["avatar_audio"][i] = _slice(c.arrays["avatar_audio"], t0 - K, t0 + S + L)
            for name in ("user_audio", "user_video", "user_blend", "user_present"):
                out[name][i] = _slice(c.arrays[name], t0 + S - U, t0 + S)
            if n:
                h0 = t0 - n * S
                for name in FEATURE_COLUMNS:
                    ctx[name][i] = _slice(c.arrays[name], h0, t0).reshape(n, S, *FRAME_COLUMNS[name])
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

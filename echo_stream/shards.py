"""The training-shard format: what ``preprocess`` / ``shards`` write and :class:`echo_stream.dataset.ShardDataset`
reads (schema, file names, chunking, ``dataset.json`` statistics), apart from the code that makes features.

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
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import config, motion, schemas
from .errors import InputError

SCHEMA_VERSION = 2   # 2: the user's face tracked into user_blend; user_video zeros
FORMAT = "echo-stream/training-shards"
DATASET_JSON = "dataset.json"
DEFAULT_CHUNK_SECONDS = config.SHARD_CHUNK_SECONDS
DEFAULT_SHARD_ROWS = config.SHARD_ROWS

#: the feature columns the pipeline's FeaturesStage produces (same names, same shapes: the Features contract's)
FEATURE_COLUMNS = schemas.FEATURE_COLUMNS
#: per-frame columns and their per-frame shapes, in shard order: the features, then the motion targets
FRAME_COLUMNS: dict[str, tuple[int, ...]] = {
    **{name: tuple(schemas.FEATURES.spec(name).shape) for name in FEATURE_COLUMNS},
    "motion": (motion.NUM_CHANNELS,),
}

#: shard file names: ``{split}-{NNNNN}.parquet``
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{5})\.parquet$")

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


def chunk_rows(row: dict, feats: dict, split: str, chunk_frames: int) -> list[dict]:
    """The shard rows of one featurised conversation (:func:`echo_stream.featurize.featurize_conversation`
    of manifest ``row``): one per chunk of :func:`chunk_bounds`, each with the transcript segments starting
    in it (chunk 0 also takes those before 0 s, the last chunk those after the end)."""
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


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows of :func:`chunk_rows` as an Arrow table of :func:`shard_schema`."""
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


class Moments:
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


# ============================================================================ reading

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
    except RecursionError:
        raise InputError(str(p), "corrupt dataset description: JSON nested too deeply") from None
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

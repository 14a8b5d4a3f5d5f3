"""Arrow contracts: the schema of every message that crosses a stage boundary.

Every row carries ``session_id`` (string), ``seq`` (int64, increasing per
session and message type) and ``pts`` (float64, presentation time in seconds).
Tensor columns are ``arrow.fixed_shape_tensor`` extension arrays; a dimension
written ``None`` in a contract is fixed per batch but may differ between
batches (the working resolution, the model's memory size).

=================  =======================  =============================================
message            producer -> consumer     one row is
=================  =======================  =============================================
AudioChunk         decode -> features       40 ms (one video frame) of 16 kHz mono audio
VideoFrames        decode -> features       one user-video frame on the 25 fps grid
TranscriptSegment  ingress -> memory        one transcript segment (text, speaker, span)
Features           features -> memory       one 25 fps frame of both sides' features
MemoryTokens       memory -> diffusion      the LCU memory tokens conditioning a window
MotionWindow       diffusion -> render      one generated motion frame
RenderedFrames     render -> egress         one rendered RGB frame
=================  =======================  =============================================

``validate(batch, CONTRACT)`` is called at each stage boundary; a batch that
does not match is rejected with :class:`~echo_stream.errors.SchemaError`
naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from . import config, motion
from .errors import SchemaError

TRACKS = ("avatar", "user")

_NUMPY_DTYPES = {pa.float32(): np.float32, pa.float64(): np.float64, pa.uint8(): np.uint8,
                 pa.int64(): np.int64, pa.int32(): np.int32, pa.float16(): np.float16}


def numpy_dtype(value_type: pa.DataType) -> type:
    """The numpy dtype of an Arrow value type (without importing pandas, as pyarrow's helper does)."""
    return _NUMPY_DTYPES[value_type]


@dataclass(frozen=True)
class TensorSpec:
    """A fixed_shape_tensor column: value type and shape (None = any size, fixed per batch)."""

    value_type: pa.DataType
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        dims = ",".join("*" if d is None else str(d) for d in self.shape)
        return f"fixed_shape_tensor<{self.value_type}>[{dims}]"

    def arrow_type(self, shape: Sequence[int] | None = None) -> pa.DataType:
        shape = tuple(shape) if shape is not None else self.shape
        if any(d is None for d in shape):
            raise ValueError(f"concrete shape needed for {self.describe()}")
        return pa.fixed_shape_tensor(self.value_type, list(shape))


@dataclass(frozen=True)
class Contract:
    name: str
    fields: tuple[tuple[str, pa.DataType | TensorSpec], ...]

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.fields)

    def spec(self, name: str):
        return dict(self.fields)[name]


_COMMON = (("session_id", pa.string()), ("seq", pa.int64()), ("pts", pa.float64()))

AUDIO_CHUNK = Contract("AudioChunk", _COMMON + (
    ("track", pa.string()),
    ("samples", TensorSpec(pa.float32(), (config.SAMPLES_PER_FRAME,))),
))

VIDEO_FRAMES = Contract("VideoFrames", _COMMON + (
    ("frame", pa.int64()),
    ("image", TensorSpec(pa.uint8(), (None, None, 3))),
))

TRANSCRIPT_SEGMENT = Contract("TranscriptSegment", _COMMON + (
    ("end_pts", pa.float64()),
    ("speaker", pa.string()),
    ("text", pa.string()),
))

FEATURES = Contract("Features", _COMMON + (
    ("frame", pa.int64()),
    ("avatar_audio", TensorSpec(pa.float32(), (config.MELS_PER_FRAME, config.AUDIO_FEAT_DIM))),
    ("user_audio", TensorSpec(pa.float32(), (config.MELS_PER_FRAME, config.AUDIO_FEAT_DIM))),
    ("user_video", TensorSpec(pa.float32(), (config.USER_VIDEO_DIM,))),
    ("user_blend", TensorSpec(pa.float32(), (motion.NUM_CHANNELS,))),
    # presence flags: user audio, user video, client blendshapes
    ("user_present", TensorSpec(pa.float32(), (3,))),
))
#: the per-frame feature columns of :data:`FEATURES`, in order (also the training shards' feature columns)
FEATURE_COLUMNS: tuple[str, ...] = tuple(n for n, t in FEATURES.fields if isinstance(t, TensorSpec))

MEMORY_TOKENS = Contract("MemoryTokens", _COMMON + (
    ("window", pa.int64()),
    ("first_frame", pa.int64()),
    ("tokens", TensorSpec(pa.float32(), (None, None))),
))

MOTION_WINDOW = Contract("MotionWindow", _COMMON + (
    ("frame", pa.int64()),
    ("window", pa.int64()),
    ("motion", TensorSpec(pa.float32(), (motion.NUM_CHANNELS,))),
))

RENDERED_FRAMES = Contract("RenderedFrames", _COMMON + (
    ("frame", pa.int64()),
    ("image", TensorSpec(pa.uint8(), (None, None, 3))),
))

#: client-side face tracking (ARKit blendshapes + head pose), one row per 25 fps frame, motion.CHANNELS order
USER_BLENDSHAPES = Contract("UserBlendshapes", _COMMON + (
    ("frame", pa.int64()),
    ("values", TensorSpec(pa.float32(), (motion.NUM_CHANNELS,))),
))

CONTRACTS: dict[str, Contract] = {c.name: c for c in (
    AUDIO_CHUNK, VIDEO_FRAMES, TRANSCRIPT_SEGMENT, FEATURES, MEMORY_TOKENS, MOTION_WINDOW, RENDERED_FRAMES,
    USER_BLENDSHAPES)}


def _check_tensor(contract: Contract, name: str, spec: TensorSpec, typ: pa.DataType) -> None:
    if not isinstance(typ, pa.FixedShapeTensorType):
        raise SchemaError(contract.name, name, f"expected {spec.describe()}, got {typ}")
    if typ.value_type != spec.value_type:
        raise SchemaError(contract.name, name, f"expected values of type {spec.value_type}, got {typ.value_type}")
    shape = tuple(typ.shape)
    if len(shape) != len(spec.shape) or any(w is not None and w != s for w, s in zip(spec.shape, shape)):
        raise SchemaError(contract.name, name, f"expected shape {spec.describe()}, got {list(shape)}")


def validate(batch: pa.RecordBatch, contract: Contract) -> pa.RecordBatch:
    """Check ``batch`` against ``contract``; return it unchanged or raise SchemaError naming the field."""
    if not isinstance(batch, (pa.RecordBatch, pa.Table)):
        raise SchemaError(contract.name, "<batch>", f"expected a pyarrow RecordBatch, got {type(batch).__name__}")
    schema = batch.schema
    for name, spec in contract.fields:
        idx = schema.get_field_index(name)
        if idx < 0:
            raise SchemaError(contract.name, name, "missing")
        typ = schema.field(idx).type
        if isinstance(spec, TensorSpec):
            _check_tensor(contract, name, spec, typ)
        elif typ != spec:
            raise SchemaError(contract.name, name, f"expected type {spec}, got {typ}")
        if batch.column(idx).null_count:
            raise SchemaError(contract.name, name, f"{batch.column(idx).null_count} null value(s)")
    extra = [n for n in schema.names if n not in contract.field_names]
    if extra:
        raise SchemaError(contract.name, extra[0], "not part of the contract")
    if batch.num_rows:
        seq = batch.column("seq").to_numpy()
        sid = batch.column("session_id").to_numpy(zero_copy_only=False)
        same = sid[1:] == sid[:-1]
        if np.any(np.diff(seq)[same] <= 0):
            raise SchemaError(contract.name, "seq", "not strictly increasing within a session")
        pts = batch.column("pts").to_numpy()
        if not np.all(np.isfinite(pts)):
            raise SchemaError(contract.name, "pts", "not finite")
    return batch


def tensor_array(values: np.ndarray, spec_value_type: pa.DataType | None = None) -> pa.Array:
    """A fixed_shape_tensor array from an (N, *shape) numpy array."""
    if spec_value_type is not None:
        values = np.asarray(values).astype(numpy_dtype(spec_value_type), copy=False)
    expected = tuple(int(np.prod(values.shape[i + 1:])) * values.itemsize for i in range(values.ndim))
    if values.strides != expected:  # not plain C order (views, or size-1 dims with odd strides)
        fresh = np.empty(values.shape, values.dtype)
        fresh[...] = values
        values = fresh
    if values.ndim < 2:
        raise ValueError("tensor columns need an array of shape (rows, *tensor_shape)")
    if values.shape[0] == 0:
        typ = pa.fixed_shape_tensor(pa.from_numpy_dtype(values.dtype), list(values.shape[1:]))
        storage = pa.array([], type=typ.storage_type)
        return pa.ExtensionArray.from_storage(typ, storage)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(values)


def make_batch(contract: Contract, columns: dict[str, object]) -> pa.RecordBatch:
    """Build a validated batch of ``contract`` from numpy/python columns (tensors as (N, *shape) arrays)."""
    arrays = []
    for name, spec in contract.fields:
        if name not in columns:
            raise SchemaError(contract.name, name, "missing")
        value = columns[name]
        if isinstance(spec, TensorSpec):
            arrays.append(tensor_array(np.asarray(value), spec.value_type))
        else:
            arrays.append(pa.array(value, type=spec))
    batch = pa.RecordBatch.from_arrays(arrays, names=list(contract.field_names))
    return validate(batch, contract)


def column(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """A column as numpy: tensor columns as (N, *shape) arrays (zero-copy where Arrow allows)."""
    col = batch.column(name)
    if isinstance(col.type, pa.FixedShapeTensorType):
        if len(col) == 0:
            return np.zeros((0, *col.type.shape), dtype=numpy_dtype(col.type.value_type))
        return col.to_numpy_ndarray()
    return col.to_numpy(zero_copy_only=False)


def empty(contract: Contract, **shapes: Sequence[int]) -> pa.RecordBatch:
    """A zero-row batch of ``contract``; wildcard tensor shapes are given by keyword (field=shape)."""
    cols: dict[str, object] = {}
    for name, spec in contract.fields:
        if isinstance(spec, TensorSpec):
            shape = shapes.get(name, spec.shape)
            cols[name] = np.zeros((0, *[d or 1 for d in shape]), dtype=numpy_dtype(spec.value_type))
        else:
            cols[name] = []
    return make_batch(contract, cols)


def concat(batches: Sequence[pa.RecordBatch], contract: Contract) -> pa.RecordBatch:
    """Concatenate batches of one contract (same tensor shapes) into one batch."""
    batches = [b for b in batches if b is not None]
    if not batches:
        return empty(contract)
    nonempty = [b for b in batches if b.num_rows] or batches[:1]
    if len(nonempty) == 1:
        return nonempty[0]
    return pa.Table.from_batches(nonempty).combine_chunks().to_batches()[0]

"""Motion tracks for training targets: the project's motion Parquet, Live Link Face CSV exports, and
face-tracker extractors whose model file the user supplies.

Every track ends up on the same 25 fps grid ``t_i = i / 25`` (``i < num_frames``) by
:func:`resample_to_grid`: rows are placed by their timestamp and each channel is linearly
interpolated; before the first and after the last row the edge value holds; channels the track does
not have are 0 (neutral). The result is ``(num_frames, 58)`` float32 in
:data:`echo_stream.motion.CHANNELS` order.

Live Link Face CSV
------------------
What the Live Link Face iPhone app exports per take::

    Timecode,BlendShapeCount,EyeBlinkLeft,EyeLookDownLeft,...,TongueOut,HeadYaw,HeadPitch,HeadRoll,LeftEyeYaw,...
    14:03:52:28.207,61,0.0123,0.0,...

* ``Timecode`` is ``HH:MM:SS:FF.sss``: ``FF`` counts frames at the app's capture rate (60 by default,
  30 or others by setting) and ``.sss`` is the sub-frame fraction, so ``t = 3600 h + 60 m + s +
  (FF + 0.sss) / rate``. The rate is inferred as the smallest standard rate (24, 25, 30, 48, 50, 60,
  120) above the largest ``FF`` in the file, or given (``fps=``). Times are relative to the first row
  (the take starts with the media), plus an optional ``offset_s``; a timecode that wraps past
  midnight is continued.
* Blendshape columns use ARKit names in PascalCase (``EyeBlinkLeft``); they are matched
  case-insensitively to :data:`echo_stream.motion.CHANNELS` (the same matching as client-side
  blendshapes in serving, :func:`echo_stream.features.blendshape_frames`).
* ``HeadYaw``/``HeadPitch``/``HeadRoll`` become ``headYaw``/``headPitch``/``headRoll`` in radians.
  App versions differ in the unit; ``head_units="auto"`` (default) reads them as degrees when any
  absolute value exceeds pi (no head turns that far in radians), else as radians. The eye rotations
  are dropped (ARKit's ``eyeLook*`` blendshapes carry gaze). There is no head translation (0).

Face-tracker extractors
-----------------------
When a conversation has avatar *video* but no motion track, an extractor can make the targets from
the video frames. The user supplies the tracker and its model file::

    echo-stream preprocess IN OUT --extractor mypkg.trackers:MyTracker --extractor-model face.task

``mypkg.trackers.MyTracker(model_path)`` is constructed once per preprocessing worker (so the model
loads once) and called per block of frames; see :class:`FaceTracker` for the interface.
"""
from __future__ import annotations

import csv
import importlib
import io
import math
import os
import re
from typing import Mapping, Protocol, runtime_checkable

import numpy as np

from . import config, motion
from .errors import InputError

#: standard capture rates a Live Link Face timecode's frame field may count at
LIVELINK_RATES = (24.0, 25.0, 30.0, 48.0, 50.0, 60.0, 120.0)
_TIMECODE_RE = re.compile(r"^\s*(\d+):(\d{1,2}):(\d{1,2})[:;](\d+)(?:\.(\d+))?\s*$")
_LIVELINK_HEAD = {"headyaw": "headYaw", "headpitch": "headPitch", "headroll": "headRoll"}
_LIVELINK_IGNORED = {"timecode", "blendshapecount", "lefteyeyaw", "lefteyepitch", "lefteyeroll",
                     "righteyeyaw", "righteyepitch", "righteyeroll"}


def resample_to_grid(pts: np.ndarray, columns: Mapping[str, np.ndarray], num_frames: int,
                     what: str) -> np.ndarray:
    """``(num_frames, 58)`` float32: ``columns`` (channel name -> values at ``pts`` seconds) on the 25 fps grid."""
    pts = np.asarray(pts, np.float64)
    out = np.zeros((num_frames, motion.NUM_CHANNELS), np.float32)
    if not np.all(np.isfinite(pts)):
        raise InputError(what, "motion track has non-finite timestamps")
    if pts.size == 0 or num_frames == 0:
        return out
    order = np.argsort(pts, kind="stable")
    pts = pts[order]
    grid = np.arange(num_frames, dtype=np.float64) / config.FPS
    for name, values in columns.items():
        v = np.asarray(values, np.float64)[order]
        if not np.all(np.isfinite(v)):
            raise InputError(what, f"motion column '{name}' has NaN or infinite values")
        out[:, motion.CHANNEL_INDEX[name]] = np.interp(grid, pts, v)
    return out


def track_span(pts: np.ndarray) -> float:
    """Seconds of media time a track covers: its last timestamp plus one 25 fps frame (0 when empty)."""
    pts = np.asarray(pts, np.float64)
    return float(pts.max() + 1.0 / config.FPS) if pts.size else 0.0


# ============================================================================ project motion Parquet

def load_motion_parquet(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(pts, {channel: values})`` of a motion table (``frame``/``pts`` + channel columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = str(path)
    try:
        table = pq.read_table(p)
    except (OSError, pa.ArrowException) as e:
        raise InputError(p, f"cannot read motion Parquet: {e}") from None
    names = set(table.column_names)
    if "pts" in names:
        pts = table.column("pts").to_numpy().astype(np.float64)
    elif "frame" in names:
        pts = table.column("frame").to_numpy().astype(np.float64) / config.FPS
    else:
        raise InputError(p, "motion table needs a 'pts' (seconds) or 'frame' column")
    known = [c for c in motion.CHANNELS if c in names]
    if not known:
        raise InputError(p, "motion table has none of the motion channel columns "
                            "(ARKit names such as 'jawOpen', 'headPitch')")
    return pts, {c: table.column(c).to_numpy(zero_copy_only=False) for c in known}


def read_motion_track(path: str | os.PathLike, num_frames: int) -> np.ndarray:
    """A motion Parquet table resampled onto the 25 fps grid ``t_i = i / 25``, ``i < num_frames``.

    Rows are placed by ``pts`` (seconds; ``frame / 25`` when there is no ``pts`` column) and each
    channel is linearly interpolated between them (see :func:`resample_to_grid`). Returns
    ``(num_frames, 58)`` float32.
    """
    pts, cols = load_motion_parquet(path)
    return resample_to_grid(pts, cols, num_frames, str(path))


# ============================================================================ Live Link Face CSV

def parse_timecode(tc: str) -> tuple[int, int, int, int, float]:
    """``(h, m, s, frame, sub_frame_fraction)`` of a ``HH:MM:SS:FF.sss`` timecode."""
    m = _TIMECODE_RE.match(str(tc))
    if not m:
        raise ValueError(f"timecode {tc!r} is not HH:MM:SS:FF(.sss)")
    h, mi, s, ff, sub = m.groups()
    return int(h), int(mi), int(s), int(ff), float("0." + sub) if sub else 0.0


def load_livelink_csv(path: str | os.PathLike, *, fps: float | None = None, head_units: str = "auto"
                      ) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """``(pts, {channel: values}, rate)`` of a Live Link Face CSV export (see the module docstring)."""
    p = str(path)
    if head_units not in ("auto", "radians", "degrees"):
        raise ValueError(f"head_units must be auto, radians or degrees, got {head_units!r}")
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except OSError as e:
        raise InputError(p, f"cannot read Live Link Face CSV: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InputError(p, "not a text CSV file (Live Link Face exports UTF-8 text)") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header or header[0].strip().lower() != "timecode":
        raise InputError(p, "not a Live Link Face CSV: the first column must be 'Timecode'")
    from .features import _CANONICAL_INDEX, _canonical

    cols: list[tuple[int, str]] = []
    for j, name in enumerate(header):
        key = _canonical(name)
        if key in _LIVELINK_IGNORED:
            continue
        if key in _LIVELINK_HEAD:
            cols.append((j, _LIVELINK_HEAD[key]))
        elif key in _CANONICAL_INDEX and not motion.CHANNELS[_CANONICAL_INDEX[key]].startswith("head"):
            cols.append((j, motion.CHANNELS[_CANONICAL_INDEX[key]]))
        else:
            raise InputError(p, f"unknown Live Link Face column '{name}' (expected ARKit blendshape names, "
                                "HeadYaw/HeadPitch/HeadRoll and eye rotations)")
    if not cols:
        raise InputError(p, "Live Link Face CSV has no blendshape or head rotation columns")
    stamps, rows = [], []
    for i, rec in enumerate(reader, 2):
        if not rec or all(not c.strip() for c in rec):
            continue
        if len(rec) < len(header):
            raise InputError(p, f"line {i}: {len(rec)} fields, the header has {len(header)} (truncated file?)")
        try:
            stamps.append(parse_timecode(rec[0]))
            rows.append([float(rec[j]) for j, _ in cols])
        except ValueError as e:
            raise InputError(p, f"line {i}: {e}") from None
    if not rows:
        raise InputError(p, "Live Link Face CSV has no data rows")
    max_ff = max(s[3] for s in stamps)
    if fps is None:
        rate = next((r for r in LIVELINK_RATES if r > max_ff), None)
        if rate is None:
            raise InputError(p, f"timecode frame field reaches {max_ff}: give the capture rate (--livelink-fps)")
    else:
        rate = float(fps)
        if max_ff >= rate:
            raise InputError(p, f"timecode frame field reaches {max_ff}, not possible at {rate:g} fps")
    t = np.array([3600 * h + 60 * m + s + (ff + sub) / rate for h, m, s, ff, sub in stamps], np.float64)
    t = t + 86400.0 * np.cumsum(np.concatenate([[0], np.diff(t) < -43200.0]))  # midnight wrap
    t -= t[0]
    values = np.array(rows, np.float64)
    out = {name: values[:, k] for k, (_, name) in enumerate(cols)}
    head = [n for n in ("headYaw", "headPitch", "headRoll") if n in out]
    degrees = head_units == "degrees" or (head_units == "auto" and head and
                                          max(float(np.abs(out[n]).max()) for n in head) > math.pi)
    if degrees:
        for n in head:
            out[n] = np.deg2rad(out[n])
    return t, out, rate


def read_livelink_csv(path: str | os.PathLike, num_frames: int, *, offset_s: float = 0.0,
                      fps: float | None = None, head_units: str = "auto") -> np.ndarray:
    """A Live Link Face CSV export on the 25 fps grid: ``(num_frames, 58)`` float32."""
    t, cols, _ = load_livelink_csv(path, fps=fps, head_units=head_units)
    return resample_to_grid(t + float(offset_s), cols, num_frames, str(path))


# ============================================================================ any track

def load_track(path: str | os.PathLike, *, livelink_fps: float | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(pts, {channel: values})`` of a motion track: ``.parquet`` (project layout) or ``.csv`` (Live Link Face)."""
    p = str(path)
    ext = os.path.splitext(p)[1].lower()
    if ext == ".parquet":
        return load_motion_parquet(p)
    if ext == ".csv":
        t, cols, _ = load_livelink_csv(p, fps=livelink_fps)
        return t, cols
    raise InputError(p, f"unknown motion track format '{ext}': use the project's motion .parquet or a "
                        "Live Link Face .csv export")


# ============================================================================ extractors

@runtime_checkable
class FaceTracker(Protocol):
    """A face tracker that turns video frames into motion channels (user-supplied; model file by path).

    ``__init__(model_path: str)`` loads the model (once per worker). ``__call__(frames)`` gets a
    ``(N, H, W, 3)`` uint8 RGB block of consecutive frames on the 25 fps grid and returns a mapping
    ``{channel name: (N,) values}`` with ARKit blendshape names and/or ``headPitch``/``headYaw``/
    ``headRoll`` (radians) and ``headTx``/``headTy``/``headTz`` (face heights); names are matched like
    client-side blendshapes. Optional attribute ``frame_size = (width, height)``: frames are resized
    to it (default: the source size).
    """

    def __call__(self, frames: np.ndarray) -> Mapping[str, np.ndarray]: ...


def load_extractor(spec: str, model_path: str | os.PathLike | None) -> FaceTracker:
    """Instantiate ``module:Class`` with the model file path."""
    if not spec or ":" not in spec:
        raise InputError("--extractor", f"expected 'package.module:ClassName', got {spec!r}")
    mod_name, _, cls_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise InputError("--extractor", f"cannot import {spec}: {e}") from None
    if model_path is not None and not os.path.exists(model_path):
        raise InputError(str(model_path), "extractor model file not found")
    try:
        return cls(None if model_path is None else str(model_path))
    except InputError:
        raise
    except Exception as e:
        raise InputError("--extractor", f"{spec}({model_path!r}) failed: {type(e).__name__}: {e}") from None


def extract_motion(tracker: FaceTracker, video_path: str, num_frames: int, block: int = 32) -> tuple[np.ndarray, int]:
    """``(motion (num_frames, 58), frames decoded)`` of a video through ``tracker``; the last frame's values
    hold after the video ends."""
    from . import media
    from .features import blendshape_frames

    out = np.zeros((num_frames, motion.NUM_CHANNELS), np.float32)
    size = getattr(tracker, "frame_size", None)
    done, buf = 0, []

    def run() -> None:
        nonlocal done
        try:
            vals = tracker(np.stack(buf))
        except InputError:
            raise
        except Exception as e:
            raise InputError(video_path, f"face tracker failed: {type(e).__name__}: {e}") from None
        m = blendshape_frames(dict(vals))
        if len(m) != len(buf):
            raise InputError(video_path, f"face tracker returned {len(m)} frames for {len(buf)}")
        out[done:done + len(buf)] = m
        done += len(buf)
        buf.clear()

    for _, _, rgb in media.iter_video_frames(video_path, fps=config.FPS, size=size):
        if done + len(buf) >= num_frames:
            break
        buf.append(rgb)
        if len(buf) == block:
            run()
    if buf:
        run()
    if done == 0:
        raise InputError(video_path, "video stream has no decodable frames for the face tracker")
    out[done:] = out[done - 1]
    return out, done

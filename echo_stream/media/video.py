"""Video decoding: RGB frames on a constant frame-rate grid, by timestamp (variable frame rate input)."""
from __future__ import annotations

import os
from typing import Iterator

import av
import numpy as np

from ..config import FPS
from ..errors import InputError
from .inputs import _av_reason, _EndCheck, _open, _set_threads, _stream_or_fail, _ToRgb


def _frame_seconds(frame, stream) -> float | None:
    if frame.pts is None:
        return None
    tb = frame.time_base or stream.time_base
    return float(frame.pts * tb) if tb else None


def iter_video_frames(path: str | os.PathLike, fps: float = FPS,
                      size: tuple[int, int] | None = None) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield ``(frame_index, t, rgb)`` on a constant ``fps`` grid: ``t = frame_index / fps``.

    For each grid time ``t`` the latest source frame whose timestamp (relative
    to the stream's first frame) is <= ``t`` (within 0.5 ms) is used: frames are
    duplicated (low or variable frame rate input) or dropped (high frame rate)
    as needed. The grid covers ``[0, end)`` where ``end`` is the last source
    frame's timestamp plus its duration (the previous frame interval when the
    file does not say), i.e. about ``ceil(duration * fps)`` frames. ``rgb`` is a
    fresh ``(H, W, 3)`` uint8 array; display rotation metadata is applied;
    ``size=(w, h)`` resizes to exactly that size (aspect ratio not preserved).
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if size is not None:
        w, h = (int(size[0]), int(size[1]))
        if w <= 0 or h <= 0:
            raise ValueError(f"size must be (width, height) > 0, got {size}")
    p, c = _open(path)
    try:
        stream = _stream_or_fail(p, c, "video")
        _set_threads(stream)
        eps = 5e-4
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        nominal = 1.0 / float(rate) if rate else 1.0 / fps
        ends = _EndCheck(p, c, stream)
        next_i = 0
        t0 = None
        prev = None          # (frame, t, cached rgb or None)
        prev_interval = nominal
        last_dur = None
        t_now = 0.0
        to_rgb = _ToRgb()

        def convert(frame) -> np.ndarray:
            rot = 0
            try:
                rot = int(round((frame.rotation or 0) / 90.0)) % 4
            except Exception:  # pragma: no cover - frames without side data
                rot = 0
            if size is not None:
                tw, th = (size[1], size[0]) if rot % 2 else (size[0], size[1])
                img = to_rgb(frame, tw, th)
            else:
                img = to_rgb(frame)
            if rot:
                img = np.ascontiguousarray(np.rot90(img, k=rot))
            return img

        def emit_until(limit: float):
            nonlocal next_i, prev
            frame, t, img = prev
            while next_i / fps < limit - eps:
                if img is None:
                    img = convert(frame)
                    prev = (frame, t, img)
                    out = img
                else:
                    out = img.copy()
                yield next_i, next_i / fps, out
                next_i += 1

        try:
            others = [s for s in (list(c.streams.audio) + list(c.streams.video)) if s is not stream]
            for packet in c.demux([stream] + others):
                ends.see(packet)
                if packet.stream is not stream:
                    continue
                if packet.pts is not None and t0 is not None:
                    t_now = float(packet.pts * packet.time_base) - t0
                for frame in packet.decode():
                    t = _frame_seconds(frame, stream)
                    if t0 is None:
                        t0 = t if t is not None else 0.0
                    if t is None:
                        t = (prev[1] + prev_interval) if prev is not None else 0.0
                    else:
                        t -= t0
                    if prev is not None:
                        if t < prev[1]:
                            t = prev[1]  # out-of-order timestamp: treat as the same instant
                        if t > prev[1]:
                            prev_interval = t - prev[1]
                        yield from emit_until(t)
                    prev = (frame, t, None)
                    t_now = t
                    d = frame.duration
                    tb = frame.time_base or stream.time_base
                    last_dur = float(d * tb) if d and tb else None
        except av.FFmpegError as e:
            raise InputError(p, f"corrupt or truncated video at t={t_now:.2f}s ({_av_reason(e)}); "
                                "re-encode or re-download the file") from None
        if prev is None:
            raise InputError(p, "video stream has no decodable frames (zero length)")
        end = prev[1] + (last_dur if last_dur and last_dur > 0 else prev_interval)
        ends.check(p, "video", end)
        yield from emit_until(max(end, prev[1] + eps * 2))
    finally:
        c.close()

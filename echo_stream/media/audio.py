"""Audio decoding: any audio PyAV reads -> mono float32 at a chosen rate (whole, or in fixed-size chunks)."""
from __future__ import annotations

import os
from typing import Iterator

import av
import numpy as np

from ..config import SAMPLE_RATE
from ..errors import InputError
from .inputs import _av_reason, _EndCheck, _open, _set_threads, _stream_or_fail

#: Timestamp gaps in an audio stream longer than this (seconds) are filled with silence.
AUDIO_GAP_FILL_S = 0.1
#: Longest timestamp jump filled with silence; a longer one is refused as broken timing.
MAX_AUDIO_GAP_S = 30.0


class AudioChunker:
    """Cut a stream of sample arrays into fixed-size chunks.

    ``push(samples)`` returns the list of ``(start_sample, chunk)`` that became
    complete; ``flush()`` returns the final, shorter chunk (or ``[]``). Every
    chunk but the last has exactly ``chunk_samples`` samples; ``start_sample``
    counts from the first sample pushed.
    """

    def __init__(self, chunk_samples: int):
        if int(chunk_samples) <= 0:
            raise ValueError(f"chunk_samples must be positive, got {chunk_samples}")
        self.chunk_samples = int(chunk_samples)
        self._parts: list[np.ndarray] = []
        self._pending = 0
        self._next_start = 0

    def push(self, samples: np.ndarray) -> list[tuple[int, np.ndarray]]:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if samples.size:
            self._parts.append(samples)
            self._pending += samples.size
        out = []
        if self._pending >= self.chunk_samples:
            buf = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
            n_full = buf.size // self.chunk_samples
            for k in range(n_full):
                out.append((self._next_start, buf[k * self.chunk_samples:(k + 1) * self.chunk_samples].copy()))
                self._next_start += self.chunk_samples
            rest = buf[n_full * self.chunk_samples:]
            self._parts = [rest] if rest.size else []
            self._pending = rest.size
        return out

    def flush(self) -> list[tuple[int, np.ndarray]]:
        if not self._pending:
            return []
        buf = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
        out = [(self._next_start, buf.copy())]
        self._next_start += buf.size
        self._parts, self._pending = [], 0
        return out


def _iter_decoded_audio(path: str | os.PathLike, sample_rate: int) -> Iterator[np.ndarray]:
    """Yield ``sample_rate`` Hz mono float32 blocks of the first audio stream, in order."""
    if int(sample_rate) <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    sample_rate = int(sample_rate)
    p, c = _open(path)
    try:
        stream = _stream_or_fail(p, c, "audio")
        _set_threads(stream)
        ends = _EndCheck(p, c, stream)
        # MP4/MOV declare the exact (edit list) duration: samples past it are encoder padding
        cap = None
        if ends.stream_declared and ("mp4" in c.format.name or "mov" in c.format.name):
            cap = int(round(ends.stream_declared * sample_rate))
        resampler = None
        setup = None
        t0 = None            # time of the first decoded frame: t = 0
        emitted = 0          # output samples produced so far
        t_now = 0.0          # last timestamp seen (for error messages)

        def drain(frames):
            nonlocal emitted
            for fr in frames:
                x = fr.to_ndarray().reshape(len(fr.layout.channels), -1)
                y = x[0] if x.shape[0] == 1 else x.mean(axis=0)
                y = np.clip(y.astype(np.float32, copy=False), -1.0, 1.0)
                if cap is not None:
                    y = y[: max(0, cap - emitted)]
                emitted += y.size
                if y.size:
                    yield y

        others = [s for s in (list(c.streams.audio) + list(c.streams.video)) if s is not stream]
        try:
            for packet in c.demux([stream] + others):
                ends.see(packet)
                if packet.stream is not stream:
                    continue
                if packet.pts is not None:
                    t_now = float(packet.pts * packet.time_base) - (t0 or 0.0)
                for frame in packet.decode():
                    if frame.samples == 0:
                        continue
                    key = (frame.format.name, frame.layout.name, frame.sample_rate)
                    if resampler is None or key != setup:
                        if resampler is not None:
                            yield from drain(resampler.resample(None))
                        nch = len(frame.layout.channels)
                        resampler = av.AudioResampler(format="fltp", layout="mono" if nch == 1 else "stereo",
                                                      rate=sample_rate)
                        setup = key
                    ft = frame.time
                    if ft is not None:
                        if t0 is None:
                            t0 = ft
                        # honour timestamp gaps (dropouts) by inserting silence
                        gap = int(round((ft - t0) * sample_rate - emitted))
                        if gap > MAX_AUDIO_GAP_S * sample_rate:
                            raise InputError(p, f"audio timestamps jump by {gap / sample_rate:.0f} s at "
                                                f"t={emitted / sample_rate:.2f}s (at most {MAX_AUDIO_GAP_S:g} s of "
                                                f"dropout is filled): the file's timing is broken; re-encode it")
                        if gap > AUDIO_GAP_FILL_S * sample_rate:
                            if cap is not None:
                                gap = min(gap, max(0, cap - emitted))
                            emitted += gap
                            yield np.zeros(gap, dtype=np.float32)
                    elif t0 is None:
                        t0 = 0.0
                    frame.pts = None  # samples are placed by us; the resampler must not re-time them
                    yield from drain(resampler.resample(frame))
            if resampler is not None:
                yield from drain(resampler.resample(None))
        except av.FFmpegError as e:
            raise InputError(p, f"corrupt or truncated audio at t={max(t_now, emitted / sample_rate):.2f}s "
                                f"({_av_reason(e)}); re-encode or re-download the file") from None
        if emitted == 0:
            raise InputError(p, "audio stream is empty (zero length): nothing to decode")
        ends.check(p, "audio", emitted / sample_rate)
    finally:
        c.close()


def decode_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The whole audio track of ``path`` as ``sample_rate`` Hz mono float32 in [-1, 1].

    The stream's start is t = 0 (see the module docstring). Raises
    :class:`InputError` for missing/unreadable/non-media/corrupt files, files
    without an audio stream, and zero-length audio.
    """
    parts = list(_iter_decoded_audio(path, sample_rate))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def iter_audio_chunks(path: str | os.PathLike, chunk_samples: int,
                      sample_rate: int = SAMPLE_RATE) -> Iterator[tuple[int, np.ndarray]]:
    """Stream ``(start_sample, samples)`` chunks of ``path``'s audio (mono float32 at ``sample_rate``).

    Chunks come in timestamp order; all have ``chunk_samples`` samples except
    possibly the last. Concatenated they equal :func:`decode_audio`. Errors are
    raised when reached (a corrupt file fails mid-iteration, after the chunks
    that decoded fine).
    """
    chunker = AudioChunker(chunk_samples)
    for block in _iter_decoded_audio(path, sample_rate):
        yield from chunker.push(block)
    yield from chunker.flush()

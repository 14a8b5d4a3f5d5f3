"""Media I/O with PyAV: decode audio/video, load images, write H.264+AAC MP4.

Everything goes through PyAV (libav* in-process; no ffmpeg command line).

Reading
-------
* :func:`decode_audio` / :func:`iter_audio_chunks`: any audio PyAV reads (wav,
  mp3, m4a/aac, ogg/opus/vorbis, flac, the audio track of a video, ...), any
  sample rate, mono/stereo/multichannel, resampled with ``av.AudioResampler`` to
  16 kHz mono float32 in [-1, 1] (stereo is averaged, more channels are first
  downmixed to stereo by libswresample).
* :func:`iter_video_frames`: RGB frames resampled onto a constant frame-rate
  grid by timestamp (variable frame rate input is handled).
* :func:`probe` / :func:`read_mp4_info`: stream facts without decoding.
* :func:`load_image`: a portrait image through Pillow.

Timestamps: each stream's own start is t = 0. A file whose audio (or video)
starts at a non-zero time (an mkv cut from a longer recording, an mp4 with an
edit list, a webcam recording that began late) is decoded as if its first
decoded frame were at 0 s: nothing is prepended and nothing is dropped.
Encoder delay that the container marks for skipping (mp3 LAME/Info gapless
data, mp4 AAC priming edit lists, Opus pre-skip) is skipped by the decoder.
After the start, audio timestamps are honoured: a jump of more than
``AUDIO_GAP_FILL_S`` between a frame's timestamp and the samples decoded so far
(a recording with a dropout) is filled with silence so that later audio stays
in place; smaller jitter and overlaps are ignored (samples stay contiguous). A
single jump longer than ``MAX_AUDIO_GAP_S`` is not a dropout but broken timing
(a few KB claiming an hour): it raises :class:`~echo_stream.errors.InputError`
instead of allocating the silence.

Errors: every problem with an input raises :class:`~echo_stream.errors.InputError`
``(path, problem)`` with a one-line, actionable message; no ``av`` exception
escapes these functions.

Writing
-------
:class:`Mp4Writer` writes H.264 (libx264, yuv420p) + AAC MP4 atomically (temp
file + ``os.replace``), or fragmented MP4 into any writable file-like object
for streaming; :class:`FragmentedMp4Encoder` wraps the latter and hands back
``bytes`` chunks.
"""
from __future__ import annotations

import io
import os
import secrets
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, Iterator

import av
import numpy as np

from .config import FPS, SAMPLE_RATE
from .errors import InputError

__all__ = [
    "MediaInfo", "probe", "read_mp4_info",
    "decode_audio", "iter_audio_chunks", "AudioChunker",
    "iter_video_frames", "load_image",
    "Mp4Writer", "FragmentedMp4Encoder",
    "AUDIO_GAP_FILL_S", "MAX_AUDIO_GAP_S",
]

#: Timestamp gaps in an audio stream longer than this (seconds) are filled with silence.
AUDIO_GAP_FILL_S = 0.1
#: Longest timestamp jump filled with silence; a longer one is refused as broken timing.
MAX_AUDIO_GAP_S = 30.0

#: Decoded duration may fall short of the duration the file declares by this
#: much (seconds, or this fraction of it when larger) before it counts as truncated.
_TRUNCATION_SLACK_S = 0.5
_TRUNCATION_SLACK_FRAC = 0.05

_ATTACHED_PIC = av.stream.Disposition.attached_pic

# FFmpeg demuxers that "open" arbitrary text; a file they claim is not media for us.
_TEXT_FORMATS = {"tty", "srt", "webvtt", "ass", "microdvd", "subviewer", "subviewer1",
                 "mpl2", "vplayer", "pjs", "jacosub", "sami", "realtext", "stl", "lrc"}


# =========================================================================== opening

def _check_path(path: str | os.PathLike) -> str:
    p = os.fspath(path)
    if not os.path.exists(p):
        raise InputError(p, "file not found")
    if os.path.isdir(p):
        raise InputError(p, "is a directory, expected a media file")
    if not os.access(p, os.R_OK):
        raise InputError(p, "permission denied: the file is not readable")
    if os.path.getsize(p) == 0:
        raise InputError(p, "file is empty (0 bytes)")
    return p


def _av_reason(e: BaseException) -> str:
    """A short reason from an av error (no file name, no traceback)."""
    reason = getattr(e, "strerror", None) or str(e)
    log = getattr(e, "log", None)
    if log:
        try:
            last = log[-1] if isinstance(log, (list, tuple)) else log
            msg = last[-1] if isinstance(last, (list, tuple)) else str(last)
            msg = str(msg).strip()
            if msg and msg not in reason:
                reason = f"{reason}; {msg}"
        except Exception:  # pragma: no cover - log layout differs between PyAV versions
            pass
    return " ".join(str(reason).split())


def _sniff(p: str) -> str | None:
    """A container family from the file's magic bytes (for better error messages)."""
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head[4:8] == b"ftyp" or head[4:8] in (b"moov", b"mdat", b"wide", b"free"):
        return "mp4"
    if head[:4] == b"RIFF":
        return {b"WAVE": "wav", b"AVI ": "avi"}.get(head[8:12], "riff")
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


def _wav_declared_seconds(p: str) -> float | None:
    """Duration a RIFF/WAVE header declares (data chunk size / byte rate), or None."""
    import struct

    try:
        with open(p, "rb") as f:
            if f.read(12)[8:12] != b"WAVE":
                return None
            byte_rate = None
            while True:
                hdr = f.read(8)
                if len(hdr) < 8:
                    return None
                cid, size = hdr[:4], struct.unpack("<I", hdr[4:])[0]
                if cid == b"fmt ":
                    fmt = f.read(size + (size & 1))
                    byte_rate = struct.unpack("<I", fmt[8:12])[0] if len(fmt) >= 12 else None
                elif cid == b"data":
                    if not byte_rate or size in (0, 0xFFFFFFFF):
                        return None  # streaming placeholder: no declared length
                    return size / byte_rate
                else:
                    f.seek(size + (size & 1), 1)
    except (OSError, struct.error):
        return None


_FAMILY_HINT = {
    "mp4": "truncated or unfinished MP4/MOV/M4A (its 'moov' index is missing or damaged): re-download or re-export it",
    "avi": "truncated or corrupt AVI header: re-download or re-export it",
    "wav": "corrupt WAV header: re-export it",
    "matroska": "truncated or corrupt MKV/WebM header: re-download or re-export it",
    "ogg": "truncated or corrupt Ogg header: re-download or re-export it",
    "flac": "truncated or corrupt FLAC header: re-download or re-export it",
    "mp3": "truncated or corrupt MP3: no decodable audio frames found",
}


#: FFmpeg threads for decoding files (:func:`decode_audio`, :func:`iter_video_frames`) and for converting
#: their video frames to RGB: ``None`` = FFmpeg's automatic choice (as many as the machine has cores);
#: ``n`` = that many. See :func:`set_decode_threads`.
_DECODE_THREADS: int | None = None


def set_decode_threads(n: int | None) -> None:
    """Threads FFmpeg uses in this process to decode files and convert their frames (``None``: FFmpeg's
    automatic choice, the default).

    A process that is one of several running in parallel, one per core (a preprocessing featuriser
    actor), sets 1: FFmpeg's own threads would only compete with the other processes for the cores,
    and on small frames their hand-offs cost more than they save. Output does not depend on it.
    """
    global _DECODE_THREADS
    if n is not None and int(n) < 1:
        raise ValueError(f"decode threads must be >= 1 or None, got {n}")
    _DECODE_THREADS = None if n is None else int(n)


def _set_threads(stream) -> None:
    if _DECODE_THREADS is None:
        stream.thread_type = "AUTO"
    else:
        stream.codec_context.thread_count = _DECODE_THREADS
        if _DECODE_THREADS > 1:
            stream.thread_type = "AUTO"


class _ToRgb:
    """RGB conversion of one file's video frames through one reused swscale context.

    (``VideoFrame.reformat`` makes a new context per frame, and with automatic threading each new
    context starts and stops its own threads: per frame, which costs more than the conversion of a
    small frame and makes the caller wait for thread start-up whenever the cores are busy.)
    """

    def __init__(self):
        from av.video.reformatter import VideoReformatter

        self._r = VideoReformatter()
        self._threads = {} if _DECODE_THREADS is None else {"threads": _DECODE_THREADS}

    def __call__(self, frame, width: int | None = None, height: int | None = None) -> np.ndarray:
        try:
            out = self._r.reformat(frame, width=width, height=height, format="rgb24", **self._threads)
        except TypeError:  # PyAV < 13: no ``threads`` argument
            self._threads = {}
            out = self._r.reformat(frame, width=width, height=height, format="rgb24")
        return out.to_ndarray()


def _open(path: str | os.PathLike):
    p = _check_path(path)
    try:
        container = av.open(p, "r", metadata_errors="replace")
    except (av.error.InvalidDataError, av.error.EOFError):
        hint = _FAMILY_HINT.get(_sniff(p) or "")
        raise InputError(p, hint or "not a media file FFmpeg can read (unknown format, "
                                    "or a corrupt/truncated header)") from None
    except av.error.PermissionError:
        raise InputError(p, "permission denied: the file is not readable") from None
    except av.FFmpegError as e:
        raise InputError(p, f"cannot open as media: {_av_reason(e)}") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(p, f"cannot open as media: {e}") from None
    names = set((container.format.name or "").split(","))
    if names & _TEXT_FORMATS or not (container.streams.audio or container.streams.video):
        container.close()
        if _sniff(p) and not names & _TEXT_FORMATS:
            raise InputError(p, "contains no audio or video streams (an empty recording?)")
        raise InputError(p, "not a media file (no audio or video streams; is it a text file?)")
    return p, container


def _streams(container, kind: str) -> list:
    """The audio or video streams of a container; cover art (attached pictures) is not video."""
    if kind == "audio":
        return list(container.streams.audio)
    return [s for s in container.streams.video if not s.disposition & _ATTACHED_PIC]


def _stream_or_fail(p: str, container, kind: str):
    streams = _streams(container, kind)
    if not streams:
        if kind == "video" and container.streams.video:
            what = "only an attached cover picture"
        else:
            what = "video only" if kind == "audio" else "audio only"
        container.close()
        raise InputError(p, f"no {kind} stream in this file ({what}); pass a file that has {kind}")
    return streams[0]


# =========================================================================== probing

@dataclass(frozen=True)
class MediaInfo:
    """Facts about a media file (``None`` where the file does not say).

    ``duration`` is the container duration in seconds. ``video_frames`` and the
    per-stream durations come from the stream headers, or, from
    :func:`read_mp4_info` (``counted=True``), from demuxing every packet.
    ``width``/``height`` are the coded size (before any display rotation,
    which :func:`iter_video_frames` applies).
    """

    path: str
    format_name: str
    duration: float | None
    has_audio: bool
    has_video: bool
    audio_codec: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    audio_duration: float | None = None
    audio_start: float | None = None
    video_codec: str | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    pix_fmt: str | None = None
    video_frames: int | None = None
    video_duration: float | None = None
    video_start: float | None = None
    counted: bool = False


def _seconds(value, time_base) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def probe(path: str | os.PathLike, *, count_packets: bool = False) -> MediaInfo:
    """Read stream facts of a media file without decoding.

    With ``count_packets`` every packet is demuxed (not decoded) so that
    ``video_frames`` and the per-stream durations are exact even when headers
    omit them (mkv/webm).
    """
    p, c = _open(path)
    try:
        a = (_streams(c, "audio") or [None])[0]
        v = (_streams(c, "video") or [None])[0]
        kw: dict = {}
        if a is not None:
            cc = a.codec_context
            kw.update(audio_codec=cc.name, sample_rate=cc.sample_rate or a.rate,
                      channels=cc.channels, audio_duration=_seconds(a.duration, a.time_base),
                      audio_start=_seconds(a.start_time, a.time_base))
        if v is not None:
            cc = v.codec_context
            rate = v.average_rate or v.guessed_rate or v.base_rate
            kw.update(video_codec=cc.name, fps=float(rate) if rate else None, width=cc.width,
                      height=cc.height, pix_fmt=cc.pix_fmt, video_frames=v.frames or None,
                      video_duration=_seconds(v.duration, v.time_base),
                      video_start=_seconds(v.start_time, v.time_base))
        if count_packets:
            spans: dict[int, list] = {}
            counts: dict[int, int] = {}
            wanted = [s for s in (a, v) if s is not None]
            try:
                for pkt in c.demux(wanted):
                    if pkt.size == 0 or pkt.pts is None:
                        continue
                    i = pkt.stream.index
                    t0 = float(pkt.pts * pkt.time_base)
                    t1 = t0 + float((pkt.duration or 0) * pkt.time_base)
                    lo_hi = spans.setdefault(i, [t0, t1])
                    lo_hi[0] = min(lo_hi[0], t0)
                    lo_hi[1] = max(lo_hi[1], t1)
                    counts[i] = counts.get(i, 0) + 1
            except av.FFmpegError as e:
                raise InputError(p, f"corrupt or truncated media while reading packets: {_av_reason(e)}") from None
            if a is not None and a.index in spans:
                kw["audio_duration"] = spans[a.index][1] - spans[a.index][0]
                kw["audio_start"] = spans[a.index][0]
            if v is not None:
                kw["video_frames"] = counts.get(v.index, 0)
                if v.index in spans:
                    kw["video_duration"] = spans[v.index][1] - spans[v.index][0]
                    kw["video_start"] = spans[v.index][0]
        return MediaInfo(
            path=p, format_name=c.format.name, duration=(c.duration / 1e6) if c.duration else None,
            has_audio=a is not None, has_video=v is not None,
            counted=count_packets, **kw)
    finally:
        c.close()


def read_mp4_info(path: str | os.PathLike) -> MediaInfo:
    """:func:`probe` with exact packet counts/durations (what tests check an MP4 with)."""
    return probe(path, count_packets=True)


# =========================================================================== audio

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


class _EndCheck:
    """Detects media that stops before the length its headers declare (truncation).

    The stream's own declared duration is used when the file has one (mp4,
    mov, mp3 with an Info/Xing header, flac, avi; wav from its RIFF data chunk
    size). Otherwise (mkv/webm) the end of the last packet of *any* stream is
    compared with the container's declared end, so a track that is
    legitimately shorter than another one is not mistaken for truncation.
    """

    def __init__(self, p: str, container, stream):
        self.stream_declared = _seconds(stream.duration, stream.time_base)
        if stream.type == "video" and stream.frames and stream.average_rate:
            # AVI headers count frames even when the index (and the duration derived from it) is lost
            by_count = stream.frames / float(stream.average_rate)
            self.stream_declared = max(self.stream_declared or 0.0, by_count)
        if _sniff(p) == "wav":
            # FFmpeg clips a WAV's duration to the bytes present; the RIFF header has the real length
            self.stream_declared = _wav_declared_seconds(p) or self.stream_declared
        # Containers disagree on whether their duration is a span or an end time (Matroska's
        # segment duration is the end timestamp); taking it as an end time can only under-detect.
        self.container_end = container.duration / 1e6 if container.duration else None
        self.file_end = None

    def see(self, packet) -> None:
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is None or packet.time_base is None:
            return
        end = float((ts + (packet.duration or 0)) * packet.time_base)
        if self.file_end is None or end > self.file_end:
            self.file_end = end

    @staticmethod
    def _short(declared: float, got: float) -> bool:
        return declared - got > max(_TRUNCATION_SLACK_S, _TRUNCATION_SLACK_FRAC * declared)

    def check(self, p: str, kind: str, got: float) -> None:
        """Raise if the ``got`` seconds decoded (relative to the stream start) fall short."""
        if self.stream_declared:
            if self._short(self.stream_declared, got):
                raise InputError(p, f"corrupt or truncated {kind} at t={got:.2f}s: decoding stopped there but "
                                    f"the file declares {self.stream_declared:.2f}s; re-encode or re-download it")
        elif self.container_end and self.file_end is not None:
            if self._short(self.container_end, self.file_end):
                raise InputError(p, f"corrupt or truncated {kind} at t={got:.2f}s: the data ends at "
                                    f"{self.file_end:.2f}s but the file declares {self.container_end:.2f}s; "
                                    "re-encode or re-download it")


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


# =========================================================================== video

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


# =========================================================================== images

def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as RGB uint8 ``(H, W, 3)`` via Pillow.

    EXIF orientation is applied. Greyscale, palette, CMYK and 16-bit images are
    converted to RGB; images with transparency (RGBA, LA, palette with a
    transparent colour) are composited onto white.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = _check_path(path)
    try:
        with Image.open(p) as im:
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # broken EXIF: keep the pixels as stored
                pass
            has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
                im.mode == "P" and "transparency" in im.info)
            if has_alpha:
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, rgba).convert("RGB")
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.float64)
                top = 65535.0 if a.max() > 255 else 255.0
                g = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(g[:, :, None], 3, axis=2)
            elif im.mode != "RGB":
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError:
        raise InputError(p, "not a PNG/JPEG/WebP/BMP/GIF/TIFF image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise InputError(p, f"image is too large to load safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(p, f"corrupt or truncated image ({' '.join(str(e).split())})") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise InputError(p, f"image decoded to an unusable shape {arr.shape}")
    return np.ascontiguousarray(arr)


# =========================================================================== writing

_FRAG_FLAGS = "frag_keyframe+empty_moov+default_base_moof"


class Mp4Writer:
    """Write RGB frames (and optional 16 kHz mono audio) as an H.264 + AAC MP4.

    ``Mp4Writer(path, width, height, fps=25, audio=None, audio_rate=16000,
    crf=23, preset='veryfast')``; use as a context manager or call
    :meth:`close`. Frames are ``(N, H, W, 3)`` (or one ``(H, W, 3)``) uint8 RGB;
    frame ``i`` gets pts ``i`` in time base ``1/fps``. Video is libx264 yuv420p
    (width and height must be even). Audio is AAC at ``aac_rate`` (48 kHz by
    default; resampled with ``av.AudioResampler``), interleaved with the video
    as frames are written. ``audio`` given up front is the whole track;
    otherwise samples come through :meth:`write_audio`. ``with_audio``:
    ``True`` declares the audio track up front, ``False`` makes a silent
    video, and the default ``None`` decides on its own: encoded video is held
    back (compressed, in memory) until the first :meth:`write_audio` call adds
    the track, or until :meth:`close` or ``audio_decision_s`` seconds of video
    settle on no audio (a later :meth:`write_audio` then raises).

    Atomic when ``path`` is a filesystem path: output goes to
    ``.<name>.tmp-<random>`` in the same directory and is renamed onto
    ``path`` by a successful :meth:`close`; an exception inside the ``with``
    block or :meth:`abort` deletes the temp file and leaves ``path`` untouched.
    Finished files get ``movflags=faststart`` (index first, for web playback).

    When ``path`` is a writable binary file-like object (``.write``), the
    output is written there, fragmented (``movflags=frag_keyframe+empty_moov+
    default_base_moof``, a keyframe every ``gop`` frames, default 1 s) so that
    a server can send bytes as they are produced; ``fragmented=True`` does the
    same for a path. ``fragment_frames`` also cuts a fragment whenever one
    spans that many frames (FFmpeg's ``frag_duration``); ``audio_lead_frames``
    lets audio already given be encoded that far ahead of the video (streaming:
    the muxer interleaves by time, so video waits for audio at least as late).
    """

    def __init__(self, path: str | os.PathLike | BinaryIO, width: int, height: int, fps: int = FPS,
                 audio: np.ndarray | None = None, audio_rate: int = SAMPLE_RATE, crf: int = 23,
                 preset: str = "veryfast", *, with_audio: bool | None = None, aac_rate: int = 48000,
                 audio_bitrate: int = 96_000, fragmented: bool | None = None, gop: int | None = None,
                 tune: str | None = None, format: str = "mp4", threads: int = 0,
                 audio_decision_s: float = 10.0, audio_lead_frames: int = 0,
                 fragment_frames: int | None = None):
        self._is_file = hasattr(path, "write")
        self.path = "<stream>" if self._is_file else os.fspath(path)
        self.width, self.height, self.fps = int(width), int(height), int(fps)
        self.frames_written = 0
        self._closed = False
        self._container = None
        self._tmp = None
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            raise InputError(self.path, f"H.264 (yuv420p) needs a positive even width and height, "
                                        f"got {self.width}x{self.height}; crop or pad by one pixel")
        if self.fps <= 0 or self.fps != fps:
            raise InputError(self.path, f"fps must be a positive integer, got {fps}")
        if fragmented is None:
            fragmented = self._is_file
        self.fragmented = bool(fragmented)
        self.audio_rate = int(audio_rate)
        #: audio already given may be encoded this many frames ahead of the video: the MP4 muxer interleaves
        #: by time, so video packets wait until audio at least as late is muxed (streaming latency)
        self._audio_lead = max(0, int(audio_lead_frames))
        if audio is not None:
            with_audio = True
        self._audio_mode: bool | None = None if with_audio is None else bool(with_audio)
        self._held: list = []
        self._hold_frames = max(1, int(audio_decision_s * self.fps))
        self._aac_rate = int(aac_rate)
        self._audio_bitrate = int(audio_bitrate)
        self._astream = None
        if audio is not None:
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim != 1:
                raise InputError(self.path, f"audio must be mono 1-D float32, got shape {audio.shape}")
        if aac_rate not in (av.codec.Codec("aac", "w").audio_rates or (aac_rate,)):
            raise InputError(self.path, f"AAC cannot encode at {aac_rate} Hz")
        if self.fragmented:
            options = {"movflags": _FRAG_FLAGS}
            if fragment_frames:   # also cut a fragment once it spans this many frames (not only at keyframes)
                options["frag_duration"] = str(int(1_000_000 * int(fragment_frames) / self.fps))
                # and hand packets to the muxer as they come instead of queueing them for interleaving: the
                # audio written ahead then closes the fragment of the newest video frame at once (otherwise
                # that frame waits for the next write)
                options["max_interleave_delta"] = "1"
        elif self._is_file:
            options = {}  # faststart re-opens the output by name: impossible for a file object
        else:
            options = {"movflags": "+faststart"}
        if self._is_file:
            target = path
        else:
            d = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(d):
                raise InputError(self.path, f"output directory {d} does not exist")
            if not os.access(d, os.W_OK):
                raise InputError(self.path, f"output directory {d} is not writable")
            if os.path.isdir(self.path):
                raise InputError(self.path, "is a directory; give a file name ending in .mp4")
            self._tmp = os.path.join(d, f".{os.path.basename(self.path)}.tmp-{secrets.token_hex(6)}")
            target = self._tmp
        try:
            self._container = av.open(target, "w", format=format, container_options=options)
            vs = self._container.add_stream("libx264", rate=self.fps)
            vs.width, vs.height, vs.pix_fmt = self.width, self.height, "yuv420p"
            vs.codec_context.time_base = Fraction(1, self.fps)
            opts = {"crf": str(crf), "preset": str(preset)}
            if tune:
                opts["tune"] = str(tune)
            vs.codec_context.options = opts
            if gop is None and self.fragmented:
                gop = self.fps
            if gop:
                vs.codec_context.gop_size = int(gop)
            if threads:
                vs.codec_context.thread_count = int(threads)
            self._vstream = vs
            self._audio_in = 0      # input samples handed to the resampler
            self._audio_out = 0     # samples (at aac_rate) handed to the encoder
            self._audio_pending: list[np.ndarray] = [] if audio is None else [audio]
            if self._audio_mode:
                self._add_audio_stream()
            if self._audio_mode is not None:
                self._container.start_encoding()  # opens the codecs and writes the header now
        except InputError:
            self._cleanup()
            raise
        except (av.FFmpegError, OSError, ValueError) as e:
            self._cleanup()
            raise InputError(self.path, f"cannot start MP4 encoding: {_av_reason(e)}") from None

    # ------------------------------------------------------------------ writing
    def write(self, frames: np.ndarray) -> None:
        """Encode RGB uint8 frames ``(N, H, W, 3)`` or ``(H, W, 3)``."""
        self._check_open()
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise InputError(self.path, f"frames must be (N, {self.height}, {self.width}, 3) RGB, got {frames.shape}")
        if frames.dtype != np.uint8:
            raise InputError(self.path, f"frames must be uint8, got {frames.dtype}")
        try:
            for img in frames:
                fr = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                fr.pts = self.frames_written
                fr.time_base = Fraction(1, self.fps)
                self._mux(self._vstream.encode(fr))
                self.frames_written += 1
            self._pump_audio(until_input_sample=self._audio_until())
        except av.FFmpegError as e:
            raise InputError(self.path, f"MP4 encoding failed: {_av_reason(e)}") from None

    def write_audio(self, samples: np.ndarray) -> None:
        """Append mono float32 samples (at ``audio_rate``) to the audio track."""
        self._check_open()
        try:
            if self._audio_mode is None:
                self._decide(True)
            if self._astream is None:
                raise InputError(self.path, "this writer has no audio track: pass audio= or with_audio=True, "
                                            "or start writing audio before the first "
                                            f"{self._hold_frames / self.fps:g} s of video")
            samples = np.asarray(samples, dtype=np.float32).reshape(-1)
            if samples.size:
                self._audio_pending.append(samples)
            self._pump_audio(until_input_sample=self._audio_until())
        except av.FFmpegError as e:
            raise InputError(self.path, f"MP4 encoding failed: {_av_reason(e)}") from None

    def _audio_until(self) -> int:
        return (self.frames_written + self._audio_lead) * self.audio_rate // self.fps

    def _add_audio_stream(self) -> None:
        a = self._container.add_stream("aac", rate=self._aac_rate)
        a.codec_context.layout = "mono"
        a.codec_context.bit_rate = self._audio_bitrate
        self._astream = a
        self._resampler = av.AudioResampler(format="fltp", layout="mono", rate=self._aac_rate)

    def _decide(self, with_audio: bool) -> None:
        """Settle whether the file has an audio track, then mux the video held back meanwhile."""
        self._audio_mode = bool(with_audio)
        if with_audio:
            self._add_audio_stream()
        self._container.start_encoding()
        held, self._held = self._held, []
        for pkt in held:
            self._container.mux(pkt)

    def _mux(self, packets) -> None:
        for pkt in packets:
            if self._audio_mode is None:
                self._held.append(pkt)
                if self.frames_written >= self._hold_frames:
                    self._decide(False)
            else:
                self._container.mux(pkt)

    def _pump_audio(self, until_input_sample: int | None) -> None:
        """Encode pending audio up to input sample ``until_input_sample`` (all of it when None)."""
        if self._astream is None or not self._audio_pending:
            return
        buf = np.concatenate(self._audio_pending) if len(self._audio_pending) > 1 else self._audio_pending[0]
        take = buf.size if until_input_sample is None else max(0, min(buf.size, until_input_sample - self._audio_in))
        if take == 0:
            self._audio_pending = [buf]
            return
        chunk, rest = buf[:take], buf[take:]
        self._audio_pending = [rest] if rest.size else []
        fr = av.AudioFrame.from_ndarray(np.clip(chunk, -1.0, 1.0)[None, :].copy(), format="fltp", layout="mono")
        fr.sample_rate = self.audio_rate
        fr.pts = self._audio_in
        fr.time_base = Fraction(1, self.audio_rate)
        self._audio_in += take
        self._encode_resampled(self._resampler.resample(fr))

    def _encode_resampled(self, frames) -> None:
        for out in frames:
            out.pts = self._audio_out
            out.time_base = Fraction(1, self._aac_rate)
            self._audio_out += out.samples
            self._mux(self._astream.encode(out))

    # ------------------------------------------------------------------ finishing
    def close(self) -> None:
        """Flush the encoders, finalise the MP4 and (for a path) move it into place."""
        if self._closed:
            return
        self._check_open()
        try:
            if self._audio_mode is None:
                self._decide(False)
            if self._astream is not None:
                self._pump_audio(None)
                self._encode_resampled(self._resampler.resample(None))
                self._mux(self._astream.encode(None))
            self._mux(self._vstream.encode(None))
            self._container.close()
            self._container = None
            if self._tmp is not None:
                os.replace(self._tmp, self.path)
                self._tmp = None
        except av.FFmpegError as e:
            self.abort()
            raise InputError(self.path, f"MP4 encoding failed while finalising: {_av_reason(e)}") from None
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Stop without producing output: the temp file is deleted, ``path`` is untouched."""
        self._closed = True
        self._cleanup()

    def _cleanup(self) -> None:
        c, self._container = self._container, None
        if c is not None:
            try:
                c.close()
            except Exception:
                pass
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _check_open(self) -> None:
        if self._closed or self._container is None:
            raise InputError(self.path, "writer is closed")

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):
        try:
            if not self._closed:
                self.abort()
        except Exception:
            pass


class _ByteSink(io.RawIOBase):
    """A write-only, non-seekable sink collecting bytes until drained."""

    def __init__(self):
        super().__init__()
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, b) -> int:
        data = bytes(b)
        self._parts.append(data)
        return len(data)

    def drain(self) -> bytes:
        out = b"".join(self._parts)
        self._parts = []
        return out


class FragmentedMp4Encoder:
    """Incremental fragmented-MP4 (H.264 + optional AAC) encoder for streaming.

    ``encode(frames, audio=None)`` returns the bytes produced so far (possibly
    ``b""``); ``close()`` returns the rest. Concatenated, the chunks are a
    playable fragmented MP4 (init segment ``ftyp+moov`` first, then
    ``moof+mdat`` pairs; a keyframe every ``gop`` frames, a fragment every
    ``fragment_frames`` frames (default: each frame its own). x264 runs with
    ``tune=zerolatency`` so frames are not held back for lookahead, and audio
    given ahead of the video is encoded up to ``audio_lead_frames`` frames
    ahead and muxed without interleaving delay, which closes the newest video
    frame's fragment at once: every ``encode`` call returns all its frames
    when audio at least ``audio_lead_frames`` ahead has been given (otherwise
    the newest frame waits for the next call). :attr:`frames_emitted` counts
    the video frames whose bytes have been returned (parsed from the
    fragments), so a server knows exactly which frames it has sent.
    """

    def __init__(self, width: int, height: int, fps: int = FPS, *, with_audio: bool = True,
                 audio_rate: int = SAMPLE_RATE, crf: int = 23, preset: str = "veryfast",
                 gop: int | None = None, aac_rate: int = 48000, audio_lead_frames: int = 3,
                 fragment_frames: int = 1):
        self._sink = _ByteSink()
        self._writer = Mp4Writer(self._sink, width, height, fps, None, audio_rate, crf, preset,
                                 with_audio=with_audio, aac_rate=aac_rate, fragmented=True,
                                 gop=gop, tune="zerolatency", audio_lead_frames=audio_lead_frames,
                                 fragment_frames=fragment_frames)
        self._video_track = self._writer._vstream.index + 1   # MP4 track ids follow the stream order
        self._frags = _FragmentCounter(self._video_track)

    @property
    def frames_written(self) -> int:
        return self._writer.frames_written

    @property
    def frames_emitted(self) -> int:
        """Video frames whose complete fragments (``moof`` + ``mdat``) have been returned so far."""
        return self._frags.samples

    def _drain(self) -> bytes:
        data = self._sink.drain()
        self._frags.feed(data)
        return data

    def encode(self, frames: np.ndarray, audio: np.ndarray | None = None) -> bytes:
        """Add audio (mono float32 at ``audio_rate``) then frames; return new bytes."""
        if audio is not None:
            self._writer.write_audio(audio)
        if frames is not None and len(frames):
            self._writer.write(frames)
        return self._drain()

    def close(self) -> bytes:
        """Finish the stream; return its last bytes."""
        self._writer.close()
        return self._drain()


class _FragmentCounter:
    """Counts the samples of one track in a fragmented-MP4 byte stream fed in arbitrary pieces.

    A fragment's samples count once its ``mdat`` (the box after its ``moof``) is complete.
    """

    def __init__(self, track_id: int):
        self.track_id = int(track_id)
        self.samples = 0
        self._buf = b""
        self._pending = 0          # samples of the last complete moof, waiting for its mdat

    def feed(self, data: bytes) -> None:
        buf = self._buf + data
        off = 0
        while len(buf) - off >= 8:
            size, kind = struct.unpack_from(">I4s", buf, off)
            head = 8
            if size == 1:                               # 64-bit size
                if len(buf) - off < 16:
                    break
                size, head = struct.unpack_from(">Q", buf, off + 8)[0], 16
            if size < head or len(buf) - off < size:
                if size == 0 or size < head:            # "to the end of the file" or malformed: stop counting
                    off = len(buf)
                break
            if kind == b"moof":
                self._pending = self._moof_samples(buf, off + head, off + size)
            elif kind == b"mdat":
                self.samples += self._pending
                self._pending = 0
            off += size
        self._buf = buf[off:]

    def _moof_samples(self, buf: bytes, lo: int, hi: int) -> int:
        n = 0
        for kind, blo, bhi in _boxes(buf, lo, hi):
            if kind != b"traf":
                continue
            track, count = None, 0
            for k2, clo, chi in _boxes(buf, blo, bhi):
                if k2 == b"tfhd" and chi - clo >= 8:
                    track = struct.unpack_from(">I", buf, clo + 4)[0]
                elif k2 == b"trun" and chi - clo >= 8:
                    count += struct.unpack_from(">I", buf, clo + 4)[0]
            if track == self.track_id:
                n += count
        return n


def _boxes(buf: bytes, lo: int, hi: int):
    """(type, payload start, end) of the boxes in ``buf[lo:hi]``."""
    off = lo
    while hi - off >= 8:
        size, kind = struct.unpack_from(">I4s", buf, off)
        if size < 8 or off + size > hi:
            return
        yield kind, off + 8, off + size
        off += size

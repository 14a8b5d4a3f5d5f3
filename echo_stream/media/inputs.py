"""Opening media files with PyAV: path and format checks with actionable errors, stream choice, FFmpeg
decode threads, RGB conversion, and detection of files shorter than their headers declare (truncation)."""
from __future__ import annotations

import os
import struct

import av
import numpy as np

from ..errors import InputError

#: Decoded duration may fall short of the duration the file declares by this
#: much (seconds, or this fraction of it when larger) before it counts as truncated.
_TRUNCATION_SLACK_S = 0.5
_TRUNCATION_SLACK_FRAC = 0.05

_ATTACHED_PIC = av.stream.Disposition.attached_pic

# FFmpeg demuxers that "open" arbitrary text; a file they claim is not media for us.
_TEXT_FORMATS = {"tty", "srt", "webvtt", "ass", "microdvd", "subviewer", "subviewer1",
                 "mpl2", "vplayer", "pjs", "jacosub", "sami", "realtext", "stl", "lrc"}


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


def _seconds(value, time_base) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


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

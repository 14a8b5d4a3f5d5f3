"""Checks of untrusted input files that need more than the header but no decoding, run before Ray starts.

:func:`~echo_stream.media.probe` reads headers; what a header cannot tell is here,
bounded in time and memory by reading packets (never decoded frames):

* :func:`check_audio` — both checks below, for a file whose audio will be used;
* :func:`check_ogg_complete` — an Ogg file has no index or declared length, so a truncated
  one reads as a shorter file; its last page must be whole and carry the end-of-stream flag;
* :func:`check_float_audio` — a float PCM track (``pcm_f32*`` / ``pcm_f64*``, e.g. a
  32-bit float WAV) is the one audio format whose samples can be NaN, infinite or
  absurdly large; compressed codecs and integer PCM cannot carry such values.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import InputError

#: float samples beyond this magnitude are not audio in any usual scale (full scale is 1.0)
MAX_FLOAT_SAMPLE = 64.0

_FLOAT_CODECS = {"pcm_f32le": "<f4", "pcm_f32be": ">f4", "pcm_f64le": "<f8", "pcm_f64be": ">f8"}


def check_float_audio(path: str | os.PathLike) -> None:
    """Raise :class:`InputError` naming ``path`` when a float PCM audio track holds NaN, inf or huge samples.

    Reads the file's audio packets once (memory: one packet); other codecs return at once.
    """
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError):
        return  # media.probe reports unreadable files; nothing more to check here
    with container:
        streams = [s for s in container.streams if s.type == "audio"]
        if not streams or streams[0].codec_context.name not in _FLOAT_CODECS:
            return
        stream = streams[0]
        dtype = np.dtype(_FLOAT_CODECS[stream.codec_context.name])
        rate = stream.codec_context.sample_rate or 1
        channels = max(stream.codec_context.channels, 1)
        seen = 0
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            raw = bytes(packet)
            x = np.frombuffer(raw[: len(raw) // dtype.itemsize * dtype.itemsize], dtype)
            bad = ~np.isfinite(x)
            if bad.any():
                i = int(np.argmax(bad))
                raise InputError(path, f"audio samples are NaN or infinite (first at t={(seen + i) // channels / rate:.2f} s): "
                                       "not usable float audio; re-export the file")
            big = np.abs(x) > MAX_FLOAT_SAMPLE
            if big.any():
                i = int(np.argmax(big))
                raise InputError(path, f"audio samples reach {float(x[i]):.3g} at t={(seen + i) // channels / rate:.2f} s, "
                                       f"far outside the float range [-1, 1]: normalise the file")
            seen += x.size


#: how far from its end an Ogg file's last page header is looked for (a page is at most 65,307 bytes)
_OGG_TAIL = 70_000


def check_ogg_complete(path: str | os.PathLike) -> None:
    """Raise :class:`InputError` naming ``path`` when an Ogg file (by its magic) was cut short."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"OggS":
                return
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _OGG_TAIL))
            start = f.tell()
            tail = f.read()
    except OSError:
        return
    i = len(tail)
    while True:
        i = tail.rfind(b"OggS", 0, i)
        if i < 0:
            raise InputError(path, "truncated or corrupt Ogg file: no page header near its end; "
                                   "re-download or re-export it")
        if len(tail) - i >= 27 and tail[i + 4] == 0:   # stream structure version 0: a page header
            nseg = tail[i + 26]
            if len(tail) - i < 27 + nseg:
                break     # header cut inside the segment table
            body = sum(tail[i + 27:i + 27 + nseg])
            if i + 27 + nseg + body > len(tail):
                break     # the last page is cut
            if tail[i + 5] & 0x04:
                return    # whole last page with the end-of-stream flag
            raise InputError(path, f"truncated Ogg file: it ends at byte {start + i + 27 + nseg + body} without "
                                   "its end-of-stream page; re-download or re-export it")
    raise InputError(path, f"truncated Ogg file: its last page is cut at byte {size}; re-download or re-export it")


def check_audio(path: str | os.PathLike) -> None:
    """Every check of this module for a file whose audio track will be used."""
    check_ogg_complete(path)
    check_float_audio(path)

"""Streaming fragmented MP4: :class:`FragmentedMp4Encoder` hands back the bytes of each fragment as it
is made, and counts the video frames those bytes complete (a small ISO BMFF box parser)."""
from __future__ import annotations

import io
import struct

import numpy as np

from ..config import FPS, SAMPLE_RATE
from .mp4 import Mp4Writer


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
    playable fragmented MP4 (init segment ``ftyp+moov`` first, returned with
    the first fragment, then ``moof+mdat`` pairs; a keyframe every ``gop``
    frames, a fragment every ``fragment_frames`` frames (default: each frame
    its own), timed as a finished :class:`Mp4Writer` file: every video frame
    lasts ``1/fps`` from pts 0 and an edit list cuts the AAC priming, so the
    audio lines up with its source). x264 runs with
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

"""Timing facts of a fragmented MP4 read straight from its boxes, and the offset of its decoded audio against a
source: what tests check the served stream (``FragmentedMp4Encoder``) with."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import av
import numpy as np

from echo_stream import media
from echo_stream.media.fmp4 import _boxes


def served_stream(frames: np.ndarray, audio: np.ndarray, step: int = 6, lead: int = 3) -> bytes:
    """The fMP4 a session serves of ``frames`` (25 fps RGB) and ``audio`` (16 kHz): the server's encoder
    settings, ``step`` frames per call, the audio handed over ``lead`` frames ahead of the video."""
    enc = media.FragmentedMp4Encoder(frames.shape[2], frames.shape[1], 25, with_audio=True, gop=16,
                                     audio_lead_frames=lead)
    data = b""
    for i in range(0, len(frames), step):
        lo, hi = (0 if i == 0 else (i + lead) * 640), (i + step + lead) * 640
        data += enc.encode(frames[i:i + step], audio[lo:hi])
    return data + enc.close()


@dataclass
class Track:
    track_id: int
    handler: str = ""                 # "vide" / "soun"
    timescale: int = 0
    edits: list = field(default_factory=list)          # [(segment_duration (movie timescale), media_time), ...]
    default_duration: int = 0         # trex default_sample_duration
    samples: list = field(default_factory=list)        # [(decode time, duration, composition offset), ...]

    @property
    def pts(self) -> list[int]:
        return [d + c for d, _, c in self.samples]


def _children(buf: bytes, lo: int, hi: int) -> dict:
    out: dict = {}
    for kind, a, b in _boxes(buf, lo, hi):
        out.setdefault(kind, []).append((a, b))
    return out


def _full(buf: bytes, a: int) -> tuple[int, int, int]:
    """(version, flags, payload start) of a full box whose payload starts at ``a``."""
    return buf[a], int.from_bytes(buf[a + 1:a + 4], "big"), a + 4


def parse_fmp4(data: bytes) -> dict[int, Track]:
    """Tracks of a fragmented MP4 (init segment + ``moof``/``mdat`` pairs): handler, timescale, edit list,
    and every sample's decode time, duration and composition offset from ``tfhd``/``tfdt``/``trun``."""
    tracks: dict[int, Track] = {}
    top = _children(data, 0, len(data))
    for moov_a, moov_b in top.get(b"moov", []):
        moov = _children(data, moov_a, moov_b)
        for trak_a, trak_b in moov.get(b"trak", []):
            trak = _children(data, trak_a, trak_b)
            v, _, p = _full(data, trak[b"tkhd"][0][0])
            tid = struct.unpack_from(">I", data, p + (16 if v else 8))[0]
            t = tracks.setdefault(tid, Track(tid))
            mdia = _children(data, *trak[b"mdia"][0])
            v, _, p = _full(data, mdia[b"mdhd"][0][0])
            t.timescale = struct.unpack_from(">I", data, p + (16 if v else 8))[0]
            _, _, p = _full(data, mdia[b"hdlr"][0][0])
            t.handler = data[p + 4:p + 8].decode()
            for edts_a, edts_b in trak.get(b"edts", []):
                for elst_a, _ in _children(data, edts_a, edts_b).get(b"elst", []):
                    v, _, p = _full(data, elst_a)
                    n = struct.unpack_from(">I", data, p)[0]
                    fmt, size = (">Qq", 20) if v else (">Ii", 12)
                    t.edits += [struct.unpack_from(fmt, data, p + 4 + k * size) for k in range(n)]
        for mvex_a, mvex_b in moov.get(b"mvex", []):
            for trex_a, _ in _children(data, mvex_a, mvex_b).get(b"trex", []):
                _, _, p = _full(data, trex_a)
                tid, _, dur = struct.unpack_from(">III", data, p)
                tracks.setdefault(tid, Track(tid)).default_duration = dur
    for moof_a, moof_b in top.get(b"moof", []):
        for traf_a, traf_b in _children(data, moof_a, moof_b).get(b"traf", []):
            traf = _children(data, traf_a, traf_b)
            _, flags, p = _full(data, traf[b"tfhd"][0][0])
            tid = struct.unpack_from(">I", data, p)[0]
            t = tracks.setdefault(tid, Track(tid))
            p += 4 + (8 if flags & 0x01 else 0) + (4 if flags & 0x02 else 0)
            default = struct.unpack_from(">I", data, p)[0] if flags & 0x08 else t.default_duration
            v, _, p = _full(data, traf[b"tfdt"][0][0])
            dts = struct.unpack_from(">Q" if v else ">I", data, p)[0]
            for trun_a, _ in traf.get(b"trun", []):
                v, flags, p = _full(data, trun_a)
                n = struct.unpack_from(">I", data, p)[0]
                p += 4 + (4 if flags & 0x01 else 0) + (4 if flags & 0x04 else 0)
                for _ in range(n):
                    dur, cts = default, 0
                    if flags & 0x100:
                        dur = struct.unpack_from(">I", data, p)[0]
                        p += 4
                    p += (4 if flags & 0x200 else 0) + (4 if flags & 0x400 else 0)
                    if flags & 0x800:
                        cts = struct.unpack_from(">i" if v else ">I", data, p)[0]
                        p += 4
                    t.samples.append((dts, dur, cts))
                    dts += dur
    return tracks


def presented_audio(path, rate: int) -> np.ndarray:
    """The file's first audio track decoded with PyAV and placed on the presentation timeline by each decoded
    frame's timestamp (so an edit list, or its absence, shows), then resampled to ``rate`` in one pass: sample
    ``i`` of the result plays at ``i / rate`` s after the presentation starts. Mono float32."""
    parts, end, native = [], 0, None
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        for frame in c.decode(stream):
            native = frame.sample_rate
            x = frame.to_ndarray().reshape(len(frame.layout.channels), -1).mean(axis=0).astype(np.float32)
            start = int(round(float(frame.pts * frame.time_base) * native))
            if start < end:                        # overlaps what is placed already (or starts before 0)
                x = x[end - start:]
            elif start > end:
                parts.append(np.zeros(start - end, np.float32))
            parts.append(x)
            end = max(end, start) + len(x)
    whole = np.concatenate(parts)[None, :]
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(whole), format="fltp", layout="mono")
    frame.sample_rate = native
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate)
    out = [r.to_ndarray().reshape(-1) for r in resampler.resample(frame) + resampler.resample(None)]
    return np.concatenate(out)


def audio_offset_s(source: np.ndarray, presented: np.ndarray, rate: int, max_lag_s: float = 0.06) -> float:
    """Seconds by which ``presented`` lags ``source`` (both at ``rate``), by cross-correlation."""
    m = int(max_lag_s * rate)
    n = min(len(source), len(presented)) - 2 * m
    ref = source[m:m + n]
    scores = [float(np.dot(ref, presented[m + lag:m + lag + n])) for lag in range(-m, m + 1)]
    return (int(np.argmax(scores)) - m) / rate

"""Stream facts of a media file without decoding (:func:`probe`, :func:`read_mp4_info`)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import av

from ..errors import InputError
from .inputs import _av_reason, _open, _seconds, _streams


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

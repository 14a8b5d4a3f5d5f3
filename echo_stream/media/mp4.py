"""Writing MP4: :class:`Mp4Writer`, H.264 + AAC, atomic for a path or fragmented into a file object."""
from __future__ import annotations

import os
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np

from ..config import FPS, SAMPLE_RATE
from .. import atomic
from ..errors import InputError
from .inputs import _av_reason

#: fragmented output; ``delay_moov`` writes the moov with the first fragment, with edit lists (see Mp4Writer)
_FRAG_FLAGS = "frag_keyframe+empty_moov+default_base_moof+delay_moov"


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
    default_base_moof+delay_moov``, a keyframe every ``gop`` frames, default
    1 s) so that a server can send bytes as they are produced; ``fragmented=True``
    does the same for a path. The init segment (``ftyp`` + ``moov``) comes
    with the first fragment (``delay_moov``), once the first packet of every
    track is known, so that its edit lists carry the timing a finished file
    has: the AAC encoder's priming is cut, and every video frame lasts
    ``1/fps`` from pts 0 (without them the first frame was stretched over the
    priming, ~21 ms, and the audio played that much late). ``fragment_frames`` also cuts a fragment whenever one
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
            try:
                self._tmp = atomic.PendingFile(self.path)
            except OSError as e:
                raise InputError(self.path, f"cannot create the output file: {e.strerror or e}") from None
            target = self._tmp.tmp
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
                self._tmp.commit()
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
            tmp.discard()

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

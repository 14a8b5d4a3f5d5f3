"""``echo-stream generate``: files in -> mp4 (H.264 + AAC) and motion Parquet out, through the streaming pipeline.

Inputs are checked before anything starts (a clear one-line error naming the
file); outputs are written under temporary names and renamed into place only
when complete, so a failure never leaves a partial file behind.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from . import atomic, config, media, motion, render, schemas, transcript
from .errors import EchoStreamError, InputError, raise_on_sigterm, unwrap_remote_error  # noqa: F401 (old import path)
from .pipeline import InlineRunner, PipelineOptions, RayRunner, SessionInputs, stream_session

log = logging.getLogger(__name__)


@dataclass
class GenerateRequest:
    portrait: str
    avatar_audio: str
    out: str | None = None
    user_video: str | None = None
    user_audio: str | None = None
    transcript: str | None = None
    motion_out: str | None = None
    landmarks: str | None = None
    checkpoint: str | None = None
    config: str | None = None
    size: int = 256
    seed: int = 0
    device: str = "cpu"


def motion_table(frames: np.ndarray, values: np.ndarray) -> pa.Table:
    """Motion as a table: ``frame``, ``pts`` (s), then one float32 column per channel (ARKit names, head pose)."""
    cols = {"frame": pa.array(frames.astype(np.int64)), "pts": pa.array(frames / config.FPS, pa.float64())}
    for i, name in enumerate(motion.CHANNELS):
        cols[name] = pa.array(values[:, i].astype(np.float32))
    return pa.table(cols)


class MotionWriter:
    """Motion rows streamed to a Parquet file as they arrive (row groups of ``group_frames``), atomically:
    the file appears at ``path`` only on :meth:`close`; :meth:`abort` leaves nothing. Memory: one row group,
    whatever the length of the session."""

    def __init__(self, path: str | os.PathLike, group_frames: int = 1500):
        import pyarrow.parquet as pq

        self._pending = atomic.PendingFile(path)
        self._schema = motion_table(np.zeros(0, np.int64), np.zeros((0, motion.NUM_CHANNELS), np.float32)).schema
        self._writer = pq.ParquetWriter(self._pending.tmp, self._schema, compression="zstd")
        self._frames: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._buffered = 0
        self.group_frames = group_frames
        self.frames = 0

    def write(self, frames: np.ndarray, values: np.ndarray) -> None:
        self._frames.append(np.array(frames, np.int64, copy=True))
        self._values.append(np.array(values, np.float32, copy=True))
        self._buffered += len(frames)
        self.frames += len(frames)
        if self._buffered >= self.group_frames:
            self._flush()

    def _flush(self) -> None:
        if self._buffered:
            self._writer.write_table(motion_table(np.concatenate(self._frames), np.concatenate(self._values)))
        self._frames, self._values, self._buffered = [], [], 0

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._pending.commit()

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - the file is discarded either way
            pass
        self._pending.discard()


def _check_output(path: str, what: str) -> None:
    d = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(d):
        raise InputError(path, f"{what}: directory {d} does not exist")
    if not os.access(d, os.W_OK):
        raise InputError(path, f"{what}: directory {d} is not writable")
    if os.path.isdir(path):
        raise InputError(path, f"{what}: is a directory, give a file name")


#: the output video's side, in pixels (the renderer's working sizes; the server allows 64..1024)
MIN_SIZE, MAX_SIZE = 32, 2048


def validate_request(req: GenerateRequest) -> tuple[list, "render.Portrait"]:
    """Check every input up front; returns (transcript segments, the placed portrait)."""
    if req.size <= 0 or req.size % 2:
        raise InputError("--size", f"{req.size} is not a positive even number of pixels")
    if not MIN_SIZE <= req.size <= MAX_SIZE:
        raise InputError("--size", f"{req.size} pixels is outside {MIN_SIZE}..{MAX_SIZE}")
    if req.out is None and req.motion_out is None:
        raise InputError("-o/--out", "nothing to write: give -o OUT.mp4 and/or --motion-out MOTION.parquet")
    if req.out is not None:
        _check_output(req.out, "output video")
    if req.motion_out is not None:
        _check_output(req.motion_out, "motion output")
    info = media.probe(req.avatar_audio)
    if not info.has_audio:
        raise InputError(req.avatar_audio, "no audio stream: --avatar-audio must contain the avatar's speech")
    if req.user_video is not None:
        if not media.probe(req.user_video).has_video:
            raise InputError(req.user_video, "no video stream: --user-video must contain video")
    if req.user_audio is not None and not media.probe(req.user_audio).has_audio:
        raise InputError(req.user_audio, "no audio stream")
    for path in (req.avatar_audio, req.user_audio, req.user_video):
        if path is not None:
            media.check_audio(path)
    if req.config is not None:
        try:
            config.get_config(req.config)
        except ValueError as e:
            raise InputError("--config", str(e)) from None
    segments = transcript.load(req.transcript)
    portrait = render.load_portrait(req.portrait, landmarks_path=req.landmarks)
    return segments, portrait


def generate(req: GenerateRequest, use_ray: bool = True, progress: bool = True,
             address: str | None = None, num_cpus: int | None = None, runner=None,
             handle_sigterm: bool = False) -> dict:
    """Run one session end to end; returns timing figures (start-up separate from processing).

    ``runner``: an already set-up runner to reuse (its stages keep their loaded
    models); by default a new one is started and shut down. ``handle_sigterm`` (the CLI's):
    SIGTERM raises :class:`~echo_stream.errors.Terminated` once the stages run, so the partial
    output is removed and Ray shut down, instead of Ray's native handler dumping a stack.
    """
    t0 = time.perf_counter()
    segments, _ = validate_request(req)
    audio_info = media.probe(req.avatar_audio)
    own_runner = runner is None
    if own_runner:
        opts = PipelineOptions(checkpoint=req.checkpoint, config=req.config, device=req.device,
                               size=(req.size, req.size))
        runner = RayRunner(opts, address=address, num_cpus=num_cpus) if use_ray else InlineRunner(opts)
    writer = motion_writer = None
    previous_sigterm = None
    try:
        setup_times = runner.setup() if own_runner else {}
        if handle_sigterm:
            previous_sigterm = raise_on_sigterm()
        startup_s = time.perf_counter() - t0
        if req.out is not None:
            writer = media.Mp4Writer(req.out, req.size, req.size, fps=config.FPS, with_audio=True)
        if req.motion_out is not None:
            motion_writer = MotionWriter(req.motion_out)
        n_frames = [0]
        audio_samples = [0]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=round(audio_info.duration or 0, 2), unit="s audio", desc="generate",
                       bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s audio [{elapsed}<{remaining}]")

        def on_audio(samples: np.ndarray) -> None:
            audio_samples[0] += len(samples)
            if writer is not None:
                writer.write_audio(samples)

        def on_output(packet) -> None:
            mw = packet.get(schemas.MOTION_WINDOW)
            if mw is None or not mw.num_rows:
                return
            n_frames[0] += mw.num_rows
            if motion_writer is not None:   # copies its rows: a view would pin the whole packet
                motion_writer.write(schemas.column(mw, "frame"), schemas.column(mw, "motion"))
            rf = packet.get(schemas.RENDERED_FRAMES)
            if writer is not None and rf is not None:
                writer.write(schemas.column(rf, "image"))

        def on_progress(n_samples: int) -> None:
            if bar is not None:
                bar.update(min(n_samples / config.SAMPLE_RATE, bar.total - bar.n))

        sid = f"generate-{uuid.uuid4().hex[:12]}"
        inp = SessionInputs(portrait=req.portrait if req.out else None, avatar_audio=req.avatar_audio,
                            user_video=req.user_video, user_audio=req.user_audio, transcript=segments,
                            landmarks=req.landmarks, size=(req.size, req.size), seed=req.seed)
        t_proc = time.perf_counter()
        try:
            run = stream_session(runner, sid, inp, on_audio, on_output, progress=on_progress)
        except Exception as e:  # noqa: BLE001 - re-raised as the user-facing error
            inner = unwrap_remote_error(e)
            if inner is not e and isinstance(inner, EchoStreamError):
                raise inner from None
            raise
        finally:
            if bar is not None:
                bar.close()
        if writer is not None:
            writer.close()
        processing_s = time.perf_counter() - t_proc
        if motion_writer is not None:
            motion_writer.close()
        stats = runner.stats()
    except BaseException:
        if writer is not None:
            writer.abort()
        if motion_writer is not None:
            motion_writer.abort()
        raise
    finally:
        if own_runner:
            runner.shutdown()
        if previous_sigterm is not None:
            import signal
            signal.signal(signal.SIGTERM, previous_sigterm)
    duration = audio_samples[0] / config.SAMPLE_RATE
    return {
        "audio_s": duration, "frames": int(n_frames[0]), "startup_s": startup_s, "setup_s": setup_times,
        "processing_s": processing_s, "rtf": processing_s / max(duration, 1e-9),
        "first_output_s": run["first_output_s"], "stages": stats,
    }

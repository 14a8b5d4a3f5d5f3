"""Egress: rendered frames -> the session's outbox, every frame at most once and in frame order.

:class:`Egress` owns ``produced`` (the next global frame to leave: frames before it are out), the outbox
messages of frames (motion, raw video, H.264/fMP4 video through :class:`~echo_stream.serve.egress.Fmp4Track`
with the avatar audio muxed in) and the session's end. For each frame it leaves it records the frame's
latency origin (from :class:`~.ingest.Arrivals`) and its motion (:class:`~.ledger.ResumeState`, the next
epoch's previous motion), and it releases the chains whose frames are all out (:class:`~.ledger.ReplayLedger`).
Events (GAP, INTERRUPTED) are put by the session itself.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ... import config
from ...protos import echo_stream_pb2 as pb
from ..egress import Fmp4Track, Outgoing
from .ingest import Arrivals
from .ledger import ReplayLedger, ResumeState

FPS = config.FPS
SPF = config.SAMPLES_PER_FRAME
#: the fMP4 encoder runs here, off the event loop
_ENCODE_POOL = cf.ThreadPoolExecutor(2, thread_name_prefix="fmp4")


def warm_up_encoder() -> None:
    """Open, use and close one fMP4 encoder (the first one in a process is the slow one)."""
    from ...media import FragmentedMp4Encoder

    enc = FragmentedMp4Encoder(64, 64, FPS, with_audio=True)
    enc.encode(np.zeros((3, 64, 64, 3), np.uint8), np.zeros(6 * SPF, np.float32))
    enc.close()


@dataclass
class SessionStats:
    frames: int = 0
    gap_frames: int = 0
    interrupts: int = 0
    recoveries: int = 0
    first_frame_latency_s: float | None = None
    latencies: deque = field(default_factory=lambda: deque(maxlen=20000))

    def proto(self) -> pb.SessionStats:
        lat = np.asarray(self.latencies, np.float64)
        return pb.SessionStats(
            frames=self.frames, gap_frames=self.gap_frames, interrupts=self.interrupts, recoveries=self.recoveries,
            first_frame_latency_s=self.first_frame_latency_s or 0.0,
            latency_p50_s=float(np.percentile(lat, 50)) if lat.size else 0.0,
            latency_p99_s=float(np.percentile(lat, 99)) if lat.size else 0.0)


class Egress:
    def __init__(self, spec, outbox: asyncio.Queue, stats: SessionStats, arrivals: Arrivals,
                 resume: ResumeState, ledger: ReplayLedger):
        self.spec, self.outbox, self.stats = spec, outbox, stats
        self.arrivals, self.resume, self.ledger = arrivals, resume, ledger
        self.produced = 0              # next global frame the egress will produce (frames < it are out)
        #: the H.264/fMP4 output (fmp4 video sessions; None otherwise)
        self.fmp4 = Fmp4Track(spec.width, spec.height) if spec.wants_video and spec.codec == "fmp4" else None

    def add_audio(self, offset: int, info: dict) -> None:
        """The avatar audio decode found in a chain (``info``; its epoch's frame 0 is global frame ``offset``),
        muxed into the video (fMP4 sessions)."""
        if self.fmp4 is not None:
            self.fmp4.audio.add(offset + info["first_frame"], info["avatar_audio"])

    def drop_audio(self) -> None:
        """Forget the avatar audio not yet muxed (its frames belong to a dropped epoch)."""
        if self.fmp4 is not None:
            self.fmp4.audio.clear()

    async def emit(self, frames: np.ndarray, motion: np.ndarray, images: np.ndarray | None) -> None:
        """Frames (global numbers, in order) with their motion rows and rendered images; those before
        ``produced`` already left and are dropped."""
        keep = frames >= self.produced           # exactly once: never a frame twice, never out of order
        frames, motion = frames[keep], motion[keep]
        images = images[keep] if images is not None else None
        if not len(frames):
            return
        spec, origins = self.spec, []
        for f, row in zip(frames.tolist(), motion):
            self.resume.sent(f, row)
            origin = self.arrivals.origin(f)
            origins.append(origin)
            if spec.wants_motion:
                await self.outbox.put(Outgoing(pb.ServerMessage(pts=f / FPS, motion=pb.MotionFrame(
                    frame=f, values=row.tolist())), f + 1, [origin], "motion"))
            if spec.wants_video and spec.codec == "raw" and images is not None:
                i = f - int(frames[0])
                counted = not spec.wants_motion          # else the motion message counted the frame
                await self.outbox.put(Outgoing(pb.ServerMessage(pts=f / FPS, video=pb.VideoChunk(
                    data=images[i].tobytes(), first_frame=f, frames=1)),
                    f + 1 if counted else None, [origin] if counted else [], "video"))
        self.produced = int(frames[-1]) + 1
        self.ledger.release(self.produced)
        if self.fmp4 is not None and images is not None:
            audio = self.fmp4.audio_for(int(frames[0]), int(frames[-1]) + 1)
            data = await asyncio.get_running_loop().run_in_executor(_ENCODE_POOL, self.fmp4.encode, images, audio)
            covered = self.fmp4.encoded(frames.tolist(), origins)
            if data:
                await self.outbox.put(self.fmp4.chunk(data, covered, self.produced, not spec.wants_motion))

    async def finish(self) -> None:
        """The end of the session: the fMP4 stream's last bytes, the ENDED event, then the outbox's end."""
        if self.fmp4 is not None and self.fmp4.started:
            data = await asyncio.get_running_loop().run_in_executor(_ENCODE_POOL, self.fmp4.close)
            await self.outbox.put(self.fmp4.chunk(data, self.fmp4.all_encoded(), self.produced,
                                                  not self.spec.wants_motion))
        await self.outbox.put(Outgoing(pb.ServerMessage(pts=self.produced / FPS, event=pb.Event(
            kind=pb.Event.ENDED, message="end of session", first_frame=self.produced,
            stats=self.stats.proto()))))
        await self.outbox.put(None)

    async def close(self) -> None:
        """Close the encoder (best effort)."""
        if self.fmp4 is not None:
            try:  # in the encoder's pool, under its lock: an encode of this session may still be running there
                await asyncio.get_running_loop().run_in_executor(_ENCODE_POOL, self.fmp4.close)
            except Exception:  # noqa: BLE001
                pass

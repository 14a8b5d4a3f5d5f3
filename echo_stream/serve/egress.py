"""What a served session sends: the outbox's items, and the H.264/fMP4 track's bookkeeping.

A session's egress turns rendered frames into :class:`Outgoing` messages on its outbox (the RPC
handler sends them and counts frames and latency). For the fMP4 codec, :class:`Fmp4Track` holds the
encoder and the accounting around it: which frames each fragment completes, their latency origins,
and which avatar audio is muxed with them (:class:`AudioTimeline`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from .. import config
from ..protos import echo_stream_pb2 as pb

FPS = config.FPS
SPF = config.SAMPLES_PER_FRAME


@dataclass
class Outgoing:
    """One outbox item: the message, and what the RPC handler counts when it leaves."""

    msg: pb.ServerMessage
    #: the frames are complete up to (excluding) this frame: counted as delivered (None: not counted, e.g.
    #: the raw video of a session that also gets motion, whose motion message counts the frame)
    upto: int | None = None
    origins: list = field(default_factory=list)   # avatar-audio arrival time of each counted frame (latency)
    kind: str = "event"                           # motion / video / event


class AudioTimeline:
    """The avatar audio by frame (for muxing it into the video), dropped once used."""

    def __init__(self):
        self._parts: dict[int, np.ndarray] = {}
        self.end_sample = 0          # the end of the audio received, in samples from frame 0

    def add(self, first_frame: int, samples: np.ndarray) -> None:
        if len(samples):
            self._parts[int(first_frame)] = np.asarray(samples, np.float32)
            self.end_sample = max(self.end_sample, int(first_frame) * SPF + len(samples))

    @property
    def end_frame(self) -> int:
        """Frames whose audio is complete."""
        return self.end_sample // SPF

    def take(self, first: int, last: int) -> np.ndarray:
        """Samples of frames [first, last) (silence where unknown); forgets everything before ``last``."""
        out = np.zeros((last - first) * SPF, np.float32)
        for f0 in sorted(self._parts):
            x = self._parts[f0]
            a, b = f0 * SPF, f0 * SPF + len(x)
            lo, hi = max(a, first * SPF), min(b, last * SPF)
            if hi > lo:
                out[lo - first * SPF:hi - first * SPF] = x[lo - a:hi - a]
            if b <= last * SPF:
                del self._parts[f0]
        return out

    def clear(self) -> None:
        self._parts.clear()
        self.end_sample = 0


class Fmp4Track:
    """The H.264 + AAC fragmented-MP4 output of one session.

    ``audio_for`` and ``chunk`` run on the event loop; ``encode`` and ``close`` in an encoder pool thread
    (the lock keeps the codec to one thread at a time, and a closed track encodes nothing).
    """

    GOP = 16          # frames per GOP
    AUDIO_LEAD = 3    # frames of avatar audio handed to the encoder ahead of the video (see audio_for)

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.audio = AudioTimeline()
        self._encoder = None
        self._lock = threading.Lock()
        self._closed = False
        self._frames: list[int] = []      # global frame of each encoded frame, in encoder order
        self._origins: list = []          # avatar-audio arrival time of each encoded frame (latency)
        self._sent = 0                    # encoded frames whose bytes were sent
        self._dropped = 0                 # entries trimmed from the front of those two lists
        self._audio_fed: int | None = None  # global frame up to which avatar audio went to the encoder
        self._next: int | None = None       # global frame after the last one encoded

    @property
    def started(self) -> bool:
        return self._encoder is not None

    def audio_for(self, first: int, last: int) -> np.ndarray:
        """The avatar audio to encode with frames [first, last): up to ``AUDIO_LEAD`` frames beyond them
        when it has arrived (it has, for the window's lookahead), so that the muxer, which interleaves
        audio and video by time, can release every video frame at once instead of holding the last few
        until the next window. Frames skipped by a gap skip their audio too (the MP4 timeline is the
        frames sent). The price of the lead: after an interrupt (or a recovery) the file already holds up to
        ``AUDIO_LEAD`` frames (120 ms) of audio past the last frame shown; those frames' new audio is not
        encoded, so the new reply's first 120 ms are not heard and the old speech's next 120 ms are (lips
        and audio stay in sync)."""
        if self._audio_fed is None:
            self._audio_fed = first
        elif self._next is not None and first > self._next:
            self._audio_fed += first - self._next
        self._next = last
        upto = max(last, min(last + self.AUDIO_LEAD, self.audio.end_frame))
        if upto <= self._audio_fed:
            return np.zeros(0, np.float32)
        audio = self.audio.take(self._audio_fed, upto)
        self._audio_fed = upto
        return audio

    def encode(self, images: np.ndarray, audio: np.ndarray) -> bytes:
        """(Encoder pool thread.) Encode frames."""
        from ..media import FragmentedMp4Encoder

        with self._lock:
            if self._closed:
                return b""
            if self._encoder is None:
                self._encoder = FragmentedMp4Encoder(self.width, self.height, FPS, with_audio=True,
                                                     gop=self.GOP, audio_lead_frames=self.AUDIO_LEAD)
            return self._encoder.encode(images, audio)

    def close(self) -> bytes:
        """(Encoder pool thread.) Finish the stream; its last bytes (b"" if there was no encoder). Nothing is
        encoded after this."""
        with self._lock:
            self._closed = True
            enc, self._encoder = self._encoder, None
            return enc.close() if enc is not None else b""

    def encoded(self, frames: list[int], origins: list) -> int:
        """Record frames just encoded; returns how many encoded frames the bytes emitted so far complete
        (the encoder counts them from the moof boxes it wrote)."""
        self._frames.extend(frames)
        self._origins.extend(origins)
        emitted = self._encoder.frames_emitted if self._encoder is not None else 0
        return max(self._sent, emitted - self._dropped)

    def all_encoded(self) -> int:
        return len(self._frames)

    def chunk(self, data: bytes, covered: int, produced: int, counted: bool) -> Outgoing:
        """The message carrying fMP4 bytes that complete the encoded frames up to ``covered`` (encoder order).
        ``counted``: the frames are counted as delivered by this message (video-only sessions)."""
        first = self._frames[self._sent] if self._sent < len(self._frames) else produced
        n = max(0, covered - self._sent)
        upto = self._frames[covered - 1] + 1 if n else None
        origins = self._origins[self._sent:covered]
        self._sent = max(self._sent, covered)
        drop = self._sent - 1                          # keep the last sent one (first_frame of an empty chunk)
        if drop > 1024:                                # bounded however long the session
            del self._frames[:drop], self._origins[:drop]
            self._sent -= drop
            self._dropped += drop
        return Outgoing(pb.ServerMessage(pts=first / FPS, video=pb.VideoChunk(data=data, first_frame=first, frames=n)),
                        upto if counted else None, origins if counted else [], "video")

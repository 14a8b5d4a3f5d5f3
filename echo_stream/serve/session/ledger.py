"""The replay ledger: what a session needs to resume after a stage fault with no frame lost or repeated.

* :class:`ReplayLedger` owns the epoch's timeline (``frame_offset``: the global frame of the epoch's
  frame 0; ``pushed_s``: avatar audio handed to the pipeline) and the input of every chain of this epoch
  whose frames are not all out yet. After a fault, :meth:`ReplayLedger.replay` says which input to push
  again and from which frame.
* :class:`ResumeState` owns what a new epoch's stage state is restored from: the last LCU memory
  checkpoint and the motion of the last frames sent (the next window's previous motion).
* :class:`ChainInFlight` / :class:`WindowInRender` are the stage handles of one chain / one window in
  flight, tagged with the epoch they belong to (results of an older epoch are dropped).

Plain data and arithmetic: nothing here calls a stage.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from ... import config

FPS = config.FPS


@dataclass
class PushedChain:
    """The input of one chain: avatar audio [start_s, end_s) of the session timeline, and its items."""

    start_s: float
    end_s: float
    items: list               # (kind, item)


@dataclass
class Replay:
    """Input to push again after a fault, starting at global frame ``first_frame`` (``seconds``: its avatar
    audio)."""

    first_frame: int
    items: list
    seconds: float


class ReplayLedger:
    """The current epoch's timeline and the input of its chains whose frames are not all out yet."""

    def __init__(self):
        self.frame_offset = 0          # global frame of the current epoch's frame 0
        self.pushed_s = 0.0            # avatar audio handed to the pipeline, seconds on the session timeline
        self._chains: deque[PushedChain] = deque()

    @property
    def epoch_t0(self) -> float:
        """Session-timeline seconds of the epoch's frame 0 (stage times are epoch-relative)."""
        return self.frame_offset / FPS

    @property
    def epoch_pushed_s(self) -> float:
        """Avatar audio of this epoch handed to the pipeline, seconds."""
        return self.pushed_s - self.frame_offset / FPS

    def record(self, items: list, seconds: float) -> None:
        """A chain of ``items`` holding ``seconds`` of avatar audio was handed to the pipeline."""
        self._chains.append(PushedChain(self.pushed_s, self.pushed_s + seconds, items))
        self.pushed_s += seconds

    def release(self, produced: int) -> None:
        """Frames before ``produced`` are out: forget the chains they complete."""
        while self._chains and self._chains[0].end_s <= produced / FPS + 1e-9:
            self._chains.popleft()

    def replay(self, produced: int) -> Replay | None:
        """The input to push again so that no frame from ``produced`` on is lost.

        It starts at the first frame boundary of the oldest chain not yet fully turned into frames (the
        frames before ``produced`` that come out again are dropped by the egress). None when that is
        impossible: nothing in flight, or a hole between the frames out and the input kept. (Encoded
        audio was decoded at the ingress: every avatar audio item here is PCM, which can be cut at a frame.)
        """
        p_s = produced / FPS
        chains = [c for c in self._chains if c.end_s > p_s + 1e-9]
        if not chains or chains[0].start_s > p_s + 1e-9:
            return None
        start = chains[0].start_s
        first = math.ceil(start * FPS - 1e-6)
        cut = first / FPS - start                      # seconds of avatar audio before the frame boundary
        items, seconds = [], 0.0
        for chain in chains:
            for kind, it in chain.items:
                if kind == "avatar_audio" and cut > 1e-9:
                    it, cut = cut_pcm(it, cut)
                    if it is None:
                        continue
                if kind == "avatar_audio":
                    seconds += it.get("seconds", 0.0)
                items.append((kind, it))
        return Replay(first, items, seconds)

    def restart(self, frame: int) -> None:
        """A new epoch whose frame 0 is global frame ``frame``: nothing of it is pushed yet."""
        self._chains.clear()
        self.frame_offset = frame
        self.pushed_s = frame / FPS

    def __len__(self) -> int:
        return len(self._chains)


def cut_pcm(item: dict, cut: float) -> tuple[dict | None, float]:
    """Drop up to ``cut`` seconds from the front of a PCM item: (what is left or None, seconds still to cut);
    what is left starts ``cut`` seconds later (its ``pts``, when it has one)."""
    width = (2 if item["format"] == "s16le" else 4) * item["channels"]
    n = len(item["pcm"]) // width
    k = min(n, int(round(cut * item["rate"])))
    cut = max(0.0, cut - k / item["rate"])
    if k >= n:
        return None, cut
    rest = dict(item, pcm=item["pcm"][k * width:], seconds=(n - k) / item["rate"])
    if "pts" in item:
        rest["pts"] = item["pts"] + k / item["rate"]
    return rest, cut


@dataclass
class Restore:
    """What a new epoch's stage state starts from (None: nothing to import)."""

    checkpoint: bytes | None       # the LCU memory (memory.import_state)
    prev_motion: np.ndarray | None  # the K' frames before the epoch's frame 0 (diffusion.import_state)


class ResumeState:
    """The last LCU memory checkpoint taken and the motion of the frames sent last."""

    def __init__(self, keep: int = 64):
        self.checkpoint: bytes | None = None
        self._sent: deque = deque(maxlen=keep)     # (frame, motion row)

    def sent(self, frame: int, row) -> None:
        self._sent.append((frame, row))

    def since(self, frame: int) -> list:
        """(frame, motion row) of the frames sent from ``frame`` on (those still kept)."""
        return [(f, row) for f, row in self._sent if f >= frame]

    def restore(self, produced: int, overlap: int) -> Restore:
        """What to import into an epoch starting at global frame ``produced`` whose windows know ``overlap``
        frames: the previous motion only when all of it was sent."""
        prev = [row for f, row in self._sent if f < produced][-overlap:]
        return Restore(self.checkpoint, np.stack(prev) if len(prev) == overlap else None)


@dataclass
class ChainInFlight:
    """One chain in flight: decode's push through the stage before the batched one."""

    epoch: int
    offset: int               # global frame of the epoch's frame 0
    info: object              # handle: what decode found (first frame, the avatar audio)
    windows: object           # handle: the generation windows
    checkpoint: object        # handle: the LCU memory after this chain (None at the end)
    t0: float

    def handles(self) -> list:
        return [h for h in (self.info, self.windows, self.checkpoint) if h is not None]


@dataclass
class WindowInRender:
    """One window being rendered: from the batched stage on."""

    epoch: int
    offset: int
    frames: object            # handle: the stages' output packets from the batched stage on
    t0: float

    def handles(self) -> list:
        return [self.frames]

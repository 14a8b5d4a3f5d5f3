"""Epoch switches of a session: fault recovery and interrupt (the part of :class:`~.core.Session` that
drops one epoch's work and opens the next).

Both run under the session's ``lock`` (one switch at a time) and with ``ready`` cleared (no chain is pushed
into a half-open epoch). Both drop what is queued (``_drop_queued``; results of the old epoch are fetched
and thrown away), then differ in what the new epoch starts from:

* **recovery** (a stage replica died, noticed by a failed call or by the server's monitor through
  :meth:`EpochSwitching.stage_restarted`): the new epoch starts at the first frame the
  :class:`~.ledger.ReplayLedger` can replay (the input in flight is pushed again; frames already out are
  dropped by the egress), else at the end of the audio pushed, with the frames between announced lost; one
  GAP event either way. The session moves to replicas that answer (``backend.wait_ready``).
* **interrupt**: buffered media are dropped (transcript and END stay); the new epoch starts at the
  playback position (``produced``) with the audio sent after the interrupt; an INTERRUPTED event.

In both, the stages' state is restored from :class:`~.ledger.ResumeState` (LCU memory checkpoint, the
previous motion of the frames sent). This is a mixin: the state it works on is the Session's (its parts
``link``, ``ledger``, ``resume``, ``chunker``, ``arrivals``, ``pacer``, ``edge``, ``out``, its queues, ``lock``,
``ready``, ``end_pushed`` and ``stats``).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time

from ... import config
from ...protos import echo_stream_pb2 as pb
from .. import metrics
from ..egress import Outgoing
from .failures import SessionFailed, log_error

log = logging.getLogger(__name__)

FPS = config.FPS


class EpochSwitching:
    """Interrupt and fault recovery of a :class:`~.core.Session`."""

    async def _on_error(self, epoch: int, e: BaseException) -> None:
        if epoch != self.epoch:
            return                                   # work of a dropped epoch: its failure does not matter
        if self.backend.is_fault(e):
            self._recovery_task = asyncio.get_running_loop().create_task(self._recover_soon(epoch, e))
            return
        raise self.failure_from(e, "the pipeline")

    def _drop_queued(self) -> list:
        """Empty the in-flight queues (their work belongs to the old epoch); returns their handles."""
        handles = []
        for q in (self.inflight, self.render_q):
            while not q.empty():
                item = q.get_nowait()
                handles += item.handles()
                if q is self.inflight:
                    metrics.QUEUE_DEPTH.labels("inflight").dec()
        return handles

    def _new_epoch(self) -> None:
        """Switch the stages to a new epoch; pushes wait until it is open (``ready``)."""
        self.link.new_epoch()
        self.ready.clear()

    async def _open_epoch(self) -> None:
        """Open the new epoch in every stage, restored to where the output is (``produced``)."""
        await self.link.open_epoch(self.stride, self.resume.restore(self.produced, self.overlap))

    async def _recover(self, epoch: int, e: BaseException, still_needed=None) -> None:
        async with self.lock:
            if epoch != self.epoch or (still_needed is not None and not still_needed()):
                return
            log.warning("session %s: stage failure (%s: %s); recovering", self.id[:8], type(e).__name__,
                        str(e).splitlines()[0][:120] if str(e) else "")
            self.stats.recoveries += 1
            metrics.RECOVERIES.inc()
            await self._reopen()

    async def move(self, moves: dict[str, tuple[int, int]], why: str, answer_s: float = 1.0) -> bool:
        """A planned move (:mod:`~echo_stream.serve.rebalance`): ``moves[stage] = (source, target)``; the session
        re-opens on replica ``target`` of each stage named, as after a fault but with nothing lost — a new
        epoch from its checkpoint, the input in flight replayed, one GAP event (no frame lost) saying ``why``.

        False (nothing done) when the plan no longer holds once the session's epoch switches are its own (it
        recovered meanwhile, or the target drains or went), when it is ending, or when a target does not answer
        within ``answer_s`` — asked before anything is dropped, so a move never lands on a silent replica."""
        from ..backend import answers

        router = self.backend.router

        def holds() -> bool:
            return not (self.done.is_set() or self.failure is not None or self.end_pushed or not self.ready.is_set()
                        or (self._recovery_task is not None and not self._recovery_task.done())) and all(
                self.route.get(stage) == source and source != target and target < len(router.load[stage])
                and target not in router.draining[stage] for stage, (source, target) in moves.items())
        async with self.lock:
            if not holds():
                return False
            ok = await asyncio.gather(*(answers(self.backend, stage, target, answer_s)
                                        for stage, (_, target) in moves.items()))
            if not all(ok) or not holds():
                return False
            metrics.MOVES.labels(why.split(":")[0]).inc()
            await self._reopen({stage: target for stage, (_, target) in moves.items()}, why)
            return True

    async def _reopen(self, moves: dict[str, int] | None = None, why: str | None = None) -> None:
        """Under the lock: the next epoch, on replicas that answer (``moves``: these first), from the checkpoint;
        the input in flight replayed, else the frames it held announced lost; one GAP event."""
        t = time.perf_counter()
        self._new_epoch()
        self.link.discard(self._drop_queued())
        replay = self.ledger.replay(self.produced)
        self.out.drop_audio()
        stalled_at = self.produced
        if replay is not None:
            resume, items, seconds = replay.first_frame, replay.items, replay.seconds
            gap = 0
        else:
            resume = max(self.produced, math.ceil(self.ledger.pushed_s * FPS - 1e-6))
            items, seconds = [], 0.0
            gap = resume - self.produced
            self.arrivals.keep_after(self.ledger.pushed_s)
        self.ledger.restart(resume)
        before = dict(self.route)
        for stage, to in (moves or {}).items():      # (state closed on the old replicas by _new_epoch)
            if self.route[stage] != to:
                self.backend.router.move(self.route, stage, to)
        try:
            if moves is None:
                # the session's replicas; one that does not answer (lost with its node) is replaced by one that
                # does: the new epoch opens there from the checkpoint
                await self.backend.wait_ready(self.recovery_timeout_s, route=self.route)
            asked = time.perf_counter() - t          # (a move asked its targets before it began)
            try:
                await self._open_epoch()
            except Exception as e3:
                if moves is None or not self.backend.is_fault(e3):
                    raise
                # a replica died since the move was planned: recover as from any fault
                log.warning("session %s: a stage failed while it moved (%s); recovering", self.id[:8],
                            type(e3).__name__)
                await self.backend.wait_ready(self.recovery_timeout_s, route=self.route)
                await self._open_epoch()
        except SessionFailed:
            raise
        except Exception as e2:  # noqa: BLE001
            raise SessionFailed("UNAVAILABLE", "a pipeline stage failed and did not recover within "
                                               f"{self.recovery_timeout_s:g} s (error id "
                                               f"{log_error(e2, 'recovery')}): retry the session") from None
        took = time.perf_counter() - t
        moved = [f"{s} replica {before[s]} -> {i}" for s, i in self.route.items() if before[s] != i]
        if replay is not None:
            what = "no frame was lost: the input in flight was replayed"
        elif gap:
            self.stats.gap_frames += gap
            metrics.GAPS.inc(gap)
            self.out.produced = resume
            what = (f"frames {stalled_at}..{resume - 1} are lost (their input could not be replayed); "
                    "output continues")
        else:
            what = "no input was in flight: no frame lost"
        if why is not None:
            cause = f"the session moved to another replica ({why}; {', '.join(moved)})"
        elif moved:
            cause = f"a pipeline stage replica was lost; the session continued on another one ({', '.join(moved)})"
        else:
            cause = "a pipeline stage failed and was restarted"
        await self.outbox.put(Outgoing(pb.ServerMessage(pts=stalled_at / FPS, event=pb.Event(
            kind=pb.Event.GAP, first_frame=stalled_at, frames=gap,
            message=cause + f"; output stalled {took:.2f} s at frame {stalled_at} (replicas asked {asked:.2f} s, "
                            f"stages opened {took - asked:.2f} s); {what}")), resume if gap else None))
        self._resend_transcript(resume)
        self.last_switch = time.monotonic()
        self.chunker.prepend(items, seconds)
        self.ready.set()
        if self.chunker.items or self.end_pushed:   # replayed input (+ the end the old epoch took with it)
            await self._push(end=self.end_pushed)
        log.warning("session %s: %s in %.2f s (epoch %d, %d frames replayed from %d, %d lost)", self.id[:8],
                    "moved" if why is not None else "recovered", took, self.epoch,
                    max(0, stalled_at - resume) if gap == 0 else 0, resume, gap)

    def _resend_transcript(self, frame: int) -> None:
        """The transcript segments starting at global frame ``frame`` or later, sent again: the old epoch's memory
        state held them until its memory folded in their frames (the LCU memory's text), that state was closed
        with the epoch, and the new epoch folds in the frames from ``frame`` on."""
        from ...pipeline import transcript_batch
        from ...transcript import Segment

        t0 = self.ledger.epoch_t0
        again = [Segment(max(0.0, it["pts"] - t0), max(0.0, it["end_pts"] - t0), it["speaker"], it["text"])
                 for it in self.transcript_sent if it["pts"] >= frame / FPS - 1e-9]
        if again:
            self.call("memory", "add_transcript", transcript_batch(self.iid, again))

    async def _recover_soon(self, epoch: int, e: BaseException) -> None:
        """Recover in its own task: the caller (generate / egress) keeps draining its queue meanwhile."""
        try:
            await self._recover(epoch, e)
        except Exception as f:  # noqa: BLE001
            self._fail(self.failure_from(f, "recovery"))

    async def stage_restarted(self, stage: str, incarnation: str, replica: int = 0) -> None:
        """Replica ``replica`` of a stage was restarted (its state of this session is gone): recover under a new
        epoch, unless the session already re-opened on the new process (a failed call recovered it first) or
        no longer uses that replica (it moved to another one)."""
        from ..backend import StageFault

        def still_needed() -> bool:
            return self.route[stage] == replica and self.link.incarnations.get((stage, replica)) != incarnation

        if not self.done.is_set() and self.route[stage] == replica:
            try:   # checked under the session's lock: a recovery in progress may already have re-opened there
                await self._recover(self.epoch, StageFault(f"stage {stage} replica {replica} restarted"),
                                    still_needed=still_needed)
            except SessionFailed as e:
                self._fail(e)

    async def interrupt(self) -> int:
        """Drop every stage's buffered work of the session; returns the playback position (frames out)."""
        async with self.lock:
            self._new_epoch()
            dropped = self._drop_queued()
            self.backend.cancel(dropped)
            self.link.discard(dropped)
            kept = []
            while not self.inbox.empty():             # buffered media are dropped; transcript / end stay
                kind, item, t = self.inbox.get_nowait()
                metrics.QUEUE_DEPTH.labels("input").dec()
                if kind in ("transcript", "control"):
                    kept.append((kind, item, t))
            for k in kept:
                self.inbox.put_nowait(k)
                metrics.QUEUE_DEPTH.labels("input").inc()
            self.chunker.clear()
            self.edge.reset()                         # a new reply is a new encoded stream
            playback = self.produced
            self.ledger.restart(playback)
            self.arrivals.clear()
            self.out.drop_audio()
            self.pacer.restart(time.monotonic())
            self.stats.interrupts += 1
            metrics.INTERRUPTS.inc()
            try:
                await self._open_epoch()
            except Exception as e:  # noqa: BLE001
                if self.backend.is_fault(e):
                    raise SessionFailed("UNAVAILABLE", "a pipeline stage failed during the interrupt (error id "
                                                       f"{log_error(e, 'interrupt')}): retry the session") from None
                raise self.failure_from(e, "interrupt") from None
            self.ready.set()
            if self.end_pushed:
                await self._push(end=True)
            await self.outbox.put(Outgoing(pb.ServerMessage(pts=playback / FPS, event=pb.Event(
                kind=pb.Event.INTERRUPTED, first_frame=playback,
                message=f"interrupted at frame {playback} ({playback / FPS:.2f} s)"))))
            return playback

"""Continuous cross-session batching of generation windows for the diffusion stage.

A window joins the next model call as soon as it is ready: the batcher runs
one diffusion call at a time per diffusion actor; while it runs, windows of
every session queue up, and the next call takes all of them (up to
``max_batch``). After the first window of an idle period it waits at most
``max_wait_s`` for company, never for stragglers beyond that. A session has at
most one window here at a time (its next window needs this one's motion).

With several diffusion replicas the server runs one batcher per replica
(``replica``): a session's windows go to the batcher of the replica that holds
its state (``Session.route``), so a batch never mixes replicas.
"""
from __future__ import annotations

import asyncio
import logging
import time

from . import metrics
from .backend import STAGE_CALL_DEADLINE_S, answered

log = logging.getLogger(__name__)


class WindowBatcher:
    def __init__(self, backend, max_batch: int = 64, max_wait_s: float = 0.004, stage: str = "diffusion",
                 replica: int = 0, deadline_s: float = STAGE_CALL_DEADLINE_S):
        self.backend = backend
        self.replica = int(replica)
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.stage = stage
        self.deadline_s = float(deadline_s)     # a batch call not back by then fails its sessions as a fault
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.windows = 0
        self.max_seen = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"window-batcher-{self.replica}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def submit(self, packet, session: str | None = None):
        """The diffusion stage's output packet for ``packet`` (raises what the batch call raised). ``session``:
        the window's session; a batch call is ordered with the calls of each session it carries (Serve)."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((packet, fut, time.perf_counter(), session))
        metrics.QUEUE_DEPTH.labels("diffusion").set(self._queue.qsize())
        return await fut

    async def _collect(self) -> list:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            batch = [b for b in batch if not b[1].done()]   # a cancelled session no longer waits
            if not batch:
                continue
            metrics.QUEUE_DEPTH.labels("diffusion").set(self._queue.qsize())
            now = time.perf_counter()
            for _, _, t, _ in batch:
                metrics.DIFFUSION_WAIT.observe(now - t)
            metrics.DIFFUSION_BATCH.observe(len(batch))
            self.batches += 1
            self.windows += len(batch)
            self.max_seen = max(self.max_seen, len(batch))
            try:
                sessions = tuple(s for _, _, _, s in batch if s is not None) or None
                out = await answered(self.backend, self.backend.call(
                    self.stage, "process", [p for p, _, _, _ in batch], replica=self.replica, session=sessions),
                    self.deadline_s)
                metrics.STAGE_LATENCY.labels(self.stage).observe(time.perf_counter() - now)
            except Exception as e:  # noqa: BLE001
                if len(batch) > 1 and not self.backend.is_fault(e):
                    # one session's bad window must not fail the others: run them one by one
                    # (the stage changes no state before the whole batch has succeeded)
                    await self._one_by_one(batch)
                else:
                    for _, fut, _, _ in batch:
                        if not fut.done():
                            fut.set_exception(e)
                continue
            for (_, fut, _, _), res in zip(batch, out):
                if not fut.done():
                    fut.set_result(res)

    async def _one_by_one(self, batch: list) -> None:
        for packet, fut, _, session in batch:
            try:
                res = (await answered(self.backend, self.backend.call(
                    self.stage, "process", [packet], replica=self.replica, session=session), self.deadline_s))[0]
            except Exception as e:  # noqa: BLE001
                if not fut.done():
                    fut.set_exception(e)
                continue
            if not fut.done():
                fut.set_result(res)

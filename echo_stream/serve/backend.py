"""The stage pipeline as the event loop sees it: ``call`` returns a handle at once, ``await get(handle)``.

* :class:`RayBackend` — the stage actors of a :class:`~echo_stream.pipeline.RayRunner`
  (handles are Ray ``ObjectRef`` s: a handle passed as an argument of another
  call travels actor to actor without coming through this process); calls from
  this process to one actor run in submission order; a stage may have several
  replicas (``PipelineOptions.replicas``): ``call(..., replica=i)`` addresses one,
  and :meth:`RayBackend.assign` gives a session its replica of each stage
  (:class:`~echo_stream.serve.routing.Router`);
* :class:`InlineBackend` — the same stage objects in this process, one worker
  thread per stage (FIFO per stage, like an actor); for tests and debugging;
* :class:`~echo_stream.serve.serve_engine.ServeBackend` — the stages as Ray Serve
  deployments (``serve --engine serve``), same interface.

``is_fault(exc)`` tells a stage process failure (restartable) from an error of
the input (which the session reports to its client).
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import time
from typing import Any

from ..pipeline import (BATCHED, STAGES, InlineRunner, PipelineOptions, RayRunner, close_session, run_chain,
                        stage_before)
from .routing import Route, Router

log = logging.getLogger(__name__)


class StageFault(RuntimeError):
    """A stage process died (or was restarted) while it held work of a session."""


#: a stage call whose result has not come back this long after the session began waiting for it is taken as a
#: fault: the session recovers (a new epoch on replicas that answer, the input in flight replayed) instead of
#: waiting for ever. Seen on Ray Serve right after a node loss: a chained call whose argument came from a
#: replica on the lost node is re-routed by Serve's router without end (the argument holds Ray's
#: ActorUnavailableError, which the router takes for the target replica being unreachable), and the session
#: waited on it for minutes. Longer than the call order's 10 s skip, so that a legitimately late call is not
#: cut short.
STAGE_CALL_DEADLINE_S = 20.0


async def answered(backend, handle, deadline_s: float = STAGE_CALL_DEADLINE_S):
    """``backend.get(handle)``, or :class:`StageFault` when it takes longer than ``deadline_s``."""
    try:
        return await asyncio.wait_for(backend.get(handle), deadline_s)
    except asyncio.TimeoutError:
        abandon = getattr(backend, "abandon", None)
        if abandon is not None:
            abandon(handle)
        raise StageFault(f"a stage call was not answered within {deadline_s:g} s (a replica, or one whose "
                         "result it takes, is stuck or lost)") from None


class OnRayCluster:
    """What a backend whose stages run on a Ray cluster has besides them (:class:`RayBackend` and
    :class:`~echo_stream.serve.serve_engine.ServeBackend`): the cluster's resume records. One method for both
    engines, so that their ingresses always find the same store (same actor names, same shards)."""

    def resume_store(self, ttl_s: float, max_records: int, shards: int) -> list:
        """The cluster's resume records (:mod:`echo_stream.actors.resume`), shared by every ingress of it."""
        from ..actors.resume import resume_store

        return resume_store(ttl_s, max_records, shards)


class RayBackend(OnRayCluster):
    def __init__(self, runner: RayRunner):
        import ray

        self.ray = ray
        self.runner = runner
        self.router = Router({s: len(r) for s, r in runner.replicas.items()})
        self.replica_nodes: dict[tuple, str] = {}     # (stage, replica): Ray node id, as its last ping said

    @classmethod
    def start(cls, opts: PipelineOptions, address: str | None = None, num_cpus: int | None = None,
              max_restarts: int = -1) -> "RayBackend":
        runner = RayRunner(opts, address=address, num_cpus=num_cpus, max_restarts=max_restarts)
        runner.setup()
        backend = cls(runner)
        log.info("stage actors warmed up in %.2f s", backend.warm_up())
        return backend

    def call(self, stage: str, method: str, *args, num_returns: int = 1, replica: int = 0, session=None):
        """``session`` (the session(s) the call is for) orders calls on the Serve engine; an actor runs this
        process's calls in submission order whatever their session."""
        return self.runner.call(stage, method, *args, num_returns=num_returns, replica=replica)

    def replica_count(self, stage: str) -> int:
        return len(self.runner.replicas[stage])

    def assign(self, session_id: str, warm: dict | None = None) -> Route:
        """The replica of each stage that serves a new session (least loaded, or warm; see :mod:`.routing`)."""
        return self.router.assign(session_id, warm)

    def release(self, route: Route, session: str | None = None) -> None:
        self.router.release(route)

    async def add_replica(self, stage: str, timeout: float = 300.0) -> int:
        """Start one more replica of ``stage`` (it loads its models off the event loop) and route new sessions
        to it; returns its number (autoscaling, :mod:`.autoscale`)."""
        loop = asyncio.get_running_loop()
        actor = await loop.run_in_executor(None, self.runner.start_replica, stage, timeout)
        self.runner.replicas[stage].append(actor)
        i = len(self.runner.replicas[stage]) - 1
        try:     # Ray's first transfers to and from it, as warm_up does at start (no session is routed there yet)
            await loop.run_in_executor(None, self._warm_route, {**{s: 0 for s in STAGES}, stage: i}, timeout)
        except BaseException:
            self.ray.kill(self.runner.replicas[stage].pop())
            raise
        return self.router.add(stage)

    def remove_replica(self, stage: str) -> int:
        """Remove ``stage``'s last replica, which must serve no session (drain it first); returns its number."""
        i = self.router.remove_last(stage)
        self.ray.kill(self.runner.replicas[stage].pop())
        return i

    async def get(self, handle) -> Any:
        return await handle

    def put(self, value) -> Any:
        """``value`` stored once (Ray's object store): pass the handle to calls instead of the value."""
        return self.ray.put(value)

    def warm_up(self, timeout: float = 120.0) -> float:
        """One synthetic session through the actor chain, as a served session's chunks travel it.

        Each stage warms its own code in ``setup``; what only the chain itself warms is Ray's part:
        the first object passed from one actor to the next (connections between worker processes,
        first (de)serialisation of the packet classes, here and there). Without this a server's first session pays it
        on its first frame (0.4 s on 2 CPU cores). Returns the seconds it took.
        """
        t = time.perf_counter()
        for k in range(max(len(r) for r in self.runner.replicas.values())):   # every replica of every stage
            self._warm_route({s: k % len(r) for s, r in self.runner.replicas.items()}, timeout)
        return time.perf_counter() - t

    def _warm_route(self, route: Route, timeout: float) -> None:
        """:meth:`warm_up` through one replica of each stage (``route``)."""
        from ..stages import warmup

        def call(stage, method, *args, num_returns=1):
            return self.call(stage, method, *args, num_returns=num_returns, replica=route[stage])
        warm_route(call, lambda h: self.ray.get(h, timeout=timeout), warmup)

    def is_fault(self, exc: BaseException) -> bool:
        return isinstance(exc, ray_fault_types() + (StageFault,))

    def cancel(self, handles) -> None:
        for h in handles:
            try:
                self.ray.cancel(h, recursive=False)
            except Exception:  # noqa: BLE001 - best effort: the task may be done or not cancellable
                pass

    def actor(self, stage: str, replica: int = 0):
        return self.runner.replicas[stage][replica]

    def placements(self, timeout: float | None = None) -> dict[str, list[dict]]:
        """Where each replica runs (``RayRunner.placements``)."""
        return self.runner.placements(timeout=timeout)

    async def _answers(self, stage: str, replica: int, timeout: float) -> bool:
        return await answers(self, stage, replica, timeout)

    async def wait_ready(self, timeout: float = 60.0, route: Route | None = None, move_after_s: float = 1.0,
                         avoid_node: str | None = None) -> None:
        """Wait until the session's replica of every stage answers (every replica without ``route``).

        With ``route``, a stage that has other replicas does not wait for a silent one (dead, restarting, on
        a lost node) longer than ``move_after_s``: the route moves (in place) to the least loaded replica that
        answers — the session re-opens there from its checkpoint. A stage with one replica waits for it, up
        to ``timeout``. ``avoid_node``: a replica known to run on that node is taken only when no other
        answers (:func:`best_answer`)."""
        deadline = time.monotonic() + timeout
        if route is None:
            for stage, reps in self.runner.replicas.items():
                for i in range(len(reps)):
                    while not await self._answers(stage, i, deadline - time.monotonic()):
                        if time.monotonic() > deadline:
                            raise StageFault(f"stage {stage} (replica {i}) did not come back within {timeout:.0f} s")
                        await asyncio.sleep(0.1)
            return
        await asyncio.gather(*(self._settle(stage, route, move_after_s, deadline, timeout, avoid_node)
                               for stage in STAGES))

    async def _settle(self, stage: str, route: Route, move_after_s: float, deadline: float, timeout: float,
                      avoid_node: str | None = None) -> None:
        """One stage of :meth:`wait_ready`: every replica asked at once, the session's own kept if it answers."""
        mine = route[stage]
        while True:
            order = [mine] + [i for i in self.router.by_load(stage) if i != mine]
            wait = max(0.05, min(move_after_s, deadline - time.monotonic()))
            best = await best_answer(self, stage, order, wait, avoid_node)
            if best is not None:
                if best != mine:
                    log_move(self, stage, mine, best, avoid_node)
                    self.router.move(route, stage, best)
                return
            if time.monotonic() > deadline:
                raise StageFault(f"no replica of stage {stage} came back within {timeout:.0f} s")
            await asyncio.sleep(0.1)

    async def incarnations(self, timeout: float = 10.0, route: Route | None = None) -> dict[tuple, str | None]:
        """``{(stage, replica): incarnation id}`` of every replica (of ``route``'s only, when given); None: no
        answer in time. A changed id means Ray restarted that replica: its sessions' state there is gone."""
        if route is not None:
            keys = [(s, route[s]) for s in STAGES]
        else:
            keys = [(s, i) for s, reps in self.runner.replicas.items() for i in range(len(reps))]

        async def one(stage, i):
            try:
                return await asyncio.wait_for(self.runner.replicas[stage][i].incarnation_id.remote(), timeout)
            except Exception:  # noqa: BLE001 - dead, restarting or busy: ask again later
                return None
        vals = await asyncio.gather(*(one(s, i) for s, i in keys))
        return dict(zip(keys, vals))

    async def keep_sessions(self, held: dict[tuple, list[str]], timeout: float = 10.0) -> None:
        """Tell each replica ``(stage, replica)`` that the sessions ``held[...]`` still run here: their state
        is not closed as idle (:meth:`~echo_stream.stages.host.StageHost.sweep`). Best effort: a replica that
        does not answer is asked again next time."""
        await keep_all(held, lambda stage, i, ids: self.runner.replicas[stage][i].keep.remote(ids), timeout)

    def shutdown(self) -> None:
        self.runner.shutdown()


def ray_fault_types() -> tuple:
    """Ray's exceptions for a stage process that died or cannot be reached (a fault: the session recovers),
    as opposed to an error the stage raised."""
    from ray import exceptions as rex

    return tuple(getattr(rex, n) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                           "ObjectLostError", "OwnerDiedError", "WorkerCrashedError")
                 if hasattr(rex, n))


async def answers(backend, stage: str, replica: int, timeout: float) -> bool:
    """Whether ``backend``'s replica of ``stage`` answers a ping within ``timeout`` s. A stage host answers
    with its Ray node id, kept in ``backend.replica_nodes[(stage, replica)]`` (:func:`best_answer`)."""
    try:
        node = await asyncio.wait_for(backend.get(backend.call(stage, "ping", replica=replica)), max(0.05, timeout))
    except Exception:  # noqa: BLE001 - dead, restarting, refused, unreachable or busy past the timeout
        return False
    nodes = getattr(backend, "replica_nodes", None)
    if nodes is not None and isinstance(node, str):
        nodes[(stage, replica)] = node
    return True


#: once a replica of a stage has answered, how long a better one that is still silent is waited for: a replica
#: on a lost node is silent for the whole ping timeout, and a session recovering would otherwise wait for it
ANSWER_GRACE_S = 0.25


async def best_answer(backend, stage: str, order: list[int], wait: float, avoid: str | None = None,
                      grace: float = ANSWER_GRACE_S) -> int | None:
    """The first replica of ``order`` (best first) that answers a ping within ``wait`` s; None: none did. All
    are asked at once, and the answer is known as soon as every better one answered or failed — not after the
    slowest (a replica on a lost node is silent for the whole ``wait``) — or ``grace`` s after the first
    answer, whichever comes first: then the best one that answered is taken.

    ``avoid``: a node whose replicas are taken only when no other answers. A session resumed after its ingress
    was lost avoids that ingress's node: when a whole node goes down, its replicas can still answer for a
    moment (their processes die after the node's raylet), and a session re-opened on one fails again a second
    later — while re-opening elsewhere costs nothing more, since a resumed session opens every stage anew from
    its record anyway. Replicas known to be there (from earlier pings) are not waited for."""
    nodes = getattr(backend, "replica_nodes", {})

    def avoided(i: int) -> bool:                     # (known from an earlier ping, or from this very answer)
        return bool(avoid) and nodes.get((stage, i)) == avoid

    if avoid:
        order = [i for i in order if not avoided(i)] + [i for i in order if avoided(i)]
    asks = {i: asyncio.ensure_future(backend._answers(stage, i, wait)) for i in order}
    loop = asyncio.get_running_loop()
    answered: dict[int, bool] = {}
    first_ok: float | None = None                    # when the first replica not avoided answered
    try:
        while True:
            for i in order:
                if i not in answered:
                    break                            # a better one has not answered yet
                if answered[i] and not avoided(i):
                    return i
            else:                                    # all answered or failed: one on the avoided node, if any
                return next((i for i in order if answered[i]), None)
            timeout = None
            if first_ok is not None:
                timeout = first_ok + grace - loop.time()
                best = next((i for i in order if answered.get(i) and not avoided(i)), None)
                if best is None:                     # (it turned out to be on the avoided node)
                    first_ok = timeout = None
                elif timeout <= 0:                   # the better ones are still silent: the best that answered
                    return best
            await asyncio.wait([asks[i] for i in order if i not in answered], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            for i in order:
                if i not in answered and asks[i].done():
                    answered[i] = bool(asks[i].result())
                    if answered[i] and not avoided(i) and first_ok is None:
                        first_ok = loop.time()
    finally:
        for a in asks.values():
            a.cancel()


async def keep_all(held: dict[tuple, list[str]], send, timeout: float) -> None:
    """``send(stage, replica, ids)`` (an awaitable: the replica's ``keep``) for every replica of ``held`` at
    once, each within ``timeout``; best effort: one that does not answer is asked again next time."""
    async def one(stage, i, ids):
        try:
            await asyncio.wait_for(send(stage, i, ids), timeout)
        except Exception:  # noqa: BLE001 - dead, restarting, not yet replaced or busy
            log.debug("keep on %s replica %d failed", stage, i, exc_info=True)
    await asyncio.gather(*(one(s, i, ids) for (s, i), ids in held.items()))


def log_move(backend, stage: str, mine: int, to: int, avoid: str | None) -> None:
    nodes = getattr(backend, "replica_nodes", {})
    why = "its node lost the session's ingress" if avoid and nodes.get((stage, mine)) == avoid else \
        "it does not answer"
    log.warning("stage %s replica %d: a session moves to replica %d (%s)", stage, mine, to, why)


def warm_route(call, get, warmup) -> None:
    """One synthetic session (``warmup.SESSION`` and a random suffix) through one replica of each stage:
    ``call(stage, method, *args, num_returns=1)`` returns a handle, ``get(handle)`` its value (blocking). The
    windows come back here for batching, as a served session's do; the egress's first column conversions are
    paid too. The suffix: the ingresses of a deployment start at once and warm the same replicas — with one id,
    one's close ended the other's session mid-way and its start failed ("unknown pushed session")."""
    import uuid

    from .. import render, schemas

    sid = f"{warmup.SESSION}.{uuid.uuid4().hex[:12]}"
    try:
        get(call("decode", "open_stream", sid))
        get(call("render", "open_session", sid, str(render.SAMPLE_PORTRAIT)))
        pk, _ = call("decode", "push", sid, warmup.pushed_inputs(24), True, num_returns=2)
        wins = get(run_chain(call, pk, last=stage_before(BATCHED)))
        out = get(run_chain(call, wins, first=BATCHED))
        for p in out:      # the egress reads these columns: the first conversion in a process is slow
            for name, batch in p.batches.items():
                for col in batch.schema.names:
                    schemas.column(batch, col)
    finally:   # best effort: a failed warm-up's own error is the one to see
        for stage in STAGES:
            try:
                get(call(stage, "close_session", sid))
            except Exception:  # noqa: BLE001
                log.debug("warm-up close_session failed on %s", stage, exc_info=True)


class _Handle:
    __slots__ = ("future",)

    def __init__(self, future: cf.Future):
        self.future = future


class InlineBackend:
    """Stages in this process; one thread per stage keeps each stage's calls in submission order."""

    def __init__(self, opts: PipelineOptions, runner: InlineRunner | None = None):
        self.runner = runner or InlineRunner(opts)
        self.runner.setup()
        self._pools = {s: cf.ThreadPoolExecutor(1, thread_name_prefix=f"stage-{s}") for s in STAGES}

    def _run(self, stage: str, method: str, args, num_returns: int):
        vals = [a.future.result() if isinstance(a, _Handle) else a for a in args]
        out = self.runner.hosts[stage].call(method, *vals)
        return out

    def call(self, stage: str, method: str, *args, num_returns: int = 1, replica: int = 0, session=None):
        if replica:
            raise ValueError(f"the in-process backend has one {stage} stage, not replica {replica}")
        fut = self._pools[stage].submit(self._run, stage, method, args, num_returns)
        if num_returns == 1:
            return _Handle(fut)
        parts = [cf.Future() for _ in range(num_returns)]

        def split(f: cf.Future) -> None:
            if f.exception() is not None:
                for p in parts:
                    p.set_exception(f.exception())
            else:
                for p, v in zip(parts, f.result()):
                    p.set_result(v)
        fut.add_done_callback(split)
        return tuple(_Handle(p) for p in parts)

    async def get(self, handle) -> Any:
        return await asyncio.wrap_future(handle.future)

    def put(self, value) -> Any:
        return value

    def is_fault(self, exc: BaseException) -> bool:
        return isinstance(exc, StageFault)

    def cancel(self, handles) -> None:
        for h in handles:
            h.future.cancel()

    def replica_count(self, stage: str) -> int:
        return 1

    def assign(self, session_id: str, warm: dict | None = None) -> Route:
        return {s: 0 for s in STAGES}

    def release(self, route: Route, session: str | None = None) -> None:
        pass

    async def wait_ready(self, timeout: float = 60.0, route: Route | None = None, move_after_s: float = 1.0,
                         avoid_node: str | None = None) -> None:
        return None

    async def incarnations(self, timeout: float = 10.0, route: Route | None = None) -> dict[tuple, str | None]:
        return {(s, 0): h.incarnation for s, h in self.runner.hosts.items()}

    def shutdown(self) -> None:
        for p in self._pools.values():
            p.shutdown(wait=False, cancel_futures=True)

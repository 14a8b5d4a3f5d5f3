"""The stage pipeline as a Ray Serve application (``echo-stream serve --engine serve``).

Each stage of :data:`~echo_stream.chain.PIPELINE` is one Serve deployment (:class:`StageReplica`) that hosts the
same stage object as the actor engine does (``actors.MeteredStageHost`` over ``stages.*``): its replica count
comes from ``--replicas``, its ``ray_actor_options`` from the stage's own resources (``num_cpus``; with
``--device cuda`` ``num_gpus`` = the stage's ``gpu_share``, fractional, so that several replicas share a GPU).

:class:`ServeBackend` is the interface :class:`~echo_stream.serve.session.Session` drives (the same as
:class:`~echo_stream.serve.backend.RayBackend`'s): ``call`` returns a handle (a ``DeploymentResponse``) at
once; a handle passed to a later call goes replica to replica (Serve hands the callee the object ref);
``assign`` / ``release`` use the same :class:`~echo_stream.serve.routing.Router` table. The table's replica
numbers are slots bound to Serve replica ids; :class:`PinnedRouter` (a Serve ``RequestRouter``) sends each
call to the replica its :class:`~echo_stream.serve.pinning.Pin` names. When that replica is gone the call
reaches another one, which refuses it (:class:`~echo_stream.serve.pinning.ReplicaGone`): a fault, and the
session re-opens from its checkpoint (GAP event), on a slot :meth:`ServeBackend.wait_ready` re-binds.

Serve's controller does what the actor engine's monitor and restart policy did by hand: it health-checks
every replica (``check_health``, every ``health_check_period_s``) and replaces a dead or unhealthy one.
What stays ours: noticing that a session's replica was replaced while the session was idle (the slot's
replica id changes: :meth:`ServeBackend.incarnations`), and the session state itself (checkpoint, replay).
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import itertools
import logging
import threading
import time
import uuid
from typing import Any

from ..chain import PIPELINE, STAGES
from .backend import OnRayCluster, StageFault, best_answer, keep_all, log_move
from .pinning import PIN_KW, CallOrder, Failed, Pin, ReplicaGone, StuckCheck, failed_argument, rebind_slots
from .routing import Route, Router
from .serve_scaling import METRIC as SESSIONS_METRIC
from .serve_scaling import autoscaling_config

log = logging.getLogger(__name__)

#: the application's name (``serve deploy`` configs); the embedded engine adds a suffix of its own, so that
#: several ``echo-stream serve`` processes on one cluster each deploy (and delete) their own
APP = "echo-stream"
#: Serve's actor-name prefix of a replica: ``SERVE_REPLICA::<app>#<deployment>#<unique id>``
REPLICA_PREFIX = "SERVE_REPLICA::"
#: requests a stage replica may hold at once: calls wait inside it for their turn (``CallOrder``), so the
#: limit must exceed what one replica ever has queued (a session keeps at most a few chains in flight)
MAX_ONGOING = 1000
#: no Serve access-log line per request (one per stage call: thousands a second; our own metrics count calls)
QUIET = {"enable_access_log": False}
#: Serve's health check of each stage replica (seconds)
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 10.0
#: a stage call running longer than this fails the replica's health check (Serve replaces the replica)
STUCK_AFTER_S = 120.0
#: how long the release of a failed call's turns waits for its replica's answer, and for each earlier call of
#: its chain to end (a call still running then takes its turn when it runs: nothing to release)
RELEASE_WAIT_S = 30.0
#: a ``release`` that reached no replica (its target not routable for a moment) is sent again after each of
#: these pauses, while its target is still a live replica of the stage (within :data:`RELEASE_WAIT_S` in all)
RELEASE_RETRY_S = (0.25, 0.5, 1.0, 2.0)


# ------------------------------------------------------------------------------------------- routing
try:
    from ray.serve.request_router import RequestRouter
except ImportError:  # pragma: no cover - ray[serve] is a dependency; the actor engine works without it
    RequestRouter = object


class PinnedRouter(RequestRouter):
    """Serve request router: a call goes to the replica its :class:`Pin` names (the session's, from our
    router table). A call without a pin, or whose replica is not among the running ones, may go to any
    replica: a pinned one is refused there (``ReplicaGone``), which is how a lost replica is noticed."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        pin = (pending_request.kwargs or {}).get(PIN_KW) if pending_request is not None else None
        if pin is not None:
            mine = [r for r in candidate_replicas if r.replica_id.unique_id == pin.target]
            if mine:
                return [mine]
        return [list(candidate_replicas)] if candidate_replicas else []


# ------------------------------------------------------------------------------------------- replicas
class StageReplica:
    """One replica of one stage: the stage object hosted as an actor hosts it, set up before the replica
    takes requests. Sequenced calls of each stream (one session's calls from one ingress) run in order, one at
    a time, in one worker thread (as an actor with ``max_concurrency=1`` runs one caller's); pings answer at
    once. The replica's own messages: ``placement``, ``stats``, ``release`` (numbers the ingress gives up:
    :meth:`CallOrder.release`), ``part`` (another result of a call with several, kept here: ``Pin.parts``),
    ``forget`` (a stream's last turn: the session closed) and ``keep`` (sessions still running: the host
    closes only sessions idle for ``idle_close_s``, :meth:`StageHost.sweep`)."""

    def __init__(self, stage: bytes, idle_close_s: float | None = None):
        """``stage``: the stage object, pickled (Serve scans a replica's arguments after its constructor ran,
        and a set-up stage holds what does not pickle)."""
        from echo_stream.actors import MeteredStageHost
        from ray import cloudpickle, serve

        self.host = MeteredStageHost(lambda: cloudpickle.loads(stage), idle_close_s)
        self.host.setup()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.order = CallOrder()
        #: per stream: ``{seq: {index: result}}``, the results past the first of calls with several
        #: (``Pin.parts``) until their ``part`` calls take them; touched in the worker thread only
        self.parts: dict[str, dict[int, dict]] = {}
        self.stuck = StuckCheck(STUCK_AFTER_S)
        self.worker = cf.ThreadPoolExecutor(1, thread_name_prefix=f"stage-{self.host.stage.name}")

    def record_autoscaling_stats(self) -> dict:
        """Serve's custom autoscaling metric: the sessions this replica's stage holds (:mod:`.serve_scaling`)."""
        return {SESSIONS_METRIC: self.host.stage.sessions()}

    async def call(self, method: str, *args, _pin: Pin | None = None):
        if _pin is not None and _pin.target != self.replica_id:
            raise ReplicaGone(f"{self.host.stage.name} replica {_pin.target} is gone (this is {self.replica_id})")
        if method in ("placement", "stats"):            # the replica's own, not the stage's
            return getattr(self, method)()
        if method == "release":                          # unsequenced: numbers that will never come here
            return await self.order.release(args[0])
        if method == "keep":                             # unsequenced; in the worker, where the sweep runs
            return await asyncio.get_running_loop().run_in_executor(self.worker, self.host.keep, *args)
        turns = _pin.turns() if _pin is not None else ()
        if method == "forget":
            return await self._forget(turns)
        upstream = failed_argument(args)                 # an earlier call of the chain failed: hand it on
        if method == "part":
            run = functools.partial(self._part, _pin.stream, *args)
        else:
            run = functools.partial(self._run, method, args, _pin if _pin is not None and _pin.parts else None)
        run = functools.partial(self.stuck.run, run)
        loop = asyncio.get_running_loop()
        if not turns:
            if upstream is not None:
                return upstream
            if method == "ping":
                return self.host.call("ping")
            return await self._value(loop.run_in_executor(self.worker, run), method)
        fut = None
        try:                                             # done also when cancelled while waiting its turn:
            for stream, seq in turns:                    # a hole would stall the stream's next calls here
                await self.order.turn(stream, seq)
            if upstream is None:
                fut = loop.run_in_executor(self.worker, run)     # queued in turn: the worker runs them in order
            elif _pin.parts:                                     # its other results fail as it did
                fut = loop.run_in_executor(self.worker, self._keep, _pin, upstream)
        finally:
            for stream, seq in turns:
                await self.order.done(stream, seq)
        if upstream is not None:
            if fut is not None:
                await fut
            return upstream
        return await self._value(fut, method)

    async def _forget(self, turns: tuple) -> None:
        """A stream's last turn (its session closed, after all its calls here): its order is dropped, and
        whatever it left in :attr:`parts` (after its calls queued in the worker)."""
        try:
            for stream, seq in turns:
                await self.order.turn(stream, seq)
        finally:
            for stream, seq in turns:
                await self.order.done(stream, seq)
                self.order.forget(stream)
                await asyncio.get_running_loop().run_in_executor(self.worker, self.parts.pop, stream, None)

    def _run(self, method: str, args: tuple, several: Pin | None):
        """The stage call (in the worker thread). ``several``: the pin of a call with several results — the
        first is the answer, the others are kept for the ``part`` calls after it (its error, if it raised)."""
        try:
            out = self.host.call(method, *args)
        except Exception as e:
            if several is not None:
                self._keep(several, self._as_failed(e, method))
            raise
        if several is None:
            return out
        self._keep(several, *out[1:])
        return out[0]

    def _keep(self, pin: Pin, *results) -> None:
        """Keep results 1.. of the call ``pin`` pinned (one value for all: the call's failure)."""
        n = pin.parts - 1
        kept = results * n if len(results) == 1 and n > 1 else results
        self.parts.setdefault(pin.stream, {})[pin.seq] = dict(enumerate(kept, 1))

    def _part(self, stream: str, seq: int, index: int):
        """Result ``index`` of the stream's call ``seq`` (in the worker thread: after that call ran)."""
        kept = self.parts.get(stream, {}).get(seq)
        if kept is None or index not in kept:
            raise ReplicaGone(f"{self.host.stage.name} replica {self.replica_id}: no result {index} of call {seq} "
                              "of this stream here (the call did not run on this replica)")
        value = kept.pop(index)
        if not kept:
            del self.parts[stream][seq]
            if not self.parts[stream]:
                del self.parts[stream]
        return value

    async def _value(self, fut, method: str):
        """The stage call's result, or its error as a :class:`Failed` value (see there)."""
        try:
            return await fut
        except Exception as e:  # noqa: BLE001 - raised again by the caller (ServeBackend.get / result)
            return self._as_failed(e, method)

    def _as_failed(self, e: BaseException, method: str) -> Failed:
        """``e`` as the value a failed call hands on (its text when it does not pickle), saying where it was."""
        import traceback

        from ray import cloudpickle

        try:
            cloudpickle.dumps(e)
        except Exception:  # noqa: BLE001 - an error that does not pickle travels as its text
            e = RuntimeError(f"{type(e).__name__}: {e}")
        return Failed(e, f"in {self.host.stage.name}.{method} on Serve replica {self.replica_id}:\n"
                         + "".join(traceback.format_exception(e)))

    def placement(self) -> dict:
        return {**self.host.placement(), "replica_id": self.replica_id}

    def stats(self) -> dict:
        return {**self.host.stats(), "order_skipped": self.order.skipped, "order_released": self.order.released,
                "order_streams": self.order.streams, "parts_kept": sum(map(len, list(self.parts.values())))}

    def check_health(self) -> None:
        """Serve's health check: a replica whose stage does not answer, or whose current call has run for more
        than :data:`STUCK_AFTER_S`, is replaced."""
        self.host.stage.ping()
        self.stuck.check(f"{self.host.stage.name} replica {self.replica_id}")


def stage_deployment(name: str, stage, replicas: int = 1, gpu: bool = False, scale=None):
    """The Serve deployment of one stage (not bound): ``replicas`` replicas, the stage's CPUs, its GPU share
    when ``gpu``; ``scale`` (an :class:`~.autoscale.ScaleSpec`): Serve autoscales it on the sessions its
    replicas hold (:mod:`.serve_scaling`) instead."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    spec = next(s for s in PIPELINE if s.name == name)
    opts = {"num_cpus": stage.resources.get("num_cpus", 0.5)}
    if gpu and spec.gpu_share:
        opts["num_gpus"] = spec.gpu_share
    count = {"num_replicas": int(replicas)} if scale is None else \
        {"num_replicas": "auto", "autoscaling_config": autoscaling_config(scale)}
    return serve.deployment(StageReplica).options(
        name=name, **count, ray_actor_options=opts, max_ongoing_requests=MAX_ONGOING,
        health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        request_router_config=RequestRouterConfig(request_router_class=PinnedRouter), logging_config=QUIET)


def stage_applications(opts) -> dict:
    """``{stage: bound deployment}`` of the pipeline for ``PipelineOptions`` ``opts``."""
    from ray import cloudpickle

    from ..chain import replica_counts
    from ..pipeline import build_stages, reserves_gpus

    stages = build_stages(opts)
    counts = replica_counts(opts.replicas)
    gpu = reserves_gpus(opts.device, opts.reserve_gpus)
    scale = getattr(opts, "autoscale", None) or {}
    idle = getattr(opts, "stage_idle_s", None)
    return {name: stage_deployment(name, stages[name], counts[name], gpu, scale.get(name))
            .bind(cloudpickle.dumps(stages[name]), idle) for name in STAGES}


class Hub:
    """The embedded engine's ingress deployment: it only holds the stages (the gRPC server runs in the
    ``echo-stream serve`` process and calls them through handles)."""

    def __init__(self, **stages):
        self.stages = stages

    def ping(self) -> str:
        return "hub"


# ------------------------------------------------------------------------------------------- backend
class _Call:
    """One stage call of this ingress (the handle :meth:`ServeBackend.call` returns): its Serve response, the
    stage and pin it went with, and the calls whose results it was given as arguments (``deps``, kept until it
    succeeded). A call that failed (its response raised, not a stage error handed on as a value) never took
    its turns on its replica: :meth:`ServeBackend._release` gives them back there, and those of its failed
    ``deps`` (a crashed replica fails every later call of the chain)."""

    __slots__ = ("response", "stage", "pin", "deps", "released")

    def __init__(self, response, stage: str, pin: Pin, deps: tuple = ()):
        self.response, self.stage, self.pin, self.deps, self.released = response, stage, pin, deps, False


def _unfinished(exc: BaseException) -> bool:
    """``exc`` says only that the wait ran out (``result(timeout)``): the call may still run and take its turn."""
    from ray.exceptions import RayTaskError

    return isinstance(exc, TimeoutError) and not isinstance(exc, RayTaskError)


class ServeBackend(OnRayCluster):
    """The backend interface of :class:`~echo_stream.serve.backend.RayBackend`, on Serve deployments."""

    #: Serve adds and removes replicas itself (``autoscaling_config``): the server's own autoscaler stays off, and
    #: new replicas become new slots when :meth:`rebind` sees them
    autoscales = True

    def __init__(self, handles: dict, app: str = APP, expected: dict | None = None, bind_timeout_s: float = 300.0,
                 grow: dict | None = None):
        """``handles``: each stage's deployment handle; ``expected``: replicas per stage to wait for (default 1
        each) — the slots of the router table are the replicas alive then (at most ``bind_timeout_s`` later);
        ``grow``: the autoscaled stages' most replicas (their new replicas get new slots, up to that many)."""
        self.grow = dict(grow or {})
        import ray

        from ..chain import replica_counts

        self.ray = ray
        self.app = app
        self.handles = handles
        self._start_order()
        self._rebinding = threading.Lock()
        want = replica_counts(expected)
        deadline = time.monotonic() + bind_timeout_s
        while True:
            live = self._live()
            self.slots = {s: sorted(ids) for s, ids in live.items()}
            self.running = {s: len(ids) for s, ids in live.items()}
            if all(len(self.slots[s]) >= want[s] for s in STAGES):
                break
            if time.monotonic() > deadline:
                if all(self.slots.values()):
                    log.warning("Serve replicas per stage %s, not the %s asked for: serving with those",
                                {s: len(v) for s, v in self.slots.items()}, want)
                    break
                raise StageFault(f"no Serve replica of {[s for s, v in self.slots.items() if not v]} within "
                                 f"{bind_timeout_s:.0f} s")
            time.sleep(0.2)
        self.router = Router({s: len(v) for s, v in self.slots.items()})
        self.replica_nodes: dict[tuple, str] = {}     # (stage, slot): Ray node id, as its replica's last ping said
        self._undraining: set = set()                  # refresh tasks asking drained slots in the background

    # -- starting
    @classmethod
    def start(cls, opts, address: str | None = None, num_cpus: int | None = None, warm: bool = True,
              **_) -> "ServeBackend":
        """Deploy the stages as an application of its own (:data:`APP`-<random>) on the Ray this process is
        connected to (a local one when none) and bind to it (``warm``: then one synthetic session through every
        replica). ``max_restarts`` (the actor engine's) is ignored: Serve replaces lost replicas. An application
        that fails to start is deleted again."""
        from ray import serve

        from ..cluster import ensure_pipeline_ray
        from ..pipeline import build_stages, check_cpu_capacity, check_gpu_capacity

        ensure_pipeline_ray(address, num_cpus)
        import ray

        have = ray.cluster_resources()
        check_gpu_capacity(opts.device, float(have.get("GPU", 0)), opts.replicas, opts.reserve_gpus)
        check_cpu_capacity(build_stages(opts), float(have.get("CPU", 0)), opts.replicas)
        serve.start(proxy_location="Disabled")
        t = time.perf_counter()
        app = f"{APP}-{uuid.uuid4().hex[:8]}"
        try:
            serve.run(serve.deployment(Hub).options(name="hub", num_replicas=1, ray_actor_options={"num_cpus": 0},
                                                   logging_config=QUIET)
                      .bind(**stage_applications(opts)), name=app, route_prefix=None)
            backend = cls({s: serve.get_deployment_handle(s, app_name=app) for s in STAGES}, app, opts.replicas,
                          grow={s: spec.max for s, spec in (opts.autoscale or {}).items()})
            log.info("Serve stage replicas up in %.2f s, warmed up in %.2f s", time.perf_counter() - t,
                     backend.warm_up() if warm else 0.0)
        except BaseException:
            try:
                serve.delete(app)
            except Exception:  # noqa: BLE001 - the start's own error is the one to see
                log.debug("serve.delete after a failed start failed", exc_info=True)
            raise
        return backend

    def _live(self) -> dict[str, set]:
        """Replica ids of each stage that Ray knows alive (named actors of the application)."""
        out: dict[str, set] = {s: set() for s in STAGES}
        for a in self.ray.util.list_named_actors(all_namespaces=True):
            name = a["name"] if isinstance(a, dict) else a
            if not name.startswith(f"{REPLICA_PREFIX}{self.app}#"):
                continue
            parts = name[len(REPLICA_PREFIX):].split("#")
            if len(parts) == 3 and parts[1] in out:
                out[parts[1]].add(parts[2])
        return out

    def replica_actor(self, stage: str, replica: int = 0):
        """The Ray actor of a stage's slot (tests kill it)."""
        return self.ray.get_actor(f"{REPLICA_PREFIX}{self.app}#{stage}#{self.slots[stage][replica]}",
                                  namespace="serve")

    actor = replica_actor

    # -- calls
    def _start_order(self) -> None:
        """This ingress's call numbering: an id of its own (its streams' prefix on every replica), each open
        session's stream, and per stream the next number for each (stage, replica id)."""
        self.caller = uuid.uuid4().hex
        self._streams: dict[str, str] = {}
        self._stream_ids = itertools.count()
        self._seq: dict[str, dict[tuple, itertools.count]] = {}
        self._numbering = threading.Lock()
        self._releasing: cf.ThreadPoolExecutor | None = None

    def _stream(self, session: str | None) -> str:
        """The session's stream (the ingress's own without one): ``<ingress id>/<session id>.<n>``, new for a
        session id that comes back after :meth:`release` (a resumed session), so that its calls never share
        numbers with those its earlier stream still has queued on a replica."""
        if session is None:
            return self.caller
        stream = self._streams.get(session)
        if stream is None:
            stream = self._streams.setdefault(session, f"{self.caller}/{session}.{next(self._stream_ids)}")
        return stream

    def _counter(self, stream: str, stage: str, target: str):
        nums = self._seq.get(stream)
        if nums is None:
            nums = self._seq.setdefault(stream, {})
        c = nums.get((stage, target))
        return c if c is not None else nums.setdefault((stage, target), itertools.count())

    def _numbers(self, stage: str, target: str, session) -> list[tuple[str, int]]:
        """The call's ``(stream, seq)`` turns: one in its session's stream (the ingress's own without one); a
        batched call (``session``: several) one in each of its sessions' streams, taken together under a lock,
        so that two batched calls are in the same order in every stream they share (none waits on the other)."""
        sessions = [session] if session is None or isinstance(session, str) else list(dict.fromkeys(session))
        if len(sessions) == 1:
            stream = self._stream(sessions[0])
            return [(stream, next(self._counter(stream, stage, target)))]
        with self._numbering:
            return [(st, next(self._counter(st, stage, target))) for st in map(self._stream, sessions)]

    def call(self, stage: str, method: str, *args, num_returns: int = 1, replica: int = 0, ordered: bool = True,
             session: str | tuple | None = None):
        """The call on ``stage``'s replica ``replica`` (a handle, at once). ``session``: the session it is for
        (several: a batched diffusion call), whose stream orders it on that replica; ``ordered=False`` (and
        pings): it runs at once. ``num_returns`` > 1: one handle per result — the call answers with the first,
        and one ``part`` call after it in its stream with each other one (``Pin.parts``)."""
        target = self.slots[stage][replica]
        stream, seq, more = self.caller, None, ()
        if ordered and method != "ping":
            (stream, seq), *rest = self._numbers(stage, target, session)
            more = tuple(rest)
        elif num_returns > 1:
            raise ValueError(f"{stage}.{method}: a call with several results is ordered (its parts follow it)")
        vals, deps = [], []
        for a in args:
            if isinstance(a, _Call):
                deps.append(a)
                a = a.response
            vals.append(a)
        handle = self.handles[stage]
        pin = Pin(stream, target, seq, more, num_returns if num_returns > 1 else 0)
        first = _Call(handle.call.remote(method, *vals, **{PIN_KW: pin}), stage, pin, tuple(deps))
        if num_returns == 1:
            return first
        parts = [Pin(stream, target, next(self._counter(stream, stage, target))) for _ in range(1, num_returns)]
        return (first, *(_Call(handle.call.remote("part", seq, k, **{PIN_KW: p}), stage, p)
                         for k, p in enumerate(parts, 1)))

    @staticmethod
    def _unpack(value):
        if isinstance(value, Failed):       # the stage (or one before it in the chain) raised
            value.raise_()
        return value

    async def get(self, handle: _Call) -> Any:
        try:
            value = await handle.response
        except Exception as e:
            self._failed(handle, e)
            raise
        handle.deps = ()
        return self._unpack(value)

    def result(self, handle: _Call, timeout: float | None = None):
        """``get`` from a thread without an event loop."""
        try:
            value = handle.response.result(timeout_s=timeout)
        except Exception as e:
            self._failed(handle, e)
            raise
        handle.deps = ()
        return self._unpack(value)

    def _failed(self, call: _Call, exc: BaseException) -> None:
        """``call``'s response raised: unless it merely ran out of time, its turns are released (in the
        background: :meth:`_release`)."""
        if call.released or _unfinished(exc):
            return
        call.released = True
        with self._numbering:
            if self._releasing is None:
                # a release retried to a replica not routable for a moment waits between its tries: enough
                # threads that the releases for other replicas do not queue behind it
                self._releasing = cf.ThreadPoolExecutor(8, thread_name_prefix="serve-release")
        self._releasing.submit(self._release, call)

    def _release(self, call: _Call) -> None:
        """Tell ``call``'s replica that its turns will never come (one unsequenced ``release`` message), then
        do the same for each of its ``deps`` that failed too: a crashed replica fails the calls of the chain
        after it before they reach their replicas, and each would leave a hole there that stalls its
        session's next call ``CallOrder.skip_after_s``. A dep that succeeded took its turn; one still running
        after :data:`RELEASE_WAIT_S` is left alone (it takes its turn when it runs). Best effort: a replica that
        is gone took its order with it; a stream that ended (its session closed: :meth:`release`) has none left
        to release."""
        self._send_release(call.stage, call.pin.target, call.pin.turns())
        for dep in call.deps:
            if dep.released:
                continue
            try:
                dep.response.result(timeout_s=RELEASE_WAIT_S)
            except Exception as e:  # noqa: BLE001 - failed too: its turns never came either
                if not _unfinished(e) and not dep.released:
                    dep.released = True
                    self._release(dep)
        call.deps = ()

    async def keep_sessions(self, held: dict[tuple, list[str]], timeout: float = 10.0) -> None:
        """:meth:`RayBackend.keep_sessions <echo_stream.serve.backend.RayBackend.keep_sessions>`: one
        unsequenced ``keep`` per slot's replica."""
        await keep_all(held, lambda stage, i, ids: self.get(self.call(stage, "keep", ids, replica=i, ordered=False)),
                       timeout)

    def _send_release(self, stage: str, target: str, turns: tuple) -> bool:
        """Send ``target`` (a replica of ``stage``) the unsequenced ``release`` of ``turns``; whether it got
        there. A release that reaches no replica (Serve routed it to another, which refused it, or it failed on
        the way) is sent again after each pause of :data:`RELEASE_RETRY_S` while the target is still one of the
        stage's live replicas: a hole left in its order would hold the epoch's next call there for
        ``CallOrder.skip_after_s``. Stops when the target is gone (its order went with it), when the turns'
        streams ended (nothing waits for them), or after :data:`RELEASE_WAIT_S`."""
        deadline = time.monotonic() + RELEASE_WAIT_S
        for pause in (*RELEASE_RETRY_S, None):
            turns = tuple(t for t in turns if t[0] in self._seq)
            left = deadline - time.monotonic()
            if not turns or left <= 0:
                return False
            try:
                self.handles[stage].call.remote("release", turns, **{PIN_KW: Pin(self.caller, target)}
                                                ).result(timeout_s=left)
                return True
            except Exception:  # noqa: BLE001 - not routable now, gone, or unreachable
                log.debug("release of %s turns %s on %s failed", stage, turns, target, exc_info=True)
            if pause is None or not self._is_live(stage, target):
                return False
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        return False

    def _is_live(self, stage: str, target: str) -> bool:
        """Whether ``target`` is still one of ``stage``'s live replicas (Ray's named actors; an answer that
        does not come counts as yes: the retries are bounded anyway)."""
        try:
            return target in self._live().get(stage, ())
        except Exception:  # noqa: BLE001
            return True

    def put(self, value) -> Any:
        return self.ray.put(value)

    def abandon(self, handle: _Call) -> None:
        """A call given up on (:func:`.backend.answered`): cancelled, so that Serve's router stops re-routing it.
        The hole it may leave in its replica's call order is in a stream of the epoch its session leaves to
        recover (every later call is numbered in the new epoch's streams)."""
        try:
            handle.response.cancel()
        except Exception:  # noqa: BLE001 - done meanwhile, or already cancelled
            pass

    def cancel(self, handles) -> None:
        """Nothing is cancelled: a cancelled call would leave a hole in its replica's call order; the work of a
        dropped epoch runs and its results are discarded."""

    def is_fault(self, exc: BaseException) -> bool:
        """A replica that died or cannot be reached (the session recovers), as opposed to a stage's error. A call
        whose argument's replica crashed fails with Serve's ``RayServeException`` ("an upstream actor died
        before finishing a dependent task"), Ray's error as its cause: a fault too."""
        from ray.serve import exceptions as sex

        from .backend import ray_fault_types

        faults = ray_fault_types() + tuple(getattr(sex, n) for n in ("DeploymentUnavailableError",)
                                           if hasattr(sex, n)) + (StageFault, ReplicaGone)
        if isinstance(exc, sex.RayServeException) and isinstance(exc.__cause__, faults):
            return True
        return isinstance(exc, faults)

    # -- routing
    def replica_count(self, stage: str) -> int:
        return len(self.slots[stage])

    def assign(self, session_id: str, warm: dict | None = None) -> Route:
        return self.router.assign(session_id, warm)

    def release(self, route: Route, session: str | None = None) -> None:
        """Give ``route``'s replicas back; ``session``: the closed session's id, whose streams end: each
        replica it called gets a last sequenced ``forget`` (after all its calls there) and drops its order;
        this ingress drops its numbers."""
        self.router.release(route)
        if session is not None:
            self.end_stream(session)

    def end_stream(self, session: str) -> None:
        """End ``session``'s stream (an epoch of a session: ``Session.iid``): each replica it called gets a last
        sequenced ``forget`` and drops its order; this ingress drops its numbers."""
        stream = self._streams.pop(session, None)
        for (stage, target), counter in (self._seq.pop(stream, None) or {}).items():
            pin = Pin(stream, target, next(counter))
            _quietly(self.handles[stage].call.remote("forget", **{PIN_KW: pin}))

    def rebind(self) -> list[tuple]:
        """Slots whose replica is gone get the replica Serve started in its place (:func:`.pinning.rebind_slots`).
        A slot whose replica is gone, or was just re-bound, takes no new session (the router drains it) until
        :meth:`refresh` has seen its replica answer: a replacement is a named actor before Serve routes to it."""
        live = self._live()
        with self._rebinding:               # the server's monitor and recovering sessions re-bind in threads
            self.running = {s: len(ids) for s, ids in live.items()}
            moved, added = rebind_slots(self.slots, live, self.grow)
            for key in moved:               # another replica now: its node is known once it answers
                self.replica_nodes.pop(key, None)
            for stage, i in added:          # a replica Serve's autoscaler started: a new slot (drained till it answers)
                assert self.router.add(stage) == i
                log.info("stage %s: a new replica (slot %d, %d slots)", stage, i, len(self.slots[stage]))
            for stage, ids in self.slots.items():
                for i, rid in enumerate(ids):
                    if rid not in live[stage] or (stage, i) in moved or (stage, i) in added:
                        self.router.drain(stage, i)
            held = {(s, rid) for s, ids in self.slots.items() for rid in ids}
            for nums in list(self._seq.values()):   # the call numbers of replicas no slot holds any more:
                for key in list(nums):               # forgotten
                    if key not in held:
                        nums.pop(key, None)
        return moved

    async def refresh(self, timeout: float = 1.0, wait: bool = True) -> None:
        """:meth:`rebind`, then the drained slots whose replica answers take new sessions again (``wait=False``:
        they are asked in the background)."""
        await asyncio.get_running_loop().run_in_executor(None, self.rebind)
        task = asyncio.ensure_future(self._undrain(timeout))
        if wait:
            await task
        else:
            self._undraining.add(task)
            task.add_done_callback(self._undraining.discard)

    async def _undrain(self, timeout: float) -> None:
        try:
            await self._undrain_once(timeout)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - asked again at the next refresh
            log.debug("asking the drained slots failed", exc_info=True)

    async def _undrain_once(self, timeout: float) -> None:
        drained = [(s, i) for s, idx in list(self.router.draining.items()) for i in sorted(list(idx))]
        oks = await asyncio.gather(*(self._answers(s, i, timeout) for s, i in drained))
        for (stage, i), ok in zip(drained, oks):
            if ok:
                self.router.drain(stage, i, on=False)

    async def _answers(self, stage: str, i: int, timeout: float) -> bool:
        from .backend import answers

        return await answers(self, stage, i, timeout)

    async def wait_ready(self, timeout: float = 60.0, route: Route | None = None, move_after_s: float = 1.0,
                         avoid_node: str | None = None) -> None:
        """As :meth:`RayBackend.wait_ready`: with ``route``, a stage whose replica does not answer within
        ``move_after_s`` (or runs on ``avoid_node`` while another answers) moves the session (in place) to the
        least loaded replica that does. The stages are
        asked at once (a lost node takes a replica of several stages: their silences overlap, they do not add
        up), one re-bind (:meth:`refresh`) between rounds."""
        deadline = time.monotonic() + timeout
        # the drained slots' replicas are asked meanwhile, not first: a silent one would hold the session for the
        # whole ping timeout before its own stages are even asked
        await self.refresh(move_after_s, wait=False)
        pending = list(STAGES)
        while True:
            settled = await asyncio.gather(*(self._settle(s, route, move_after_s, deadline, avoid_node)
                                             for s in pending))
            pending = [s for s, ok in zip(pending, settled) if not ok]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise StageFault(f"no replica of stage {pending[0]} answered within {timeout:.0f} s")
            await asyncio.sleep(0.2)
            await self.refresh(move_after_s)

    async def _settle(self, stage: str, route: Route | None, move_after_s: float, deadline: float,
                      avoid_node: str | None = None) -> bool:
        """One round of :meth:`wait_ready` for one stage: every replica asked at once; True when the stage is
        ready (``route``'s replica answers, or it moved to the best one that does: :func:`.backend.best_answer`;
        without ``route``: all answer)."""
        mine = route[stage] if route is not None else None
        # a drained slot (its replica gone, or just re-bound and not yet seen to answer) comes last: Serve may
        # not route to a replacement yet, and a call there would wait and be refused
        late = [mine] if mine is not None and mine in self.router.draining[stage] else []
        order = ([mine] if mine is not None and not late else []) + \
            [i for i in self.router.by_load(stage) if i != mine] + late
        wait = max(0.05, min(move_after_s, deadline - time.monotonic()))
        if route is None:
            return all(await asyncio.gather(*(self._answers(stage, i, wait) for i in order)))
        best = await best_answer(self, stage, order, wait, avoid_node)
        if best is None:
            return False
        if best != mine:
            log_move(self, stage, mine, best, avoid_node)
            self.router.move(route, stage, best)
        return True

    async def incarnations(self, timeout: float = 10.0, route: Route | None = None) -> dict[tuple, str | None]:
        """``{(stage, slot): replica id}`` (of ``route``'s slots only, when given). Without ``route`` (the
        server's monitor) the slots are re-bound first, so a replica Serve replaced shows as a changed id."""
        if route is not None:
            return {(s, route[s]): self.slots[s][route[s]] for s in STAGES}
        await self.refresh()
        return {(s, i): rid for s, ids in self.slots.items() for i, rid in enumerate(ids)}

    # -- warm-up, placement, shutdown
    def warm_up(self, timeout: float = 120.0) -> float:
        """One synthetic session through every replica of every stage (as ``RayBackend.warm_up``)."""
        from ..stages import warmup
        from .backend import warm_route

        t = time.perf_counter()
        for k in range(max(len(v) for v in self.slots.values())):
            route = {s: k % len(v) for s, v in self.slots.items()}

            def call(stage, method, *args, num_returns=1, route=route):
                return self.call(stage, method, *args, num_returns=num_returns, replica=route[stage])
            warm_route(call, lambda h: self.result(h, timeout), warmup)
        return time.perf_counter() - t

    def placements(self, timeout: float | None = 60.0) -> dict[str, list[dict]]:
        """Where each slot's replica runs (node, GPU ids, ``CUDA_VISIBLE_DEVICES``, pid, replica id); slots of
        lost replicas are re-bound to their replacements first (a slot not yet replaced: its call fails)."""
        self.rebind()
        return {s: [self.result(self.call(s, "placement", replica=i, ordered=False), timeout)
                    for i in range(len(ids))] for s, ids in self.slots.items()}

    def shutdown(self) -> None:
        from ray import serve

        if getattr(self, "_releasing", None) is not None:
            self._releasing.shutdown(wait=False, cancel_futures=True)
        try:
            serve.delete(self.app)
        except Exception:  # noqa: BLE001 - best effort at exit
            log.debug("serve.delete failed", exc_info=True)
        # the handles' routers run on in this process otherwise: for an autoscaled deployment they push metrics
        # to the controller every few seconds, and after ray.shutdown() that call started a new local Ray
        for h in self.handles.values():
            try:
                h.shutdown()
            except Exception:  # noqa: BLE001 - best effort at exit
                log.debug("a handle's shutdown failed", exc_info=True)


#: the tasks of :func:`_quietly` (the event loop keeps only weak references to tasks)
_FETCHING: set = set()


def _quietly(response) -> None:
    """Fetch ``response`` in the background, its error ignored (a message whose answer nobody reads: Ray would
    log a failed one as an unhandled error)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return

    async def fetch():
        try:
            await asyncio.wait_for(response, RELEASE_WAIT_S)
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - the replica may be gone: nothing to forget
            pass
    task = loop.create_task(fetch())
    _FETCHING.add(task)
    task.add_done_callback(_FETCHING.discard)


def engine_backend(engine: str):
    """The backend class of ``--engine``: ``RayBackend`` (stage actors) or :class:`ServeBackend` (Ray Serve)."""
    if engine == "serve":
        return ServeBackend
    from .backend import RayBackend
    return RayBackend


# ------------------------------------------------------------------------------------------- the deployable app
#: ``build_app`` keys that are not ``echo-stream serve`` options
INGRESS_REPLICAS = "ingress_replicas"
#: how long ``build_app`` waits for the cluster's GPU nodes to join before refusing ``device: cuda`` (a
#: RayService or an autoscaled cluster builds the application when the head is up, before its GPU workers)
GPU_NODES_WAIT_S = 600.0
GPU_NODES_POLL_S = 5.0


def wait_for_gpu_capacity(popts, wait_s: float | None = None) -> None:
    """:func:`~echo_stream.pipeline.check_gpu_capacity` on the cluster this process is connected to, asked
    again while GPU nodes may still be joining (at most ``wait_s``, default :data:`GPU_NODES_WAIT_S`); then its
    refusal (InputError naming ``--device``, the GPUs asked for and those the cluster has)."""
    import ray

    from ..errors import InputError
    from ..pipeline import check_gpu_capacity

    deadline = time.monotonic() + (GPU_NODES_WAIT_S if wait_s is None else wait_s)
    said = False
    while True:
        try:
            return check_gpu_capacity(popts.device, float(ray.cluster_resources().get("GPU", 0)), popts.replicas,
                                      popts.reserve_gpus)
        except InputError as e:
            if time.monotonic() >= deadline:
                raise
            if not said:
                log.warning("%s; waiting up to %.0f s for GPU nodes to join", e, deadline - time.monotonic())
                said = True
        time.sleep(GPU_NODES_POLL_S)


def app_arguments(args: dict | None) -> list[str]:
    """``echo-stream serve`` argv from a Serve config's ``args`` (``{"port": 50051, "replicas": "diffusion=2"}``
    -> ``["--port", "50051", "--replicas", "diffusion=2"]``; a list repeats its option, ``true`` is a flag)."""
    argv: list[str] = []
    for key, value in (args or {}).items():
        if key == INGRESS_REPLICAS or value is None or value is False:
            continue
        flag = "--" + str(key).replace("_", "-")
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            argv += [flag] if v is True else [flag, str(v)]
    return argv


def parse_app_arguments(argv: list[str]):
    """``echo-stream serve``'s parsed arguments for the Serve application; InputError for an unknown option
    or a bad value (naming it) instead of argparse's exit."""
    import argparse

    from ..arguments.serve import add_serve_arguments
    from ..errors import InputError

    p = argparse.ArgumentParser(prog="build_app", exit_on_error=False)
    add_serve_arguments(p)
    try:
        ns, extra = p.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise InputError(f"args.{(e.argument_name or '?').lstrip('-').replace('-', '_')}", str(e.message)) from None
    if extra:
        raise InputError("args", f"not options of echo-stream serve: {' '.join(extra)}")
    if ns.engine != "serve" and "--engine" in argv:
        raise InputError("args.engine", "the Serve application runs the stages on Serve: leave engine out")
    ns.engine = "serve"
    return ns


class Ingress:
    """The gRPC ingress of the Serve application: the same server as ``echo-stream serve``
    (:class:`~echo_stream.serve.server.AvatarServer`: auth, limits, health, reflection, interrupt, GAP events,
    drain) in this replica's event loop, on the stages' deployment handles. One per node
    (``max_replicas_per_node=1``) on a fixed port: a TCP load balancer or a Kubernetes Service spreads
    sessions over the nodes."""

    async def __init__(self, argv: list, **stages):
        from ray import serve

        from .options import serve_options
        from .server import AvatarServer

        opts, popts = serve_options(parse_app_arguments(argv))
        loop = asyncio.get_running_loop()
        app = serve.get_replica_context().app_name
        self.backend = await loop.run_in_executor(None, lambda: ServeBackend(
            stages, app, popts.replicas, grow={s: spec.max for s, spec in (popts.autoscale or {}).items()}))
        await self.backend.wait_ready(timeout=600)       # every stage replica routable (they start with us)
        await loop.run_in_executor(None, self.backend.warm_up)
        self.server = AvatarServer(self.backend, opts)
        self.port = await self.server.start()
        log.info("ingress: gRPC on %s:%d", opts.host, self.port)

    def address(self) -> str:
        return f"{self.server.opts.host}:{self.port}"

    def sessions(self) -> dict:
        """This ingress's node and the ids of its running sessions (operators; tests that lose a node)."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "sessions": sorted(self.server.sessions)}

    def check_health(self) -> None:
        if self.server.stopped:
            raise RuntimeError("the gRPC server of this ingress stopped")

    async def __del__(self):
        """Serve stops the replica: drain (health NOT_SERVING, running sessions get --drain-timeout)."""
        server = getattr(self, "server", None)        # None: the constructor failed before the server started
        if server is not None:
            await server.drain()


def build_app(args: dict | None = None):
    """The Serve application (``serve run echo_stream.serve.serve_engine:build_app port=50051 ...``, or
    ``import_path`` of a ``serve deploy`` config): the :class:`Ingress` (``ingress_replicas`` of them, one per
    node) and one deployment per stage. ``args`` are ``echo-stream serve``'s options (``replicas``, ``device``,
    ``port``, ``host``, ``tokens_file``, ``max_sessions`` ...), checked here: bad ones fail the build with an
    error naming them."""
    from ray import serve

    from ..errors import InputError
    from .options import serve_options

    argv = app_arguments(args)
    ns = parse_app_arguments(argv)
    opts, popts = serve_options(ns)                     # every option checked before anything is deployed
    try:
        n = int((args or {}).get(INGRESS_REPLICAS, 1))
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise InputError(f"args.{INGRESS_REPLICAS}", "must be a whole number >= 1 (one ingress per node)")
    import ray

    if ray.is_initialized():     # built on the cluster (serve deploy / serve run): GPUs it cannot hold are refused
        wait_for_gpu_capacity(popts)     # once its GPU nodes had time to join
    ingress = serve.deployment(Ingress).options(
        name="ingress", num_replicas=n, max_replicas_per_node=1, ray_actor_options={"num_cpus": 0.5},
        health_check_period_s=HEALTH_CHECK_PERIOD_S, graceful_shutdown_timeout_s=opts.drain_timeout_s + 5,
        logging_config=QUIET)
    return ingress.bind(argv, **stage_applications(popts))

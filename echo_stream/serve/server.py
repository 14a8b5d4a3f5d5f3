"""The gRPC service (``grpc.aio``, one event loop): admission, auth, sessions, health, reflection, drain.

Every session shares the one stage pipeline (:mod:`echo_stream.serve.backend`),
on one replica of each stage (its route, chosen when it opens); its diffusion
windows are batched across the sessions of its diffusion replica (one
:class:`~echo_stream.serve.batching.WindowBatcher` per replica). Capacity is a number of
sessions (``max_sessions``): past it a new session gets RESOURCE_EXHAUSTED and
the admitted ones keep their latency. On :meth:`AvatarServer.drain` (SIGTERM in
``echo-stream serve``) health turns NOT_SERVING, new sessions get UNAVAILABLE,
running ones may finish for ``drain_timeout_s``, then the server stops.
"""
from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from dataclasses import dataclass, field

import grpc
from grpc import aio

from .. import config
from ..chain import BATCHED
from ..errors import InputError, one_line
from ..geometry import WindowGeometry, default_geometry
from ..render.portrait import DecodedImage
from ..protos import echo_stream_pb2 as pb
from . import metrics, wire
from .auth import Authenticator
from .backend import STAGE_CALL_DEADLINE_S
from .batching import WindowBatcher
from .portrait_gate import PortraitGate
from .resume import RecordWriter, Shards, resume_point
from .session import Session, SessionFailed, failure_from, log_error, warm_up_encoder
from .wire import Limits

log = logging.getLogger(__name__)

SERVICE = "echo_stream.v1.AvatarStream"
#: a resumed session's first open attempt is given up after this long (then it moves and opens again)
RESUME_OPEN_TIMEOUT_S = 1.5
SESSION_METHOD = f"/{SERVICE}/Session"
CONTROL_METHOD = f"/{SERVICE}/Control"


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 50051                       # 0: any free port
    max_sessions: int = 8
    tokens: dict = field(default_factory=dict)   # token -> principal
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    limits: Limits = field(default_factory=Limits)
    avatars: dict = field(default_factory=dict)  # avatar id -> portrait path
    drain_timeout_s: float = 30.0
    chunk_frames: int = 16                  # most avatar audio per pipeline chain (frames)
    max_inflight: int = 4
    max_batch: int = 64
    batch_wait_s: float = 0.004
    #: the model's window geometry (W frames per window, at most new_frames of them new, L lookahead frames)
    geometry: WindowGeometry = field(default_factory=default_geometry)
    stride: int | None = None               # default new frames per window of video sessions (None: max_stride)
    motion_stride: int | None = None        # ... of motion-only sessions (None: max_stride)

    @classmethod
    def for_model(cls, config_name: str | None = None, **kw) -> "ServeOptions":
        """Options with the window geometry of a model config (tiny by default)."""
        from ..config import get_config

        c = get_config(config_name or "tiny")
        opts = cls(geometry=WindowGeometry.of(c), **kw)
        for name in ("stride", "motion_stride"):
            opts.stride_for(None, getattr(opts, name))   # a bad default fails at start
        return opts

    def stride_for(self, spec, requested: int | None = None) -> int:
        """A session's new frames per window: its own request, else the default for its output mode."""
        if requested is None and spec is not None:
            requested = spec.stride or (self.stride if spec.wants_video else self.motion_stride)
        return self.geometry.stride(requested, "stride_frames")
    recovery_timeout_s: float = 30.0
    monitor_interval_s: float = 0.5         # how often stage actors are asked for their incarnation
    #: autoscaled stages: ``{stage: autoscale.ScaleSpec}`` (``--autoscale``); the others keep their count
    autoscale: dict = field(default_factory=dict)
    autoscale_interval_s: float = 0.5       # how often the autoscaler looks at the load
    #: sessions resumable on another stream (``SessionConfig.resume``) this long after their last update
    #: (``--resume-ttl``; 0: no resume records)
    resume_ttl_s: float = 120.0
    resume_max_records: int = 100_000
    resume_shards: int = 4                  # the store's actors (``--resume-shards``; the same on every ingress)
    #: a stage call whose result is not back this long after a session (or a batcher) began waiting for it is a
    #: fault: the session recovers instead of waiting for ever (:data:`~.backend.STAGE_CALL_DEADLINE_S`)
    stage_call_deadline_s: float = STAGE_CALL_DEADLINE_S
    #: the stage replicas close a session's state after this long without a call (``--stage-idle-timeout``;
    #: None: they never do); the server keeps its running sessions' state with a ``keep`` every quarter of it
    stage_idle_s: float | None = None
    #: running sessions move between a stage's replicas every this many seconds, to even out the load and to
    #: empty a replica drained for scale-down (``--rebalance-interval``; 0: never: :mod:`.rebalance`)
    rebalance_interval_s: float = 0.0
    rebalance_cooldown_s: float = 30.0      # a session moved (or resumed) is not moved again for this long


_NO_TOKEN = ("missing or unknown bearer token: send metadata 'authorization: Bearer <token>' with a token the "
             "server knows (--tokens-file / $ECHO_STREAM_TOKENS)")


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (``ipv4:1.2.3.4:5678`` -> ``1.2.3.4``, ``ipv6:[::1]:5678`` ->
    ``::1``; anything else as it is): the unit that pre-authentication resources are counted in."""
    peer = peer or "unknown"
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]") if rest.startswith("[") else rest
    return peer


class SlotCounter(dict):
    """Slots held per key (a peer, a principal): ``take`` one under a per-key and a total cap; the release it
    returns gives it back (a key holding none is dropped, so an empty counter is falsy)."""

    @property
    def total(self) -> int:
        return sum(self.values())

    def take(self, key: str, per_key: int | None, total: int):
        held = self.get(key, 0)
        if (per_key is not None and held >= per_key) or self.total >= total:
            return None
        self[key] = held + 1

        def release() -> None:
            n = self.get(key, 0) - 1
            if n > 0:
                self[key] = n
            else:
                self.pop(key, None)
        return release


class TokenBucket:
    """``rate`` messages per second with bursts of ``burst``; ``take()`` waits when empty (flow control)."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = float(rate), float(burst)
        self.tokens = float(burst)
        self.t = time.monotonic()

    async def take(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < 1:
            await asyncio.sleep((1 - self.tokens) / self.rate)
            self.tokens = 1.0
            self.t = time.monotonic()
        self.tokens -= 1


_CODES = {name: getattr(grpc.StatusCode, name) for name in (
    "INVALID_ARGUMENT", "INTERNAL", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED", "DEADLINE_EXCEEDED",
    "ABORTED", "NOT_FOUND", "PERMISSION_DENIED", "FAILED_PRECONDITION")}
#: how a stream ended -> whether its session stays resumable (its record is kept until it expires)
_RESUMABLE = {"CANCELLED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "INTERNAL"}


def _taken_over() -> SessionFailed:
    return SessionFailed("ABORTED", "this session was resumed on another stream (SessionConfig.resume); this one ends")


class AvatarServer:
    def __init__(self, backend, opts: ServeOptions):
        self.backend = backend
        self.opts = opts
        self.auth = Authenticator(opts.tokens)
        self.sessions: dict[str, Session] = {}
        self._opening = 0
        self._pending_by = SlotCounter()   # authenticated streams awaiting their first message, per principal
        self._strangers = SlotCounter()    # streams without a known token awaiting their first message, per peer
        self.draining = False
        self.server: aio.Server | None = None
        self.batcher: WindowBatcher | None = None     # replica 0's (of self.batchers)
        self.batchers: list[WindowBatcher] = []
        self.portraits = PortraitGate(opts.limits)
        self.health = None
        self.port: int | None = None
        self._stopped: asyncio.Event | None = None
        #: the cluster's resume records (:class:`~.resume.Shards`; None: this server keeps none, resume is refused)
        self.records = None
        #: the Ray node this ingress runs on ("" unknown), kept in its sessions' resume records
        self.node = ""

    @property
    def stopped(self) -> bool:
        """True once the server has stopped (``stop`` or a fatal error); False before it started."""
        return self._stopped is not None and self._stopped.is_set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> int:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        self._stopped = asyncio.Event()
        # the first H.264/AAC encoder opened in a process costs ~0.35 s (codec set-up): pay it now, not on
        # the first session's first frame
        await asyncio.get_running_loop().run_in_executor(None, warm_up_encoder)
        await asyncio.get_running_loop().run_in_executor(None, self.portraits.start)
        n = self.backend.replica_count(BATCHED)
        self.batchers = [self._batcher(i) for i in range(n)]
        self.batcher = self.batchers[0]
        self.records = await asyncio.get_running_loop().run_in_executor(None, self._resume_store)
        self._monitor = asyncio.get_running_loop().create_task(self._watch_stages(), name="stage-monitor")
        self._toucher = asyncio.get_running_loop().create_task(self._touch_records(), name="resume-records") \
            if self.records is not None else None
        self._scaler = asyncio.get_running_loop().create_task(self._autoscale(), name="autoscaler") \
            if self.opts.autoscale and not getattr(self.backend, "autoscales", False) else None
        self._keeper = asyncio.get_running_loop().create_task(self._keep_stage_state(), name="stage-keep") \
            if self.opts.stage_idle_s and hasattr(self.backend, "keep_sessions") else None
        self._moving: set = set()                      # sessions' moves under way (rebalancing)
        self._balancer = asyncio.get_running_loop().create_task(self._rebalance(), name="rebalance") \
            if self.opts.rebalance_interval_s > 0 and hasattr(self.backend, "router") else None
        lim = self.opts.limits.max_message_bytes
        self.server = aio.server(options=[("grpc.max_receive_message_length", lim),
                                          ("grpc.max_send_message_length", lim)])
        handlers = {
            "Session": grpc.stream_stream_rpc_method_handler(
                self._session_rpc, request_deserializer=wire.parse_client_message,
                response_serializer=pb.ServerMessage.SerializeToString),
            "Control": grpc.unary_unary_rpc_method_handler(
                self._control_rpc, request_deserializer=wire.parse_control_request,
                response_serializer=pb.SessionControlReply.SerializeToString),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        addr = f"{self.opts.host}:{self.opts.port}"
        if self.opts.tls_cert and self.opts.tls_key:
            creds = grpc.ssl_server_credentials([(self.opts.tls_key, self.opts.tls_cert)])
            self.port = self.server.add_secure_port(addr, creds)
        else:
            self.port = self.server.add_insecure_port(addr)
        if not self.port:
            raise InputError(addr, "cannot bind the gRPC port (in use, or a bad address)")
        await self.server.start()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s (%s)", SERVICE, addr, "TLS" if self.opts.tls_cert else "plaintext")
        return self.port

    async def wait(self) -> None:
        await self._stopped.wait()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Graceful drain: NOT_SERVING, refuse new sessions, let running ones finish (bounded), stop."""
        if self.draining:
            await self.wait()
            return
        self.draining = True
        timeout_s = self.opts.drain_timeout_s if timeout_s is None else timeout_s
        log.warning("draining: %d running session(s), up to %.0f s", len(self.sessions), timeout_s)
        await self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + timeout_s
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for s in list(self.sessions.values()):
            s._fail(SessionFailed("UNAVAILABLE", f"the server shut down (drain timeout {timeout_s:g} s) before "
                                                 "the session ended; resume it on another server "
                                                 "(SessionConfig.resume)"))
        await self.stop(grace=5.0)

    async def stop(self, grace: float | None = 1.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
        for b in self.batchers:
            await b.stop()
        self.portraits.close()
        for task in (getattr(self, "_monitor", None), getattr(self, "_scaler", None),
                     getattr(self, "_toucher", None), getattr(self, "_keeper", None),
                     getattr(self, "_balancer", None), *getattr(self, "_moving", ())):
            if task is not None:
                task.cancel()
        self._stopped.set()

    def _resume_store(self):
        """The cluster's resume store, from the backend (None: the backend has none, or ``resume_ttl_s`` is 0)."""
        make = getattr(self.backend, "resume_store", None)
        if make is None or self.opts.resume_ttl_s <= 0:
            return None
        try:
            shards = Shards(make(self.opts.resume_ttl_s, self.opts.resume_max_records, self.opts.resume_shards))
            import ray

            self.node = ray.get_runtime_context().get_node_id() or ""
            return shards
        except Exception as e:  # noqa: BLE001 - serving goes on; resume is refused
            log.warning("no resume store (error id %s): sessions cannot be resumed on another stream",
                        log_error(e, "resume store"))
            return None

    async def _touch_records(self) -> None:
        """Keep the running sessions' resume records alive; a session resumed elsewhere meanwhile (its record
        claimed by a newer stream) ends here with ABORTED."""
        while True:
            await asyncio.sleep(max(0.5, self.opts.resume_ttl_s / 4))
            owned = [(s.id, s.generation) for s in self.sessions.values() if s.record is not None]
            if not owned:
                continue
            try:
                lost = await self.records.touch(owned)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the store restarting: try again next time
                continue
            for s in list(self.sessions.values()):
                if s.id in lost and s.record is not None:
                    s._fail(_taken_over())

    async def _keep_stage_state(self) -> None:
        """Every quarter of ``stage_idle_s``, tell each stage replica which of its sessions this server still
        runs: the replicas close the state of sessions with no call for that long (what a lost ingress left:
        :meth:`~echo_stream.stages.host.StageHost.sweep`), and a running session whose client is silent makes
        no call."""
        while True:
            await asyncio.sleep(self.opts.stage_idle_s / 4)
            held: dict[tuple, list[str]] = {}
            for s in list(self.sessions.values()):
                for stage, replica in s.route.items():
                    held.setdefault((stage, replica), []).append(s.iid)
            if held:
                await self.backend.keep_sessions(held)

    async def _watch_stages(self) -> None:
        """Detect stage replicas restarted by Ray even when no call of a session failed (an idle stage died):
        the sessions routed to that replica then recover (their state there is gone); the others go on."""
        known = await self.backend.incarnations()
        while True:
            await asyncio.sleep(self.opts.monitor_interval_s)
            now = await self.backend.incarnations()
            for (stage, replica), inc in now.items():
                if inc is None:
                    continue
                if known.get((stage, replica)) not in (None, inc):
                    mine = [s for s in self.sessions.values() if s.route.get(stage) == replica]
                    log.warning("stage %s replica %d was restarted: recovering %d of %d session(s)", stage, replica,
                                len(mine), len(self.sessions))
                    for s in mine:
                        asyncio.get_running_loop().create_task(s.stage_restarted(stage, inc, replica))
                known[(stage, replica)] = inc
            for key in set(known) - set(now):      # a replica removed by autoscaling
                del known[key]
            self._follow_replicas()

    async def _rebalance(self) -> None:
        """Every ``rebalance_interval_s``, a few running sessions move to another replica of a stage (policy:
        :mod:`.rebalance`): once they have sent a frame, before their end, and not within
        ``rebalance_cooldown_s`` of their last epoch switch."""
        from .rebalance import plan_moves
        from .serve_scaling import wanted

        scales = {} if getattr(self.backend, "autoscales", False) else self.opts.autoscale

        def surplus(stage: str, sessions: int, replicas: int) -> bool:
            spec = scales.get(stage)
            return spec is not None and wanted(sessions, spec.target, spec.min) < replicas

        while True:
            await asyncio.sleep(self.opts.rebalance_interval_s)
            try:
                now = time.monotonic()
                running = {sid: s for sid, s in list(self.sessions.items()) if not s.done.is_set()}

                def movable(sid: str) -> bool:
                    s = running[sid]
                    return s.produced > 0 and s.ready.is_set() and not s.end_pushed and \
                        now - s.last_switch >= self.opts.rebalance_cooldown_s

                for m in plan_moves(self.backend.router, {sid: s.route for sid, s in running.items()}, movable,
                                    surplus=surplus):
                    task = asyncio.get_running_loop().create_task(self._move(running[m.session], m))
                    self._moving.add(task)
                    task.add_done_callback(self._moving.discard)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - e.g. the router changing under a re-bind: next round
                log.warning("rebalancing failed (error id %s); trying again next round", log_error(e, "rebalance"))

    async def _move(self, session: Session, m) -> None:
        try:
            if await session.move({m.stage: (m.source, m.target)}, m.why):
                log.info("session %s moved: %s", session.id[:8], m.why)
        except asyncio.CancelledError:
            raise
        except SessionFailed as e:
            session._fail(e)
        except Exception as e:  # noqa: BLE001
            session._fail(session.failure_from(e, "a move to another replica"))

    def _batcher(self, replica: int) -> WindowBatcher:
        """A started batcher of the diffusion windows bound for ``replica``."""
        b = WindowBatcher(self.backend, self.opts.max_batch, self.opts.batch_wait_s, replica=replica,
                          deadline_s=self.opts.stage_call_deadline_s)
        b.start()
        return b

    def _follow_replicas(self) -> None:
        """A backend that scales itself (Serve) added diffusion replicas: each gets its batcher (routes index
        batchers by replica); the replica counts are exported. (The actor engine's autoscaler adds its own.)"""
        if not getattr(self.backend, "autoscales", False):
            return
        while len(self.batchers) < self.backend.replica_count(BATCHED):
            self.batchers.append(self._batcher(len(self.batchers)))
        running = getattr(self.backend, "running", None)      # replicas Serve runs (slots may stay empty)
        if running:
            for stage in self.opts.autoscale:
                metrics.REPLICAS.labels(stage).set(running.get(stage, 0))

    async def _autoscale(self) -> None:
        """The autoscaled stages' replicas follow their sessions (policy and design: :mod:`.autoscale`)."""
        from .autoscale import StageScaler

        scalers = {stage: StageScaler(spec) for stage, spec in self.opts.autoscale.items()}
        while True:
            await asyncio.sleep(self.opts.autoscale_interval_s)
            for stage, scaler in scalers.items():
                try:
                    await self._scale_step(stage, scaler, time.monotonic())
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - e.g. no resources for a new replica: try again later
                    log.warning("autoscaling %s failed (error id %s); the replicas stay as they are", stage,
                                log_error(e, f"autoscaling {stage}"))

    async def _scale_step(self, stage: str, scaler, now: float) -> None:
        router = self.backend.router
        n = router.counts[stage]
        last = n - 1
        sessions = sum(router.load[stage])
        metrics.REPLICAS.labels(stage).set(n)
        if last in router.draining[stage]:
            if scaler.wanted(sessions) >= n:          # the load came back: keep it
                router.drain(stage, last, on=False)
                log.info("autoscale: %s replica %d takes sessions again (%d sessions)", stage, last, sessions)
            elif router.load[stage][last] == 0:       # drained: its last session ended
                self.backend.remove_replica(stage)
                if stage == BATCHED:
                    await self.batchers.pop().stop()
                log.info("autoscale: %s %d -> %d replicas (%d sessions)", stage, n, n - 1, sessions)
                metrics.REPLICAS.labels(stage).set(n - 1)
            return
        step = scaler.decide(now, sessions, n)
        if step > 0:
            log.info("autoscale: %s %d -> %d replicas (%d sessions, target %g per replica): starting one", stage,
                     n, n + 1, sessions, scaler.spec.target)
            i = await self.backend.add_replica(stage)
            if stage == BATCHED:
                self.batchers.append(self._batcher(i))
            metrics.REPLICAS.labels(stage).set(n + 1)
        elif step < 0:
            router.drain(stage, last)
            log.info("autoscale: %s replica %d drains (%d sessions there): no new sessions; removed when they "
                     "have ended", stage, last, router.load[stage][last])

    # ------------------------------------------------------------------ RPCs
    async def _abort(self, context, code: grpc.StatusCode, details: str, outcome: str | None = None):
        metrics.ERRORS.labels(code.name).inc()
        if outcome:
            metrics.SESSIONS.labels(outcome).inc()
        await context.abort(code, one_line(details))

    async def _session_rpc(self, request_iterator, context):
        """The Session RPC; whatever escapes the handler is answered INTERNAL with an error id (logged), never
        with the exception's own text (gRPC would send it as UNKNOWN)."""
        inner = self._session(request_iterator, context)
        try:
            async for msg in inner:
                yield msg
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - a bug: this stream only
            await self._abort(context, grpc.StatusCode.INTERNAL, failure_from(e, "the session RPC").message, "failed")
        finally:
            await inner.aclose()          # its clean-up runs now, not when the generator is collected

    async def _session(self, request_iterator, context):
        lim = self.opts.limits
        # Authentication comes first, from the call's metadata: what a stream without a known token may hold
        # (a slot while its first message is awaited) is counted per peer address, in a pool of its own, so
        # strangers can never use up what authenticated callers need (their pending slots, the sessions).
        principal = self.auth.principal(context.invocation_metadata())
        if principal is None:
            slot = self._stranger_slot(peer_host(context.peer()))
            if slot is None:      # refused at once: reading the first message is what a flood must not get
                await self._abort(context, grpc.StatusCode.UNAUTHENTICATED, _NO_TOKEN + " (too many streams "
                                  "without a known token from this address are open)", "unauthenticated")
            wait = min(lim.config_timeout_s, lim.unauthenticated_config_timeout_s)
        else:
            slot = self._member_slot(principal)
            if slot is None:
                await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"{self._pending} streams are already waiting to send their SessionConfig: "
                                  "send it as the first message, then retry", "rejected_capacity")
            wait = lim.config_timeout_s
        # The first message is read before any other refusal: a client that is still writing it when the
        # server ends the call would otherwise see its write fail (INTERNAL) instead of the refusal's status.
        # The caps above are the exception on purpose (under a flood of streams, reading one more first
        # message is what the server must not do; such a client may see INTERNAL and retries either way).
        try:
            first = await asyncio.wait_for(request_iterator.__anext__(), wait)
            t_first = time.perf_counter()
        except StopAsyncIteration:
            first = None
        except asyncio.TimeoutError:
            first = None
            if principal is not None:
                await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                                  f"no SessionConfig within {wait:g} s", "invalid")
        finally:
            slot()
        if principal is None:
            await self._abort(context, grpc.StatusCode.UNAUTHENTICATED, _NO_TOKEN, "unauthenticated")
        if self.draining:
            await self._abort(context, grpc.StatusCode.UNAVAILABLE,
                              "the server is draining (shutting down): connect to another server or retry later",
                              "rejected_draining")
        if len(self.sessions) + self._opening >= self.opts.max_sessions:
            await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the server is at capacity ({self.opts.max_sessions} sessions): retry later or "
                              "connect to another server", "rejected_capacity")
        self._opening += 1
        session = None
        reader = None
        try:
            if first is None:
                await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                                  "the stream ended before its SessionConfig", "invalid")
            try:
                spec = wire.session_spec(first, self.opts.limits, self.opts.avatars)
                resume = wire.resume_request(first)
                stride = self.opts.stride_for(spec)
                if spec.wants_video and isinstance(spec.portrait, bytes):   # checked and decoded at the edge
                    spec.portrait = await self.portraits.prepare(spec.portrait)
            except InputError as e:
                await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e), "invalid")
            point = record = None
            generation = 0
            if resume is None:
                sid = secrets.token_urlsafe(24)
            else:
                sid = resume.session_id
                generation, record = await self._claim(context, principal, resume)
                t_claimed = time.perf_counter()
                point = resume_point(record, resume.next_frame, self.opts.geometry.known(stride))
                older = self.sessions.get(sid)
                if older is not None:          # its stream on this server is still open: the newer one wins
                    older._fail(_taken_over())
            o = self.opts
            session = Session(sid, principal, spec, self.backend, self.batchers, o.limits, o.chunk_frames,
                              o.max_inflight, recovery_timeout_s=o.recovery_timeout_s, stride=stride,
                              geometry=o.geometry, generation=generation,
                              call_deadline_s=o.stage_call_deadline_s)
            self.sessions[sid] = session
            self._opening -= 1
            metrics.SESSIONS_ACTIVE.set(len(self.sessions))
            session.record = self._record_writer(session, principal, wire.config_fingerprint(first))
            try:
                asked = await self._open(session, point, record)
            except Exception as e:  # noqa: BLE001 - reported as its status; the session is closed below
                if self.backend.is_fault(e):
                    e = SessionFailed("UNAVAILABLE", "a pipeline stage is restarting (error id "
                                                     f"{log_error(e, 'session open')}): retry in a few seconds")
                f = session.failure_from(e, "session open")
                code = _CODES.get(f.code, grpc.StatusCode.INTERNAL)
                inner = f.input_error
                if isinstance(spec.portrait, DecodedImage) and isinstance(inner, InputError) \
                        and inner.what == spec.portrait.label:
                    self.portraits.remember_refusal(spec.portrait, inner.problem)
                await self._abort(context, code, f.message,
                                  "invalid" if code == grpc.StatusCode.INVALID_ARGUMENT else "failed")
            if point is not None:
                now = time.perf_counter()
                await session.announce_resume(point, now - t_first, {
                    "record claimed": t_claimed - t_first, "replicas asked": asked,
                    "stages opened": now - t_claimed - asked})
            metrics.SESSIONS.labels("resumed" if point is not None else "opened").inc()
            session.start()
            reader = asyncio.get_running_loop().create_task(self._read(session, request_iterator))
            seq = 0
            yield wire.opened(seq, sid, spec, point)
            async for msg in self._outputs(session):
                seq += 1
                msg.seq = seq
                yield msg
            if session.failure is not None:
                f = session.failure
                code = _CODES.get(f.code, grpc.StatusCode.INTERNAL)
                seq += 1
                yield pb.ServerMessage(seq=seq, pts=session.produced / config.FPS,
                                       event=pb.Event(kind=pb.Event.ERROR, message=f.message))
                await self._abort(context, code, f.message, "failed" if code != grpc.StatusCode.INVALID_ARGUMENT
                                  else "invalid")
            metrics.SESSIONS.labels("completed").inc()
        except asyncio.CancelledError:
            metrics.SESSIONS.labels("cancelled").inc()
            raise
        finally:
            if session is None:
                self._opening -= 1
            else:
                if reader is not None:
                    reader.cancel()
                if self.sessions.get(session.id) is session:     # (a resume on this server may have replaced it)
                    del self.sessions[session.id]
                metrics.SESSIONS_ACTIVE.set(len(self.sessions))
                if session.record is not None:     # an ended session, or one refused for its input, is forgotten
                    f = session.failure
                    ended = f is None and session.done.is_set()
                    asyncio.get_running_loop().create_task(session.record.close(
                        drop=ended or (f is not None and f.code not in _RESUMABLE)))
                await session.close()

    async def _open(self, session: Session, point, record) -> float:
        """Open the session in its stages; when a replica of its route was just lost (a fault: its node died, a
        resume often comes right after), move it to replicas that answer and open again, once. A resumed
        session asks its replicas first (a call to a replica on a node that is gone but not yet known to be gone
        would wait for Ray to notice, ~15 s; an unanswered ask moves the session after 1 s). Returns the seconds
        the asking took."""
        t = time.perf_counter()
        # a session whose ingress was on another node avoids that node's replicas: when a whole node is lost,
        # they may still answer for a moment, and fail the session again right after it re-opened there
        avoid = {"avoid_node": record.node} if point is not None and record.node not in ("", self.node) else {}
        if point is not None:
            await self.backend.wait_ready(self.opts.recovery_timeout_s, route=session.route, **avoid)
        asked = time.perf_counter() - t
        try:
            if point is None:
                await session.open(point, record)
            else:   # right after a loss, a call may wait ~3 s for Serve to refuse it: given up after 1.5 s
                await asyncio.wait_for(session.open(point, record), RESUME_OPEN_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001
            if not (self.backend.is_fault(e) or isinstance(e, asyncio.TimeoutError)):
                raise
            log.info("session %s: a stage replica of its route did not answer at open (%s): moving",
                     session.id[:8], type(e).__name__)
            await self.backend.wait_ready(self.opts.recovery_timeout_s, route=session.route, **avoid)
            session.link.new_epoch()
            await session.open(point, record)
        return asked

    async def _claim(self, context, principal: str, req: wire.ResumeRequest):
        """Take a session over for a resume: (generation, its record); refusals end the call with their status."""
        if self.records is None:
            await self._abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                              "this server keeps no resume records (serve --resume-ttl 0, or no Ray cluster): "
                              "open a new session", "invalid")
        try:
            got = await asyncio.wait_for(self.records.of(req.session_id).claim.remote(req.session_id, principal,
                                                                                    req.digest, self.node), 10.0)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            await self._abort(context, grpc.StatusCode.UNAVAILABLE,
                              f"the resume store did not answer (error id {log_error(e, 'resume claim')}): retry "
                              "in a few seconds", "failed")
        if "refused" in got:
            await self._abort(context, _CODES.get(got["refused"], grpc.StatusCode.INVALID_ARGUMENT), got["message"],
                              "invalid")
        return got["generation"], got["record"]

    def _record_writer(self, session: Session, principal: str, digest: str):
        """The session's resume record writer (a new session's record is created first, without waiting: the
        store runs one caller's calls in order); None without a store."""
        if self.records is None:
            return None
        created = None
        if session.generation == 0:
            try:
                created = self.records.of(session.id).create.remote(session.id, principal, digest, self.node)
            except Exception as e:  # noqa: BLE001 - the session is served, not resumable
                log.warning("session %s: no resume record (error id %s)", session.id[:8],
                            log_error(e, "resume record"))
                return None
        return RecordWriter(self.records.of(session.id), session.id, session.generation, created=created,
                            on_taken_over=lambda: session._fail(_taken_over()))

    def _stranger_slot(self, peer: str):
        """Take a pending slot of a stream without a known token from ``peer``; returns its release, or None
        when the peer (or all strangers together) already hold as many as allowed."""
        lim = self.opts.limits
        return self._strangers.take(peer, lim.max_unauthenticated_per_peer, lim.max_unauthenticated_streams)

    def _member_slot(self, principal: str):
        """Take a pending slot of an authenticated stream (at most ``max_pending_streams`` of all principals,
        ``max_pending_per_principal`` of one when tokens are configured); its release, or None when full."""
        lim = self.opts.limits
        per = lim.max_pending_per_principal if self.auth.required else None
        return self._pending_by.take(principal, per, lim.max_pending_streams)

    @property
    def _pending(self) -> int:
        """Authenticated streams whose first message has not been read yet."""
        return self._pending_by.total

    async def _outputs(self, session: Session):
        """The session's messages as they leave the egress (frame accounting, latency)."""
        st = session.stats
        while True:
            item = await session.outbox.get()
            if item is None:
                return
            msg, upto, origins, kind = item.msg, item.upto, item.origins, item.kind
            now = time.monotonic()
            if kind in ("motion", "video") and upto is not None:
                n = 1 if kind == "motion" else msg.video.frames
                st.frames += n
                metrics.FRAMES.labels(kind).inc(n)
                if n and st.first_frame_latency_s is None and session.t_first_audio is not None:
                    st.first_frame_latency_s = now - session.t_first_audio
                    metrics.FIRST_FRAME_LATENCY.observe(st.first_frame_latency_s)
                for origin in origins:
                    if origin is not None:
                        st.latencies.append(now - origin)
                        metrics.FRAME_LATENCY.observe(now - origin)
            elif kind == "video":
                metrics.FRAMES.labels("video").inc(msg.video.frames)
            if msg.WhichOneof("body") == "event" and msg.event.kind == pb.Event.ENDED:
                msg.event.stats.CopyFrom(st.proto())     # final figures: every frame has left by now
                if session.record is not None:           # ended: not resumable once the client knows it
                    await session.record.close(drop=True)
            yield msg

    async def _read(self, session: Session, it) -> None:
        checker = wire.InputChecker(self.opts.limits)
        bucket = TokenBucket(self.opts.limits.messages_per_s, self.opts.limits.burst)
        try:
            while True:
                try:
                    msg = await it.__anext__()
                except StopAsyncIteration:         # half-close = END
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - the client went away or the transport broke
                    log.info("session %s: input stream ended: %s", session.id[:8], e)
                    session._fail(SessionFailed("CANCELLED", "the input stream broke before its END"))
                    return
                await bucket.take()
                kind, item = checker.check(msg)
                metrics.MESSAGES_IN.labels(kind).inc()
                if kind == "control" and item["kind"] == "interrupt":
                    await session.interrupt()
                    continue
                if kind == "control" and item["kind"] == "end":
                    break
                if "encoded" in item and kind in ("avatar_audio", "user_audio"):
                    item = await session.decode_encoded(kind, item)   # paced below by its decoded duration
                    if item is None:
                        continue
                await session.put_input(kind, item)
            for kind, item in await session.finish_encoded():       # what the decoders still hold
                await session.put_input(kind, item)
            await session.put_input("control", {"kind": "end"})
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - bad input (INVALID_ARGUMENT) or a bug (INTERNAL, logged)
            session._fail(session.failure_from(e, "input"))

    async def _control_rpc(self, request, context):
        try:
            return await self._control(request, context)
        except aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001 - reported as its status, without the exception's text
            f = failure_from(e, "the Control RPC")
            await self._abort(context, _CODES.get(f.code, grpc.StatusCode.INTERNAL), f.message)

    async def _control(self, request, context):
        principal = self.auth.principal(context.invocation_metadata())
        if principal is None:
            await self._abort(context, grpc.StatusCode.UNAUTHENTICATED, _NO_TOKEN)
        if isinstance(request, wire.Malformed):
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.problem)
        session = self.sessions.get(request.session_id)
        if session is None:
            await self._abort(context, grpc.StatusCode.NOT_FOUND,
                              "no running session with this id (ended, or never existed)")
        if not secrets.compare_digest(session.principal.encode(), principal.encode()):   # str: ASCII only
            await self._abort(context, grpc.StatusCode.PERMISSION_DENIED,
                              "this session belongs to another principal")
        kind = request.control.kind
        if kind == pb.Control.INTERRUPT:
            playback = await session.interrupt()
        elif kind in (pb.Control.FLUSH, pb.Control.END):
            await session.put_input("control", {"kind": "flush" if kind == pb.Control.FLUSH else "end"})
            playback = session.produced
        else:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                              "control.kind: use INTERRUPT, FLUSH or END")
        return pb.SessionControlReply(playback_frame=playback, playback_pts=playback / config.FPS)


class ServerThread:
    """An :class:`AvatarServer` on its own event loop in a background thread (tests, benchmarks)."""

    def __init__(self, backend, opts: ServeOptions):
        import threading

        self.server = AvatarServer(backend, opts)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="echo-stream-server", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_until_complete(self.server.wait())

    def start(self) -> int:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self.server.port

    def run(self, coro, timeout: float | None = None):
        """Run a coroutine on the server's loop from another thread; returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def drain(self, timeout_s: float | None = None) -> None:
        self.run(self.server.drain(timeout_s))
        self._thread.join(30)

    def stop(self) -> None:
        if self._thread.is_alive():
            try:
                self.run(self.server.stop(0.5), timeout=30)
            except Exception:  # noqa: BLE001 - already stopped
                pass
            self._thread.join(30)

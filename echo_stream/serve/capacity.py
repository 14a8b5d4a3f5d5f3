"""``echo-stream bench capacity``: serving at internet scale, by simulation, on one machine.

What is **real**: the ingress side of ``echo-stream serve`` — :class:`~echo_stream.serve.session.Session`
(input pacing, chunking at the window geometry's ready points, the chain in flight, epochs, the egress
building one protobuf message per frame), the server's input reader and output loop
(``AvatarServer._read`` / ``_outputs``: message validation, rate limit, frame accounting, latency), the
:class:`~echo_stream.serve.routing.Router` (session affinity, least loaded) and one
:class:`~echo_stream.serve.batching.WindowBatcher` per diffusion replica, all on one asyncio event loop as
in the server. Clients send real ``ClientMessage`` s (80 ms of PCM each, in real time); every message the
egress yields is serialised.

What is **stand-in**: the stage actors. Each replica of each stage is a task on a second event loop in
another thread (the "cluster"), taking its calls one at a time in submission order like a Ray actor, and
*sleeping* for the stage's cost instead of computing: per chain (``decode.push``, ``features``,
``memory``), per diffusion call as a function of its batch size, per window (``render``, motion-only
sessions). The stand-in memory stage cuts windows exactly where the real one does (stride ``S'``,
lookahead ``L``, the last window at END), so the ingress sees the same windows at the same times; the
stand-in render returns real Arrow ``MotionWindow`` batches. Not simulated: gRPC's transport (the
simulated clients hand messages to the reader directly), Ray's object transfers and scheduling between
processes, the network.

``--time-scale K`` runs every clock the sessions and stand-ins see K times slower (the clients' pacing,
the stage costs, the batcher's wait, the ramp) and divides the latencies by K again: routing and
batching see the same arrivals and costs, but the ingress's own CPU work is not slowed, so K > 1 models
an ingress with K times the CPU of this process (one Python thread, sharing the GIL with the stand-ins).
The ingress CPU per session is measured either way; it is what sizes the ingress processes of a fleet.

Costs come from ``--costs``: ``measure`` (default) times the tiny model's stages on this machine's CPU
(:func:`measure_cpu_costs`), ``gpu-assumed`` keeps those CPU stage costs but replaces the diffusion
call by ``--gpu-batch-ms BASE,PER_WINDOW`` milliseconds — an ASSUMPTION until H200 figures exist — or
a JSON file of an earlier run's ``costs``.

Figures (JSON + PNG in ``--out``): frame latency as the server measures it (avatar-audio arrival at the
ingress -> that frame leaving the egress) for the fleet and for one session alone on the same
stand-ins (``baseline``); the difference of their p99 is what routing, batching and sharing add; the
*window wait* (the stand-in memory stage cut a window -> its diffusion batch started: the ingress's hop
and the batcher's queue) p50/p99; batch sizes per diffusion call; every stage replica's busy share;
ingress CPU per session (CPU time of the ingress thread / session-seconds served) and the event loop's
lag; the checks that every window was generated once and every frame delivered once, in order.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import math
import os
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from ..arguments.bench import add_capacity_bench_arguments as add_arguments  # noqa: F401 (the command's arguments)
from .. import atomic
from ..chain import BATCHED, STAGES, parse_replicas
from ..config import FPS, SAMPLE_RATE
from ..errors import InputError

#: every stage replica's work as the stand-ins charge it (seconds); see :class:`StageCosts`
CPU_SOURCE = "measured: tiny model, this machine's CPU (measure_cpu_costs)"


@dataclass
class StageCosts:
    """What a stand-in replica sleeps: per chain (one push of avatar audio through decode, features, memory),
    per diffusion call (``diffusion_ms``: batch size -> ms, linear between the points, the last slope
    beyond) and per render call of a motion-only window."""

    source: str
    push_ms: float
    features_ms: float
    memory_ms: float
    diffusion_ms: dict[int, float]
    render_ms: float
    notes: str = ""

    def diffusion_s(self, n: int) -> float:
        pts = sorted((int(k), float(v)) for k, v in self.diffusion_ms.items())
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if len(xs) == 1:                                  # one point: proportional beyond it
            return ys[0] / 1e3 * max(1.0, n / xs[0])
        if n <= xs[0]:
            return ys[0] / 1e3
        if n >= xs[-1]:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            return (ys[-1] + slope * (n - xs[-1])) / 1e3
        return float(np.interp(n, xs, ys)) / 1e3

    def chain_s(self) -> dict[str, float]:
        return {"decode": self.push_ms / 1e3, "features": self.features_ms / 1e3, "memory": self.memory_ms / 1e3}

    @classmethod
    def load(cls, d: dict) -> "StageCosts":
        if not isinstance(d, dict):
            raise TypeError(f"expected an object, not {type(d).__name__}")
        d = dict(d)
        d["diffusion_ms"] = {int(k): float(v) for k, v in d["diffusion_ms"].items()}
        if not d["diffusion_ms"] or min(d["diffusion_ms"]) < 1:
            raise ValueError("diffusion_ms needs at least one batch size >= 1")
        for k in ("push_ms", "features_ms", "memory_ms", "render_ms"):
            d[k] = float(d[k])
        if not all(v >= 0 and math.isfinite(v) for v in [*d["diffusion_ms"].values(), d["push_ms"], d["features_ms"],
                                                           d["memory_ms"], d["render_ms"]]):
            raise ValueError("every cost must be a finite number of milliseconds >= 0")
        return cls(**d)

    def with_gpu_diffusion(self, base_ms: float, per_window_ms: float) -> "StageCosts":
        sizes = (1, 8, 64, 128)
        return StageCosts(
            source=f"ASSUMED GPU diffusion: {base_ms:g} ms + {per_window_ms:g} ms per window per call (not measured: "
                   f"no H200 figures yet); other stages {self.source}",
            push_ms=self.push_ms, features_ms=self.features_ms, memory_ms=self.memory_ms,
            diffusion_ms={n: base_ms + per_window_ms * n for n in sizes}, render_ms=self.render_ms,
            notes="render: motion-only sessions (the stage passes motion through); CPU stages keep their CPU costs")


def measure_cpu_costs(config: str = "tiny", stride: int | None = None, chunk_frames: int = 16,
                      sizes=(1, 2, 4, 8, 16, 32), reps: int = 3) -> StageCosts:
    """Time the real stages (the default checkpoint of ``config``, CPU) in a child process with one thread per
    library, as in a stage actor (Ray starts its workers with ``OMP_NUM_THREADS=1``; two BLAS/OpenMP threads
    on cores that other work holds made a diffusion call 50x slower here): one ``chunk_frames``-frame chain
    of avatar audio (no user media, as the simulated clients send) through decode.push, features and
    memory (mean per chain), and diffusion calls of ``sizes`` windows of different sessions (median of
    ``reps``)."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1")
    arg = json.dumps({"config": config, "stride": stride, "chunk_frames": chunk_frames, "sizes": list(sizes),
                      "reps": reps})
    out = subprocess.run([sys.executable, "-m", "echo_stream.serve.capacity", arg], env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return StageCosts.load(json.loads(out.strip().splitlines()[-1]))


def _measure_here(config, stride, chunk_frames, sizes, reps) -> StageCosts:
    import torch

    from .. import config as cfgmod
    from ..pipeline import PipelineOptions, build_stages

    torch.set_num_threads(1)
    return _measure(cfgmod, build_stages(PipelineOptions(config=config, stride=stride)), config, stride,
                    chunk_frames, sizes, reps)


def _measure(cfgmod, stages, config, stride, chunk_frames, sizes, reps) -> StageCosts:
    for s in stages.values():
        s.setup()
    dec, feat, mem, dif, ren = (stages[s] for s in STAGES)
    spf = cfgmod.SAMPLES_PER_FRAME
    rng = np.random.default_rng(0)
    timings: dict[str, list] = defaultdict(list)
    windows = []

    def timed(key, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        timings[key].append(time.perf_counter() - t)
        return out

    for i in range(max(sizes)):
        sid = f"capacity/{i}"
        dec.open_stream(sid)
        mem.set_stride(sid, stride)
        dif.set_seed(sid, i)
        got = []
        while not got:
            pcm = (0.05 * rng.standard_normal(chunk_frames * spf)).astype("<f4").tobytes()
            item = {"pcm": pcm, "format": "f32le", "rate": cfgmod.SAMPLE_RATE, "channels": 1}
            pk, _ = timed("push", dec.push, sid, [("avatar_audio", item)], False)
            pk = timed("features", feat.process, pk)
            got = timed("memory", mem.process, pk)
        windows.append(got[0])
    diffusion = {}
    for n in sizes:
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            out = dif.process(windows[:n])
            ts.append(time.perf_counter() - t)
        diffusion[n] = 1e3 * float(np.median(ts))
    render = []
    for _ in range(reps * 4):
        t = time.perf_counter()
        ren.process(out[0])
        render.append(time.perf_counter() - t)
    med = {k: 1e3 * float(np.mean(v)) for k, v in timings.items()}     # per chain: windows cost more
    return StageCosts(source=CPU_SOURCE, push_ms=med["push"], features_ms=med["features"], memory_ms=med["memory"],
                      diffusion_ms=diffusion, render_ms=1e3 * float(np.median(render)),
                      notes=f"config {config}, stride {stride or 'new_frames'}, chunks of {chunk_frames} frames, "
                            "1 torch thread (as in an actor); avatar audio only")


# ---------------------------------------------------------------------------------------------- stand-in cluster
class _StandIns:
    """What the stand-in replicas of every stage do with a call, besides sleeping its cost. Windows are cut
    as the real memory stage cuts them (``memory.MemoryStage._next_window``)."""

    def __init__(self, costs: StageCosts, geometry, time_scale: float = 1.0):
        from .. import motion

        self.costs = costs
        self.k = float(time_scale)
        self.lookahead = geometry.lookahead_frames
        self.channels = motion.NUM_CHANNELS
        self.state: dict[tuple, dict] = {}       # (stage, replica, iid) -> state
        self.diffusion_calls: list[tuple] = []    # (replica, t start, batch size)
        self.window_waits: list[float] = []       # window cut -> its diffusion call starts
        self.generated: Counter = Counter()       # (session id, epoch-global first frame) -> times generated
        self.busy: dict[tuple, float] = defaultdict(float)   # (stage, replica) -> seconds slept

    def begin(self, stage: str, replica: int, method: str, args) -> float:
        """A call starts on a replica: the seconds it sleeps (its cost); diffusion calls are recorded here."""
        if method != "process" and not (stage == "decode" and method == "push"):
            return 0.0
        if stage == BATCHED:
            now = time.perf_counter()
            work = [w for w in args[0] if w["frames"]]
            self.diffusion_calls.append((replica, now, len(work)))
            for w in work:
                self.window_waits.append(now - w["t_cut"])
                self.generated[(w["iid"], w["t0"])] += 1
            return self.k * self.costs.diffusion_s(len(work))
        if stage == "render":
            return self.k * self.costs.render_ms / 1e3
        return self.k * self.costs.chain_s()[stage]

    def run(self, stage: str, replica: int, method: str, args):
        key = (stage, replica)
        if method in ("ping", "incarnation_id"):
            return "stand-in"
        if method == "close_session":
            self.state.pop(key + (args[0],), None)
            return None
        if method in ("open_stream", "set_seed", "open_session", "import_state", "add_transcript"):
            return None
        if method == "set_stride":
            self.state[key + (args[0],)] = {"stride": int(args[1]), "have": 0, "window": 0, "total": None}
            return None
        if method == "export_state":
            return b"lcu"
        if stage == "decode" and method == "push":
            iid, items, end = args
            st = self.state.setdefault(key + (iid,), {"samples": 0, "sent": 0})
            st["samples"] += sum(len(it["pcm"]) // (2 if it["format"] == "s16le" else 4) // it["channels"]
                                 for kind, it in items if kind == "avatar_audio")
            from .. import config
            complete = (math.ceil if end else math.floor)(st["samples"] / config.SAMPLES_PER_FRAME)
            first, st["sent"] = st["sent"], complete
            return ({"iid": iid, "frames": complete - first, "end": end},
                    {"end": end, "first_frame": first, "frames": complete - first, "avatar_audio": None})
        if stage == "features":
            return args[0]
        if stage == "memory":
            return self._windows(self.state[key + (args[0]["iid"],)], args[0])
        if stage == BATCHED:
            return args[0]
        if stage == "render":
            return [self._packet(args[0])]
        raise ValueError(f"stand-in {stage} has no method {method!r}")

    def _windows(self, st: dict, pk: dict) -> list[dict]:
        st["have"] += pk["frames"]
        if pk["end"]:
            st["total"] = st["have"]
        S, L, out = st["stride"], self.lookahead, []
        while True:
            t0 = st["window"] * S
            if st["total"] is not None:
                if t0 >= st["total"]:
                    break
                n = min(S, st["total"] - t0)
            elif st["have"] < t0 + S + L:
                break
            else:
                n = S
            out.append({"iid": pk["iid"], "t0": t0, "frames": n, "end": False, "t_cut": time.perf_counter()})
            st["window"] += 1
        if pk["end"]:
            if out:
                out[-1]["end"] = True
            else:
                out.append({"iid": pk["iid"], "t0": st["have"], "frames": 0, "end": True, "t_cut": time.perf_counter()})
        return out

    def _packet(self, w: dict):
        import pyarrow as pa

        from .. import schemas
        from ..stages import Packet

        p = Packet(w["iid"], end=w["end"])
        n = w["frames"]
        if n:
            frames = np.arange(w["t0"], w["t0"] + n, dtype=np.int64)
            p.batches[schemas.MOTION_WINDOW.name] = pa.RecordBatch.from_arrays(
                [pa.array([w["iid"]] * n), pa.array(frames), pa.array(frames / FPS), pa.array(frames),
                 pa.array(np.zeros(n, np.int64)),
                 schemas.tensor_array(np.zeros((n, self.channels), np.float32))],
                names=["session_id", "seq", "pts", "frame", "window", "motion"])
        return p


class _Cluster:
    """The stand-in replicas on their own event loop in a thread: one FIFO worker task per replica."""

    def __init__(self, counts: dict[str, int], stand_ins: _StandIns):
        self.counts = counts
        self.do = stand_ins
        self.loop = asyncio.new_event_loop()
        self.queues: dict[tuple, asyncio.Queue] = {}
        self.cpu_s = 0.0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="stand-in-cluster", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        cpu0 = time.thread_time()
        for stage, n in self.counts.items():
            for i in range(n):
                q = self.queues[(stage, i)] = asyncio.Queue()
                self.loop.create_task(self._replica(stage, i, q))
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()
        self.cpu_s = time.thread_time() - cpu0

    async def _replica(self, stage: str, replica: int, q: asyncio.Queue) -> None:
        while True:
            method, args, futs = await q.get()
            try:
                vals = [await asyncio.wrap_future(a) if isinstance(a, cf.Future) else a for a in args]
                s = self.do.begin(stage, replica, method, vals)
                if s > 0:
                    await asyncio.sleep(s)
                    self.do.busy[(stage, replica)] += s
                out = self.do.run(stage, replica, method, vals)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the result
                for f in futs:
                    if not f.done():
                        f.set_exception(e)
                continue
            if len(futs) == 1:
                futs[0].set_result(out)
            else:
                for f, v in zip(futs, out):
                    f.set_result(v)

    def submit(self, stage: str, replica: int, method: str, args, futs) -> None:
        self.loop.call_soon_threadsafe(self.queues[(stage, replica)].put_nowait, (method, args, futs))

    def stop(self) -> None:
        async def shutdown():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()
        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self._thread.join(10)
        self.loop.close()


class SimBackend:
    """The serving backend's interface (``RayBackend``'s) over the stand-in cluster; routing by the real
    :class:`~echo_stream.serve.routing.Router`."""

    def __init__(self, counts: dict[str, int], cluster: _Cluster):
        from .routing import Router

        self.counts = counts
        self.cluster = cluster
        self.router = Router(counts)

    def call(self, stage: str, method: str, *args, num_returns: int = 1, replica: int = 0, session=None):
        futs = [cf.Future() for _ in range(num_returns)]
        self.cluster.submit(stage, replica, method, args, futs)
        return futs[0] if num_returns == 1 else tuple(futs)

    async def get(self, handle):
        return await asyncio.wrap_future(handle)

    def put(self, value):
        return value

    def replica_count(self, stage: str) -> int:
        return self.counts[stage]

    def assign(self, session_id: str, warm: dict | None = None):
        return self.router.assign(session_id, warm)

    def release(self, route, session: str | None = None) -> None:
        self.router.release(route)

    def is_fault(self, exc: BaseException) -> bool:
        return False

    def cancel(self, handles) -> None:
        for h in handles:
            h.cancel()

    async def wait_ready(self, timeout: float = 60.0, route=None, move_after_s: float = 1.0) -> None:
        return None

    async def incarnations(self, timeout: float = 10.0, route=None) -> dict:
        keys = [(s, route[s]) for s in STAGES] if route is not None else \
            [(s, i) for s, n in self.counts.items() for i in range(n)]
        return {k: "stand-in" for k in keys}


# ---------------------------------------------------------------------------------------------- the fleet
@dataclass
class Scenario:
    sessions: int
    replicas: dict[str, int]
    costs: StageCosts
    duration_s: float = 20.0
    ramp_s: float = 5.0            # sessions open evenly over this long
    stride: int | None = None      # motion-only sessions' new frames per window (None: the config's)
    max_batch: int = 64
    batch_wait_s: float = 0.004
    config: str = "tiny"
    label: str = ""
    #: every clock the sessions and stand-ins see runs this many times slower (client pacing, stage costs, the
    #: batcher's wait, the ramp); latencies are divided by it again. The ingress's own CPU work is not slowed:
    #: > 1 models an ingress with enough CPU for the fleet (see the module docstring)
    time_scale: float = 1.0


def auto_replicas(sessions: int, costs: StageCosts, geometry, stride: int | None, chunk_frames: int,
                  given: dict[str, int], busy: float = 0.6) -> dict[str, int]:
    """Replicas per stage: ``given`` where named, else enough that each replica of a chain stage (and
    render) is at most ``busy`` busy at the offered load (one chain per ``chunk_frames`` frames; the
    window-ready pushes of the session add one per window); diffusion must be named."""
    s = geometry.stride(stride)
    per_s = FPS / min(chunk_frames, s) + FPS / s       # chains per second per session (upper bound)
    win_s = FPS / s
    need = {st: sessions * per_s * c for st, c in costs.chain_s().items()}
    need["render"] = sessions * win_s * costs.render_ms / 1e3
    out = {}
    for st in STAGES:
        if st in given:
            out[st] = given[st]
        elif st == BATCHED:
            raise InputError("--replicas", f"name the {BATCHED} replicas (e.g. {BATCHED}=64): they are what is "
                                           "being sized")
        else:
            out[st] = max(1, math.ceil(need[st] / busy))
    return out


#: seconds of avatar audio per client message (as `echo-stream client` and `bench serve` send)
CHUNK_S = 0.08


def client_frames(seconds: float) -> int:
    """Frames a simulated client's audio makes: ``seconds`` rounded up to whole messages of ``CHUNK_S``."""
    return math.ceil(round(math.ceil(seconds / CHUNK_S - 1e-9) * CHUNK_S * 25, 6))


def _client_messages(seconds: float, t_start: float, chunk_s: float = CHUNK_S, time_scale: float = 1.0):
    """A real-time client: ``seconds`` of 16 kHz PCM (rounded up to whole messages) in ``chunk_s`` messages on
    the clock, ``time_scale`` times slower (the config is the session's spec, not a message here)."""
    from ..protos import echo_stream_pb2 as pb

    n = int(round(chunk_s * SAMPLE_RATE))
    pcm = np.zeros(n, "<i2").tobytes()

    async def gen():
        loop = asyncio.get_running_loop()
        k = 0
        while k < math.ceil(seconds / chunk_s - 1e-9):
            wait = t_start + k * chunk_s * time_scale - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            k += 1
            yield pb.ClientMessage(seq=k, pts=(k - 1) * chunk_s, avatar_audio=pb.AudioChunk(
                pcm_s16le=pcm, sample_rate=SAMPLE_RATE, channels=1))
    return gen()


async def _fleet(sc: Scenario, backend: SimBackend, opts) -> dict:
    from ..protos import echo_stream_pb2 as pb
    from . import wire
    from .batching import WindowBatcher
    from .server import AvatarServer
    from .session import Session

    server = AvatarServer(backend, opts)
    batchers = [WindowBatcher(backend, opts.max_batch, opts.batch_wait_s, replica=i)
                for i in range(backend.replica_count(BATCHED))]
    for b in batchers:
        b.start()
    loop = asyncio.get_running_loop()
    config = pb.ClientMessage(seq=0, config=pb.SessionConfig(output_mode=pb.OUTPUT_MODE_MOTION,
                                                             stride_frames=sc.stride or 0))
    lag: list[float] = []
    stop = asyncio.Event()

    async def watch_lag():                      # how late the event loop wakes a 50 ms timer
        while not stop.is_set():
            t = loop.time()
            await asyncio.sleep(0.05)
            lag.append(loop.time() - t - 0.05)

    async def one(i: int) -> dict:
        await asyncio.sleep(sc.time_scale * sc.ramp_s * i / max(1, sc.sessions))
        spec = wire.session_spec(config, opts.limits, {})
        s = Session(f"sim{i:05d}", "sim", spec, backend, batchers, opts.limits, opts.chunk_frames,
                    opts.max_inflight, stride=opts.stride_for(spec), geometry=opts.geometry)
        frames, nbytes = [], 0
        try:
            await s.open()
            s.start()
            reader = loop.create_task(server._read(s, _client_messages(sc.duration_s, loop.time(),
                                                                       time_scale=sc.time_scale)))
            async for msg in server._outputs(s):
                nbytes += len(msg.SerializeToString())
                if msg.WhichOneof("body") == "motion":
                    frames.append(msg.motion.frame)
            reader.cancel()
        finally:
            await s.close()
        return {"frames": frames, "latencies": list(s.stats.latencies), "first_frame_s": s.stats.first_frame_latency_s,
                "failure": s.failure.message if s.failure else None, "route": dict(s.route), "bytes": nbytes}

    watcher = loop.create_task(watch_lag())
    cpu0, t0 = time.thread_time(), time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(sc.sessions)))
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - t0
    stop.set()
    await watcher
    for b in batchers:
        await b.stop()
    return {"sessions": results, "ingress_cpu_s": cpu, "wall_s": wall, "loop_lag": lag,
            "batcher_max_seen": max(b.max_seen for b in batchers)}


def simulate(sc: Scenario) -> dict:
    """Run one scenario (the fleet, in real time); returns its figures and checks."""
    from .server import ServeOptions

    opts = ServeOptions.for_model(sc.config, motion_stride=sc.stride, max_batch=sc.max_batch,
                                  batch_wait_s=sc.batch_wait_s * sc.time_scale, max_sessions=sc.sessions)
    stand_ins = _StandIns(sc.costs, opts.geometry, sc.time_scale)
    cluster = _Cluster(sc.replicas, stand_ins)
    try:
        run = asyncio.run(_fleet(sc, SimBackend(sc.replicas, cluster), opts))
    finally:
        cluster.stop()
    return _figures(sc, run, stand_ins, cluster.cpu_s, opts)


def _pct(x, q):
    return float(np.percentile(x, q)) if len(x) else None


def _figures(sc: Scenario, run: dict, si: _StandIns, cluster_cpu_s: float, opts) -> dict:
    stride = opts.geometry.stride(sc.stride)
    expected = client_frames(sc.duration_s)
    sessions = run["sessions"]
    k = sc.time_scale
    lat = np.concatenate([np.asarray(s["latencies"]) for s in sessions]) / k if sessions else np.zeros(0)
    waits = np.asarray(si.window_waits) / k
    sizes = np.asarray([n for _, _, n in si.diffusion_calls])
    lat_q, wait_q = _quantiles(lat), _quantiles(waits)      # percentiles 0..100, once
    per_replica = Counter(r for r, _, _ in si.diffusion_calls)
    in_order = all(s["frames"] == list(range(expected)) for s in sessions)
    session_s = sc.sessions * expected / FPS
    busy = {f"{st}/{i}": round(v / run["wall_s"], 4) for (st, i), v in sorted(si.busy.items())}
    by_stage = defaultdict(list)
    for (st, _), v in si.busy.items():
        by_stage[st].append(v / run["wall_s"])
    return {
        "label": sc.label, "sessions": sc.sessions, "replicas": sc.replicas, "stride": stride,
        "duration_s": sc.duration_s, "ramp_s": sc.ramp_s, "max_batch": sc.max_batch,
        "batch_wait_ms": sc.batch_wait_s * 1e3, "time_scale": k, "wall_s": run["wall_s"],
        "frame_latency_s": {"p50": _at(lat_q, 50), "p90": _at(lat_q, 90), "p99": _at(lat_q, 99),
                            "max": _at(lat_q, 100)},
        "frame_latency_quantiles_s": lat_q,
        "window_wait_quantiles_s": wait_q,
        "first_frame_latency_s_max": max((s["first_frame_s"] or 0.0) for s in sessions) / k if sessions else None,
        "window_wait_s": {"p50": _at(wait_q, 50), "p99": _at(wait_q, 99), "max": _at(wait_q, 100)},
        "diffusion_batches": {"calls": int(sizes.size), "mean": float(sizes.mean()) if sizes.size else None,
                              "p50": _pct(sizes, 50), "p99": _pct(sizes, 99),
                              "max": int(sizes.max()) if sizes.size else 0,
                              "histogram": {int(k): int(v) for k, v in sorted(Counter(sizes.tolist()).items())},
                              "replicas_used": len(per_replica)},
        "sessions_per_diffusion_replica": _spread(Counter(s["route"][BATCHED] for s in sessions), sc.replicas[BATCHED]),
        "replica_busy_share": {st: {"mean": float(np.mean(v)), "max": float(np.max(v))} for st, v in by_stage.items()},
        "replica_busy_share_each": busy,
        "ingress": {"cpu_s": run["ingress_cpu_s"], "session_s": session_s,
                    "cpu_per_session": run["ingress_cpu_s"] / session_s if session_s else None,
                    "sessions_per_core_at_100pct": session_s / run["ingress_cpu_s"] if run["ingress_cpu_s"] else None,
                    "loop_lag_s": {"p50": _pct(run["loop_lag"], 50), "p99": _pct(run["loop_lag"], 99),
                                   "max": max(run["loop_lag"]) if run["loop_lag"] else None},
                    "bytes_out_per_session_s": sum(s["bytes"] for s in sessions) / session_s if session_s else None},
        "stand_in_cluster_cpu_s": cluster_cpu_s,
        "checks": {
            "sessions_failed": [s["failure"] for s in sessions if s["failure"]],
            "frames_expected_per_session": expected,
            "every_frame_once_in_order": in_order,
            "windows_generated": sum(si.generated.values()),
            "windows_expected": sc.sessions * math.ceil(expected / stride),
            "every_window_once": bool(si.generated) and max(si.generated.values()) == 1,
            "batches_within_max_batch": bool(sizes.size == 0 or sizes.max() <= sc.max_batch),
            "batcher_max_seen": run["batcher_max_seen"],
        },
    }


def _quantiles(x) -> list:
    """Percentiles 0, 1, ..., 100 (for the plot and the summaries)."""
    return [float(v) for v in np.percentile(x, np.arange(101))] if len(x) else []


def _at(quantiles: list, q: int) -> float | None:
    """Percentile ``q`` from :func:`_quantiles`' list (None when there were no values)."""
    return quantiles[q] if quantiles else None


def _spread(counts: Counter, n: int) -> dict:
    v = [counts.get(i, 0) for i in range(n)]
    return {"min": min(v), "max": max(v), "mean": float(np.mean(v))}


# ---------------------------------------------------------------------------------------------- the command
def _costs(args) -> StageCosts:
    if args.costs in ("measure", "gpu-assumed"):
        print("measuring the tiny model's stage costs on this CPU ...", flush=True)
        # with assumed GPU costs only batch 1 is timed (render is timed on its output; the rest is replaced)
        costs = measure_cpu_costs(args.config, sizes=(1,) if args.costs == "gpu-assumed" else (1, 2, 4, 8, 16, 32))
    else:
        try:
            with open(args.costs) as f:
                d = json.load(f)
            costs = StageCosts.load(d.get("costs", d) if isinstance(d, dict) else d)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError("--costs", f"{args.costs}: not 'measure', 'gpu-assumed' or a JSON file with a 'costs' "
                                        f"object of an earlier run ({type(e).__name__}: {e})") from None
    if args.costs == "gpu-assumed":
        base, per = _gpu_ms(args.gpu_batch_ms)
        costs = costs.with_gpu_diffusion(base, per)
    return costs


def _gpu_ms(text: str) -> tuple[float, float]:
    try:
        base, per = (float(x) for x in text.split(","))
    except ValueError:
        raise InputError("--gpu-batch-ms", f"{text!r} is not BASE,PER_WINDOW (two numbers of milliseconds, "
                                           "e.g. 8,0.4)") from None
    if not (base >= 0 and per > 0 and math.isfinite(base + per)):
        raise InputError("--gpu-batch-ms", f"{text!r}: BASE must be >= 0 and PER_WINDOW > 0 ms")
    return base, per


def _counts(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise InputError("--sessions", f"{text!r} is not a comma-separated list of session counts >= 1")
    return out


def run(args) -> int:
    from ..geometry import WindowGeometry
    from ..config import get_config
    from ..machine import environment

    if args.plot:
        try:
            with open(args.plot) as f:
                result = json.load(f)
            png = os.path.splitext(args.plot)[0] + ".png"
            plot(result, png)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError("--plot", f"{args.plot}: not a capacity JSON ({type(e).__name__}: {e})") from None
        print(f"wrote {png}")
        return 0
    counts = _counts(args.sessions)
    given = parse_replicas(args.replicas)
    # every argument is checked before anything is measured or simulated (minutes)
    if not (args.duration > 0 and math.isfinite(args.duration)):
        raise InputError("--duration", f"{args.duration}: the session length must be a number of seconds > 0")
    if not (args.ramp >= 0 and math.isfinite(args.ramp)):
        raise InputError("--ramp", f"{args.ramp}: must be a number of seconds >= 0")
    if not (args.time_scale >= 1 and math.isfinite(args.time_scale)):
        raise InputError("--time-scale", f"{args.time_scale}: must be a number >= 1 (1 = real time)")
    if args.max_batch < 1:
        raise InputError("--max-batch", f"{args.max_batch}: must be 1 or more windows per diffusion call")
    if not (args.batch_wait_ms >= 0 and math.isfinite(args.batch_wait_ms)):
        raise InputError("--batch-wait-ms", f"{args.batch_wait_ms}: must be a number of milliseconds >= 0")
    if args.costs == "gpu-assumed":
        _gpu_ms(args.gpu_batch_ms)
    try:
        geometry = WindowGeometry.of(get_config(args.config))
    except ValueError as e:
        raise InputError("--config", str(e)) from None
    stride = geometry.stride(args.stride, "--stride") if args.stride is not None else None
    path = os.path.join(args.out, args.name or f"capacity_{args.costs if args.costs in ('measure', 'gpu-assumed') else 'file'}.json")
    atomic.output_dir(args.out)
    costs = _costs(args)
    print(f"costs ({costs.source}): push {costs.push_ms:.1f} ms, features {costs.features_ms:.1f} ms, memory "
          f"{costs.memory_ms:.1f} ms per chain; diffusion {costs.diffusion_ms} ms per call; render "
          f"{costs.render_ms:.2f} ms per window", flush=True)
    rows = []
    # the process's first sessions pay one-off costs (imports, first Arrow / protobuf conversions): not the baseline
    simulate(Scenario(2, auto_replicas(2, costs, geometry, stride, 16, given), costs, 1.0, 0.0, stride,
                      args.max_batch, args.batch_wait_ms / 1e3, args.config, "warm-up"))
    base_sc = Scenario(1, auto_replicas(1, costs, geometry, stride, 16, given), costs, args.duration, 0.0,
                       stride, args.max_batch, args.batch_wait_ms / 1e3, args.config, "baseline: 1 session alone",
                       args.time_scale)
    baseline = simulate(base_sc)
    print(f"baseline (1 session): frame latency p50 {baseline['frame_latency_s']['p50']:.3f} s, p99 "
          f"{baseline['frame_latency_s']['p99']:.3f} s", flush=True)
    for n in counts:
        reps = auto_replicas(n, costs, geometry, stride, 16, given)
        sc = Scenario(n, reps, costs, args.duration, args.ramp, stride, args.max_batch, args.batch_wait_ms / 1e3,
                      args.config, f"{n} sessions", args.time_scale)
        row = simulate(sc)
        row["added_p99_s"] = row["frame_latency_s"]["p99"] - baseline["frame_latency_s"]["p99"]
        rows.append(row)
        print(f"N={n} over {reps[BATCHED]} {BATCHED} replicas: frame latency p50 {row['frame_latency_s']['p50']:.3f} "
              f"p99 {row['frame_latency_s']['p99']:.3f} s (+{row['added_p99_s']:.3f} s over one alone); window wait "
              f"p99 {1e3 * row['window_wait_s']['p99']:.1f} ms; batch mean {row['diffusion_batches']['mean']:.2f} max "
              f"{row['diffusion_batches']['max']}; ingress CPU {1e3 * row['ingress']['cpu_per_session']:.2f} ms per "
              f"session-second, loop lag p99 {1e3 * row['ingress']['loop_lag_s']['p99']:.1f} ms; checks "
              f"{_checks_line(row['checks'])}", flush=True)
    result = {"benchmark": "capacity", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment(),
              "config": {"model_config": args.config, "sessions": counts, "replicas_given": given or "auto",
                         "duration_s": args.duration, "ramp_s": args.ramp, "output": "motion only",
                         "stride": geometry.stride(stride), "max_batch": args.max_batch,
                         "batch_wait_ms": args.batch_wait_ms, "costs_from": args.costs,
                         "time_scale": args.time_scale},
              "costs": asdict(costs), "what_is_real": __doc__.split("\n\n")[1:4],
              "definitions": {
                  "frame_latency": "avatar-audio arrival at the ingress -> the frame leaving the egress (Session's own "
                                   "measurement); includes the structural wait for a window's audio",
                  "added_p99_s": "fleet p99 minus the p99 of one session alone on the same stand-ins",
                  "window_wait": "the stand-in memory stage cut a window -> its diffusion batch started (the "
                                 "ingress's fetch and the batcher's queue)",
                  "ingress cpu_per_session": "CPU seconds of the ingress thread per session-second served",
                  "replica_busy_share": "seconds a stand-in replica slept on work / wall seconds"},
              "baseline": baseline, "results": rows}
    atomic.write_text(path, json.dumps(result, indent=2, default=str))
    png = os.path.splitext(path)[0] + ".png"
    plot(result, png)
    print(f"wrote {path} and {png}")
    return 0 if all(_checks_ok(r["checks"]) for r in rows) else 1


def _checks_ok(c: dict) -> bool:
    return (not c["sessions_failed"] and c["every_frame_once_in_order"] and c["every_window_once"]
            and c["windows_generated"] == c["windows_expected"] and c["batches_within_max_batch"])


def _checks_line(c: dict) -> str:
    return "ok" if _checks_ok(c) else f"FAILED {c}"


def plot(result: dict, path: str) -> None:
    """Frame latency and window wait by percentile (each run and the session alone); batch sizes per call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    q = np.arange(101)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, scale, title in ((axes[0], "frame_latency_quantiles_s", 1.0, "frame latency (arrival -> egress), s"),
                                  (axes[1], "window_wait_quantiles_s", 1e3, "window cut -> its diffusion call, ms")):
        for j, r in enumerate([result["baseline"]] + rows):
            if r.get(key):
                alone = r is result["baseline"]
                ax.plot(q, scale * np.asarray(r[key]), linestyle="--" if alone else "-", color=f"C{j}",
                        label="1 session alone" if alone else f"{r['sessions']} sessions / {r['replicas'][BATCHED]} "
                                                               f"{BATCHED} replicas")
        ax.set_xlabel("percentile")
        ax.set_title(title)
        ax.legend(fontsize=8)
    ax = axes[2]
    width = 0.8 / max(1, len(rows))
    for j, r in enumerate(rows):
        h = r["diffusion_batches"]["histogram"]
        total = sum(h.values()) or 1
        ax.bar(np.asarray([int(k) for k in h]) + j * width, [v / total for v in h.values()], width=width,
               color=f"C{j + 1}",
               label=f"{r['sessions']} sessions (mean {r['diffusion_batches']['mean']:.1f})")
    ax.set_xlabel("windows per diffusion call")
    ax.set_ylabel("share of calls")
    ax.set_title("batch sizes")
    ax.legend(fontsize=8)
    k = result["config"].get("time_scale", 1.0)
    fig.suptitle(f"capacity simulation (real ingress, stand-in stages{'' if k == 1 else f', time scale {k:g}'}): "
                 f"{result['costs']['source']}", fontsize=8, wrap=True)
    fig.tight_layout()

    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

if __name__ == "__main__":      # measure_cpu_costs's child: its costs as one JSON line
    import sys

    print(json.dumps(asdict(_measure_here(**json.loads(sys.argv[1])))))

"""Pipeline wiring: stage hosts, the runners (inline or Ray actors), and the streaming session driver.

::

    ingress ─▶ decode ─▶ features ─▶ context memory ─▶ motion diffusion ─▶ render ─▶ egress

The *same* driver loop (:func:`stream_session`) runs on either runner:

* :class:`RayRunner` — each stage is a Ray actor (``echo_stream.actors``); the
  driver chains object refs, so the stages work on consecutive chunks at the
  same time; at most ``max_inflight`` chunks are in flight (backpressure);
* :class:`InlineRunner` — the same stage objects called in-process (tests,
  debugging, profiling).

Chunks are fed in pts order as a live stream would arrive them: the driver
pulls one chunk (``chunk_frames`` frames of audio) at a time from decode and
never reads ahead of what it has submitted by more than ``max_inflight``
chunks; features wait for 80 ms of lookahead at most.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from . import config, schemas
from .chain import (BATCHED, PIPELINE, STAGES, StageSpec, local_call, parse_replicas,  # noqa: F401 (re-exported)
                    replica_counts, run_chain, stage_after, stage_before)
from .cluster import ensure_pipeline_ray
from .errors import InputError
from .stages import Packet, Stage
from .stages.host import StageHost

log = logging.getLogger(__name__)

def load_model(checkpoint: str | None, config: str | None, device: str = "cpu"):
    """Load the model a stage runs: a checkpoint path, or the bundled default checkpoint."""
    from .model import load_checkpoint, load_default_model
    from .config import get_config
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    if checkpoint:
        return load_checkpoint(checkpoint, config=get_config(config) if config else None, device=device)
    return load_default_model(get_config(config or "tiny")).to(device)


@dataclass
class PipelineOptions:
    checkpoint: str | None = None
    config: str | None = None
    device: str = "cpu"
    size: tuple[int, int] = (256, 256)
    chunk_frames: int = 8
    max_inflight: int = 4
    #: new frames per generation window (None: the model config's new_frames; shorter = lower latency)
    stride: int | None = None
    #: guidance on the user branch (``EchoModel.sample``): 1 = none; > 1 amplifies the reactions, 2x the
    #: diffusion cost (experimental: see README, "The model and its weights")
    user_guidance: float = 1.0
    #: actors per stage (``--replicas diffusion=2,render=2``; stages not named: 1). Serving routes every call
    #: of a session to one replica per stage (``serve.routing``); generate uses replica 0 of each
    replicas: dict[str, int] = field(default_factory=dict)
    #: the most replicas an autoscaled stage may reach (``serve --autoscale``): the start checks the cluster's
    #: CPUs and GPUs against these, so that scaling up never waits for resources the cluster lacks
    max_replicas: dict[str, int] = field(default_factory=dict)
    #: autoscaled stages, ``{stage: serve.autoscale.ScaleSpec}`` (``serve --autoscale``): the Serve engine gives
    #: their deployments an ``autoscaling_config`` (the actor engine's autoscaler is the server's own)
    autoscale: dict = field(default_factory=dict)
    #: reserve each GPU stage's GPU share per replica: None = with a CUDA device (the normal case). True
    #: reserves them whatever the device: a test seam, to check placement on fake GPU resources
    #: (``ray.init(num_gpus=2)``) with actors that compute on the CPU
    reserve_gpus: bool | None = None
    #: a stage actor / Serve replica closes the state of a session that had no call for this long (None:
    #: never); ``serve --stage-idle-timeout``: the state an abruptly lost ingress left behind
    stage_idle_s: float | None = None

    def model_loader(self) -> Callable:
        return functools.partial(load_model, self.checkpoint, self.config, self.device)


#: GPU share each GPU stage's actor reserves with ``--device cuda`` (Ray ``num_gpus``): both fit one GPU
GPU_SHARES = {s.name: s.gpu_share for s in PIPELINE if s.gpu_share}


def reserves_gpus(device: str, reserve: bool | None = None) -> bool:
    """Whether the GPU stages' actors reserve their GPU shares (``PipelineOptions.reserve_gpus``)."""
    return str(device).startswith("cuda") if reserve is None else bool(reserve)


def gpu_resources(stages: dict[str, Stage], device: str, reserve: bool | None = None) -> None:
    """With a CUDA device (or ``reserve``), give each GPU stage its GPU share (so Ray places and counts GPU
    work, and sets each actor's ``CUDA_VISIBLE_DEVICES``); every replica of the stage reserves it."""
    if reserves_gpus(device, reserve):
        for name, share in GPU_SHARES.items():
            stages[name].resources = {**stages[name].resources, "num_gpus": share}


def gpu_demand(replicas: dict[str, int] | None = None) -> dict[str, float]:
    """GPUs each GPU stage reserves in all: its share times its replica count."""
    counts = replica_counts(replicas)
    return {name: share * counts[name] for name, share in GPU_SHARES.items()}


def check_gpu_capacity(device: str, cluster_gpus: float, replicas: dict[str, int] | None = None,
                       reserve: bool | None = None) -> None:
    """Refuse ``--device cuda`` on a Ray cluster without the GPUs the GPU stages' replicas reserve (Ray would
    otherwise wait forever for resources that never come). Counts the cluster's GPUs in all, not per node: a
    share is never split over two GPUs, so a cluster of 0.5-GPU leftovers can still leave a replica pending."""
    if not reserves_gpus(device, reserve):
        return
    counts, demand = replica_counts(replicas), gpu_demand(replicas)
    need = sum(demand.values())
    if cluster_gpus + 1e-9 < need:
        parts = ", ".join(f"{name} {counts[name]} x {GPU_SHARES[name]:g}" for name in demand)
        raise InputError("--device", f"{device} asks for {need:g} GPU ({parts} replicas x GPU share) but the "
                                     f"Ray cluster has {cluster_gpus:g}: start Ray on a machine or cluster with "
                                     "GPUs (ray start --num-gpus N), use fewer --replicas, or use --device cpu")


def check_cpu_capacity(stages: dict[str, Stage], cluster_cpus: float, replicas: dict[str, int] | None = None) -> None:
    """Refuse a pipeline whose actors reserve more CPUs (Ray ``num_cpus``, per replica) than the Ray cluster has:
    Ray would otherwise leave the last actors pending, and the start would wait forever."""
    counts = replica_counts(replicas)
    demand = {name: st.resources.get("num_cpus", 0.5) * counts[name] for name, st in stages.items()}
    need = sum(demand.values())
    if cluster_cpus + 1e-9 < need:
        parts = ", ".join(f"{name} {counts[name]} x {stages[name].resources.get('num_cpus', 0.5):g}" for name in demand)
        replicated = any(n > 1 for n in counts.values())
        raise InputError("--replicas" if replicated else "--num-cpus",
                         f"the stage actors reserve {need:g} CPUs ({parts}: replicas x CPUs each) but the Ray "
                         f"cluster has {cluster_cpus:g}: " + ("use fewer --replicas, or " if replicated else "")
                         + "give Ray more CPUs (--num-cpus N for a local Ray, which may exceed the cores; or a "
                           "bigger cluster)")


def build_stages(opts: PipelineOptions) -> dict[str, Stage]:
    """The five stage objects (not set up: each loads its models in ``setup`` where it runs)."""
    from .stages.decode import DecodeStage
    from .stages.diffusion import DiffusionStage
    from .stages.features import FeaturesStage
    from .stages.memory import MemoryStage
    from .stages.render import RenderStage

    loader = opts.model_loader()
    return {
        "decode": DecodeStage(chunk_frames=opts.chunk_frames),
        "features": FeaturesStage(),
        "memory": MemoryStage(model_loader=loader, stride=opts.stride),
        "diffusion": DiffusionStage(model_loader=loader, device=opts.device, stride=opts.stride,
                                    user_guidance=opts.user_guidance),
        "render": RenderStage(device=opts.device),
    }


class InlineRunner:
    """Runs every stage in this process (no Ray)."""

    def __init__(self, opts: PipelineOptions, stages: dict[str, Stage] | None = None):
        stages = stages or build_stages(opts)
        self.hosts = {name: StageHost(lambda s=stages[name]: s) for name in STAGES}

    def setup(self) -> dict[str, float]:
        return {n: h.setup() for n, h in self.hosts.items()}

    def call(self, stage: str, method: str, *args, num_returns: int = 1, replica: int = 0):
        if replica:
            raise ValueError(f"the inline runner has one {stage} stage, not replica {replica}")
        args = [a.value if isinstance(a, _Done) else a for a in args]
        value = self.hosts[stage].call(method, *args)
        return tuple(_Done(v) for v in value) if num_returns > 1 else _Done(value)

    def get(self, handle):
        if isinstance(handle, list):
            return [h.value for h in handle]
        return handle.value

    def stats(self) -> dict:
        return {n: h.stats() for n, h in self.hosts.items()}

    def shutdown(self) -> None:
        pass


@dataclass
class _Done:
    value: Any


class RayRunner:
    """Runs every stage as a Ray actor (local Ray unless ``address`` is given)."""

    def __init__(self, opts: PipelineOptions, address: str | None = None, num_cpus: int | None = None,
                 max_restarts: int = 0):
        """``max_restarts``: how often Ray restarts a stage actor that dies (-1: always; serving)."""
        import ray

        self.ray = ray
        self._owns_ray = ensure_pipeline_ray(address, num_cpus)
        stages = build_stages(opts)
        gpu_resources(stages, opts.device, opts.reserve_gpus)
        try:
            counts = replica_counts(opts.replicas)
            most = {s: max(n, opts.max_replicas.get(s, n)) for s, n in counts.items()}
            have = ray.cluster_resources()
            check_gpu_capacity(opts.device, float(have.get("GPU", 0)), most, opts.reserve_gpus)
            check_cpu_capacity(stages, float(have.get("CPU", 0)), most)
        except InputError:
            if self._owns_ray:
                ray.shutdown()
            raise
        self._stages, self._max_restarts = stages, max_restarts
        self._idle_close_s = opts.stage_idle_s
        #: every stage's actors, replica 0 first; a stage of N > 1 replicas is spread over the cluster's nodes
        #: (Ray's SPREAD strategy: a lost node takes as few of them as it can)
        self.replicas = {name: [self._new_actor(name, spread=most[name] > 1) for _ in range(counts[name])]
                         for name in STAGES}
        #: replica 0 of each stage (what a single-session driver such as generate uses)
        self.actors = {name: reps[0] for name, reps in self.replicas.items()}

    def _new_actor(self, stage: str, spread: bool):
        from .actors import make_stage_actor

        return make_stage_actor(self._stages[stage], max_restarts=self._max_restarts,
                                idle_close_s=self._idle_close_s,
                                **({"scheduling_strategy": "SPREAD"} if spread else {}))

    def start_replica(self, stage: str, timeout: float = 300.0):
        """A new, set-up actor of ``stage`` (blocks while it loads and warms its models); not yet in
        ``replicas``: the caller adds it (autoscaling, ``serve.autoscale``). Raises TimeoutError (the actor
        killed) when it is not up within ``timeout`` s (e.g. no resources for it)."""
        actor = self._new_actor(stage, spread=True)
        try:
            self.ray.get(actor.setup.remote(), timeout=timeout)
        except BaseException:
            self.ray.kill(actor)
            raise
        return actor

    def _all(self):
        """``(label, actor)`` of every replica: ``"diffusion"`` for replica 0, ``"diffusion#1"`` ... after it."""
        return [(name if i == 0 else f"{name}#{i}", a) for name, reps in self.replicas.items()
                for i, a in enumerate(reps)]

    def setup(self) -> dict[str, float]:
        refs = [(label, a.setup.remote()) for label, a in self._all()]
        return {label: self.ray.get(r) for label, r in refs}

    def call(self, stage: str, method: str, *args, num_returns: int = 1, replica: int = 0):
        actor = self.replicas[stage][replica]
        if method == "ping":                   # answered on the actor's own ping thread, not behind its work
            return actor.ping.remote()
        if num_returns > 1:
            return actor.call.options(num_returns=num_returns).remote(method, *args)
        return actor.call.remote(method, *args)

    def get(self, handle):
        return self.ray.get(handle)

    def stats(self) -> dict:
        labels, actors = zip(*self._all())
        return dict(zip(labels, self.ray.get([a.stats.remote() for a in actors])))

    def placements(self, timeout: float | None = None) -> dict[str, list[dict]]:
        """Where each replica runs: ``{stage: [{"node_id", "gpu_ids", "cuda_visible_devices", "pid"}, ...]}``."""
        refs = {name: [a.placement.remote() for a in reps] for name, reps in self.replicas.items()}
        return {name: self.ray.get(r, timeout=timeout) for name, r in refs.items()}

    def shutdown(self) -> None:
        for _, a in self._all():
            self.ray.kill(a)
        if self._owns_ray:
            self.ray.shutdown()


@dataclass
class SessionInputs:
    portrait: str | bytes | None
    avatar_audio: str
    user_video: str | None = None
    user_audio: str | None = None
    transcript: list = field(default_factory=list)   # transcript.Segment list
    landmarks: str | None = None
    size: tuple[int, int] = (256, 256)
    seed: int | None = None


def transcript_batch(session_id: str, segments: Iterable, seq0: int = 0):
    segs = list(segments)
    return schemas.make_batch(schemas.TRANSCRIPT_SEGMENT, {
        "session_id": [session_id] * len(segs), "seq": list(range(seq0, seq0 + len(segs))),
        "pts": [s.start for s in segs], "end_pts": [s.end for s in segs],
        "speaker": [s.speaker for s in segs], "text": [s.text for s in segs]})


def open_session(runner, session_id: str, inp: SessionInputs) -> dict:
    """Prepare every stage for a session; returns what decode found in the inputs."""
    refs = [runner.call("decode", "open_session", session_id, inp.avatar_audio, inp.user_audio, inp.user_video),
            runner.call("diffusion", "set_seed", session_id, inp.seed)]
    if inp.portrait is not None:
        refs.append(runner.call("render", "open_session", session_id, inp.portrait, tuple(inp.size), inp.landmarks))
    return runner.get(refs)[0]


def close_session(runner, session_id: str) -> None:
    """Drop a session's state from every stage (after an error or a client going away)."""
    refs = [runner.call(name, "close_session", session_id) for name in STAGES]
    for r in refs:
        try:
            runner.get(r)
        except Exception:  # noqa: BLE001 - best effort: a stage that failed keeps failing
            log.debug("close_session %s failed on a stage", session_id, exc_info=True)


def stream_session(runner, session_id: str, inp: SessionInputs,
                   on_audio: Callable[[Any], None], on_output: Callable[[Packet], None],
                   max_inflight: int = 4, progress: Callable[[int], None] | None = None) -> dict:
    """Drive one session through the pipeline, chunk by chunk, in pts order.

    ``on_audio(samples)`` receives the avatar audio as decoded (for muxing);
    ``on_output(packet)`` receives each render-stage packet (MotionWindow and,
    with a portrait, RenderedFrames) in order. Returns timing figures.
    """
    pending_text = deque(sorted(inp.transcript, key=lambda s: s.start))
    text_seq = 0
    inflight: deque = deque()
    t_start = time.perf_counter()
    first_output = None
    chunks = 0

    def drain(n_keep: int) -> None:
        nonlocal first_output
        while len(inflight) > n_keep:
            for p in runner.get(inflight.popleft()):
                if first_output is None:
                    first_output = time.perf_counter() - t_start
                on_output(p)

    try:
        info = open_session(runner, session_id, inp)
        fed_until = 0.0
        while True:
            packet_ref, info_ref = runner.call("decode", "next_chunk", session_id, num_returns=2)
            chunk_info = runner.get(info_ref)
            on_audio(chunk_info["avatar_audio"])
            fed_until += len(chunk_info["avatar_audio"]) / config.SAMPLE_RATE
            # transcript segments that have "arrived" by this point of the stream go to memory first
            due = []
            while pending_text and (pending_text[0].start <= fed_until or chunk_info["end"]):
                due.append(pending_text.popleft())
            if due:
                runner.call("memory", "add_transcript", transcript_batch(session_id, due, text_seq))
                text_seq += len(due)
            inflight.append(run_chain(runner.call, packet_ref))
            chunks += 1
            if progress:
                progress(len(chunk_info["avatar_audio"]))
            drain(max_inflight)
            if chunk_info["end"]:
                break
        drain(0)
    except BaseException:
        close_session(runner, session_id)
        raise
    return {"chunks": chunks, "wall_s": time.perf_counter() - t_start, "first_output_s": first_output,
            "inputs": info}

"""Where :func:`~.conversation.process_input` runs: in this process (:func:`run_local`) or on Ray Data
(:func:`run_ray`, an actor pool of featurisers that hold the models)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from .. import features
from ..cluster import ensure_ray
from .conversation import process_input
from .inputs import Item
from .settings import Settings


def one_thread_per_library() -> None:
    """Pin this process's feature libraries to one thread each: OpenCV's pool (the face tracker's crops) and
    FFmpeg's threads (decoding, RGB conversion); LiteRT runs the face models on one thread already. A featuriser actor does this (one featuriser per CPU: the
    libraries' own threads would only oversubscribe the cores; Ray already sets ``OMP_NUM_THREADS=1`` for
    BLAS), and so does the benchmark's single-threaded sequential baseline. Outputs do not depend on it."""
    import cv2

    from .. import media

    cv2.setNumThreads(1)
    media.set_decode_threads(1)


class _Featurizer:
    """Ray Data actor: holds the models for its lifetime and featurises one conversation per call."""

    def __init__(self, settings: dict):
        self.settings = Settings(**settings)
        one_thread_per_library()
        self.tracker = make_tracker(self.settings)
        features.warmup()

    def __call__(self, batch):
        import pyarrow as pa
        import ray

        node = ray.get_runtime_context().get_node_id()
        out = {"conversation_id": [], "result": [], "table": []}
        for blob in batch.column("item").to_pylist():
            t0 = time.time()
            r = process_input(Item(**json.loads(blob)), self.settings, self.tracker)
            r["node"] = node
            table = r.pop("table")
            out["table"].append(None if table is None else _ipc(table))
            r["busy"] = [f"{node}:{os.getpid()}", t0, time.time()]   # this worker's busy interval (run summary)
            out["conversation_id"].append(r["conversation_id"])
            out["result"].append(json.dumps(r))
        return pa.table({"conversation_id": pa.array(out["conversation_id"], pa.string()),
                         "result": pa.array(out["result"], pa.string()),
                         "table": pa.array(out["table"], pa.binary())})


def _featurizer_class(settings: dict) -> type:
    """:class:`_Featurizer` with ``settings`` baked in (no constructor arguments in the object store, so a
    restarted actor never depends on an object that a lost node held)."""

    class Featurizer(_Featurizer):
        def __init__(self):
            super().__init__(settings)

    return Featurizer


def _ipc(table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(blob: bytes):
    import pyarrow as pa

    return pa.ipc.open_stream(blob).read_all()


def make_tracker(settings: Settings):
    """The face tracker for avatar video without a motion track: ``--extractor``'s, else the bundled one
    (:class:`echo_stream.face.VideoMotionTracker`), or none with ``--no-tracker``."""
    from .. import tracks

    if settings.extractor:
        return tracks.load_extractor(settings.extractor, settings.extractor_model)
    if settings.no_tracker:
        return None
    from ..face import VideoMotionTracker

    return VideoMotionTracker()


def run_local(items: Sequence[Item], settings: Settings) -> Iterator[dict]:
    """The plain sequential loop: :func:`process_input` over ``items`` in this process."""
    tracker = make_tracker(settings)
    for it in items:
        yield process_input(it, settings, tracker)


#: conversations handed to a featuriser actor at a time: the one it works on and the next (see run_ray)
_IN_FLIGHT_PER_ACTOR = 2


@dataclass
class RayOptions:
    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    workers: int | None = None          # actor pool size (default: the cluster's CPUs)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


def _ensure_ray(opts: RayOptions) -> bool:
    """Connect to / start Ray; True when this call started it (and should shut it down)."""
    return ensure_ray(opts.address, num_cpus=opts.num_cpus, num_gpus=opts.num_gpus)


def run_ray(items: Sequence[Item], settings: Settings, opts: RayOptions) -> Iterator[dict]:
    """:func:`process_input` over ``items`` on Ray Data (streaming; an autoscaling actor pool holds the models)."""
    import ray
    import ray.data

    if not items:
        return
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False          # ours shows files/s, media hours/h and ETA
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # the pool starts at its maximum size, so the autoscaler's "cannot scale up" notice is noise
    logging.getLogger("ray.data._internal.actor_autoscaler").setLevel(logging.ERROR)
    ctx.execution_options.preserve_order = False
    cpus = ray.cluster_resources().get("CPU", 1)
    n = opts.workers or max(1, int(cpus // max(opts.cpus_per_worker, 1e-6)))
    n = max(1, min(n, len(items)))
    blobs = [{"item": json.dumps(dataclasses.asdict(it))} for it in items]
    ds = ray.data.from_items(blobs, override_num_blocks=len(blobs))
    # the pool starts at n actors and may shrink to 1 (a lost node); actors restart and their tasks are
    # retried by Ray Data's defaults. Two conversations in flight per actor: the one it works on and the next,
    # already queued at the actor, so it starts at once (with one, each actor waited about 0.16 s per
    # conversation for the executor to hand it the next: 4 % of a 1-minute conversation). More would only
    # make the tail uneven (a queued conversation cannot move to an actor that has run out of work).
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=n, initial_size=n,
                                      max_tasks_in_flight_per_actor=_IN_FLIGHT_PER_ACTOR)
    ds = ds.map_batches(_featurizer_class(dataclasses.asdict(settings)), batch_size=1, batch_format="pyarrow", compute=pool,
                        num_cpus=opts.cpus_per_worker, num_gpus=opts.gpus_per_worker or None)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
        for cid, res, blob in zip(*(batch.column(c).to_pylist() for c in ("conversation_id", "result", "table"))):
            r = json.loads(res)
            r["table"] = None if blob is None else _from_ipc(blob)
            yield r

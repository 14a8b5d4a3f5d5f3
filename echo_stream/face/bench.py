"""``echo-stream bench tracker``: face-tracker speed on one CPU core, written as JSON.

Per frame of a real face video (the test suite's Pexels clip by default, or ``--video``): the whole
tracking step (mesh from the previous frame's region, both eyes, measures; detection only where the
face was lost: amortised), the streaming ``process`` (plus calibration and filter), and each model
alone. Medians and 90th percentiles over ``--repeat`` passes; the machine and versions beside them.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ..arguments.bench import add_tracker_bench_arguments as add_arguments  # noqa: F401 (the command's arguments)


def _ms(samples: list[float]) -> dict:
    a = np.asarray(samples) * 1000
    return {"median_ms": round(float(np.median(a)), 3), "p90_ms": round(float(np.percentile(a, 90)), 3),
            "mean_ms": round(float(a.mean()), 3), "n": int(a.size)}


def run(args) -> int:
    import cv2

    from .. import atomic, media
    from ..machine import environment
    from ..errors import InputError
    from . import expressions as ex
    from .mesh import roi_from_mesh
    from .tracker import FaceModels, FaceTracker

    if args.repeat < 1:
        raise InputError("--repeat", f"must be >= 1, got {args.repeat}")
    cv2.setNumThreads(1)                       # the crops' warps on this core too
    frames = [f for _, _, f in media.iter_video_frames(args.video)]
    if not frames:
        raise InputError(args.video, "no frames")
    models = FaceModels(threads=1)
    tracker = FaceTracker(models=models)
    observe, process = [], []
    for _ in range(args.repeat):
        tracker.reset()
        for f in frames:
            t0 = time.perf_counter()
            tracker.observe(f)
            observe.append(time.perf_counter() - t0)
        tracker.reset()
        for f in frames:
            t0 = time.perf_counter()
            tracker.process(f[None])
            process.append(time.perf_counter() - t0)
    det, mesh, iris = models.detector, models.mesh, models.iris
    t_det, t_mesh, t_iris, t_meas = [], [], [], []
    obs = FaceTracker(models=models).landmarks(frames[0])
    if not obs.present:
        raise InputError(args.video, "no face in the first frame: the per-model timings read the mesh there")
    roi = roi_from_mesh(obs.points)
    for f in frames[:: max(1, len(frames) // 100)]:
        t0 = time.perf_counter()
        det.detect(f)
        t_det.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = mesh.run(f, [roi])[0]
        t_mesh.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        eyes = iris.run(f, r.points)
        t_iris.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ex.measures(r.points, eyes)
        t_meas.append(time.perf_counter() - t0)
    h, w = frames[0].shape[:2]
    result = {
        "benchmark": "face tracker, one CPU core (LiteRT XNNPACK, 1 thread per model)",
        "command": f"echo-stream bench tracker --video {args.video} --repeat {args.repeat}",
        "environment": dict(environment(), litert=_litert_version()),
        "config": {"video": os.path.basename(args.video), "frames": len(frames), "frame_size": [w, h],
                   "repeat": args.repeat},
        "per_frame": {"track_step (detection amortised)": _ms(observe), "streaming process": _ms(process)},
        "per_call": {"detector (whole frame)": _ms(t_det), "mesh (one face)": _ms(t_mesh),
                     "eye model (both eyes)": _ms(t_iris), "measures": _ms(t_meas)},
    }
    result["frames_per_second_one_core"] = round(1000.0 / result["per_frame"]["streaming process"]["mean_ms"], 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("per_frame", "per_call", "frames_per_second_one_core")}, indent=2))
    return 0


def _litert_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("ai-edge-litert")
    except Exception:  # noqa: BLE001
        return None

"""``echo-stream bench pipeline``: real-time factor, start-up, per-stage time and peak memory of ``generate``.

Writes one JSON file (machine, versions, config, figures) under ``--out``.
Real-time factor = processing wall time / audio duration, start-up (Ray,
actors, model loading, librosa/numba warm-up) excluded and reported apart.
"""
from __future__ import annotations

import json
import os
import resource
import tempfile
import time

from .arguments.bench import add_pipeline_arguments as add_arguments  # noqa: F401 (the command's arguments)
from .machine import environment


def run(args) -> int:
    from .generate import GenerateRequest, generate
    from .samples import demo_inputs

    inputs = demo_inputs()
    if args.no_user:
        inputs.pop("user_video"), inputs.pop("transcript")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            req = GenerateRequest(portrait=inputs["portrait"], avatar_audio=inputs["avatar_audio"],
                                  user_video=inputs.get("user_video"), transcript=inputs.get("transcript"),
                                  out=os.path.join(tmp, f"bench{i}.mp4"), checkpoint=args.checkpoint,
                                  config=args.config, size=args.size, device=args.device)
            stats = generate(req, use_ray=not args.no_ray, progress=False, num_cpus=args.num_cpus)
            stats["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            runs.append(stats)
            print(f"run {i}: rtf {stats['rtf']:.3f}, start-up {stats['startup_s']:.2f} s, "
                  f"{stats['audio_s']:.1f} s audio in {stats['processing_s']:.2f} s")
    rtfs = sorted(r["rtf"] for r in runs)
    result = {
        "benchmark": "pipeline", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment(),
        "config": {"size": args.size, "num_cpus": args.num_cpus or os.cpu_count(), "runner": "inline" if args.no_ray else "ray",
                   "model_config": args.config or "checkpoint default", "inputs": inputs, "device": args.device},
        "median_rtf": rtfs[len(rtfs) // 2],
        "median_startup_s": sorted(r["startup_s"] for r in runs)[len(runs) // 2],
        "runs": runs,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"pipeline_{'inline' if args.no_ray else 'ray'}_{args.size}_{result['config']['num_cpus']}cpu.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {path}")
    return 0

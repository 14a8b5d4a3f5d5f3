"""``echo-stream preprocess``: the entry point (its arguments: :mod:`echo_stream.arguments.data`)."""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from ..arguments.data import PREPROCESS_EPILOG as EPILOG  # noqa: F401 (re-exported)
from ..arguments.data import add_preprocess_arguments as add_arguments  # noqa: F401 (the command's arguments)
from . import job
from .report import summary_table
from .runners import RayOptions
from .settings import Settings


def settings_from_args(args) -> Settings:
    return Settings(chunk_seconds=args.chunk_seconds, require_motion=not args.allow_no_motion,
                    length_tolerance_s=args.length_tolerance, silence_dbfs=args.silence_dbfs,
                    livelink_fps=args.livelink_fps, extractor=args.extractor, no_tracker=args.no_tracker,
                    extractor_model=None if args.extractor_model is None else str(Path(args.extractor_model).resolve()))


def run(args) -> int:
    """``echo-stream preprocess``."""
    opts = RayOptions(address=args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus, workers=args.workers,
                      gpus_per_worker=args.gpus_per_worker)

    def on_sigint(signum, frame):
        job._interrupted.set()
        signal.default_int_handler(signum, frame)

    job._interrupted.clear()
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        info = job.preprocess(args.input, args.output, settings=settings_from_args(args),
                              shard_size=args.shard_size, executor="local" if args.sequential else "ray",
                              ray_options=opts, progress=not args.quiet, fresh=args.fresh,
                              retry_quarantined=args.retry_quarantined, limit=args.limit)
    except KeyboardInterrupt:
        print(f"echo-stream preprocess: interrupted; committed shards are kept in {args.output}. "
              "Run the same command again to resume (every input is processed exactly once).", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    if not args.quiet:
        print(summary_table(info), file=sys.stderr)
    if args.json:
        print(json.dumps({k: info[k] for k in ("run", "total", "splits", "quarantined")}, indent=1))
    return 0

"""``echo-stream corpus``: arguments and entry point."""
from __future__ import annotations

import time

from ..arguments.data import add_corpus_arguments as add_arguments  # noqa: F401 (the command's arguments)
from .files import generate_corpus, read_manifest


def run(args) -> int:
    """Run ``echo-stream corpus`` with parsed ``args``; returns the exit status."""
    import sys

    t0 = time.perf_counter()
    path = generate_corpus(args.out_dir, n_conversations=args.conversations, minutes=args.minutes, seed=args.seed,
                           size=args.size, progress=not args.quiet, render_video=not args.no_video,
                           early_s=args.early_s, context_gap_s=args.context_gap_s,
                           portrait=getattr(args, "portrait", None))
    rows = read_manifest(path)
    held = sum(r["split"] == "heldout" for r in rows)
    print(f"wrote {path}: {len(rows)} SYNTHETIC conversations ({held} heldout), "
          f"{sum(r['duration_s'] for r in rows) / 60:.1f} min, in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0

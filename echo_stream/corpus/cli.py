"""``echo-stream corpus``: arguments and entry point."""
from __future__ import annotations

import time


from .files import generate_corpus, read_manifest

def add_arguments(p) -> None:
    """Arguments of ``echo-stream corpus OUT_DIR``."""
    p.add_argument("out_dir", metavar="OUT_DIR", help="corpus directory (created; a re-run resumes)")
    p.add_argument("--conversations", type=int, default=20, metavar="N", help="number of conversations (default 20)")
    p.add_argument("--minutes", type=float, default=1.0, metavar="M",
                   help="length of each conversation in minutes (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (same seed = same corpus)")
    p.add_argument("--size", type=int, default=192, help="user video size in pixels (square, even; default 192)")
    p.add_argument("--no-video", action="store_true", help="write the user side as audio only (user.wav)")
    p.add_argument("--portrait", metavar="IMAGE",
                   help="photo for the user's face (mirrored and tinted; default: the bundled portrait)")
    p.add_argument("--early-s", type=float, default=20.0,
                   help="seconds at the start that establish the affect (default 20)")
    p.add_argument("--context-gap-s", type=float, default=30.0,
                   help="the long-range effect is measured this many seconds after the affect exchange (default 30)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


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

"""Arguments of the data commands: ``echo-stream corpus``, ``shards`` and ``preprocess``."""
from __future__ import annotations

import argparse

from .. import config

#: preprocess's quality thresholds (the defaults of :class:`echo_stream.preprocess.Settings`)
LENGTH_TOLERANCE_S = 1.0
SILENCE_DBFS = -60.0


def add_corpus_arguments(p: argparse.ArgumentParser) -> None:
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


def add_shards_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream shards``."""
    chunk, rows = config.SHARD_CHUNK_SECONDS, config.SHARD_ROWS
    p.add_argument("manifest", metavar="CORPUS|MANIFEST",
                   help="a corpus directory holding manifest.jsonl, or the manifest file itself")
    p.add_argument("-o", "--out", metavar="DIR", required=True, help="output directory for the shards")
    p.add_argument("--chunk-seconds", type=float, default=chunk,
                   help=f"conversation chunk per Parquet row, seconds (default {chunk:g}; the "
                        "reader re-joins a conversation's chunks, so stage-2 history is not cut at chunk ends)")
    p.add_argument("--shard-rows", type=int, default=rows, help=f"chunks per shard file (default {rows})")
    p.add_argument("--skip-bad", action="store_true",
                   help="quarantine (list in dataset.json and outcomes.jsonl) conversations whose files cannot be "
                        "read, instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


PREPROCESS_EPILOG = """\
examples:
  echo-stream preprocess data/corpus out/shards                      # local Ray, all CPUs
  echo-stream preprocess manifest.csv out/shards --num-cpus 4 --shard-size 64
  echo-stream preprocess /shared/data /shared/shards --address auto  # on a running cluster
  echo-stream train --shards out/shards --out runs/mine

INPUT is a manifest (.jsonl or .csv; fields conversation_id, avatar_media, user_media, transcript,
avatar_motion, user_motion, split, duration_s) or a directory holding manifest.jsonl/.csv or laid out
as [SPLIT/]ID/{avatar.wav, user.webm, transcript.json, avatar_motion.parquet|.csv}.
Motion tracks: the project's motion .parquet or Live Link Face .csv exports.
Re-running the same command resumes: done inputs are skipped, interrupted work is redone once.
Bad inputs are quarantined with a reason (outcomes.jsonl); the job continues.
See docs/preprocess.md.
"""


def add_preprocess_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream preprocess INPUT OUTPUT``."""
    chunk, rows = config.SHARD_CHUNK_SECONDS, config.SHARD_ROWS
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = PREPROCESS_EPILOG
    p.add_argument("input", metavar="INPUT", help="manifest .jsonl/.csv, or a directory (see below)")
    p.add_argument("output", metavar="OUTPUT", help="output directory: shards, dataset.json, outcomes.jsonl, "
                                                    "dataset_card.md, journal.jsonl (resume state)")
    p.add_argument("--address", metavar="RAY_ADDRESS",
                   help="connect to a running Ray cluster ('auto' or host:port) instead of starting local Ray")
    p.add_argument("--num-cpus", type=int, help="CPUs for local Ray (default: all); ignored with --address")
    p.add_argument("--num-gpus", type=int, help="GPUs for local Ray (default: detected); ignored with --address")
    p.add_argument("--workers", type=int, help="featuriser actors at most (default: one per CPU of the cluster)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPU share each featuriser actor requests (for a GPU face tracker; default 0)")
    p.add_argument("--shard-size", type=int, default=rows,
                   help=f"chunk rows per shard file, at most (default {rows})")
    p.add_argument("--chunk-seconds", type=float, default=chunk,
                   help=f"conversation chunk per row, seconds (default {chunk:g})")
    p.add_argument("--length-tolerance", type=float, default=LENGTH_TOLERANCE_S, metavar="SECONDS",
                   help="quarantine a conversation whose user media / motion track / manifest duration_s differs "
                        f"from the avatar audio by more than this (default {LENGTH_TOLERANCE_S:g})")
    p.add_argument("--silence-dbfs", type=float, default=SILENCE_DBFS,
                   help=f"quarantine avatar audio whose peak is below this (default {SILENCE_DBFS:g})")
    p.add_argument("--livelink-fps", type=float,
                   help="capture rate of Live Link Face CSV timecodes (default: inferred from the frame field)")
    p.add_argument("--extractor", metavar="MODULE:CLASS",
                   help="your own face tracker making motion targets from avatar video when a row has no "
                        "avatar_motion (see echo_stream.tracks.FaceTracker); default: the bundled one "
                        "(echo-stream track)")
    p.add_argument("--no-tracker", action="store_true",
                   help="do not track avatar video: rows without avatar_motion have no motion targets")
    p.add_argument("--extractor-model", metavar="PATH", help="the tracker's model file, passed to its constructor")
    p.add_argument("--allow-no-motion", action="store_true",
                   help="keep conversations without motion targets (zeros) instead of quarantining them")
    p.add_argument("--sequential", action="store_true",
                   help="no Ray: the plain sequential loop in this process (same functions, same output)")
    p.add_argument("--fresh", action="store_true", help="discard what OUTPUT holds and start over")
    p.add_argument("--retry-quarantined", action="store_true",
                   help="try inputs quarantined by an earlier run again (default: keep them quarantined)")
    p.add_argument("--limit", type=int, help="process at most N pending inputs this run (resumable)")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary table")

"""Arguments of ``echo-stream train`` and ``echo-stream eval``."""
from __future__ import annotations

import argparse
import math

from .. import config


def floats(text: str) -> list[float]:
    """argparse type: ``"1e-3"`` or ``"1e-3,4e-4"`` -> a list of numbers."""
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or two numbers separated by a comma, got {text!r}")


def ints(text: str) -> list[int]:
    """argparse type: ``"2000"`` or ``"2000,1200"`` -> a list of whole numbers."""
    vals = floats(text)
    if any(v != int(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected whole numbers, got {text!r}")
    return [int(v) for v in vals]


def guidance(text: str) -> float:
    """argparse type of ``--user-guidance``: a finite number >= 0."""
    try:
        g = float(text)
    except ValueError:
        g = float("nan")
    if not (math.isfinite(g) and g >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: need a finite number >= 0 (1 = no guidance)")
    return g


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream train``."""
    d1, d2 = config.TRAIN_DEFAULTS[1], config.TRAIN_DEFAULTS[2]
    bptt = config.TRAIN_BPTT_WINDOWS or 0
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "examples:\n"
        "  # the default checkpoint, from scratch (SYNTHETIC corpus; ~25 min on 2 CPU cores):\n"
        "  echo-stream train --make-corpus 20 --corpus out/corpus --out out/train --export default\n"
        "  # your own data: a manifest.jsonl (see echo_stream/dataset.py) -> shards -> training\n"
        "  echo-stream train --corpus my_corpus/ --out runs/mine --time-budget 2h\n"
        "  # shards already written; stage 2 only, from a stage-1 checkpoint\n"
        "  echo-stream train --shards runs/mine/shards --stage 2 --init-from runs/mine/stage1/step-0002400\n"
        "  # the listener-reaction head (when to nod / raise the brows) on a trained model (~3 min):\n"
        "  echo-stream train --shards runs/mine/shards --stage reactions --init-from runs/mine/final "
        "--out runs/mine\n")
    src = p.add_argument_group("data")
    src.add_argument("--shards", metavar="DIR",
                     help="training shards (a directory with dataset.json); default OUT/shards")
    src.add_argument("--corpus", metavar="DIR|MANIFEST",
                     help="a corpus (manifest.jsonl + media): its shards are written to --shards first "
                          "unless that directory already has them")
    src.add_argument("--make-corpus", type=int, metavar="N",
                     help="when --corpus has no manifest yet, generate a SYNTHETIC corpus of N conversations "
                          "there first (echo_stream.corpus)")
    src.add_argument("--corpus-minutes", type=float, default=1.0, help="minutes per generated conversation (1.0)")
    src.add_argument("--rewrite-shards", action="store_true", help="write the shards again even if present")
    src.add_argument("--chunk-seconds", type=float, default=config.SHARD_CHUNK_SECONDS,
                     help=f"shard chunk length in seconds ({config.SHARD_CHUNK_SECONDS:g})")
    src.add_argument("--shard-rows", type=int, default=config.SHARD_ROWS,
                     help=f"chunks per shard file ({config.SHARD_ROWS})")
    p.add_argument("-o", "--out", metavar="DIR", default="out/train", help="output directory (default out/train)")
    p.add_argument("--config", metavar="NAME|PATH", default=None,
                   help="model config for a new model: tiny (default) or base or a JSON file")
    p.add_argument("--stage", choices=("1", "2", "both", "reactions"), default="both",
                   help="which stage(s) to train; 'reactions': only the listener-reaction head of the "
                        "--init-from model (echo_stream/model/reactions.py), everything else frozen "
                        "(1500 steps of 16 crops at lr 2e-3 unless --steps/--batch-size/--lr say otherwise)")
    p.add_argument("--steps", type=ints, metavar="S[,S2]",
                   help=f"training steps (one value for both stages, or stage1,stage2; default "
                        f"{d1.steps},{d2.steps})")
    p.add_argument("--batch-size", type=ints, metavar="B[,B2]",
                   help=f"windows per step (default {d1.batch_size},{d2.batch_size})")
    p.add_argument("--lr", type=floats, metavar="LR[,LR2]",
                   help=f"peak learning rate (default {d1.lr:g},{d2.lr:g})")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batches and noise (0)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue exactly from OUT's newest checkpoint (default); --no-resume starts over")
    p.add_argument("--init-from", metavar="CHECKPOINT", help="start from this checkpoint instead of a new model")
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="steps between checkpoints (~10 per stage)")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="wall-clock limit (1200, 1200s, 20m, 1.5h): the schedules shrink to fit")
    p.add_argument("--history-s", type=float, default=config.TRAIN_HISTORY_S,
                   help="stage 2: seconds of history rolled through the LCU memory before each window "
                        f"({config.TRAIN_HISTORY_S:g})")
    p.add_argument("--bptt-windows", type=int, default=bptt, metavar="N",
                   help=f"stage 2: back-propagate through only the last N history windows of the behaviour "
                        f"slots (0 = all; default {bptt}); the transcript traces always get "
                        f"gradients from the whole past")
    p.add_argument("--eval-batches", type=int, default=4, help="heldout batches per evaluation (0 = none)")
    p.add_argument("--calibration-convs", type=int, default=0, metavar="N",
                   help="--stage reactions: hold the last N training conversations out of the head's fit and scale "
                        "each kind's onset probabilities to the onsets found in them (0 = off, the default: on the "
                        "bundled 21-conversation corpus 4 held out gave factors that missed the held-out counts "
                        "by up to 3x; worth it with many conversations)")
    p.add_argument("--export", metavar="DIR|default",
                   help="also write the final model to DIR ('default' = the packaged default checkpoint)")
    p.add_argument("--long-known", type=float, metavar="P",
                   help=f"stage 2: share of windows trained with more known frames than the config's overlap, "
                        f"so that serving can use strides shorter than new_frames (low latency; default "
                        f"{d2.long_known})")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: every core this process may use)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream eval``."""
    p.add_argument("--checkpoint", help="checkpoint to evaluate (default: the bundled one)")
    p.add_argument("--ablation", help="entangled-fusion checkpoint for the SDCM interference comparison")
    p.add_argument("--corpus", required=True, help="corpus directory (manifest.jsonl) with a heldout split")
    p.add_argument("--tts", help="directory of real speech clips (*.ogg; default tests/data/tts)")
    p.add_argument("--out", default="bench/results/eval", help="output directory for eval.json and eval.png")
    p.add_argument("--clips", type=int, default=4, help="held-out conversations to use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reaction-seeds", type=int, default=3, metavar="N",
                   help="sampling seeds (SEED, SEED+1, ...) the listener and rule metrics of the model are averaged "
                        "over: reactions are drawn, and a few held-out conversations hold few events (default 3)")
    p.add_argument("--stride", type=int, default=None, metavar="FRAMES",
                   help="new frames per generation window of every rollout (default: the config's new_frames; "
                        "serve uses 6 for video sessions)")
    p.add_argument("--user-guidance", type=guidance, default=1.0, metavar="G",
                   help="guidance on the user branch at sampling (1 = none; >1 amplifies the learned reactions, "
                        "twice the diffusion cost)")
    p.add_argument("--quiet", action="store_true")

"""The ``echo-stream`` command line."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from . import __version__, samples
from .arguments import module_doc

ASSETS = samples.ASSETS_DIR   # (kept for callers of cli.ASSETS)

#: ``(command, help, description, the arguments' module:function, the module whose ``run(args)`` runs it)``;
#: a description ``None`` is the command module's docstring. The argument modules are light (see
#: :mod:`echo_stream.arguments`); the command module is imported only when its command runs.
COMMANDS = (
    ("generate", "portrait + avatar audio (+ user video/audio, transcript) -> mp4 / motion",
     "Animate a portrait: lips from the avatar's audio, reactions from the user's behaviour and the conversation "
     "context. Runs the real streaming pipeline on local Ray, feeding the inputs chunk by chunk as a live stream "
     "would arrive.", "generate:add_generate_arguments", None),
    ("demo", "run generate on the bundled sample inputs (no arguments needed)",
     "Runs the whole pipeline on local Ray with the bundled sample portrait, avatar speech, user webcam clip and "
     "transcript, and the default checkpoint, on CPU.", "generate:add_demo_arguments", None),
    ("corpus", "generate the SYNTHETIC dyadic training corpus (media + motion + transcripts)",
     "Writes a synthetic dyadic conversation corpus in the input format preprocessing reads: avatar speech "
     "with known articulation targets, a rendered user webcam with speech and pauses, motion tracks for "
     "both sides, transcripts and a manifest. It is synthetic: made by this project, not recorded.",
     "data:add_corpus_arguments", "corpus.cli"),
    ("shards", "featurize a corpus manifest into Parquet training shards (sequential)",
     "Runs the same decode + feature code as the streaming pipeline over every conversation of a "
     "manifest and writes zstd Parquet shards plus dataset.json (counts, hours, feature statistics).",
     "data:add_shards_arguments", "dataset"),
    ("preprocess", "conversations -> training shards on Ray Data (resumable, bad files quarantined)",
     "Featurises conversations (avatar speech, user webcam/audio, transcript, motion track: project Parquet or "
     "Live Link Face CSV) with the same code as the serving pipeline, on Ray Data (local or --address cluster), "
     "into zstd Parquet shards + dataset.json + outcomes.jsonl + dataset_card.md. Exactly once: re-running "
     "resumes after an interruption; bad inputs are quarantined with a reason and the job continues.",
     "data:add_preprocess_arguments", "preprocess"),
    ("track", "video with a face -> ARKit blendshapes + head pose (.parquet), bundled face tracker",
     "Tracks the face in a video with the bundled MediaPipe face mesh (LiteRT, CPU) and writes the motion "
     "table that generate --motion-out writes, plus face_present and face_confidence per frame.",
     "face:add_track_arguments", "face.cli"),
    ("train", "two-stage training (stage 1: own audio -> motion; stage 2: full SDCM + LCU)",
     "Trains the ECHO model on Parquet shards with progress, periodic checkpoints, resume and a loss plot.",
     "training:add_train_arguments", "train"),
    ("eval", "lip sync, SDCM interference, listener responsiveness, long-range context, FD",
     "Evaluates a checkpoint through the pipeline's own stage cores; writes eval.json and eval.png.",
     "training:add_eval_arguments", "evaluate"),
    ("serve", "multi-session gRPC server (bidirectional streaming) on the Ray pipeline",
     "Serves the AvatarStream gRPC service (protos/echo_stream.proto): one bidirectional stream per avatar "
     "session, all sessions sharing one set of stage actors, diffusion windows batched across sessions.",
     "serve:add_serve_arguments", "serve.cli:run_serve"),
    ("client", "stream local files (or a test signal) to a server; save mp4 / motion",
     "Streams avatar audio (+ user video/audio, transcript) to `echo-stream serve` in real time and saves what "
     "comes back.", "serve:add_client_arguments", "serve.cli:run_client"),
    ("web", "browser demo: talk to the avatar live over WebRTC (camera + microphone in, video + audio out)",
     "Serves a page where the browser's webcam and microphone stream to an avatar session over WebRTC and the "
     "avatar's video and audio come back in sync. The avatar speaks a typed sentence (offline TTS: espeak-ng, "
     "when installed) or an uploaded audio file, and listens to you while silent. By default starts local Ray "
     "and an in-process avatar server, as `serve` does.", "web:add_web_arguments", "web.server:run"),
)

#: the same for ``echo-stream bench WHICH``
BENCHMARKS = (
    ("pipeline", "real-time factor, start-up, per-stage time and peak memory of generate",
     "Times `generate` through the Ray pipeline on sample inputs: start-up (Ray, models, librosa/numba warm-up) "
     "separately from processing; per-stage busy time; peak memory of the driver and of every actor.",
     "bench:add_pipeline_arguments", "bench_pipeline"),
    ("serve", "N concurrent real-time sessions against a server: latency, capacity", None,
     "bench:add_serve_bench_arguments", "serve.bench"),
    ("hop", "what one pipeline hop costs: a stage actor call vs a Ray Serve handle call, same payload", None,
     "bench:add_hop_bench_arguments", "serve.hop_bench"),
    ("resume", "the resume store: updates/s and claim latency per shard count (sizes --resume-shards)", None,
     "bench:add_resume_bench_arguments", "serve.resume_bench"),
    ("preprocess", "preprocessing throughput: Ray Data vs the sequential loop, CPU scaling", None,
     "bench:add_preprocess_bench_arguments", "bench_preprocess"),
    ("tracker", "face tracker speed on one CPU core (ms per frame, per model)", None,
     "bench:add_tracker_bench_arguments", "face.bench"),
    ("kernels", "fused SDCM attention vs eager / compiled / FlexAttention compositions",
     "Microbenchmark of echo_stream.kernels.sdcm_attention (needs CUDA for the full grid; --cpu-smoke runs a "
     "tiny CPU grid).", "bench:add_kernels_bench_arguments", "kernels.bench"),
    ("memory", "generate's driver memory against the audio's length (10 s, 10 min, 1 h)", None,
     "bench:add_memory_bench_arguments", "bench_memory"),
    ("soak", "sessions opened and closed for an hour: memory, descriptors, threads of every process", None,
     "bench:add_soak_bench_arguments", "serve.soak"),
    ("web", "latency over WebRTC: headless Chromium talking to `web`, server-side and glass-to-glass", None,
     "bench:add_web_bench_arguments", "web.bench"),
    ("capacity", "internet scale by simulation: the real ingress, routing and batching, stand-in stages", None,
     "bench:add_capacity_bench_arguments", "serve.capacity"),
)

#: the commands whose help keeps its own line breaks (epilogs with examples, docstring descriptions)
_RAW = {"generate", "corpus", "shards", "preprocess", "track", "train", "eval", "serve", "client", "web"}
_RAW_BENCH = {"serve", "hop", "resume", "preprocess", "tracker", "memory", "soak", "web", "capacity"}


def _add_command(sub, name: str, help_: str, desc: str | None, args_fn: str, runner: str | None,
                 raw: bool) -> argparse.ArgumentParser:
    module, _, fn = args_fn.partition(":")
    add = getattr(importlib.import_module(f"echo_stream.arguments.{module}"), fn)
    if desc is None:
        desc = module_doc(f"echo_stream.{runner.partition(':')[0]}").replace("``", "`")
    p = sub.add_parser(name, help=help_, description=desc,
                       formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter)
    add(p)
    p.set_defaults(_run=runner)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The whole argument tree; imports no command module (no torch, Ray, librosa or PyAV)."""
    parser = argparse.ArgumentParser(
        prog="echo-stream",
        description="Streaming interactive head generation (ECHO: LCU context memory + SDCM attention) "
                    "on a Ray actor pipeline: decode -> features -> context memory -> motion diffusion -> render.",
    )
    parser.add_argument("--version", action="version", version=f"echo-stream {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_, desc, args_fn, runner in COMMANDS:
        _add_command(sub, name, help_, desc, args_fn, runner, name in _RAW)
        if name == "client":   # bench after client: the order `echo-stream --help` lists them in
            b = sub.add_parser("bench", help="benchmarks that write JSON (and CSV/PNG) under bench/results/")
            bsub = b.add_subparsers(dest="bench", metavar="WHICH")
            for bname, bhelp, bdesc, bargs, brunner in BENCHMARKS:
                _add_command(bsub, bname, bhelp, bdesc, bargs, brunner, bname in _RAW_BENCH)
    return parser


def _runner(spec: str):
    """The function ``module[:function]`` (default ``run``) names, its module imported now."""
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(f"echo_stream.{module}"), fn or "run")


def _run_generate(args, inputs: dict) -> int:
    from .generate import GenerateRequest, generate

    req = GenerateRequest(
        portrait=inputs["portrait"], avatar_audio=inputs["avatar_audio"], out=args.out,
        user_video=inputs.get("user_video"), user_audio=inputs.get("user_audio"),
        transcript=inputs.get("transcript"), motion_out=args.motion_out, landmarks=inputs.get("landmarks"),
        checkpoint=args.checkpoint, config=args.config, size=getattr(args, "size", 256),
        seed=getattr(args, "seed", 0), device=args.device)
    stats = generate(req, use_ray=not args.no_ray, progress=not args.quiet, address=getattr(args, "address", None),
                     handle_sigterm=True)
    wrote = " and ".join(p for p in (args.out, args.motion_out) if p)
    print(f"wrote {wrote}: {stats['frames']} frames, {stats['audio_s']:.2f} s audio, "
          f"processed in {stats['processing_s']:.2f} s (real-time factor {stats['rtf']:.2f}), "
          f"start-up {stats['startup_s']:.1f} s", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps(stats, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .errors import EchoStreamError

    try:
        if args.command == "generate":
            if not args.out and not args.motion_out:
                parser.error("generate: give -o OUT.mp4 and/or --motion-out MOTION.parquet")
            return _run_generate(args, vars(args))
        if args.command == "demo":
            for p in (args.out, args.motion_out):
                if p and os.path.dirname(p):
                    os.makedirs(os.path.dirname(p), exist_ok=True)
            return _run_generate(args, samples.demo_inputs())
        if args.command == "bench" and getattr(args, "_run", None) is None:
            parser.parse_args(["bench", "--help"])
            return 2
        if getattr(args, "_run", None):
            try:
                run = _runner(args._run)
            except ImportError as e:   # an optional dependency of this one command (e.g. triton for kernels)
                print(f"echo-stream: error: this command cannot load: {e}", file=sys.stderr)
                return 1
            return run(args)
        parser.print_help()
        return 2
    except EchoStreamError as e:
        print(f"echo-stream: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        from .errors import Terminated

        if isinstance(e, Terminated):
            print("echo-stream: terminated (SIGTERM); no partial output was kept", file=sys.stderr)
            return 143
        print("echo-stream: interrupted; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

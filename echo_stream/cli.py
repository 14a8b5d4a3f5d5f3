"""The ``echo-stream`` command line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import resources

from . import __version__

ASSETS = resources.files("echo_stream") / "assets"

EPILOG_GENERATE = """\
examples:
  echo-stream generate --portrait me.jpg --avatar-audio reply.wav -o out.mp4
  echo-stream generate --portrait me.jpg --avatar-audio reply.mp3 \\
      --user-video webcam.mp4 --transcript chat.srt -o out.mp4 --motion-out motion.parquet

Inputs may be any audio/video PyAV opens (wav, mp3, m4a, ogg/opus, flac, mp4,
mkv, webm, mov; any sample rate, mono or stereo, variable frame rate). The
portrait is a png/jpeg photo; the face is found automatically, or placed from a
landmarks sidecar (PORTRAIT.landmarks.json beside it, or --landmarks).
Outputs appear only when complete: nothing partial is left on failure.
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="PATH",
                   help="model checkpoint (directory with model.safetensors + config.json); "
                        "default: the bundled tiny checkpoint")
    p.add_argument("--config", metavar="NAME|PATH",
                   help="model config: tiny (CPU default), base (GPU reference) or a JSON file")
    p.add_argument("--device", default="cpu", help="torch device for diffusion and render (cpu, cuda)")


def _add_generate_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--portrait", metavar="IMAGE", required=required, help="the avatar's reference photo (png/jpeg)")
    p.add_argument("--avatar-audio", metavar="AUDIO", required=required,
                   help="the avatar's own speech (drives the lips); defines the output duration")
    p.add_argument("--user-video", metavar="VIDEO", help="the human user's webcam video (drives reactions); "
                   "its audio track is the user audio unless --user-audio is given")
    p.add_argument("--user-audio", metavar="AUDIO", help="the human user's microphone audio")
    p.add_argument("--transcript", metavar="TEXT",
                   help="conversation transcript: a .txt/.srt/.vtt/.json file, or the text itself")
    p.add_argument("--landmarks", metavar="JSON", help="landmarks sidecar for the portrait (precise placement)")
    p.add_argument("--size", type=int, default=256, help="output resolution in pixels (square, even; default 256)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same inputs + seed = same motion)")
    p.add_argument("--motion-out", metavar="MOTION.parquet",
                   help="also write the motion: frame, pts and one column per ARKit blendshape / head pose channel")
    p.add_argument("--no-ray", action="store_true",
                   help="run the stages in this process instead of Ray actors (debugging)")
    p.add_argument("--address", metavar="RAY_ADDRESS", help="connect to a running Ray cluster instead of local Ray")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echo-stream",
        description="Streaming interactive head generation (ECHO: LCU context memory + SDCM attention) "
                    "on a Ray actor pipeline: decode -> features -> context memory -> motion diffusion -> render.",
    )
    parser.add_argument("--version", action="version", version=f"echo-stream {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="portrait + avatar audio (+ user video/audio, transcript) -> mp4 / motion",
                       description="Animate a portrait: lips from the avatar's audio, reactions from the user's "
                                   "behaviour and the conversation context. Runs the real streaming pipeline on "
                                   "local Ray, feeding the inputs chunk by chunk as a live stream would arrive.",
                       epilog=EPILOG_GENERATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_generate_args(g)
    g.add_argument("-o", "--out", metavar="OUT.mp4", help="output video: H.264 25 fps + the avatar audio as AAC")
    g.add_argument("--json", action="store_true", help="print timing figures as JSON when done")

    d = sub.add_parser("demo", help="run generate on the bundled sample inputs (no arguments needed)",
                       description="Runs the whole pipeline on local Ray with the bundled sample portrait, avatar "
                                   "speech, user webcam clip and transcript, and the default checkpoint, on CPU.")
    d.add_argument("-o", "--out", metavar="OUT.mp4", default="out/demo.mp4", help="output video (default out/demo.mp4)")
    d.add_argument("--motion-out", metavar="MOTION.parquet", default="out/demo_motion.parquet")
    d.add_argument("--no-ray", action="store_true", help="run the stages in-process instead of Ray actors")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_args(d)

    for name, module, help_, desc in _TOOL_COMMANDS:
        mod = _import_tool(module)
        if mod is None:
            continue
        tp = sub.add_parser(name, help=help_, description=desc, formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(tp)
        tp.set_defaults(_tool=module)

    from .serve import cli as serve_cli
    sp = sub.add_parser("serve", help="multi-session gRPC server (bidirectional streaming) on the Ray pipeline",
                        description="Serves the AvatarStream gRPC service (protos/echo_stream.proto): one "
                                    "bidirectional stream per avatar session, all sessions sharing one set of stage "
                                    "actors, diffusion windows batched across sessions.",
                        epilog=serve_cli.SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_cli.add_serve_arguments(sp)
    cp = sub.add_parser("client", help="stream local files (or a test signal) to a server; save mp4 / motion",
                        description="Streams avatar audio (+ user video/audio, transcript) to `echo-stream serve` "
                                    "in real time and saves what comes back.",
                        epilog=serve_cli.CLIENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_cli.add_client_arguments(cp)

    b = sub.add_parser("bench", help="benchmarks that write JSON (and CSV/PNG) under bench/results/")
    bsub = b.add_subparsers(dest="bench", metavar="WHICH")
    bp = bsub.add_parser("pipeline", help="real-time factor, start-up, per-stage time and peak memory of generate",
                         description="Times `generate` through the Ray pipeline on sample inputs: start-up (Ray, "
                                     "models, librosa/numba warm-up) separately from processing; per-stage busy time; "
                                     "peak memory of the driver and of every actor.")
    from . import bench_pipeline
    bench_pipeline.add_arguments(bp)
    from .serve import bench as serve_bench
    bs = bsub.add_parser("serve", help="N concurrent real-time sessions against a server: latency, capacity",
                         description=serve_bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_bench.add_arguments(bs)
    from . import bench_preprocess
    bpp = bsub.add_parser("preprocess", help="preprocessing throughput: Ray Data vs the sequential loop, CPU scaling",
                          description=bench_preprocess.__doc__.replace("``", "`"),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_preprocess.add_arguments(bpp)
    from .face import bench as tracker_bench
    btr = bsub.add_parser("tracker", help="face tracker speed on one CPU core (ms per frame, per model)",
                          description=tracker_bench.__doc__.replace("``", "`"),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    tracker_bench.add_arguments(btr)
    try:
        from .kernels import bench as kbench
    except ImportError:  # pragma: no cover - kernels import torch/triton lazily
        kbench = None
    if kbench is not None:
        bk = bsub.add_parser("kernels", help="fused SDCM attention vs eager / compiled / FlexAttention compositions",
                             description="Microbenchmark of echo_stream.kernels.sdcm_attention (needs CUDA for the "
                                         "full grid; --cpu-smoke runs a tiny CPU grid).")
        kbench.add_arguments(bk)
    return parser


_TOOL_COMMANDS = (
    ("corpus", "corpus", "generate the SYNTHETIC dyadic training corpus (media + motion + transcripts)",
     "Writes a synthetic dyadic conversation corpus in the input format preprocessing reads: avatar speech "
     "with known articulation targets, a rendered user webcam with speech and pauses, motion tracks for "
     "both sides, transcripts and a manifest. It is synthetic: made by this project, not recorded."),
    ("shards", "dataset", "featurize a corpus manifest into Parquet training shards (sequential)",
     "Runs the same decode + feature code as the streaming pipeline over every conversation of a "
     "manifest and writes zstd Parquet shards plus dataset.json (counts, hours, feature statistics)."),
    ("preprocess", "preprocess", "conversations -> training shards on Ray Data (resumable, bad files quarantined)",
     "Featurises conversations (avatar speech, user webcam/audio, transcript, motion track: project Parquet or "
     "Live Link Face CSV) with the same code as the serving pipeline, on Ray Data (local or --address cluster), "
     "into zstd Parquet shards + dataset.json + outcomes.jsonl + dataset_card.md. Exactly once: re-running "
     "resumes after an interruption; bad inputs are quarantined with a reason and the job continues."),
    ("track", "face.cli", "video with a face -> ARKit blendshapes + head pose (.parquet), bundled face tracker",
     "Tracks the face in a video with the bundled MediaPipe face mesh (LiteRT, CPU) and writes the motion "
     "table that generate --motion-out writes, plus face_present and face_confidence per frame."),
    ("train", "train", "two-stage training (stage 1: own audio -> motion; stage 2: full SDCM + LCU)",
     "Trains the ECHO model on Parquet shards with progress, periodic checkpoints, resume and a loss plot."),
    ("eval", "evaluate", "lip sync, SDCM interference, listener responsiveness, long-range context, FD",
     "Evaluates a checkpoint through the pipeline's own stage cores; writes eval.json and eval.png."),
)


def _import_tool(module: str):
    import importlib

    try:
        mod = importlib.import_module(f"echo_stream.{module}")
    except ImportError as e:  # pragma: no cover - a missing optional module must not break the CLI
        logging.getLogger(__name__).debug("command module %s unavailable: %s", module, e)
        return None
    return mod if hasattr(mod, "add_arguments") and hasattr(mod, "run") else None


def _demo_inputs() -> dict:
    base = str(ASSETS / "sample")
    return {
        "portrait": os.path.join(str(ASSETS), "portrait.jpg"),
        "avatar_audio": os.path.join(base, "avatar_speech.ogg"),
        "user_video": os.path.join(base, "user_webcam.webm"),
        "transcript": os.path.join(base, "transcript.txt"),
    }


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
            return _run_generate(args, _demo_inputs())
        if args.command == "serve":
            from .serve import cli as serve_cli
            return serve_cli.run_serve(args)
        if args.command == "client":
            from .serve import cli as serve_cli
            return serve_cli.run_client(args)
        if getattr(args, "_tool", None):
            return _import_tool(args._tool).run(args)
        if args.command == "bench":
            if args.bench == "pipeline":
                from . import bench_pipeline
                return bench_pipeline.run(args)
            if args.bench == "serve":
                from .serve import bench as serve_bench
                return serve_bench.run(args)
            if args.bench == "preprocess":
                from . import bench_preprocess
                return bench_preprocess.run(args)
            if args.bench == "tracker":
                from .face import bench as tracker_bench
                return tracker_bench.run(args)
            if args.bench == "kernels":
                from .kernels import bench as kbench
                return kbench.run(args)
            parser.parse_args(["bench", "--help"])
            return 2
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

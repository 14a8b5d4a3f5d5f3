"""Arguments of ``echo-stream bench pipeline | serve | preprocess | tracker | kernels``."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import DEFAULT_SERVE_STRIDE
from .serve import ENGINES, add_stride_arguments

#: the benchmarks' JSON directory
RESULTS = "bench/results"
#: ``bench tracker``'s default video: the test suite's real face clip
TRACKER_VIDEO = Path(__file__).resolve().parents[2] / "tests" / "data" / "real" / "WolfgangLanger_Pexels.mp4"
#: ``bench kernels``: the implementations timed on a GPU by default (``echo_stream.kernels.bench.GPU_IMPLS``)
KERNEL_GPU_IMPLS = ("fused", "eager_sdpa", "compiled_sdpa", "flex")


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream bench pipeline``."""
    p.add_argument("--out", default=RESULTS, help=f"directory for the JSON (default {RESULTS})")
    p.add_argument("--size", type=int, default=256, help="output resolution (default 256)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    p.add_argument("--repeat", type=int, default=1, help="runs; the JSON keeps each and the median")
    p.add_argument("--no-user", action="store_true", help="avatar audio only (no user video / transcript)")
    p.add_argument("--config", default=None, help="model config (default: the checkpoint's)")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: bundled)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-ray", action="store_true", help="inline runner (no Ray) for comparison")


def add_serve_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream bench serve``."""
    p.add_argument("--target", help="a running server (host:port); default: start one here on local Ray")
    p.add_argument("--token", help="bearer token for --target")
    p.add_argument("--sessions", default="1,2,4,8", help="concurrent session counts to try (default 1,2,4,8)")
    p.add_argument("--mode", choices=("video", "motion", "both"), default="video", help="output mode (default video)")
    p.add_argument("--codec", choices=("fmp4", "raw"), default="fmp4", help="video codec (default fmp4)")
    p.add_argument("--size", type=int, default=256, help="video size (default 256)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of avatar audio per session (default 8)")
    p.add_argument("--rt-p99", type=float, default=2.0, help="client p99 frame latency bound of 'real time' (s, default 2)")
    p.add_argument("--max-growth", type=float, default=0.25, help="latency growth bound of 'real time' (s)")
    p.add_argument("--stop-after-miss", action="store_true", help="stop the sweep at the first N not real time")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--max-sessions", type=int, default=None, help="local server capacity (default: max N)")
    p.add_argument("--config", default=None, help="model config of the local server (tiny, base)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--replicas", default="", metavar="STAGE=N,...",
                   help="replicas per stage of the local server, as `serve --replicas` (default 1 each)")
    p.add_argument("--engine", choices=ENGINES, default="actors",
                   help="what runs the local server's stages, as `serve --engine` (default actors)")
    add_stride_arguments(p)
    p.add_argument("--out", default=RESULTS, help=f"directory for the JSON (default {RESULTS})")
    p.add_argument("--name", default=None, help="file name (default serve_<mode>_<size>_<cpus>cpu.json)")


def add_hop_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream bench hop``."""
    p.add_argument("--sizes-kb", default="1,100,3072", metavar="KB,...",
                   help="payload sizes in KiB (default 1,100,3072: a motion window .. 16 frames of 256² RGB)")
    p.add_argument("--repeat", type=int, default=200, help="timed calls per payload and engine (default 200)")
    p.add_argument("--hops", type=int, default=5, help="calls per chain (default 5, the pipeline's stages)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--out", default=RESULTS, help=f"directory for the JSON (default {RESULTS})")
    p.add_argument("--name", default=None, help="file name (default hop_<cpus>cpu.json)")


def add_resume_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream bench resume``."""
    p.add_argument("--shards", default="1,2,4", metavar="N,...", help="store shard counts to measure (default 1,2,4)")
    p.add_argument("--sessions", type=int, default=400, help="sessions updating at once (default 400)")
    p.add_argument("--updates", type=int, default=10, help="updates per session (default 10)")
    p.add_argument("--checkpoint-kb", type=int, default=16, help="LCU checkpoint size, every second update (16)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--out", default=RESULTS, help=f"directory for the JSON (default {RESULTS})")
    p.add_argument("--name", default=None, help="file name (default resume_store_<cpus>cpu.json)")


def add_preprocess_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream bench preprocess``."""
    p.add_argument("--corpus", metavar="DIR|MANIFEST",
                   help="inputs (a manifest or corpus directory); default: a synthetic corpus in --work")
    p.add_argument("--sizes", default="16,48", help="corpus sizes in conversations, comma-separated (default 16,48)")
    p.add_argument("--cpus", default="2", help="num_cpus values for the Ray runs, comma-separated (default 2)")
    p.add_argument("--minutes", type=float, default=1.0, help="minutes per generated conversation (default 1)")
    p.add_argument("--no-video", action="store_true", help="generated corpus with audio-only user side")
    p.add_argument("--work", default="out/bench_preprocess", help="corpus cache and scratch directory")
    p.add_argument("--baselines", default="1,default",
                   help="sequential baselines to run: library threads '1', 'default', or both (default '1,default')")
    p.add_argument("--no-sequential", action="store_true", help="skip the sequential baselines")
    p.add_argument("--no-ideal", action="store_true", help="skip the ideal split (plain processes, no Ray)")
    p.add_argument("--no-probe", action="store_true", help="skip the parallel-capacity probes")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds per size: every runner once per round, rounds one after the other; speed-ups "
                        "are taken within a round and summarised by their median (default 1)")
    p.add_argument("--out", default=RESULTS, help=f"directory for the JSON (default {RESULTS})")
    p.add_argument("--tag", help="JSON file name suffix: preprocess_<N>cpu_<tag>.json (default: none)")
    p.add_argument("--plot", metavar="JSON",
                   help="only draw the figure of an earlier result (its PNG beside it) and print its table; "
                        "runs nothing")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run, JSON on stdout


def add_tracker_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream bench tracker``."""
    p.add_argument("--video", default=str(TRACKER_VIDEO), help="a face video (default: the tests' real clip)")
    p.add_argument("--repeat", type=int, default=3, help="passes over the video (default 3)")
    p.add_argument("--out", default=f"{RESULTS}/tracker_cpu1.json", help="JSON output path")


def add_kernels_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream bench kernels``."""
    parser.add_argument("--out", default=RESULTS, help=f"output directory (default: {RESULTS}/)")
    parser.add_argument("--quick", action="store_true", help="a small grid instead of the full one")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run a tiny float32 grid on CPU (reference vs eager composition; the kernel too "
                             "under TRITON_INTERPRET=1) to exercise the code path; timings are meaningless")
    parser.add_argument("--impls", default=None,
                        help=f"comma-separated implementations (default on GPU: {','.join(KERNEL_GPU_IMPLS)})")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"),
                        help="input dtype on the GPU (default: bfloat16)")
    parser.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up time per measurement")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measurement time per measurement")
    parser.add_argument("--seed", type=int, default=0)


def add_memory_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream bench memory``."""
    p.add_argument("--seconds", type=float, nargs="+", default=[10.0, 600.0, 3600.0],
                   help="audio lengths to generate, in seconds (default: 10 600 3600)")
    p.add_argument("--size", type=int, default=256, help="output resolution (default 256)")
    p.add_argument("--num-cpus", type=int, default=0, help="CPUs for local Ray (default: all)")
    p.add_argument("--out", default=RESULTS, help=f"directory for the JSON and PNG (default {RESULTS})")


def add_soak_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream bench soak``."""
    p.add_argument("--minutes", type=float, default=60.0, help="how long sessions are opened and closed (default 60)")
    p.add_argument("--concurrency", type=int, default=3, help="sessions in flight at any time (default 3)")
    p.add_argument("--size", type=int, default=128, help="video size of the video sessions (default 128)")
    p.add_argument("--every", type=float, default=15.0, help="seconds between samples (default 15)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--out", default=RESULTS, help=f"directory for soak.json / soak.png (default {RESULTS})")


def add_web_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream bench web``."""
    p.add_argument("--seconds", type=float, default=25.0, help="seconds the browser session runs (default 25)")
    p.add_argument("--stride", type=int, default=DEFAULT_SERVE_STRIDE, metavar="FRAMES",
                   help="new frames per generation window (default %(default)s, as `serve` and `web`)")
    p.add_argument("--size", type=int, default=128, help="avatar video size (default 128)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--chromium", default="/usr/bin/chromium",
                   help="the browser (default: Debian's /usr/bin/chromium)")
    p.add_argument("--chromedriver", default="/usr/bin/chromedriver",
                   help="its WebDriver (default /usr/bin/chromedriver)")
    p.add_argument("--out", default=RESULTS, help=f"directory for web_latency.json (default {RESULTS})")
    p.add_argument("--screenshot", metavar="PNG", help="also save a screenshot of the page at the end")


def add_capacity_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream bench capacity``."""
    p.add_argument("--sessions", default="100,300,1000",
                   help="concurrent sessions per run, comma-separated (default 100,300,1000); one session alone "
                        "runs first as the baseline")
    p.add_argument("--replicas", default="diffusion=64", metavar="STAGE=N,...",
                   help="simulated replicas per stage, as `serve --replicas` (default diffusion=64); stages not "
                        "named get enough replicas to stay at most 60%% busy at the offered load")
    p.add_argument("--costs", default="measure",
                   help="what a stand-in replica sleeps: 'measure' (time the tiny model's stages on this CPU, "
                        "default), 'gpu-assumed' (those CPU costs, but a diffusion call costs --gpu-batch-ms: an "
                        "assumption, not a measurement) or an earlier capacity JSON (its 'costs')")
    p.add_argument("--gpu-batch-ms", default="8,0.4", metavar="BASE,PER_WINDOW",
                   help="with --costs gpu-assumed: ms per diffusion call = BASE + PER_WINDOW x windows (default 8,0.4)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of avatar audio per session (default 20)")
    p.add_argument("--ramp", type=float, default=5.0, help="sessions open evenly over this many seconds (default 5)")
    p.add_argument("--stride", type=int, default=None,
                   help="new frames per window of the (motion-only) sessions (default: the config's new_frames)")
    p.add_argument("--max-batch", type=int, default=64, help="windows per diffusion call at most, as `serve` (64)")
    p.add_argument("--batch-wait-ms", type=float, default=4.0,
                   help="the batcher's wait for company after an idle period, as `serve` (default 4)")
    p.add_argument("--time-scale", type=float, default=1.0, metavar="K",
                   help="run every clock the sessions and stand-ins see K times slower (client pacing, stage costs, "
                        "batch wait) and divide latencies by K: for fleets whose ingress needs more CPU than this "
                        "machine has (default 1 = real time)")
    p.add_argument("--config", default="tiny", help="model config: window geometry and measured costs (default tiny)")
    p.add_argument("--out", default=RESULTS, help=f"directory for the JSON and PNG (default {RESULTS})")
    p.add_argument("--name", default=None,
                   help="JSON file name (default capacity_<costs>.json; the PNG gets the same stem)")
    p.add_argument("--plot", metavar="JSON",
                   help="only redraw the figure of an earlier result (its PNG beside it); runs nothing")

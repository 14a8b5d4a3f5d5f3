"""Arguments of ``echo-stream serve`` and ``echo-stream client`` (and ``--stride``, shared with ``bench serve``)."""
from __future__ import annotations

import argparse

from ..config import DEFAULT_SERVE_STRIDE

#: ``--engine`` values
ENGINES = ("actors", "serve")

SERVE_EPILOG = """\
examples:
  echo-stream serve                                   # loopback only, no auth, local Ray
  ECHO_STREAM_TOKENS=alice:$(openssl rand -hex 24) \\
  echo-stream serve --host 0.0.0.0 --port 50051 --metrics-port 9100 \\
      --tls-cert server.crt --tls-key server.key --max-sessions 8
  echo-stream serve --address ray://head:10001        # stage actors on a Ray cluster
  echo-stream serve --address auto --replicas diffusion=2,render=2 --device cuda
                                                      # 2 actors each of diffusion and render, 0.5 GPU each
  echo-stream serve --engine serve --replicas diffusion=2
                                                      # the stages as a Ray Serve application
  serve deploy deploy/serve_config.yaml               # the same on a cluster, an ingress per node
                                                      # (its `args` are these options; docs/serving.md)

Binding beyond loopback needs bearer tokens (--tokens-file and/or
$ECHO_STREAM_TOKENS, entries 'principal:token'); clients send
'authorization: Bearer <token>'. Session ids are issued by the server and
bound to the principal that opened them. Prometheus metrics are served on
--metrics-port (/metrics); stage actors report through Ray's metrics agent.
SIGTERM (or Ctrl-C) drains: health NOT_SERVING, new sessions refused,
running ones get --drain-timeout seconds to finish, then the server exits.
"""

CLIENT_EPILOG = """\
examples:
  echo-stream client --test-signal 5 -o out.mp4 --motion-out motion.parquet
  echo-stream client --avatar-audio reply.wav --user-video webcam.mp4 --portrait me.jpg -o out.mp4
  echo-stream client --target host:50051 --token-file ~/.echo-token --tls-ca ca.crt --avatar-audio reply.wav \\
      --output motion --motion-out motion.parquet

Inputs are decoded locally and streamed in real time (--fast: as fast as the
server accepts them). Outputs are written only when the session completed.
"""


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream serve``."""
    p.epilog = SERVE_EPILOG
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0 = any free port)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on this port (/metrics); default: off")
    p.add_argument("--address", metavar="RAY_ADDRESS", help="run the stages (actors, or the Serve "
                   "application) on this Ray cluster (default: a new local Ray instance)")
    p.add_argument("--engine", choices=ENGINES, default="actors",
                   help="what runs the stages: 'actors' (default: one Ray actor per stage replica) or 'serve' (a Ray "
                        "Serve application of its own, echo-stream-<id>, one deployment per stage, deleted again when "
                        "this process exits; see docs/serving.md). Both take --replicas, --device, --address and "
                        "--num-cpus; --autoscale is the actor engine's only")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--replicas", default="", metavar="STAGE=N,...",
                   help="replicas per stage (actors, or Serve replicas with --engine serve), e.g. diffusion=2,render=2 (stages: decode, features, memory, diffusion, "
                        "render; default 1 each). Each session stays on one replica of every stage; replicas of a "
                        "stage are spread over the Ray cluster's nodes; with --device cuda each GPU-stage replica "
                        "reserves its GPU share (0.5)")
    p.add_argument("--autoscale", default="", metavar="STAGE=MIN:MAX,...",
                   help="replicas of a stage follow the load between MIN and MAX, e.g. diffusion=1:4 (a stage named "
                        "here is not named in --replicas; it starts with MIN). One more replica when the sessions per "
                        "replica stay above --scale-target for --scale-up-delay s; the last replica drains (no new "
                        "sessions) when they stay below for --scale-down-delay s, and goes when its sessions have "
                        "ended (or moved: --rebalance-interval). The cluster must hold MAX replicas (checked at start)")
    p.add_argument("--rebalance-interval", type=float, default=0.0, metavar="S",
                   help="every S seconds, move a few running sessions to another replica of a stage: onto a replica "
                        "the autoscaler added (or one back from a fault) while others hold 2+ sessions more, and "
                        "off a replica drained to scale down, which then goes at once. A moved session re-opens "
                        "from its checkpoint: a short stall, no frame lost, a GAP event (default 0: never)")
    p.add_argument("--scale-target", type=float, default=4.0, metavar="SESSIONS",
                   help="sessions per replica the autoscaler aims at (default 4)")
    p.add_argument("--scale-up-delay", type=float, default=2.0, metavar="S",
                   help="seconds the load stays above the target before a replica is added (default 2)")
    p.add_argument("--scale-down-delay", type=float, default=10.0, metavar="S",
                   help="seconds the load stays below the target before a replica drains (default 10)")
    p.add_argument("--max-sessions", type=int, default=8,
                   help="concurrent sessions; more get RESOURCE_EXHAUSTED (default 8: measure yours with "
                        "`echo-stream bench serve`)")
    p.add_argument("--tokens-file", metavar="PATH", help="bearer tokens, one 'principal:token' per line "
                   "(also: $ECHO_STREAM_TOKENS='p1:t1,p2:t2')")
    p.add_argument("--tls-cert", metavar="PEM", help="TLS certificate chain (with --tls-key): serve gRPC over TLS")
    p.add_argument("--tls-key", metavar="PEM", help="TLS private key")
    p.add_argument("--avatar", action="append", default=[], metavar="NAME=IMAGE",
                   help="register a portrait clients can select by avatar_id (repeatable)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds running sessions get on SIGTERM")
    p.add_argument("--resume-ttl", type=float, default=120.0, metavar="S",
                   help="a session whose stream broke (its server lost or drained, the network down) can be "
                        "resumed on any server of the cluster (SessionConfig.resume) for this long after its last "
                        "frame (default 120; 0: no resume records)")
    p.add_argument("--stage-idle-timeout", type=float, default=600.0, metavar="S",
                   help="a stage replica closes the state of a session that had no call for this long: what an "
                        "abruptly lost server left there (default 600; at least --resume-ttl; a running session's "
                        "server keeps its state however long its client is silent)")
    p.add_argument("--stage-call-deadline", type=float, default=20.0, metavar="S",
                   help="a stage result not back this long after a session began waiting for it is taken as a "
                        "lost replica: the session moves and replays its input in flight (default 20; above the "
                        "call order's 10 s skip)")
    p.add_argument("--resume-shards", type=int, default=4, metavar="N",
                   help="actors holding the cluster's resume records (default 4; a running session sends about one "
                        "update per generation window, ~1.6/s at stride 16; every server of a cluster must give the "
                        "same number)")
    p.add_argument("--max-lead", type=float, default=2.0,
                   help="seconds a session's avatar audio may run ahead of real time before flow control "
                        "slows its sender (default 2)")
    p.add_argument("--batch-wait-ms", type=float, default=4.0,
                   help="longest wait for more sessions' windows before a diffusion call (default 4 ms)")
    p.add_argument("--max-batch", type=int, default=64, help="most session windows per diffusion call")
    p.add_argument("--size", type=int, default=256, help="default render size of the stages (per-session "
                   "sizes come from SessionConfig)")
    p.add_argument("--checkpoint", metavar="PATH", help="model checkpoint (default: the bundled tiny one)")
    p.add_argument("--config", metavar="NAME|PATH", help="model config (tiny, base or a JSON file)")
    p.add_argument("--device", default="cpu", help="torch device of diffusion and render (cpu, cuda)")
    add_stride_arguments(p)


def add_stride_arguments(p: argparse.ArgumentParser) -> None:
    """``--stride`` / ``--motion-stride`` (serve and bench serve)."""
    p.add_argument("--stride", type=int, default=DEFAULT_SERVE_STRIDE, metavar="FRAMES",
                   help="new frames per generation window of video sessions: a window's first frame waits for "
                        "the audio of STRIDE + lookahead frames before it is computed, so a shorter stride means "
                        "lower latency and more model calls per second (default %(default)s = "
                        f"{DEFAULT_SERVE_STRIDE * 40} ms; 0 = the config's new_frames, 16 for tiny). A client "
                        "may ask for its own (SessionConfig.stride_frames)")
    p.add_argument("--motion-stride", type=int, default=0, metavar="FRAMES",
                   help="the same for motion-only sessions (default 0 = the config's new_frames: the fewest "
                        "model calls, the most sessions per CPU)")


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream client``."""
    p.epilog = CLIENT_EPILOG
    p.add_argument("--target", default="127.0.0.1:50051", help="server host:port (default 127.0.0.1:50051)")
    p.add_argument("--token", help="bearer token (prefer --token-file or $ECHO_STREAM_TOKEN)")
    p.add_argument("--token-file", metavar="PATH", help="file holding the bearer token")
    p.add_argument("--tls-ca", metavar="PEM", help="CA certificate to verify the server's TLS certificate")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    p.add_argument("--resume-through", default="", metavar="HOST:PORT,...",
                   help="when the stream breaks (server lost, drained, network down), resume the session through "
                        "these servers (and --target) and send the input again from where the server says; "
                        "default: no resume")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--avatar-audio", metavar="AUDIO", help="the avatar's speech (any format PyAV reads)")
    src.add_argument("--test-signal", type=float, metavar="SECONDS",
                     help="send a generated spoken test sentence of this length instead of files")
    p.add_argument("--user-video", metavar="VIDEO", help="the user's webcam video (its audio is the user audio)")
    p.add_argument("--user-audio", metavar="AUDIO", help="the user's microphone audio")
    p.add_argument("--transcript", metavar="TEXT", help="transcript: .txt/.srt/.vtt/.json file or the text itself")
    p.add_argument("--portrait", metavar="IMAGE", help="portrait to animate (default: the bundled one)")
    p.add_argument("--avatar-id", help="a portrait registered on the server (--avatar NAME=IMAGE there)")
    p.add_argument("--output", choices=("video", "motion", "both"), default=None,
                   help="what the server sends back (default: both when -o is given, else motion)")
    p.add_argument("--size", type=int, default=256, help="video size in pixels (square, even; default 256)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same as generate --seed)")
    p.add_argument("--fast", action="store_true", help="send as fast as the server accepts, not in real time")
    p.add_argument("--stride", type=int, default=None, metavar="FRAMES",
                   help="new frames per generation window for this session (lower = less latency, more server "
                        "compute; default: the server's choice for the output mode)")
    p.add_argument("-o", "--out", metavar="OUT.mp4", help="save the returned H.264/AAC video (fragmented MP4)")
    p.add_argument("--motion-out", metavar="MOTION.parquet", help="save the returned motion")

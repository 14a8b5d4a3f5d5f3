"""Arguments of ``echo-stream web`` (the browser demo over WebRTC)."""
from __future__ import annotations

import argparse

from ..config import DEFAULT_SERVE_STRIDE

WEB_EPILOG = """\
examples:
  echo-stream web                                  # http://127.0.0.1:8080/, local Ray + an in-process server
  echo-stream web --size 128 --max-sessions 2      # lighter on a small CPU
  echo-stream web --server 127.0.0.1:50051         # use a running `echo-stream serve`
  ECHO_STREAM_TOKENS=alice:$(openssl rand -hex 24) \\
  echo-stream web --host 0.0.0.0 --tls-cert web.crt --tls-key web.key

Open the page, allow the camera and microphone, press Start. The avatar
listens to you while silent; type a sentence (spoken by espeak-ng when it is
installed) or upload an audio file to make it speak; Interrupt stops it.
Binding beyond loopback needs bearer tokens (--tokens-file and/or
$ECHO_STREAM_TOKENS, 'principal:token'): the page asks for one and the web
server passes it to the gRPC server. Browsers give the camera only to a
secure context: beyond localhost serve the page over HTTPS (--tls-cert/--tls-key).
"""


def add_web_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream web``."""
    p.epilog = WEB_EPILOG
    p.add_argument("--host", default="127.0.0.1", help="address the page is served on (default 127.0.0.1: "
                   "loopback only)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port of the page (default 8080; 0 = any free port)")
    p.add_argument("--server", metavar="HOST:PORT", help="a running `echo-stream serve` to use (default: start "
                   "local Ray, the stage actors and a gRPC server on a loopback port here)")
    p.add_argument("--token", help="bearer token for --server when the page gives none (loopback only; prefer "
                   "$ECHO_STREAM_TOKEN)")
    p.add_argument("--tokens-file", metavar="PATH", help="tokens the page may give, one 'principal:token' per line "
                   "(also $ECHO_STREAM_TOKENS); required beyond loopback")
    p.add_argument("--tls-cert", metavar="PEM", help="serve the page over HTTPS with this certificate (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="TLS private key of the page")
    p.add_argument("--size", type=int, default=256, help="avatar video size in pixels (square, even; default 256)")
    p.add_argument("--portrait", metavar="IMAGE", help="portrait to animate (default: the bundled one)")
    p.add_argument("--checkpoint", metavar="PATH", help="model checkpoint of the embedded server (default: bundled)")
    p.add_argument("--max-sessions", type=int, default=4,
                   help="concurrent browser sessions of the embedded server; more get 'server full' (default 4)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray (default: all)")
    p.add_argument("--device", default="cpu", help="torch device of the embedded server (cpu, cuda)")
    p.add_argument("--stride", type=int, default=DEFAULT_SERVE_STRIDE, metavar="FRAMES",
                   help="new frames per generation window of the sessions (lower = less latency, more compute; "
                        "default %(default)s, as `serve`)")

"""Regenerate the committed protobuf module from ``protos/echo_stream.proto``.

``python -m echo_stream.protos.build`` (needs ``grpcio-tools``, in the ``test``
extra). The generated ``echo_stream_pb2.py`` is committed so that a plain
``pip install`` needs no code generation step; ``tests/test_serve_protocol.py``
fails when it is out of date with the ``.proto``. The gRPC method handlers are
written by hand in :mod:`echo_stream.serve` (they need a tolerant request
deserializer), so no ``_pb2_grpc`` module is generated.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE.parent.parent / "protos"
PROTO = PROTO_DIR / "echo_stream.proto"


def generate(out_dir: str | os.PathLike = HERE) -> Path:
    """Run protoc (grpcio-tools) on the .proto; returns the path of the generated module."""
    try:
        from grpc_tools import protoc
    except ImportError:  # pragma: no cover - depends on the environment
        raise SystemExit("grpcio-tools is needed to regenerate the stubs: pip install -e '.[test]'") from None
    if not PROTO.is_file():
        raise SystemExit(f"{PROTO}: not found (regenerate from a source checkout)")
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", str(PROTO)])
    if rc != 0:
        raise SystemExit(f"protoc failed on {PROTO} (exit status {rc})")
    return Path(out_dir) / "echo_stream_pb2.py"


if __name__ == "__main__":
    print(generate(sys.argv[1] if len(sys.argv) > 1 else HERE))

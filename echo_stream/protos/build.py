"""Regenerate the committed protobuf module from ``protos/echo_stream.proto``.

``python -m echo_stream.protos.build`` (needs ``grpcio-tools``, in the ``test``
extra). The generated ``echo_stream_pb2.py`` is committed so that a plain
``pip install`` needs no code generation step; ``tests/test_serve_protocol.py``
fails when it is out of date with the ``.proto``. The gRPC method handlers are
written by hand in :mod:`echo_stream.serve` (they need a tolerant request
deserializer), so no ``_pb2_grpc`` module is generated.

protoc's output is committed with its runtime-version check removed (and
nothing else changed), so that the module imports on protobuf 5.29 through 7.x;
the reasons and the guarantee this rests on are in :mod:`echo_stream.protos`.
:func:`render` does that edit and refuses a protoc whose Python output is not
the 5.29-7.x family (grpcio-tools 1.69 to 1.85 bundle protoc 29 to 35).
"""
from __future__ import annotations

import ast
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE.parent.parent / "protos"
PROTO = PROTO_DIR / "echo_stream.proto"
MODULE = "echo_stream_pb2.py"

# protobuf python versions whose generated code this module's body is checked against
OLDEST_GENERATOR = (5, 29)
NEWEST_GENERATOR_MAJOR = 7

_IMPORT = "from google.protobuf import runtime_version as _runtime_version\n"
_CHECK = re.compile(
    r"_runtime_version\.ValidateProtobufRuntimeVersion\(\n"
    r"\s*_runtime_version\.Domain\.PUBLIC,\n"
    r"\s*(\d+),\n\s*(\d+),\n\s*(\d+),\n\s*'([^']*)',\n\s*'[^']*'\n\)\n")
_VERSION_LINE = re.compile(r"^# Protobuf Python Version: .*$", re.M)
NOTE = ("# echo_stream.protos.build took out protoc's runtime-version check and changed nothing else:\n"
        "# this module runs on protobuf 5.29 through 7.x; see echo_stream/protos/__init__.py.\n")


def protoc_output() -> str:
    """Run protoc (grpcio-tools) on the .proto; returns the Python module it writes, unchanged."""
    try:
        from grpc_tools import protoc
    except ImportError:  # pragma: no cover - depends on the environment
        raise SystemExit("grpcio-tools is needed to regenerate the stubs: pip install -e '.[test]'") from None
    if not PROTO.is_file():
        raise SystemExit(f"{PROTO}: not found (regenerate from a source checkout)")
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={tmp}", str(PROTO)])
        if rc != 0:
            raise SystemExit(f"protoc failed on {PROTO} (exit status {rc})")
        return (Path(tmp) / MODULE).read_text()


def render(generated: str) -> str:
    """protoc's module without its runtime-version check, with a note saying so.

    Raises ``ValueError`` when the check is not there exactly as expected (a
    protoc whose output changed shape) or when the generator is outside
    protobuf python 5.29..7.x (its body may call runtime API older runtimes lack).
    """
    found = _CHECK.findall(generated)
    if len(found) != 1 or generated.count(_IMPORT) != 1:
        raise ValueError("protoc's output has no runtime-version check of the expected form; "
                         "this generator is not one build.py knows (see echo_stream/protos/__init__.py)")
    major, minor, patch, suffix = int(found[0][0]), int(found[0][1]), int(found[0][2]), found[0][3]
    if (major, minor) < OLDEST_GENERATOR or major > NEWEST_GENERATOR_MAJOR or suffix:
        raise ValueError(
            f"protoc writes protobuf python {major}.{minor}.{patch}{suffix} code; echo_stream_pb2.py is "
            f"checked for {OLDEST_GENERATOR[0]}.{OLDEST_GENERATOR[1]} .. {NEWEST_GENERATOR_MAJOR}.x "
            "(use a grpcio-tools that bundles protoc 29..35, e.g. 1.69..1.85; or widen the range "
            "after ECHO_STREAM_PROTOBUF_MATRIX=1 tests/test_protobuf_matrix.py passes)")
    text = _CHECK.sub("", generated.replace(_IMPORT, ""))
    if "_runtime_version" in text:
        raise ValueError("protoc's output uses _runtime_version beyond the version check")
    header_end = _VERSION_LINE.search(text)
    if header_end is None:
        raise ValueError("protoc's output has no '# Protobuf Python Version' line")
    return text[:header_end.end() + 1] + NOTE + text[header_end.end() + 1:]


def serialized_descriptor(module_text: str) -> bytes:
    """The serialized ``FileDescriptorProto`` a generated module passes to ``AddSerializedFile``."""
    for node in ast.walk(ast.parse(module_text)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "AddSerializedFile":
            return ast.literal_eval(node.args[0])
    raise ValueError("no AddSerializedFile(...) call in the module")


def without_generator_line(module_text: str) -> str:
    """The module text minus the ``# Protobuf Python Version`` line (which protoc wrote it)."""
    return _VERSION_LINE.sub("", module_text, count=1)


def generate(out_dir: str | os.PathLike = HERE) -> Path:
    """Run protoc and write the rendered module to ``out_dir``; returns its path."""
    try:
        text = render(protoc_output())
    except ValueError as e:
        raise SystemExit(str(e)) from None
    path = Path(out_dir) / MODULE
    path.write_text(text)
    return path


if __name__ == "__main__":
    print(generate(sys.argv[1] if len(sys.argv) > 1 else HERE))

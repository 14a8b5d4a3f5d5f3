"""The committed ``echo_stream_pb2.py`` on every protobuf runtime pyproject.toml allows.

Opt-in (``ECHO_STREAM_PROTOBUF_MATRIX=1``): it makes one venv per runtime and
installs ``protobuf`` + ``grpcio`` into each (pip's cache or PyPI), so it takes
a minute or more and is kept out of the default run::

    ECHO_STREAM_PROTOBUF_MATRIX=1 .venv/bin/python -m pytest -q -rA tests/test_protobuf_matrix.py

Each venv imports the module by path (nothing of echo_stream is installed
there) under the upb and the pure-Python implementation, round-trips
ClientMessage/ServerMessage (``tests/protobuf_roundtrip.py``) and must raise no
warning. The runtimes: 5.29.6 (the floor, Pipecat's too), 6.31.1 (the last 6.x
that warns on gencode one major older, so it would catch a 5.x version stamp
left in the module), the newest 6.x, and the 7.x installed here. The versions
seen are printed (``-rA``) so that docs/serving.md can quote them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest

from echo_stream.protos import build

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("ECHO_STREAM_PROTOBUF_MATRIX") != "1",
                       reason="set ECHO_STREAM_PROTOBUF_MATRIX=1 to build a venv per protobuf runtime"),
]

SCRIPT = Path(__file__).with_name("protobuf_roundtrip.py")
RUNTIMES = {
    "5.29.6": "protobuf==5.29.6",
    "6.31.1": "protobuf==6.31.1",
    "newest 6.x": "protobuf>=6,<7",
    "installed 7.x": f"protobuf=={metadata.version('protobuf')}",
}


@pytest.fixture(scope="module")
def venvs(tmp_path_factory):
    made = {}

    def make(label: str) -> Path:
        if label not in made:
            root = tmp_path_factory.mktemp("pb-" + label.replace(" ", "-").replace(".", "_"))
            venv.EnvBuilder(with_pip=True).create(root)
            python = root / "bin" / "python"
            subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            RUNTIMES[label], "grpcio"], check=True, timeout=900)
            made[label] = python
        return made[label]
    return make


@pytest.mark.parametrize("implementation", ["upb", "python"])
@pytest.mark.parametrize("label", list(RUNTIMES))
def test_committed_pb2_on_runtime(venvs, label, implementation):
    if label == "installed 7.x" and not metadata.version("protobuf").startswith("7."):
        pytest.skip(f"the installed protobuf is {metadata.version('protobuf')}, not 7.x")
    python = venvs(label)
    env = dict(os.environ, PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    if implementation == "python":
        env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"
    else:
        env.pop("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", None)
    proc = subprocess.run([str(python), str(SCRIPT), str(build.HERE / build.MODULE)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=python.parent.parent)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    print(f"\n{label}: protobuf {report.get('protobuf')} ({report.get('implementation')}), "
          f"grpcio {report.get('grpcio')}, "
          f"python {report['python']}: ok={report['ok']} warnings={len(report['warnings'])}", file=sys.stderr)
    assert report["ok"], report.get("traceback")
    assert report.get("implementation") == implementation
    assert report["warnings"] == [], report["warnings"]

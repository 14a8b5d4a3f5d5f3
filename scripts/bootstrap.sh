#!/usr/bin/env bash
# Creates .venv (once) and installs echo-stream with its test extras (and the browser demo's and the
# voice-agent adapters', which the suite covers) into it.
# Torch is installed first, pinned, so that a CPU-only machine never pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${ECHO_STREAM_TORCH:-2.13.0}
stamp=.venv/.echo-stream-installed
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  echo ">> creating virtual environment .venv" >&2
  "$PY" -m venv .venv
fi
echo ">> installing torch==$TORCH_VERSION (CPU wheel where available)" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" 2>&1 | grep -v '^WARNING: Location' || true
echo ">> installing echo-stream and its dependencies" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,web,pipecat,livekit]" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import echo_stream, echo_stream.kernels, torch, ray, av, librosa" || {
  echo "bootstrap: the install did not complete (see pip output above)" >&2; exit 1; }
echo "$want" > "$stamp"

"""`echo-stream web` as a user starts it: the embedded default (local Ray, the stage actors, a loopback gRPC
server) comes up, serves the page and its config, and exits 0 on SIGTERM."""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("ray")
pytest.importorskip("aiortc")

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _lines_until(proc, pattern: str, timeout: float) -> tuple[re.Match | None, list[str]]:
    """stderr lines of ``proc`` until one matches ``pattern`` (or the timeout, or the process ends)."""
    seen, buf = [], b""
    end = time.monotonic() + timeout
    fd = proc.stderr.fileno()
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            text = line.decode(errors="replace")
            seen.append(text)
            m = re.search(pattern, text)
            if m:
                return m, seen
    return None, seen


def test_embedded_web_command_serves_the_page_and_exits_on_sigterm(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "echo_stream.cli", "web", "--port", "0", "--size", "96",
                             "--num-cpus", "2"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
                            cwd=tmp_path)
    try:
        m, seen = _lines_until(proc, r"echo-stream web: open (http://127\.0\.0\.1:\d+/) \(avatar server "
                                     r"127\.0\.0\.1:\d+; no auth: loopback", 180)
        assert m, "\n".join(seen[-20:])
        url = m.group(1)
        with urllib.request.urlopen(url, timeout=10) as r:
            page = r.read().decode()
        assert r.status == 200 and "echo-stream" in page and "<video" in page
        with urllib.request.urlopen(url + "config", timeout=10) as r:
            cfg = json.loads(r.read())
        assert cfg["size"] == 96 and cfg["token_required"] is False and isinstance(cfg["tts"], bool), cfg
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        _, rest = _lines_until(proc, r"$^", 1)
        assert not any("Traceback" in line for line in seen + rest), "\n".join(seen + rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""The command line: its whole argument tree builds and answers ``--help`` without the heavy libraries,
every command module is imported only when its command runs, and the defaults it shows are the library's."""
import json
import re
import subprocess
import sys

import pytest

from echo_stream import cli

HEAVY = ("torch", "ray", "librosa", "av", "cv2", "scipy", "grpc", "echo_stream.model", "echo_stream.media")

# Every --help of the CLI in one fresh interpreter; prints the help texts and the heavy modules loaded.
_PROBE = r"""
import contextlib, io, json, sys
from echo_stream import cli

parser = cli.build_parser()
helps = {}
commands = [[]] + [[c[0]] for c in cli.COMMANDS] + [["bench"]] + [["bench", b[0]] for b in cli.BENCHMARKS]
for argv in commands:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = cli.main(argv + ["--help"])
        except SystemExit as e:
            code = e.code
    helps[" ".join(argv)] = [code, out.getvalue()]
heavy = [m for m in json.loads(sys.argv[1]) if m in sys.modules]
print(json.dumps({"helps": helps, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def probe():
    r = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(HEAVY)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_help_of_every_command_loads_no_heavy_module(probe):
    assert probe["heavy"] == []
    for argv, (code, text) in probe["helps"].items():
        assert code == 0, argv
        assert text.startswith("usage: echo-stream" + (" " + argv if argv else "")), argv


def test_top_level_help_names_every_command(probe):
    def listed(text):   # the sub-command names argparse lists, one per line
        return {m.group(1) for m in re.finditer(r"^    (\S+)", text, re.M)}

    assert listed(probe["helps"][""][1]) >= {c[0] for c in cli.COMMANDS} | {"bench"}
    assert listed(probe["helps"]["bench"][1]) >= {b[0] for b in cli.BENCHMARKS}


def test_command_help_keeps_its_arguments_and_descriptions(probe):
    h = {k: v[1] for k, v in probe["helps"].items()}
    assert "--avatar-audio" in h["generate"] and "examples:" in h["generate"]
    assert "--tls-cert" in h["serve"] and "Binding beyond loopback" in h["serve"]
    assert "--test-signal" in h["client"] and "examples:" in h["client"]
    assert "--num-cpus" in h["preprocess"] and "Live Link Face" in h["preprocess"]
    assert "--make-corpus" in h["train"] and "--time-budget" in h["train"]
    assert "--user-guidance" in h["eval"] and "--max-seconds" in h["track"]
    # descriptions read from the command modules' docstrings, without importing them
    assert "parallel capacity" in h["bench preprocess"]
    assert "real time" in h["bench serve"] and "face-tracker speed" in h["bench tracker"]


def test_a_command_module_is_imported_when_its_command_runs():
    code = ("import sys; from echo_stream import cli\n"
            "rc = cli.main(['shards', '/nonexistent/manifest.jsonl', '-o', '/nonexistent/out'])\n"
            "print(rc, 'echo_stream.dataset' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["1", "True"], r.stderr
    assert "input not found" in r.stderr


def _parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_defaults_shown_are_the_librarys():
    from echo_stream import dataset, preprocess, train

    args = _parse("preprocess", "in", "out")
    assert preprocess.settings_from_args(args) == preprocess.Settings()
    assert args.shard_size == preprocess.DEFAULT_SHARD_SIZE
    args = _parse("shards", "corpus", "-o", "out")
    assert (args.chunk_seconds, args.shard_rows) == (dataset.DEFAULT_CHUNK_SECONDS, dataset.DEFAULT_SHARD_ROWS)
    args = _parse("train")
    assert args.history_s == train.DEFAULT_HISTORY_S and args.bptt_windows == train.DEFAULT_BPTT_WINDOWS
    assert (args.chunk_seconds, args.shard_rows) == (dataset.DEFAULT_CHUNK_SECONDS, dataset.DEFAULT_SHARD_ROWS)



def test_no_library_module_imports_the_command_line():
    import ast
    from pathlib import Path

    root = Path(cli.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path == root / "cli.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = "." * node.level + (node.module or "")
                names = {a.name for a in node.names}
                pkg = path.parent.relative_to(root.parent).as_posix().replace("/", ".")
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                full = (base + "." + (node.module or "")).rstrip(".") if node.level else node.module
                if full == "echo_stream.cli" or (full == "echo_stream" and "cli" in names):
                    offenders.append(f"{path.relative_to(root)}: from {mod} import {', '.join(sorted(names))}")
            elif isinstance(node, ast.Import) and any(a.name == "echo_stream.cli" for a in node.names):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []

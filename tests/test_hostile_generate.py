"""The hostile-input corpus (tests/hostile.py) through ``echo-stream generate`` and ``preprocess``.

Every case must end as one line ``echo-stream: error: <input>: <problem>`` with
exit status 1: no traceback, no warning noise, no output file or temp file left.
The same bad media as preprocessing rows must each be quarantined with a reason
that names the problem, while the good row of the same run is processed.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from echo_stream import cli, preprocess

from . import hostile


#: the corpus is written once, at collection (its case names parametrize the test below)
_DIR = tempfile.TemporaryDirectory(prefix="hostile-")
_CASES = hostile.generate_cases(_DIR.name)


@pytest.fixture(scope="module")
def corpus():
    d = Path(_DIR.name)
    yield d, _CASES, hostile.good_inputs(d)
    _DIR.cleanup()


def test_the_corpus_is_big_enough(corpus):
    _, cases, _ = corpus
    assert len(cases) >= 60 and len({c.name for c in cases}) == len(cases)


def _argv(case: hostile.Case, good: dict, out_dir) -> tuple[list[str], list[str]]:
    opts = dict(good)
    opts.update(case.options)
    out = opts.pop("-o", str(out_dir / "out.mp4"))
    motion_out = str(out_dir / "motion.parquet")
    argv = ["generate", "-o", out, "--motion-out", motion_out, "--no-ray", "--quiet", "--size", "64"]
    for k, v in opts.items():
        argv += [k, v]
    return argv, [out, motion_out]


@pytest.mark.parametrize("name", [c.name for c in _CASES])
def test_generate_refuses_with_one_line(corpus, tmp_path, capsys, name):
    d, cases, good = corpus
    case = next(c for c in cases if c.name == name)
    argv, outputs = _argv(case, good, tmp_path)
    before = set(os.listdir(d))
    rc = cli.main(argv)
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 1, f"{name}: exit {rc}, stderr {cap.err[-500:]!r}"
    assert len(lines) == 1, f"{name}: expected one line, got {lines}"
    line = lines[0]
    assert line.startswith("echo-stream: error: ") and "Traceback" not in line
    assert case.names in line, f"{name}: the line does not name the input: {line}"
    assert any(w in line.lower() for w in case.problem), f"{name}: the line does not say the problem: {line}"
    for p in outputs:
        assert not os.path.isfile(p), f"{name}: left {p}"
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    assert set(os.listdir(d)) == before, f"{name}: files appeared beside the inputs"


def test_the_good_inputs_are_good(corpus, tmp_path, capsys):
    """The cases differ from a run that works by their one bad input (else they test nothing)."""
    _, _, good = corpus
    argv, outputs = _argv(hostile.Case("good"), good, tmp_path)
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert all(os.path.getsize(p) > 0 for p in outputs)


#: media cases that make sense as a preprocessing row's avatar media (options of the generate case)
_PRE_CASES = ("avatar-audio:random.mp3", "avatar-audio:empty.wav", "avatar-audio:zero-channels.wav",
              "avatar-audio:claims-67000s.wav", "avatar-audio:nan.wav", "avatar-audio:inf.wav",
              "avatar-audio:trunc.m4a", "avatar-audio:trunc.ogg", "avatar-audio:jump-1e6s.mka",
              "avatar-audio:silent.mp4", "avatar-audio:text.ogg", "avatar-audio:missing.wav")


def test_preprocess_quarantines_each_hostile_row_and_keeps_going(corpus, tmp_path, capsys):
    d, cases, good = corpus
    by = {c.name: c for c in cases}
    root = tmp_path / "in"
    root.mkdir()
    rows = [{"conversation_id": "good", "avatar_media": "good.wav"}]
    shutil.copy(good["--avatar-audio"], root / "good.wav")
    for i, name in enumerate(_PRE_CASES):
        src = by[name].options["--avatar-audio"]
        dst = root / os.path.basename(src)
        if os.path.exists(src):
            shutil.copy(src, dst)
        rows.append({"conversation_id": f"bad{i}", "avatar_media": dst.name})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    preprocess.preprocess(root, out, executor="local", progress=False,
                          settings=preprocess.Settings(require_motion=False, silence_dbfs=-200.0))
    outcomes = {}
    for line in (out / "outcomes.jsonl").read_text().splitlines():
        o = json.loads(line)
        outcomes[o["conversation_id"]] = o
    assert outcomes["good"]["status"] == "done", outcomes["good"]
    for i, name in enumerate(_PRE_CASES):
        o = outcomes[f"bad{i}"]
        assert o["status"] == "quarantined", (name, o)
        reason = o["reason"].lower()
        assert "traceback" not in reason and "\n" not in reason
        assert any(w in reason for w in by[name].problem), (name, o["reason"])


@pytest.mark.parametrize("manifest,needle", [
    ("not json at all\n", "not a json object"),
    ("[" * 50000 + "]" * 50000 + "\n", "not a json object"),
    ('{"conversation_id": "a"}\n', "avatar_media"),
    ('"just a string"\n', "not a json object"),
])
def test_preprocess_bad_manifest_is_one_line(tmp_path, capsys, manifest, needle):
    m = tmp_path / "manifest.jsonl"
    m.write_text(manifest)
    rc = cli.main(["preprocess", str(m), str(tmp_path / "out"), "--sequential", "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "manifest.jsonl" in lines[0] and needle in lines[0].lower(), lines
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))

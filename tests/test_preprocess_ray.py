"""`echo-stream preprocess` on Ray Data (local Ray, 2 CPUs): end to end on a small generated corpus with the
serving path's features, a killed worker, Ctrl-C and resume with exactly-once accounting, and the
synthetic corpus through preprocess -> train."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from echo_stream import cli, preprocess, schemas
from echo_stream.dataset import FEATURE_COLUMNS, FRAME_COLUMNS, ShardDataset, read_dataset_info, read_shard
from echo_stream.preprocess import Settings
from echo_stream.stages.decode import DecodeStage, chunks
from echo_stream.stages.features import FeaturesStage

from .preprocess_helpers import write_avatar_video, write_conversation

pytestmark = [pytest.mark.ray]
REPO = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = REPO + (os.pathsep + old if old else "")  # workers import tests.preprocess_helpers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rows = [write_conversation(root / "v0", 0, 3.3, user="video"),
            write_conversation(root / "a1", 1, 2.1, user="audio", track="csv"),
            write_conversation(root / "n2", 2, 1.5, user="none"),
            write_conversation(root / "v3", 3, 2.6, user="video", track="csv")]
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, rows


def _chunk_ids(out: Path) -> list[tuple[str, int]]:
    ids = []
    for s in read_dataset_info(out)["shards"]:
        t = read_shard(out / s["file"])
        ids += list(zip(t.column("conversation_id").to_pylist(), t.column("chunk_index").to_pylist()))
    return ids


def _serving_features(root: Path, row: dict):
    dec = DecodeStage(chunk_frames=8)
    kw = {}
    if row.get("user_media"):
        user = str(root / row["user_media"])
        kw = {"user_video": user} if user.endswith(".mp4") else {"user_audio": user}
    dec.open_session("s", str(root / row["avatar_media"]), **kw)
    fs = FeaturesStage()
    return schemas.concat([fs.process(p).get(schemas.FEATURES) for p, _ in chunks(dec, "s")], schemas.FEATURES)


def test_ray_preprocess_end_to_end_identical_to_serving_and_sequential(local_ray, corpus, tmp_path):
    root, rows = corpus
    settings = Settings(chunk_seconds=1.0)
    info = preprocess.preprocess(root, tmp_path / "ray", settings=settings, shard_size=3, progress=False)
    seq = preprocess.preprocess(root, tmp_path / "seq", settings=settings, shard_size=3, progress=False,
                                executor="local")
    run = info["run"]
    assert run["executor"] == "ray" and run["done"] == 4 and run["quarantined_now"] == 0 and run["complete"]
    assert all(s["rows"] <= 3 for s in info["shards"])
    ids = _chunk_ids(tmp_path / "ray")
    assert len(ids) == len(set(ids)) == info["total"]["chunks"] == seq["total"]["chunks"]
    assert info["stats"]["frames"] == seq["stats"]["frames"]
    assert np.allclose(info["stats"]["motion_mean"], seq["stats"]["motion_mean"], atol=1e-6)
    ray_convs = {c.conversation_id: c for c in ShardDataset(tmp_path / "ray", "train").conversations}
    seq_convs = {c.conversation_id: c for c in ShardDataset(tmp_path / "seq", "train").conversations}
    for r in rows:
        cid = r["conversation_id"]
        served = _serving_features(root, r)
        conv = ray_convs[cid]
        assert served.num_rows == conv.frames
        for col in FEATURE_COLUMNS:  # the serving pipeline's features, bit for bit
            assert np.array_equal(schemas.column(served, col), conv.arrays[col]), (cid, col)
        for col in FRAME_COLUMNS:    # Ray and the sequential loop write the same data
            assert np.array_equal(seq_convs[cid].arrays[col], conv.arrays[col]), (cid, col)
        assert conv.transcript == seq_convs[cid].transcript and conv.transcript
        assert np.abs(conv.arrays["motion"]).max() > 0
    outcomes = [json.loads(x) for x in (tmp_path / "ray" / "outcomes.jsonl").read_text().splitlines()]
    assert [o["status"] for o in outcomes] == ["done"] * 4


def test_killed_worker_is_retried_and_counted_once(local_ray, corpus, tmp_path):
    """A face tracker that kills its worker process on first use: Ray restarts the actor, the conversation
    is redone, and the output holds every conversation once."""
    root, rows = corpus
    (root / "tracked").mkdir(exist_ok=True)
    write_avatar_video(root / "tracked" / "avatar.mp4", 1.4, seed=5)
    model = tmp_path / "tracker.json"
    model.write_text('{"gain": 1.5}')
    extra = {"conversation_id": "tracked", "avatar_media": "tracked/avatar.mp4"}
    settings = Settings(extractor="tests.preprocess_helpers:CrashOnceTracker", extractor_model=str(model))
    info = preprocess.preprocess(rows + [extra], tmp_path / "out", root=root, settings=settings, shard_size=2,
                                 progress=False)
    assert Path(str(model) + ".crashed").exists()   # a worker did die
    assert info["run"]["done"] == 5 and info["run"]["quarantined_now"] == 0, info["run"]
    ids = [c for c, i in _chunk_ids(tmp_path / "out") if i == 0]
    assert sorted(ids) == sorted([r["conversation_id"] for r in rows] + ["tracked"])
    conv = next(c for c in ShardDataset(tmp_path / "out", "train").conversations if c.conversation_id == "tracked")
    assert conv.arrays["motion"][:, 3].max() > 0  # jawOpen from the tracker


def test_ctrl_c_then_resume_accounts_every_input_once(local_ray, tmp_path):
    root = tmp_path / "in"
    rows = [write_conversation(root / f"c{k}", k, 1.2 + 0.2 * (k % 3), user="video") for k in range(10)]
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "echo_stream.cli", "preprocess", str(root), str(out), "--num-cpus", "2",
           "--shard-size", "1", "--quiet"]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    journal = out / "journal.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and journal.read_text().count('"commit"') >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Run the same command again to resume" in err
    assert not (out / "dataset.json").exists()
    committed = {c for c, _ in ((e["conversations"][0]["conversation_id"], 0) for e in
                                map(json.loads, journal.read_text().splitlines()) if e["type"] == "commit")}
    assert 2 <= len(committed) < len(rows)
    info = preprocess.preprocess(root, out, shard_size=1, progress=False)
    run = info["run"]
    assert run["skipped"] == len(committed) and run["done"] == len(rows) - len(committed), run
    ids = [c for c, i in _chunk_ids(out) if i == 0]
    assert sorted(ids) == sorted(r["conversation_id"] for r in rows)  # no duplicates, none missing
    outcomes = {o["conversation_id"]: o["status"] for o in
                map(json.loads, (out / "outcomes.jsonl").read_text().splitlines())}
    assert {k for k, v in outcomes.items() if v == "skipped"} == committed
    assert all(v in ("skipped", "done") for v in outcomes.values()) and len(outcomes) == len(rows)


@pytest.mark.slow
def test_synthetic_corpus_through_preprocess_then_train(local_ray, tmp_path, capsys):
    """The synthetic corpus (`echo-stream corpus`) -> `echo-stream preprocess` -> `echo-stream train`, unchanged."""
    from echo_stream.model import load_checkpoint

    corpus_dir, shards, run_dir = tmp_path / "corpus", tmp_path / "shards", tmp_path / "run"
    assert cli.main(["corpus", str(corpus_dir), "--conversations", "3", "--no-video", "--quiet"]) == 0
    assert cli.main(["preprocess", str(corpus_dir), str(shards), "--shard-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "preprocess summary" in err and "done this run          3" in err
    info = read_dataset_info(shards)
    assert info["total"]["conversations"] == 3 and info["total"]["hours"] > 0.04
    assert cli.main(["train", "--shards", str(shards), "--out", str(run_dir), "--steps", "3", "--batch-size", "2,2",
                     "--history-s", "1", "--eval-batches", "0", "--threads", "1", "--quiet"]) == 0
    model = load_checkpoint(run_dir / "final")
    assert model.checkpoint_meta["stage"] == 2 and model.checkpoint_meta["synthetic_data"] is True

"""Preprocessing without Ray: Live Link Face alignment, input formats, quality checks / quarantine, the
commit protocol (exactly-once recovery), the sequential executor that `shards` and the benchmark use."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from echo_stream import atomic, config, motion, preprocess, tracks
from echo_stream.dataset import ShardDataset, read_dataset_info, read_shard
from echo_stream.errors import InputError
from echo_stream.preprocess import Settings, read_inputs

from . import mediagen
from .preprocess_helpers import timecode, write_conversation, write_livelink_csv

JAW, PITCH = motion.CHANNEL_INDEX["jawOpen"], motion.CHANNEL_INDEX["headPitch"]


# ----------------------------------------------------------------------------------------- Live Link Face

def test_livelink_csv_aligned_to_the_25fps_grid_by_timecode(tmp_path):
    # a 60 fps take starting at an arbitrary time of day, with a frame dropped; values are ramps of time
    t = np.arange(150) / 60.0
    t = np.delete(t, 40)
    vals = {"JawOpen": 0.5 * t, "EyeBlinkLeft": np.where(t > 1.0, 1.0, 0.0), "HeadYaw": np.degrees(0.1 * t) + 0,
            "LeftEyeYaw": np.full(t.size, 7.0)}
    p = write_livelink_csv(tmp_path / "take.csv", t, vals, rate=60.0, start_s=14 * 3600 + 3 * 60 + 52.0)
    ts, cols, rate = tracks.load_livelink_csv(p)
    assert rate == 60.0 and np.allclose(ts, t - t[0], atol=2e-3)
    assert "headYaw" in cols and not any("Eye" in c and "Yaw" in c for c in cols)
    n = 50
    m = tracks.read_livelink_csv(p, n)
    grid = np.arange(n) / config.FPS
    assert m.shape == (n, 58) and m.dtype == np.float32
    assert np.allclose(m[:, JAW], 0.5 * np.clip(grid, 0, t[-1]), atol=2e-3)
    # HeadYaw was written in degrees (values up to 14 > pi): converted to radians
    assert np.allclose(m[:, motion.CHANNEL_INDEX["headYaw"]], 0.1 * np.clip(grid, 0, t[-1]), atol=1e-3)
    blink = m[:, motion.CHANNEL_INDEX["eyeBlinkLeft"]]
    assert blink[grid < 0.98].max() == 0 and blink[grid > 1.02].min() == 1
    # an offset shifts the track on the media timeline; values hold before the first row
    m2 = tracks.read_livelink_csv(p, n, offset_s=0.4)
    assert np.allclose(m2[:, JAW], 0.5 * np.clip(grid - 0.4, 0, t[-1]), atol=2e-3)
    # the capture rate is inferred from the frame field: a 30 fps take
    t30 = np.arange(45) / 30.0
    p30 = write_livelink_csv(tmp_path / "take30.csv", t30, {"JawOpen": t30}, rate=30.0)
    _, _, r30 = tracks.load_livelink_csv(p30)
    assert r30 == 30.0
    assert np.allclose(tracks.read_livelink_csv(p30, 20)[:, JAW], np.clip(np.arange(20) / 25, 0, t30[-1]), atol=2e-3)


def test_livelink_timecode_midnight_and_bad_files(tmp_path):
    t = np.arange(10) / 60.0
    p = write_livelink_csv(tmp_path / "mid.csv", t, {"JawOpen": t}, start_s=86400 - 5 / 60.0)
    assert timecode(0, 60, 86400 - 5 / 60.0).startswith("23:59:59:55")
    ts, _, _ = tracks.load_livelink_csv(p)
    assert np.allclose(ts, t, atol=2e-3)  # continues across 00:00:00
    lines = p.read_text().splitlines()
    (tmp_path / "trunc.csv").write_text("\n".join(lines[:5] + [lines[5][:30]]) + "\n")
    with pytest.raises(InputError, match=r"trunc.csv: line 6: .*truncated"):
        tracks.load_livelink_csv(tmp_path / "trunc.csv")
    (tmp_path / "other.csv").write_text("time,jaw\n0,1\n")
    with pytest.raises(InputError, match="Timecode"):
        tracks.load_livelink_csv(tmp_path / "other.csv")
    with pytest.raises(InputError, match="unknown motion track format"):
        tracks.load_track(tmp_path / "m.txt")


# ----------------------------------------------------------------------------------------- inputs

def test_manifest_csv_jsonl_and_directory_convention(tmp_path):
    a = write_conversation(tmp_path / "d" / "train" / "c1", 0, 1.0, user="audio", track="csv")
    write_conversation(tmp_path / "d" / "heldout" / "c2", 1, 1.0, user="none", transcript=False)
    rows, root = read_inputs(tmp_path / "d")
    assert root == tmp_path / "d"
    got = {r["conversation_id"]: r for r in rows}
    assert got["c1"] == {"conversation_id": "c1", "split": "train", "avatar_media": "train/c1/avatar.wav",
                         "user_media": "train/c1/user.wav", "transcript": "train/c1/transcript.json",
                         "avatar_motion": "train/c1/avatar_motion.csv"}
    assert got["c2"]["split"] == "heldout" and "user_media" not in got["c2"]
    csv_path = tmp_path / "d" / "list.csv"
    csv_path.write_text("conversation_id,avatar_media,user_media,avatar_motion,duration_s,split\n"
                        "x1,train/c1/avatar.wav,,train/c1/avatar_motion.csv,1.0,train\n")
    (r,), root = read_inputs(csv_path)
    assert r["user_media"] is None and r["duration_s"] == 1.0 and root == csv_path.parent
    (tmp_path / "bad.csv").write_text("id,media\n1,a.wav\n")
    with pytest.raises(InputError, match="conversation_id"):
        read_inputs(tmp_path / "bad.csv")
    with pytest.raises(InputError, match="no manifest.jsonl"):
        read_inputs(tmp_path / "d" / "train" / "c1")
    assert a["avatar_motion"].endswith(".csv")


# ----------------------------------------------------------------------------------------- quarantine

@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Three good conversations and one of each kind of bad input."""
    root = tmp_path_factory.mktemp("mixed")
    rows = [write_conversation(root / "good0", 0, 2.2, user="video"),
            write_conversation(root / "good1", 1, 1.6, user="audio", track="csv"),
            write_conversation(root / "good2", 2, 1.2, user="none")]
    bad = {}

    def add(name, **kw):
        r = write_conversation(root / name, 3, 1.6, user=kw.pop("user", "audio"))
        r.update(kw)
        rows.append(r)
        return r

    r = add("corrupt", user="video")
    mediagen.write_corrupted(root / "corrupt/user.mp4", root / "corrupt/user_bad.mp4", start_fraction=0.2,
                             length_fraction=0.6)
    r["user_media"] = "corrupt/user_bad.mp4"
    bad["corrupt"] = "user_bad.mp4"
    r = add("truncated")
    mediagen.write_truncated(root / "truncated/avatar.wav", root / "truncated/cut.wav", 0.5)
    r["avatar_media"] = "truncated/cut.wav"
    bad["truncated"] = "cut.wav: .*truncated"
    r = add("silent")
    mediagen.write_audio(root / "silent/avatar.wav", np.zeros(16000, np.float32), 16000)
    bad["silent"] = "silent"
    add("wronglen", duration_s=9.0)
    bad["wronglen"] = "wrong length: avatar audio is 1.60 s, the manifest says duration_s 9.00"
    r = add("shorttrack")
    generate_short = np.zeros((10, motion.NUM_CHANNELS), np.float32)
    from echo_stream import generate
    atomic.write_parquet(generate.motion_table(np.arange(10), generate_short),
                         str(root / "shorttrack/avatar_motion.parquet"))
    bad["shorttrack"] = "wrong length: motion track covers 0.40 s"
    r = add("undecodable")
    mediagen.write_text(root / "undecodable/avatar.mp4")
    r["avatar_media"] = "undecodable/avatar.mp4"
    bad["undecodable"] = "avatar.mp4"
    r = add("nomotion")
    r.pop("avatar_motion")
    bad["nomotion"] = "no motion targets"
    rows.append(dict(rows[0]))  # a duplicate id
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, rows, bad


def test_bad_files_quarantined_with_reasons_and_the_job_continues(mixed, tmp_path):
    root, rows, bad = mixed
    info = preprocess.preprocess(root, tmp_path / "out", executor="local", progress=False, shard_size=2)
    outcomes = [json.loads(x) for x in (tmp_path / "out" / "outcomes.jsonl").read_text().splitlines()]
    assert [o["conversation_id"] for o in outcomes] == [r["conversation_id"] for r in rows]
    by = {}
    for o in outcomes:
        by.setdefault(o["conversation_id"], []).append(o)
    for cid in ("good0", "good1", "good2"):
        assert by[cid][0]["status"] == "done" and by[cid][0]["shards"]
    assert by["good0"][1]["status"] == "quarantined" and "twice" in by["good0"][1]["reason"]
    for cid, pattern in bad.items():
        (o,) = by[cid]
        assert o["status"] == "quarantined", o
        assert __import__("re").search(pattern, o["reason"]), (cid, o["reason"])
    assert info["total"]["conversations"] == 3 and info["run"]["quarantined_now"] == len(bad)
    assert info["run"]["duplicate_rows"] == 1
    assert {q["conversation_id"] for q in info["quarantined"]} == set(bad)
    ds = ShardDataset(tmp_path / "out", "train")
    assert sorted(c.conversation_id for c in ds.conversations) == ["good0", "good1", "good2"]
    card = (tmp_path / "out" / "dataset_card.md").read_text()
    assert "| train | 3 |" in card and "silent" in card
    # a re-run keeps the quarantined ones quarantined (not retried) and skips the done ones
    again = preprocess.preprocess(root, tmp_path / "out", executor="local", progress=False, shard_size=2)
    assert again["run"]["done"] == 0 and again["run"]["skipped"] == 3
    assert again["run"]["quarantined_before"] == len(bad)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_live_link_track_through_preprocess_lands_on_the_media_grid(mixed, tmp_path):
    """good1's Live Link CSV holds its 25 fps motion sampled at 60 fps (timecodes from 10:00:00:00): the shard's
    targets are those samples interpolated back at t = i / 25 (and zeros for a row without a track)."""
    from echo_stream import media

    from .preprocess_helpers import motion_for

    root, rows, _ = mixed
    r = next(x for x in rows if x["conversation_id"] == "good1")
    info = preprocess.preprocess([r, dict(r, conversation_id="untracked", avatar_motion=None)], tmp_path / "o",
                                 root=root, executor="local", progress=False,
                                 settings=Settings(require_motion=False))
    assert info["total"]["conversations"] == 2
    convs = {c.conversation_id: c for c in ShardDataset(tmp_path / "o", "train").conversations}
    m25 = motion_for(media.decode_audio(root / r["avatar_media"]), 1)
    grid = np.arange(len(m25)) / config.FPS
    t60 = np.arange(int(1.6 * 60)) / 60.0
    got = convs["good1"].arrays["motion"]
    for ch in (JAW, PITCH):
        want = np.interp(grid, t60, np.interp(t60, grid, m25[:, ch]))
        assert np.allclose(got[:, ch], want, atol=2e-3), ch
    assert np.abs(got[:, JAW] - m25[:, JAW]).mean() < 0.03
    assert np.all(convs["untracked"].arrays["motion"] == 0)


# ----------------------------------------------------------------------------------------- commit protocol

def test_recovery_removes_uncommitted_shards_and_torn_journal_lines(mixed, tmp_path):
    root, rows, _ = mixed
    good = [r for r in rows[:3]]
    out = tmp_path / "o"
    first = preprocess.preprocess(good, out, root=root, executor="local", progress=False, shard_size=1, limit=2)
    assert first["run"]["done"] == 2 and first["run"]["not_run"] == 1 and not (out / "dataset.json").exists()
    committed = sorted(p.name for p in out.glob("*.parquet"))
    # a crash after a shard's rename but before its journal line, and a torn journal line
    shutil.copy(out / committed[0], out / "train-00042.parquet")
    (out / ".train-00043.parquet.x.tmp").write_bytes(b"partial")
    with open(out / "journal.jsonl", "a") as f:
        f.write('{"type": "commit", "split": "train", "files": [{"file": "train-00042.parq')
    info = preprocess.preprocess(good, out, root=root, executor="local", progress=False, shard_size=1)
    assert info["run"]["done"] == 1 and info["run"]["skipped"] == 2
    assert not (out / "train-00042.parquet").exists() and not list(out.glob(".*.tmp"))
    ids = []
    for s in read_dataset_info(out)["shards"]:
        ids += read_shard(out / s["file"]).column("conversation_id").to_pylist()
    assert sorted(ids) == ["good0", "good1", "good2"]  # exactly once (one chunk each)
    for line in (out / "journal.jsonl").read_text().splitlines():
        json.loads(line)
    # other settings on the same OUTPUT are refused; --fresh starts over
    with pytest.raises(InputError, match="chunk_seconds"):
        preprocess.preprocess(good, out, root=root, executor="local", progress=False,
                              settings=Settings(chunk_seconds=1.0))
    info = preprocess.preprocess(good, out, root=root, executor="local", progress=False, fresh=True,
                                 settings=Settings(chunk_seconds=1.0))
    assert info["run"]["done"] == 3 and info["total"]["chunks"] > 3
    assert all(pq.ParquetFile(out / s["file"]).metadata.row_group(0).column(0).compression == "ZSTD"
               for s in info["shards"])
    # a changed manifest row of a done conversation is refused
    changed = [dict(good[0], transcript=None)] + good[1:]
    with pytest.raises(InputError, match="changed"):
        preprocess.preprocess(changed, out, root=root, executor="local", progress=False,
                              settings=Settings(chunk_seconds=1.0))


def test_face_tracker_extractor_makes_targets_from_avatar_video(tmp_path):
    from .preprocess_helpers import write_avatar_video

    (tmp_path / "c").mkdir()
    write_avatar_video(tmp_path / "c" / "avatar.mp4", 1.2)
    (tmp_path / "model.json").write_text('{"gain": 2.0}')
    row = {"conversation_id": "c", "avatar_media": "c/avatar.mp4"}
    s = Settings(extractor="tests.preprocess_helpers:BrightnessTracker", extractor_model=str(tmp_path / "model.json"))
    info = preprocess.preprocess([row], tmp_path / "o", root=tmp_path, executor="local", progress=False, settings=s)
    (conv,) = ShardDataset(tmp_path / "o", "train").conversations
    jaw = conv.arrays["motion"][:, JAW]
    assert info["total"]["conversations"] == 1 and 0.05 < jaw.mean() < 2.0 and conv.frames == 30
    with pytest.raises(InputError, match="--extractor"):
        Settings(extractor_model="x").check()
    with pytest.raises(InputError, match="cannot import"):
        tracks.load_extractor("tests.nope:Nothing", None)


# ----------------------------------------------------------------------------------------- cluster config, CLI

def test_ray_cluster_yaml_is_valid_for_the_cluster_launcher():
    import copy
    from pathlib import Path

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    types = cfg["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"} and cfg["head_node_type"] == "head"
    assert any("pip install" in c and "-e ." in c for c in cfg["setup_commands"])
    assert any("-e ." in c for c in types["gpu_worker"]["worker_setup_commands"])
    assert "." in cfg["file_mounts"].values()


def test_cli_help_explains_and_bad_arguments_are_named(tmp_path, capsys):
    from echo_stream import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["preprocess", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("--address", "--shard-size", "--num-cpus", "--num-gpus", "Live Link Face", "resume", "quarantined"):
        assert word in text, word
    assert cli.main(["preprocess", str(tmp_path / "missing.jsonl"), str(tmp_path / "o"), "--sequential"]) == 1
    assert "missing.jsonl: input not found" in capsys.readouterr().err


def test_one_writer_per_output(mixed, tmp_path):
    root, rows, _ = mixed
    held = preprocess.OutputDir(tmp_path / "o").open(Settings())
    try:
        with pytest.raises(InputError, match="another preprocess run"):
            preprocess.preprocess(rows[:1], tmp_path / "o", root=root, executor="local", progress=False)
    finally:
        held.close()
    info = preprocess.preprocess(rows[:1], tmp_path / "o", root=root, executor="local", progress=False)
    assert info["run"]["done"] == 1


def test_a_failed_ray_pass_is_resumed_by_the_next_pass(mixed, tmp_path, monkeypatch):
    """When a Ray pass dies mid-stream (e.g. a lost node took results with it), the driver keeps what it has
    and runs only the inputs not yet accounted for again; results repeated by the next pass are dropped.
    (Ray itself is replaced by the sequential executor here; the real cluster is in test_preprocess_cluster.)"""
    root, rows, _ = mixed
    good = rows[:3]
    passes = []

    def flaky_run_ray(items, settings, opts):
        passes.append([i.conversation_id for i in items])
        for k, r in enumerate(preprocess.run_local(items, settings)):
            yield r
            if len(passes) == 1 and k == 1:
                yield r                                   # a retried task's result, delivered twice
                raise ConnectionError("node 10.0.0.7 lost")

    monkeypatch.setattr(preprocess.job, "run_ray", flaky_run_ray)       # where the job looks them up
    monkeypatch.setattr(preprocess.job, "_ensure_ray", lambda opts: False)
    info = preprocess.preprocess(good, tmp_path / "o", root=root, progress=False, shard_size=1)
    assert passes == [["good0", "good1", "good2"], ["good2"]]
    run = info["run"]
    assert run["done"] == 3 and run["passes"] == 2 and run["duplicates_dropped"] == 1
    assert run["pass_errors"] == ["ConnectionError: node 10.0.0.7 lost"]
    ids = []
    for s in info["shards"]:
        ids += read_shard(tmp_path / "o" / s["file"]).column("conversation_id").to_pylist()
    assert sorted(ids) == ["good0", "good1", "good2"]

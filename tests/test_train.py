"""Training data and training: manifest -> shards (same features as serving) -> two-stage training -> checkpoint."""
import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from echo_stream import atomic, config, dataset, features, generate, motion, schemas
from echo_stream.dataset import (FEATURE_COLUMNS, FRAME_COLUMNS, SCHEMA_VERSION, ShardDataset, chunk_bounds,
                                 featurize_conversation, read_dataset_info, read_motion_track, read_shard,
                                 shard_schema, write_shards)
from echo_stream.errors import InputError
from echo_stream.model import load_checkpoint
from echo_stream.stages.decode import DecodeStage, chunks
from echo_stream.stages.features import FeaturesStage
from echo_stream.train import add_arguments, latest_checkpoint, read_loss_csv, read_trainer_state, run, train

from . import mediagen

CFG = config.CONFIGS["tiny"]
#: (id, seconds, split, user media kind)
CONVERSATIONS = (("conv_a", 5.3, "train", "video"), ("conv_b", 4.1, "train", "video"),
                 ("conv_c", 3.0, "heldout", "audio"))
CHUNK_S = 2.0


def _motion_for(samples: np.ndarray, seed: int) -> np.ndarray:
    """Learnable targets: jaw follows the audio envelope, the head sways, the rest is quiet."""
    T = features.num_video_frames(samples.size)
    env = features.rms_envelope(samples)[:T]
    m = np.zeros((T, motion.NUM_CHANNELS), np.float32)
    m[:, motion.CHANNEL_INDEX["jawOpen"]] = np.clip(env / max(env.max(), 1e-6), 0, 1)
    m[:, motion.CHANNEL_INDEX["mouthClose"]] = 0.3 * (1 - m[:, motion.CHANNEL_INDEX["jawOpen"]])
    t = np.arange(T) / config.FPS
    m[:, motion.CHANNEL_INDEX["headPitch"]] = 0.05 * np.sin(2 * np.pi * 0.5 * t + seed)
    m[:, motion.CHANNEL_INDEX["eyeBlinkLeft"]] = (np.arange(T) % 60 < 3).astype(np.float32)
    return m


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rows = []
    for k, (cid, dur, split, kind) in enumerate(CONVERSATIONS):
        d = root / cid
        d.mkdir()
        samples = mediagen.speech_like(dur, 16000, seed=k, f0=120 + 20 * k)
        mediagen.write_audio(d / "avatar.wav", samples, 16000)
        user_audio = mediagen.speech_like(dur + 0.7, 44100, seed=20 + k)
        if kind == "video":  # user video ends before the avatar audio; its audio runs longer
            frames = mediagen.face_frames(int(dur * 25) - 7, 160, 120, motion="nod", seed=k)
            user = mediagen.write_video(d / "user.mp4", frames, fps=25, audio=user_audio, audio_rate=44100)
        else:
            user = mediagen.write_audio(d / "user.wav", user_audio, 44100)
        m = _motion_for(samples, k)
        atomic.write_parquet(generate.motion_table(np.arange(len(m)), m), str(d / "avatar_motion.parquet"))
        (d / "transcript.json").write_text(json.dumps([
            {"start": 0.3, "end": 1.2, "speaker": "user", "text": "I got the job, great news"},
            {"start": 1.5, "end": 2.5, "speaker": "avatar", "text": "that is wonderful"},
            {"start": 2.9, "end": 3.6, "speaker": "user", "text": "thank you"}]))
        rows.append({"conversation_id": cid, "avatar_media": f"{cid}/avatar.wav", "user_media": f"{cid}/{user.name}",
                     "transcript": f"{cid}/transcript.json", "avatar_motion": f"{cid}/avatar_motion.parquet",
                     "user_motion": None, "duration_s": dur, "split": split, "synthetic": True,
                     "affect": "positive"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, rows


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory):
    root, _ = corpus
    out = tmp_path_factory.mktemp("shards")
    info = write_shards(root / "manifest.jsonl", out, chunk_seconds=CHUNK_S, shard_rows=2, progress=False)
    return out, info


def _frames_of(root: Path, row: dict) -> int:
    from echo_stream import media

    return math.ceil(media.decode_audio(root / row["avatar_media"]).size / config.SAMPLES_PER_FRAME)


# ----------------------------------------------------------------------------------------- shards

def test_shards_schema_versioned_and_counts(corpus, shards):
    root, rows = corpus
    out, info = shards
    assert info == read_dataset_info(out)
    assert info["schema_version"] == SCHEMA_VERSION and info["format"] == "echo-stream/training-shards"
    files = sorted(p.name for p in out.glob("*.parquet"))
    assert files == sorted(s["file"] for s in info["shards"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind
    want_chunks = {}
    for r in rows:
        T = _frames_of(root, r)
        want_chunks[r["conversation_id"]] = chunk_bounds(T, int(CHUNK_S * config.FPS))
    assert info["total"]["chunks"] == sum(len(b) for b in want_chunks.values())
    assert info["splits"]["train"]["conversations"] == 2 and info["splits"]["heldout"]["conversations"] == 1
    seen = {}
    for s in info["shards"]:
        path = out / s["file"]
        assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
        t = read_shard(path)
        assert t.num_rows == s["rows"] <= 2
        assert t.schema.metadata[b"echo_stream.schema_version"] == str(SCHEMA_VERSION).encode()
        for f in shard_schema():
            assert t.schema.field(f.name).type == f.type
        for name, shape in FRAME_COLUMNS.items():
            assert json.loads(t.schema.field(name).metadata[b"shape"]) == list(shape)
        for r in t.select(["conversation_id", "chunk_index", "start_frame", "frames", "split"]).to_pylist():
            assert r["split"] == s["split"]
            seen.setdefault(r["conversation_id"], []).append((r["start_frame"], r["start_frame"] + r["frames"]))
    assert {k: sorted(v) for k, v in seen.items()} == want_chunks
    st = info["stats"]
    assert st["split"] == "train" and len(st["motion_mean"]) == 58 and len(st["audio_std"]) == 83
    assert st["motion_std"][motion.CHANNEL_INDEX["jawOpen"]] > 0.05


def test_training_features_identical_to_streaming_features(corpus, shards):
    """The proof that training and serving see the same features: the shard rows equal what
    DecodeStage + FeaturesStage produce for the same files, frame for frame, bit for bit."""
    root, rows = corpus
    out, _ = shards
    by_split = {sp: {c.conversation_id: c for c in ShardDataset(out, sp).conversations} for sp in ("train", "heldout")}
    for r in rows:
        dec = DecodeStage(chunk_frames=8)
        user = str(root / r["user_media"])
        kw = {"user_video": user} if user.endswith(".mp4") else {"user_audio": user}
        dec.open_session("s", str(root / r["avatar_media"]), **kw)
        fs = FeaturesStage()
        batches = [fs.process(p).get(schemas.FEATURES) for p, _ in chunks(dec, "s")]
        stream = schemas.concat(batches, schemas.FEATURES)
        conv = by_split[r["split"]][r["conversation_id"]]
        direct = featurize_conversation(r, root)
        assert stream.num_rows == conv.frames == direct["frames"] == _frames_of(root, r)
        for col in FEATURE_COLUMNS:
            served = schemas.column(stream, col)
            assert np.array_equal(served, conv.arrays[col]), (r["conversation_id"], col)
            assert np.array_equal(served, direct[col]), (r["conversation_id"], col)
        present = conv.arrays["user_present"]
        # a user video reaches training as the user's tracked face (flag 2), never as flag 1
        assert present[:, 0].all() and not present[:, 1].any()
        assert (present[:, 2].mean() > 0.9) == r["user_media"].endswith(".mp4")


def test_motion_aligned_by_pts(tmp_path):
    # a 50 fps table with a linear ramp, starting late: resampled onto the 25 fps grid by pts
    pts = 0.1 + np.arange(40) / 50.0
    cols = {"pts": pa.array(pts)}
    for c in motion.CHANNELS:
        cols[c] = pa.array(np.zeros(40, np.float32))
    cols["jawOpen"] = pa.array((pts * 2).astype(np.float32))
    pq.write_table(pa.table(cols), tmp_path / "m.parquet")
    m = read_motion_track(tmp_path / "m.parquet", 30)
    grid = np.arange(30) / 25.0
    want = np.clip(grid, pts[0], pts[-1]) * 2
    assert m.shape == (30, 58) and np.allclose(m[:, motion.CHANNEL_INDEX["jawOpen"]], want, atol=1e-6)
    with pytest.raises(InputError, match="m2.parquet"):
        pq.write_table(pa.table({"x": [1.0]}), tmp_path / "m2.parquet")
        read_motion_track(tmp_path / "m2.parquet", 5)


def test_bad_rows_named_or_skipped(corpus, tmp_path):
    root, rows = corpus
    bad = dict(rows[0], conversation_id="broken", avatar_media="nope/missing.wav")
    with pytest.raises(InputError, match="missing.wav"):
        write_shards([rows[1], bad], tmp_path / "a", root=root, progress=False)
    assert not (tmp_path / "a" / "dataset.json").exists()
    manifest = tmp_path / "manifest.jsonl"
    # absolute paths work too; a row without a transcript is fine
    good = dict(rows[1], transcript=None,
                **{k: str(root / rows[1][k]) for k in ("avatar_media", "user_media", "avatar_motion")})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in (good, bad)))
    parser = argparse.ArgumentParser()
    dataset.add_arguments(parser)
    assert dataset.run(parser.parse_args([str(manifest), "-o", str(tmp_path / "b"), "--skip-bad", "--quiet"])) == 0
    info = read_dataset_info(tmp_path / "b")
    assert info["total"]["conversations"] == 1 and info["quarantined"][0]["conversation_id"] == "broken"
    assert "missing.wav" in info["quarantined"][0]["reason"]
    with pytest.raises(InputError, match="dataset.json"):
        read_dataset_info(tmp_path / "nothing")


def test_batches_follow_the_loss_and_memory_geometry(shards):
    out, _ = shards
    ds = ShardDataset(out, "train", CFG)
    K, S, W, L = CFG.overlap_frames, CFG.new_frames, CFG.window_frames, CFG.lookahead_frames
    rng = np.random.default_rng(0)
    b = ds.stage1_batch(rng, 5)
    assert b["motion"].shape == (5, W, 58) and b["avatar_audio"].shape == (5, W + L, 2, 83)
    # stage 2: the history is everything since the session start (capped), in windows of S frames
    conv = ds.conversations[0]
    assert conv.window_texts[0] == "I got the job, great news"   # starts at 0.3 s < 0.64 s
    assert conv.window_texts[2] == "that is wonderful"             # 1.5 s in [1.28, 1.92)
    hist = []
    for _ in range(12):
        b = ds.stage2_batch(rng, 3, max_history=4)
        n = b["history_windows"]
        hist.append(n)
        assert b["user_video"].shape == (3, CFG.user_frames, 16) and b["avatar_audio"].shape == (3, W + L, 2, 83)
        if n:
            assert b["context_avatar_audio"].shape == (3, n, S, 2, 83) and len(b["context_texts"][0]) == n
        else:
            assert "context_avatar_audio" not in b
    assert max(hist) == 4 and min(hist) < 4
    # a window at w < max_history has exactly the serving history: frames [0, w*S)
    rng = np.random.default_rng(5)
    for _ in range(30):
        b = ds.stage2_batch(rng, 1, max_history=100)
        n = b["history_windows"]
        if n >= 2:
            break
    c_hist = b["context_avatar_audio"][0].reshape(n * S, 2, 83).numpy()
    match = [c for c in ds.conversations if np.array_equal(c.arrays["avatar_audio"][:n * S], c_hist)]
    assert match and np.array_equal(b["motion"][0].numpy(), match[0].arrays["motion"][n * S - K:n * S + S])
    # the user rows: the last user_frames frames up to the window's end (history before the window)
    U = CFG.user_frames
    assert n * S + S - U >= 0
    assert np.array_equal(b["user_audio"][0].numpy(), match[0].arrays["user_audio"][n * S + S - U:n * S + S])
    assert b["context_texts"][0] == match[0].window_texts[:n]


def test_truncated_bptt_rolls_the_same_memory(shards):
    """The trainer's own LCU roll (used for truncated back-propagation) equals EchoModel.loss's."""
    from echo_stream.model import EchoModel
    from echo_stream.train import _roll_memory

    ds = ShardDataset(shards[0], "train", CFG)
    rng = np.random.default_rng(3)
    batch = ds.stage2_batch(rng, 2, max_history=3)
    while batch.pop("history_windows") < 2:
        batch = ds.stage2_batch(rng, 2, max_history=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and immune to a busy machine
    try:
        torch.manual_seed(0)
        model = EchoModel(CFG).train()
        a, _ = model.loss(dict(batch), 2, generator=torch.Generator().manual_seed(9))
        for grad_windows in (3, 1):
            rolled = _roll_memory(model, dict(batch), grad_windows)
            assert "context_avatar_audio" not in rolled
            assert rolled["memory"].shape == (2, CFG.memory_rows, CFG.d_model)
            b, _ = model.loss(rolled, 2, generator=torch.Generator().manual_seed(9))
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
            b.backward()
            assert model.lcu.text_proj.weight.grad is not None  # gradients reach the LCU
            model.zero_grad()
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("run")
    kw = dict(stage="both", steps=(30, 30), batch_size=(8, 4), lr=(2e-3, 1e-3), seed=1, checkpoint_every=10,
              progress=False, history_s=2.5, eval_batches=1, threads=1)
    final = train(shards[0], out_dir, resume=False, **kw)
    return out_dir, final, kw


def test_two_stage_training_lowers_loss_and_writes_outputs(trained):
    out_dir, final, _ = trained
    rows = read_loss_csv(out_dir / "loss.csv")
    for stage in (1, 2):
        tr = [r for r in rows if r["stage"] == stage and r["split"] == "train"]
        assert [r["step"] for r in tr] == list(range(1, 31))
        first, last = np.mean([r["loss"] for r in tr[:5]]), np.mean([r["loss"] for r in tr[-5:]])
        assert last < first, (stage, first, last)
        assert [r["step"] for r in rows if r["stage"] == stage and r["split"] == "heldout"] == [10, 20, 30]
        assert all(np.isfinite(r["grad_norm"]) for r in tr)
    assert max(r["history"] for r in rows if r["stage"] == 2 and r["split"] == "train") == 4  # ceil(2.5 / 0.64)
    # warm-up then cosine decay
    lrs = [r["lr"] for r in rows if r["stage"] == 1 and r["split"] == "train"]
    assert lrs[0] < lrs[2] and lrs[-1] < max(lrs)
    assert (out_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out_dir / "train_summary.json").read_text())
    assert summary["stages"]["1"]["step"] == summary["stages"]["2"]["step"] == 30
    assert summary["stages"]["2"]["steps_per_s"] > 0
    for stage in (1, 2):
        ck = latest_checkpoint(out_dir / f"stage{stage}")
        assert ck.name == "step-0000030" and read_trainer_state(ck)["done"]
        assert {p.name for p in ck.iterdir()} == {"model.safetensors", "config.json", "meta.json",
                                                  "optimizer.safetensors", "trainer_state.json"}
        assert len([p for p in (out_dir / f"stage{stage}").iterdir() if p.is_dir()]) == 2  # keeps the last two
    # the final checkpoint: loadable, normalised from dataset.json, samples
    model = load_checkpoint(final)
    assert model.checkpoint_meta["stage"] == 2 and model.checkpoint_meta["step"] == 30
    assert model.checkpoint_meta["synthetic_data"] is True
    assert {p.name for p in final.iterdir()} == {"model.safetensors", "config.json", "meta.json"}
    assert sum(p.stat().st_size for p in final.iterdir()) < 20e6
    K, W, L = CFG.overlap_frames, CFG.window_frames, CFG.lookahead_frames
    g = torch.Generator().manual_seed(0)
    out = model.sample(torch.zeros(2, K, 58), torch.randn(2, W + L, 2, 83, generator=g) - 5, seeds=[1, 2])
    assert out.shape == (2, CFG.new_frames, 58) and torch.isfinite(out).all()
    stage1 = load_checkpoint(latest_checkpoint(out_dir / "stage1"))
    assert not torch.equal(stage1.motion_mean, torch.zeros(58))  # stats from dataset.json


def test_resume_continues_exactly(trained, shards, tmp_path):
    """A run resumed from its step-20 checkpoint of stage 2 ends where the uninterrupted run ended."""
    out_dir, final, kw = trained
    resumed = tmp_path / "resumed"
    for stage, step in ((1, 30), (2, 20)):
        d = resumed / f"stage{stage}"
        d.mkdir(parents=True)
        shutil.copytree(out_dir / f"stage{stage}" / f"step-{step:07d}", d / f"step-{step:07d}")
        (d / "LATEST").write_text(f"step-{step:07d}\n")
    shutil.copy(out_dir / "loss.csv", resumed / "loss.csv")
    st = read_trainer_state(resumed / "stage2" / "step-0000020")
    assert st["step"] == 20 and not st["done"] and st["total_steps"] == 30
    final2 = train(shards[0], resumed, resume=True, **kw)
    a, b = load_checkpoint(final).state_dict(), load_checkpoint(final2).state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    ra = [(r["stage"], r["step"], r["loss"]) for r in read_loss_csv(out_dir / "loss.csv") if r["split"] == "train"]
    rb = [(r["stage"], r["step"], r["loss"]) for r in read_loss_csv(resumed / "loss.csv") if r["split"] == "train"]
    assert [x[:2] for x in rb] == [x[:2] for x in ra]
    assert np.allclose([x[2] for x in rb], [x[2] for x in ra], rtol=1e-5)


def test_cli_time_budget_and_stage2_needs_stage1(shards, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--shards", str(shards[0]), "--out", str(tmp_path / "cli"), "--steps", "100000",
                              "--batch-size", "4,2", "--time-budget", "6s", "--history-s", "1", "--quiet",
                              "--eval-batches", "0", "--checkpoint-every", "1000", "--threads", "1",
                              "--bptt-windows", "1"])
    assert run(args) == 0
    rows = read_loss_csv(tmp_path / "cli" / "loss.csv")
    steps = {s: max(r["step"] for r in rows if r["stage"] == s) for s in (1, 2)}
    assert 0 < steps[1] < 100000 and 0 < steps[2] < 100000
    assert latest_checkpoint(tmp_path / "cli" / "stage2").name == f"step-{steps[2]:07d}"
    assert load_checkpoint(tmp_path / "cli" / "final").checkpoint_meta["step"] == steps[2]
    with pytest.raises(InputError, match="stage-1"):
        train(shards[0], tmp_path / "empty", stage=2, steps=2, progress=False)


def test_ablation_starts_from_the_same_weights(tmp_path):
    """The entangled-fusion ablation can start from an SDCM checkpoint; other config changes are refused."""
    import dataclasses

    import torch

    from echo_stream.config import get_config
    from echo_stream.errors import CheckpointError
    from echo_stream.model import EchoModel, save_checkpoint
    from echo_stream.train import _load_for_training

    torch.manual_seed(0)
    src = EchoModel(get_config("tiny"))
    save_checkpoint(src, tmp_path / "ck")
    abl = _load_for_training(tmp_path / "ck", get_config("tiny-entangled"))
    assert abl.cfg.fusion == "entangled"
    for (n, a), (_, b) in zip(src.state_dict().items(), abl.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(CheckpointError, match="d_model"):
        _load_for_training(tmp_path / "ck", dataclasses.replace(get_config("tiny"), d_model=64))


def test_load_for_training_adds_transcript_traces(tmp_path):
    """A stage-1 checkpoint without traces trains on as a model with them, exactly as one run would."""
    import dataclasses

    import torch

    from echo_stream.config import get_config
    from echo_stream.errors import CheckpointError
    from echo_stream.model import EchoModel, save_checkpoint
    from echo_stream.train import _load_for_training

    tiny = get_config("tiny")
    torch.manual_seed(7)
    src = EchoModel(dataclasses.replace(tiny, text_trace_decays=()))
    save_checkpoint(src, tmp_path / "ck")
    model = _load_for_training(tmp_path / "ck", tiny, seed=3)
    assert model.cfg.text_traces == 2 and model.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        fresh = EchoModel(tiny)
    own = src.state_dict()
    for name, value in model.state_dict().items():
        expect = fresh.state_dict()[name] if name.startswith("text_trace.") else own[name]
        assert torch.equal(value, expect), name
    # traces cannot be changed or removed that way
    save_checkpoint(model, tmp_path / "ck2")
    with pytest.raises(CheckpointError, match="traces"):
        _load_for_training(tmp_path / "ck2", dataclasses.replace(tiny, text_trace_decays=(0.5, 0.9)))


def test_long_known_is_checked_before_any_training(tmp_path):
    from echo_stream.train import train

    with pytest.raises(InputError, match="--long-known.*probability"):
        train(tmp_path / "no_shards", tmp_path / "out", stage="both", long_known=1.5)
    with pytest.raises(InputError, match="--long-known.*stage 2 only"):
        train(tmp_path / "no_shards", tmp_path / "out", stage=1, long_known=0.3)
    assert not (tmp_path / "out").exists()               # refused before anything was written


def test_audio_augmentation_is_a_level_and_tilt_change(shards):
    from echo_stream.dataset import augment_audio

    x = np.zeros((3, 2, 83), np.float32)
    augment_audio(x, 0.25, 0.0)
    assert np.allclose(x[..., :80], 0.5) and np.allclose(x[..., 80], 0.25) and not x[..., 81:].any()
    y = np.zeros((1, 2, 83), np.float32)
    augment_audio(y, 0.0, 0.8)
    assert y[0, 0, 0] == pytest.approx(-0.4) and y[0, 0, 79] == pytest.approx(0.4)
    out, _ = shards
    plain = ShardDataset(out, "train", CFG).stage1_batch(np.random.default_rng(3), 4)
    aug = ShardDataset(out, "train", CFG, augment=True)
    b = aug.stage1_batch(np.random.default_rng(3), 4)
    d = (b["avatar_audio"] - plain["avatar_audio"]).numpy()
    assert not np.allclose(d, 0)
    assert np.allclose(d[..., 81:], 0)                            # f0 and voicing untouched
    assert np.array_equal(b["motion"].numpy(), plain["motion"].numpy())


def test_reaction_stage_adds_a_trained_head_and_changes_nothing_else(trained, shards, tmp_path):
    _, final, _ = trained
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--shards", str(shards[0]), "--out", str(tmp_path / "r"), "--stage", "reactions",
                              "--init-from", str(final), "--steps", "20", "--batch-size", "2", "--quiet",
                              "--threads", "1", "--export", str(tmp_path / "exported")])
    assert run(args) == 0
    base, got = load_checkpoint(final), load_checkpoint(tmp_path / "r" / "reactions" / "final")
    assert got.cfg.reactions
    assert float(got.reactions.trained) == 1.0 and (base.reactions is None or float(base.reactions.trained) == 0.0)
    for k, v in base.state_dict().items():
        if not k.startswith("reactions."):
            assert torch.equal(v, got.state_dict()[k]), k
    exported = load_checkpoint(tmp_path / "exported")
    assert torch.equal(exported.reactions.members[2].out.weight, got.reactions.members[2].out.weight)
    assert not torch.equal(got.reactions.members[0].out.weight, got.reactions.members[1].out.weight)
    summary = json.loads((tmp_path / "r" / "reactions" / "reactions.json").read_text())
    assert set(summary["train_onsets"]) == {"nod", "micro_nod", "brow_raise", "brow_flash", "gaze_away"}
    assert summary["members"] == 3 and [len(c) for c in summary["loss_every_50"]] == [1, 1, 1]
    assert summary["validation"]["bce"] > 0
    with pytest.raises(InputError, match="--calibration-convs: 50: the training split has"):
        run(parser.parse_args(["--shards", str(shards[0]), "--out", str(tmp_path / "c"), "--stage", "reactions",
                               "--init-from", str(final), "--calibration-convs", "50", "--quiet"]))
    with pytest.raises(InputError, match="--init-from"):
        run(parser.parse_args(["--shards", str(shards[0]), "--out", str(tmp_path / "x"), "--stage", "reactions"]))

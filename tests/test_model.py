"""Behaviour of the ECHO model: encoders, SDCM masking, LCU memory, sampler, checkpoints, training."""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from echo_stream import atomic, motion
from echo_stream.config import CONFIGS
from echo_stream.errors import CheckpointError
from echo_stream.model import (
    EchoModel,
    MemoryState,
    MemoryStateError,
    default_checkpoint_path,
    load_checkpoint,
    load_default_model,
    save_checkpoint,
    window_seed,
)
from echo_stream.model.encoders import featurize_transcript

TINY = CONFIGS["tiny"]
K, W, L, S = TINY.overlap_frames, TINY.window_frames, TINY.lookahead_frames, TINY.new_frames
U = TINY.user_frames   # user frames per window (history + window)
M, D = TINY.memory_rows, TINY.d_model


def make_model(cfg=TINY, seed=0) -> EchoModel:
    torch.manual_seed(seed)
    return EchoModel(cfg).eval()


def window_inputs(b: int, seed: int = 0, cfg=TINY, user: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    w, k, lk, u = cfg.window_frames, cfg.overlap_frames, cfg.lookahead_frames, cfg.user_frames
    return dict(
        prev_motion=torch.rand(b, k, 58, generator=g) * 0.3,
        avatar_audio=torch.randn(b, w + lk, 2, 83, generator=g),
        user_audio=torch.randn(b, u, 2, 83, generator=g),
        user_video=torch.randn(b, u, 16, generator=g),
        user_blend=torch.rand(b, u, 58, generator=g) * 0.3,
        user_present=torch.ones(b, u, 3) if user else torch.zeros(b, u, 3),
    )


def random_memory(model: EchoModel, b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tanh(torch.randn(b, model.cfg.memory_rows, model.cfg.d_model, generator=g))


# ----------------------------------------------------------------------------- shapes


def test_tiny_shapes_and_ranges():
    model = make_model()
    x = window_inputs(3)
    mem = model.memory_init(3)
    assert mem.shape == (3, M, D)
    out = model.sample(**x, memory=mem, seeds=[1, 2, 3])
    assert out.shape == (3, S, 58) and out.dtype == torch.float32
    assert torch.all(out >= torch.from_numpy(motion.CHANNEL_MIN))
    assert torch.all(out <= torch.from_numpy(motion.CHANNEL_MAX))
    win = model.sample(**x, memory=mem, seeds=[1, 2, 3], return_window=True)
    assert win.shape == (3, W, 58)
    assert torch.equal(win[:, K:], out)

    text = model.encode_transcript(["That's great, thanks!", "", "I'm so sorry"])
    assert text.shape == (3, TINY.transcript_dim)
    assert torch.all(text[1] == 0) and text[0].abs().sum() > 0
    t = 7
    mem2 = model.memory_update(mem, torch.randn(3, t, 2, 83), torch.randn(3, t, 2, 83), torch.randn(3, t, 16),
                               torch.rand(3, t, 58), torch.ones(3, t, 3), text)
    assert mem2.shape == (3, M, D) and not torch.equal(mem2, mem)

    with pytest.raises(ValueError, match="avatar_audio"):
        model.sample(x["prev_motion"], x["avatar_audio"][:, :W], seeds=[0, 0, 0])
    with pytest.raises(ValueError, match="seeds"):
        model.sample(**x, seeds=[0])


def test_numpy_inputs_and_no_user():
    model = make_model()
    x = {k: v.numpy() for k, v in window_inputs(2).items()}
    out = model.sample(x["prev_motion"], x["avatar_audio"], seeds=[5, 6])  # no user, no memory
    assert out.shape == (2, S, 58) and torch.isfinite(out).all()


def test_base_constructs_and_runs():
    cfg = CONFIGS["base"]
    model = make_model(cfg)
    assert model.denoiser.layout.tokens == 200 and model.denoiser.layout.lip_tokens == 50
    x = window_inputs(1, cfg=cfg)
    out = model.sample(**x, memory=model.memory_init(1), seeds=[0], steps=1)
    assert out.shape == (1, cfg.new_frames, 58) and torch.isfinite(out).all()


def test_entangled_ablation_runs_and_validates_fusion():
    cfg = dataclasses.replace(TINY, fusion="entangled")
    model = make_model(cfg)
    x = window_inputs(1)
    out = model.sample(**x, seeds=[0])
    assert out.shape == (1, S, 58)
    with pytest.raises(ValueError, match="fusion"):
        EchoModel(dataclasses.replace(TINY, fusion="bogus"))


@torch.no_grad()
def test_region_major_token_layout():
    """Each region's channels map to exactly its own contiguous token block (lips first), and back."""
    cfg = dataclasses.replace(TINY, d_model=32, n_heads=2, head_dim=32, region_tokens=(2, 1, 3, 1, 2), n_layers=1,
                              transcript_dim=16)
    model = make_model(cfg)
    den = model.denoiser
    t = sum(cfg.region_tokens)
    b = 2
    ctx = den.prepare(torch.randn(b, W, 32), torch.randn(b, M, 32), torch.randn(b, U, 32), torch.full((b,), M))
    x = torch.randn(b, W, 58)
    known = torch.zeros(b, W, 58)
    mask = torch.zeros(b, W)
    cond = den.condition_known(known, mask, ctx)
    base = den.tokens_in(x, cond, ctx)
    assert base.shape == (b, W * t, 32)
    start = 0
    for r, n in zip(motion.REGIONS, cfg.region_tokens):
        block = slice(start, start + W * n)
        y = x.clone()
        y[:, 7, motion.REGION_SLICES[r]] += 1.0  # frame 7 of region r
        changed = (den.tokens_in(y, cond, ctx) - base).abs().amax(dim=(0, 2)) > 0
        expect = torch.zeros(W * t, dtype=torch.bool)
        expect[start + 7 * n: start + 8 * n] = True  # frame-major inside the region block
        assert torch.equal(changed, expect), r
        # the same tokens through the per-region layer directly
        s0, s1 = int(motion.REGION_SLICES[r][0]), int(motion.REGION_SLICES[r][-1]) + 1
        lin = den.embed[motion.REGIONS.index(r)]
        direct = lin(torch.cat([x[..., s0:s1], known[..., s0:s1], mask[..., None]], -1)).view(b, W * n, 32)
        fb = ctx.frame_bias.view(b, W, t, 32)[:, :, sum(cfg.region_tokens[:motion.REGIONS.index(r)]):][:, :, :n]
        torch.testing.assert_close(base[:, block], direct + fb.reshape(b, W * n, 32), rtol=1e-5, atol=1e-5)
        # and back: perturbing the region's tokens moves only the region's channels
        h = torch.randn(b, W * t, 32)
        h2 = h.clone()
        h2[:, block] += 1.0
        moved = (den.tokens_out(h2, ctx) - den.tokens_out(h, ctx)).abs().amax(dim=(0, 1)) > 0
        assert np.array_equal(moved.nonzero().flatten().numpy(), motion.REGION_SLICES[r]), r
        start += W * n
    assert torch.equal(den.lip_mask, torch.arange(W * t) < W * cfg.region_tokens[0])


# ----------------------------------------------------------------------------- SDCM masking


def _cross_layer_io(model: EchoModel, user_tok: torch.Tensor, memory: torch.Tensor, user_lengths=None):
    den = model.denoiser
    g = torch.Generator().manual_seed(3)
    b = user_tok.shape[0]
    audio_tok = torch.randn(b, W, D, generator=g)
    if user_lengths is None:
        user_lengths = torch.full((b,), M + U)
    ctx = den.prepare(audio_tok, memory, user_tok, user_lengths)
    h = torch.randn(b, den.layout.tokens, D, generator=g)
    cross = den.blocks[0].cross
    return cross(h, ctx.kv[0], *den.lip_args(h.device), ctx.audio_lengths, ctx.user_lengths)


@torch.no_grad()
def test_sdcm_lip_tokens_never_see_user_or_memory():
    model = make_model()
    den = model.denoiser
    cross = den.blocks[0].cross
    cross.gate_bias.fill_(0.5)  # make the user branch matter
    torch.nn.init.normal_(cross.gate_mod.weight, std=0.05)
    n_lip = den.layout.lip_tokens
    u1, m1 = torch.randn(2, U, D), random_memory(model, 2, 1)
    u2, m2 = u1 + torch.randn(2, U, D), random_memory(model, 2, 2)
    a = _cross_layer_io(model, u1, m1)
    b = _cross_layer_io(model, u2, m2)
    assert torch.equal(a[:, :n_lip], b[:, :n_lip]), "lip tokens changed with user/memory inputs"
    assert (a[:, n_lip:] - b[:, n_lip:]).abs().max() > 1e-3, "non-lip tokens ignore user inputs"

    # gate = 0 -> non-lip tokens ignore the user branch too
    cross.gate_bias.fill_(-1e4)
    torch.nn.init.zeros_(cross.gate_mod.weight)
    a = _cross_layer_io(model, u1, m1)
    b = _cross_layer_io(model, u2, m2)
    assert torch.equal(a, b)


@torch.no_grad()
def test_sdcm_lip_tile_padding_matches_unpadded():
    model = make_model()
    u, m = torch.randn(2, U, D), random_memory(model, 2)
    ref = _cross_layer_io(model, u, m)
    model.denoiser.lip_tile = 16  # what CUDA does with 128: pad the lip prefix to whole tiles
    assert model.denoiser._lip_pad(torch.device("cpu")) == (-W) % 16
    padded = _cross_layer_io(model, u, m)
    torch.testing.assert_close(padded, ref, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_entangled_lip_tokens_do_see_user():
    model = make_model(dataclasses.replace(TINY, fusion="entangled"))
    n_lip = model.denoiser.layout.lip_tokens
    u1, m1 = torch.randn(1, U, D), random_memory(model, 1, 1)
    a = _cross_layer_io(model, u1, m1)
    b = _cross_layer_io(model, u1 + torch.randn(1, U, D), m1)
    assert (a[:, :n_lip] - b[:, :n_lip]).abs().max() > 1e-4


def test_stage1_user_branch_off_ignores_user_and_memory():
    model = make_model()
    x = window_inputs(1)
    a = model.sample(**x, memory=random_memory(model, 1, 1), seeds=[3], use_context=False)
    y = dict(x, user_audio=x["user_audio"] * 5, user_blend=x["user_blend"].flip(1))
    b = model.sample(**y, memory=random_memory(model, 1, 2), seeds=[3], use_context=False)
    assert torch.equal(a, b)
    c = model.sample(**y, memory=random_memory(model, 1, 2), seeds=[3])
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------- encoders


@torch.no_grad()
def test_audio_encoder_causal_with_exact_lookahead():
    model = make_model()
    enc = model.audio_encoder
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 30, 2, 83, generator=g)
    base = enc(feats)
    assert base.shape == (1, 30 - L, D)
    for t in (0, 5, 12, 20):
        later = feats.clone()
        later[:, t + L + 1:] = torch.randn(later[:, t + L + 1:].shape, generator=g)
        out = enc(later)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"token {t} saw audio after frame t+{L}"
        edge = feats.clone()
        edge[:, t + L] += 1.0
        assert (enc(edge)[:, t] - base[:, t]).abs().max() > 1e-4, f"token {t} does not look {L} frames ahead"
    causal = enc(feats, lookahead=False)
    assert causal.shape == (1, 30, D)
    torch.testing.assert_close(causal[:, L:], base)


def test_transcript_encoder_offline_and_affect():
    model = make_model()
    ids1, lex1 = featurize_transcript("That was great, I love it!", TINY.transcript_buckets)
    ids2, _ = featurize_transcript("That was great, I love it!", TINY.transcript_buckets)
    assert ids1 == ids2 and lex1[0] > 0 and lex1[6] > 0  # positive words, exclamation
    _, lex_neg = featurize_transcript("sorry, that is terrible and sad", TINY.transcript_buckets)
    assert lex_neg[1] > 0 and lex_neg[0] == 0
    e = model.encode_transcript(["", "   ", "great", "terrible"])
    assert torch.all(e[:2] == 0)
    assert not torch.allclose(e[2], e[3])

    class Fixed:
        dim = TINY.transcript_dim

        def encode(self, texts):
            return torch.ones(len(texts), self.dim)

    model.set_transcript_encoder(Fixed())
    assert torch.equal(model.encode_transcript(["x", "y"]), torch.ones(2, TINY.transcript_dim))

    class Wrong:
        dim = 3

        def encode(self, texts):
            return torch.ones(len(texts), 3)

    with pytest.raises(ValueError, match="dim"):
        model.set_transcript_encoder(Wrong())


# ----------------------------------------------------------------------------- LCU memory


def _update(model, mem, seed, t=S):
    g = torch.Generator().manual_seed(seed)
    b = mem.shape[0]
    return model.memory_update(mem, torch.randn(b, t, 2, 83, generator=g), torch.randn(b, t, 2, 83, generator=g),
                               torch.randn(b, t, 16, generator=g), torch.rand(b, t, 58, generator=g),
                               torch.ones(b, t, 3), torch.randn(b, TINY.transcript_dim, generator=g))


def test_memory_bounded_and_long_range():
    model = make_model()
    mem1 = _update(model, model.memory_init(2), 0)
    mem = mem1
    for i in range(1, 200):
        mem = _update(model, mem, i)
    assert mem.shape == mem1.shape == (2, M, D)
    slots = mem[:, :TINY.memory_slots]
    assert torch.isfinite(mem).all() and slots.abs().max() <= 1.0
    # the transcript traces' read-out is a weighted mean of what was said: never beyond the largest embedding
    tr = mem[:, TINY.memory_slots:]
    dt = TINY.transcript_dim
    mean = tr[..., :dt] / tr[..., dt:dt + 1].clamp_min(1.0)
    assert (tr[..., dt] > 0).all() and mean.abs().max() <= 5.0 and (tr[..., dt + 1:] == 0).all()

    # long-range: two sessions differing only in their first window still differ 50 windows (32 s) later
    a = _update(model, model.memory_init(1), 1000)
    b = _update(model, model.memory_init(1), 2000)
    first = (a - b).norm()
    for i in range(50):
        a, b = _update(model, a, i), _update(model, b, i)
    assert (a - b).norm() > 0.05 * first


def test_memory_state_round_trip_and_errors():
    model = make_model()
    mem = _update(model, model.memory_init(1), 0)[0]
    state = model.memory_state(mem, steps=17)
    blob = state.to_bytes()
    back = MemoryState.from_bytes(blob, config=TINY)
    assert back.steps == 17 and back.config_name == "tiny"
    assert back.memory.dtype == torch.float32
    assert back.memory.numpy().tobytes() == mem.numpy().tobytes()  # bitwise
    assert MemoryState.from_bytes(back.to_bytes()).memory.numpy().tobytes() == mem.numpy().tobytes()
    assert MemoryState.stack([back, back]).shape == (2, M, D)

    with pytest.raises(MemoryStateError, match="corrupt"):
        MemoryState.from_bytes(blob[: len(blob) // 2])
    with pytest.raises(MemoryStateError, match="corrupt"):
        MemoryState.from_bytes(b"not a memory state at all")
    flipped = bytearray(blob)
    flipped[-5] ^= 0x40  # inside the tensor data
    with pytest.raises(MemoryStateError, match="checksum"):
        MemoryState.from_bytes(bytes(flipped))
    with pytest.raises(MemoryStateError, match="shape"):
        MemoryState.from_bytes(blob, config=CONFIGS["base"])
    with pytest.raises(CheckpointError):  # MemoryStateError is a CheckpointError
        MemoryState.from_bytes(blob, config=dataclasses.replace(TINY, name="other"))


# ----------------------------------------------------------------------------- sampler


def test_sampler_deterministic_and_batch_independent():
    model = make_model()
    xs = [window_inputs(1, seed=i, user=(i != 1)) for i in range(3)]
    mems = [random_memory(model, 1, 10 + i) for i in range(3)]
    seeds = [window_seed(100 + i, 7) for i in range(3)]
    singles = [model.sample(**xs[i], memory=mems[i], seeds=[seeds[i]]) for i in range(3)]
    again = model.sample(**xs[0], memory=mems[0], seeds=[seeds[0]])
    assert torch.equal(again, singles[0])
    other = model.sample(**xs[0], memory=mems[0], seeds=[seeds[0] + 1])
    assert not torch.equal(other, singles[0])
    batch = {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
    out = model.sample(**batch, memory=torch.cat(mems), seeds=seeds)
    for i in range(3):
        torch.testing.assert_close(out[i:i + 1], singles[i], rtol=1e-4, atol=1e-5)
    assert window_seed(1, 2) == window_seed(1, 2) != window_seed(1, 3)


def test_session_without_user_ignores_user_buffers():
    model = make_model()
    x = window_inputs(2, user=False)
    mem = random_memory(model, 2)
    a = model.sample(**x, memory=mem, seeds=[1, 2])
    garbage = dict(x, user_audio=torch.full_like(x["user_audio"], float("nan")),
                   user_video=torch.full_like(x["user_video"], 1e6), user_blend=torch.full_like(x["user_blend"], -3.0))
    b = model.sample(**garbage, memory=mem, seeds=[1, 2])
    assert torch.equal(a, b)
    # but the memory still conditions it (user_lengths = memory slots)
    c = model.sample(**x, memory=random_memory(model, 2, 9), seeds=[1, 2])
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    model = make_model(seed=3)
    model.set_motion_stats(torch.full((58,), 0.1), torch.full((58,), 0.2))
    path = save_checkpoint(model, tmp_path / "ck", extra_meta={"stage": 2, "step": 123})
    assert path.name == "model.safetensors" and (tmp_path / "ck" / "config.json").is_file()
    assert not [p for p in (tmp_path / "ck").iterdir() if atomic.is_temp_name(p.name)]
    for p in (tmp_path / "ck", path):
        loaded = load_checkpoint(p)
        assert loaded.cfg == TINY and loaded.checkpoint_meta["step"] == 123 and loaded.checkpoint_meta["stage"] == 2
        x = window_inputs(2)
        mem = random_memory(model, 2)
        assert torch.equal(model.sample(**x, memory=mem, seeds=[1, 2]), loaded.sample(**x, memory=mem, seeds=[1, 2]))
        assert torch.equal(loaded.motion_std, torch.full((58,), 0.2))
    load_checkpoint(tmp_path / "ck", config="tiny")


def test_checkpoint_mismatch_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model()
    ck = tmp_path / "ck"
    save_checkpoint(model, ck)

    with pytest.raises(CheckpointError, match="d_model"):
        load_checkpoint(ck, config="base")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")

    # tensors that do not match the config: missing / unexpected names, shapes (no embedded config)
    tensors = load_file(ck / "model.safetensors")
    bad = dict(tensors)
    bad.pop("denoiser.blocks.0.cross.gate_bias")
    bad["denoiser.extra_thing"] = torch.zeros(2)
    bad["lcu.slot_init"] = torch.zeros(3, 3)
    d2 = tmp_path / "bad"
    d2.mkdir()
    save_file(bad, d2 / "model.safetensors")
    (d2 / "config.json").write_text(TINY.to_json())
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(d2)
    msg = str(err.value)
    assert "denoiser.blocks.0.cross.gate_bias" in msg and "denoiser.extra_thing" in msg and "lcu.slot_init" in msg

    # config.json edited so it disagrees with the weights
    d3 = tmp_path / "edited"
    save_checkpoint(model, d3)
    cfg = json.loads((d3 / "config.json").read_text())
    cfg["n_layers"] = 6
    (d3 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="n_layers"):
        load_checkpoint(d3)
    cfg["n_layers"] = TINY.n_layers
    cfg["mystery_field"] = 1
    (d3 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mystery_field"):
        load_checkpoint(d3)

    # corrupt / truncated weights
    d4 = tmp_path / "corrupt"
    save_checkpoint(model, d4)
    blob = (d4 / "model.safetensors").read_bytes()
    (d4 / "model.safetensors").write_bytes(blob[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(d4)
    (d4 / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(d4)


def test_default_model(caplog):
    path = default_checkpoint_path()
    assert path.parts[-3:] == ("assets", "checkpoints", "tiny")
    if (path / "model.safetensors").exists():
        model = load_default_model()
        assert isinstance(model, EchoModel)
        return
    state = torch.random.get_rng_state()
    with caplog.at_level(logging.WARNING):
        a = load_default_model()
    assert any("untrained" in r.getMessage().lower() for r in caplog.records)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = load_default_model()
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


# ----------------------------------------------------------------------------- training


def synthetic_batch(b: int, seed: int = 0) -> dict:
    """Windows whose jawOpen follows the avatar's audio energy; a few other channels drift slowly."""
    g = torch.Generator().manual_seed(seed)
    t = W + L
    steps = torch.randn(b, t, generator=g) * 0.35
    energy = torch.sigmoid(steps.cumsum(1))  # smooth-ish in [0, 1]
    audio = torch.randn(b, t, 2, 83, generator=g) * 0.1
    audio[..., :80] += energy[:, :, None, None] * 3.0  # louder mel bins
    audio[..., 80] += energy[:, :, None] * 3.0  # log-energy prosody feature
    mot = torch.zeros(b, W, 58)
    mot[:, :, motion.CHANNEL_INDEX["jawOpen"]] = energy[:, :W]
    phase = torch.rand(b, 1, generator=g) * 6.28
    frames = torch.arange(W)[None, :]
    mot[:, :, motion.CHANNEL_INDEX["browInnerUp"]] = 0.3 + 0.1 * torch.sin(phase + frames / 8)
    mot[:, :, motion.CHANNEL_INDEX["headYaw"]] = 0.1 * torch.cos(phase + frames / 10)
    return {"motion": mot, "avatar_audio": audio}


@pytest.fixture(scope="module")
def trained():
    """A tiny model after 60 Adam steps of stage-1 training on one small synthetic batch."""
    model = make_model()
    model.train()
    batch = synthetic_batch(6)

    def eval_loss():
        with torch.no_grad():
            return sum(model.loss(batch, 1, generator=torch.Generator().manual_seed(s))[0].item() for s in range(4))

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    logs = {}
    for _ in range(60):
        loss, logs = model.loss(batch, stage=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    model.eval()
    return {"model": model, "opt": opt, "batch": batch, "before": before, "after": after, "logs": logs}


def test_tiny_training_lowers_loss(trained):
    assert np.isfinite(trained["logs"]["loss"]) and set(trained["logs"]) >= {"loss", "fm", "vel", "lip_mse"}
    assert trained["after"] < 0.5 * trained["before"], (trained["before"], trained["after"])


def test_trained_jaw_follows_audio(trained):
    """After the short run the sampled jawOpen tracks the audio energy better than a constant does."""
    model = trained["model"]
    batch = synthetic_batch(4, seed=1)
    jaw = motion.CHANNEL_INDEX["jawOpen"]
    prev = batch["motion"][:, :K]
    out = model.sample(prev, batch["avatar_audio"], seeds=[0, 1, 2, 3])
    target = batch["motion"][:, K:, jaw]
    err = (out[..., jaw] - target).pow(2).mean()
    assert err < (target - target.mean()).pow(2).mean()


def test_window_continuity(trained):
    model = trained["model"]
    batch = synthetic_batch(4, seed=2)
    prev = batch["motion"][:1, :K]
    outputs = []
    for i in range(4):
        win = model.sample(prev, batch["avatar_audio"][i:i + 1], seeds=[window_seed(0, i)], return_window=True)
        assert torch.equal(win[:, :K], prev), "overlap frames must equal the previous window's last K frames"
        outputs.append(win)
        prev = win[:, -K:]
    for a, b in zip(outputs, outputs[1:]):
        new = b[0, K:]
        within = (new[1:] - new[:-1]).abs()  # (S-1, 58) frame-to-frame changes inside the window
        junction = (b[0, K] - a[0, -1]).abs()  # (58,) change across the join
        assert junction.max() <= within.max(dim=0).values.max() + 1e-6
        # per channel: no channel jumps at the join more than its own largest in-window step (small slack)
        assert torch.all(junction <= within.max(dim=0).values * 1.5 + 0.02), (junction, within.max(dim=0).values)


def test_stage2_loss_trains_memory_and_transcript(trained):
    model = trained["model"]
    model.train()
    try:
        batch = dict(synthetic_batch(4))
        user = window_inputs(4)
        for key in ("user_audio", "user_video", "user_blend", "user_present"):
            batch[key] = user[key]
        batch["context_avatar_audio"] = torch.randn(4, 2, S, 2, 83)
        batch["context_user_present"] = torch.ones(4, 2, S, 3)
        batch["context_texts"] = [["hello there", "that's wonderful"]] * 4
        model.zero_grad()
        loss, logs = model.loss(batch, stage=2, user_drop=0.0)
        loss.backward()
        assert logs["stage"] == 2 and torch.isfinite(loss)
        assert model.lcu.gate_z.weight.grad is not None and model.lcu.gate_z.weight.grad.abs().sum() > 0
        assert model.transcript_encoder.bag.weight.grad is not None
        assert model.denoiser.blocks[0].cross.kv_user.weight.grad.abs().sum() > 0
        # stage 1 leaves the user/context branch without gradient
        model.zero_grad()
        model.loss(batch, stage=1)[0].backward()
        assert model.denoiser.blocks[0].cross.kv_user.weight.grad is None or \
            model.denoiser.blocks[0].cross.kv_user.weight.grad.abs().sum() == 0
        with pytest.raises(ValueError, match="stage"):
            model.loss(batch, stage=3)
    finally:
        model.zero_grad()
        model.eval()


# ----------------------------------------------------------------------------- transcript traces


def test_text_traces_closed_form_equals_recurrence():
    """Training computes the traces in closed form over the whole past; serving updates them window by
    window: both must give the same state (and gradients flow to the transcript encoder from any distance)."""
    model = make_model()
    model.train()
    texts = [["", "Great news, I got the job!", "", "", "I went to the office today."] + [""] * 40 + ["ok"],
             ["I lost my job, it is terrible.", "", "so sad"]]
    mem = model.memory_init(2)
    dt, m = TINY.transcript_dim, TINY.memory_slots
    n = max(map(len, texts))
    for j in range(n):
        batch_texts = [row[j] if j < len(row) else None for row in texts]
        emb = model.encode_transcript([t or "" for t in batch_texts])
        new = model.text_trace.update(mem[:, m:], emb)
        keep = torch.tensor([t is not None for t in batch_texts])[:, None, None]
        mem = torch.cat([mem[:, :m], torch.where(keep, new, mem[:, m:])], dim=1)
    closed = model.text_traces_from_history(texts)
    assert closed.shape == (2, TINY.text_traces, D)
    torch.testing.assert_close(closed, mem[:, m:], rtol=1e-5, atol=1e-5)
    # the slow trace still holds the first item's early text 46 windows later; the fast one has mostly forgotten
    w = closed[0, :, dt]
    assert w[1] > 2 * w[0]
    model.zero_grad()
    model.memory_tokens(torch.cat([model.memory_init(2)[:, :m], closed], dim=1))[:, m:].sum().backward()
    assert model.transcript_encoder.bag.weight.grad.abs().sum() > 0
    assert model.text_trace.salience.weight.grad.abs().sum() > 0
    model.eval()


def test_memory_update_carries_text_through_traces():
    """Two sessions differing only in one early sentence keep different memory tokens 120 windows later."""
    model = make_model()
    mems = []
    for text in ("I got the job, I am so happy.", "I lost my job, it is terrible."):
        mem = model.memory_init(1)
        for i in range(120):
            g = torch.Generator().manual_seed(i)
            emb = model.encode_transcript([text if i == 2 else ""])
            mem = model.memory_update(mem, torch.randn(1, S, 2, 83, generator=g), text_emb=emb)
        mems.append(model.memory_tokens(mem))
    diff = (mems[0] - mems[1]).abs()
    assert diff[:, TINY.memory_slots:].mean() > 1e-3


def test_known_drop_swaps_the_known_baseline():
    """With known_drop=1 an item's new frames see another item's non-lip level in the known frames (so stage 2
    must read the level from the context); lips and the within-window shape stay the item's own."""
    model = make_model()
    batch = dict(synthetic_batch(2, seed=5))
    lip = torch.zeros(58, dtype=torch.bool)
    lip[slice(*model.denoiser.ranges[0])] = True
    mo = batch["motion"]
    base = mo[:, :K].mean(dim=1, keepdim=True)
    # the same two items with their known non-lip levels exchanged
    swapped = mo.clone()
    swapped[:, :K, ~lip] = (mo[:, :K] - base + base.flip(0))[..., ~lip]
    other = dict(batch, motion=swapped)

    def fm(b, drop):
        with torch.no_grad():
            return model.loss(b, 2, user_drop=0.0, known_drop=drop, generator=torch.Generator().manual_seed(3))[1]["fm"]

    assert fm(batch, 1.0) == pytest.approx(fm(other, 0.0), rel=1e-5, abs=1e-7)
    assert fm(other, 1.0) == pytest.approx(fm(batch, 0.0), rel=1e-5, abs=1e-7)
    assert abs(fm(batch, 1.0) - fm(batch, 0.0)) > 1e-7


def test_trace_bias_reaches_non_lip_tokens_only():
    """The traces' direct path shifts the input embedding of non-lip tokens; lip tokens never see it."""
    model = make_model()
    with torch.no_grad():
        model.text_trace.nonlip_bias.weight.normal_(0, 0.5)
    x = window_inputs(1)
    user_tok = torch.zeros(1, U, D)
    ctxs = []
    for text in ("I got the job, I am so happy.", "I lost my job, it is terrible."):
        mem = model.memory_update(model.memory_init(1), x["avatar_audio"][:, :S],
                                  text_emb=model.encode_transcript([text]))
        with torch.no_grad():
            ctxs.append(model._context(x["avatar_audio"], user_tok, mem, torch.full((1,), TINY.memory_rows)))
    t, n_lip = TINY.tokens_per_frame, TINY.region_tokens[0]
    a, b = (c.frame_bias.view(1, W, t, D) for c in ctxs)
    assert torch.equal(a[:, :, :n_lip], b[:, :, :n_lip])
    assert (a[:, :, n_lip:] - b[:, :, n_lip:]).abs().max() > 1e-3


@torch.no_grad()
def test_frame_aligned_user_bias_reaches_non_lip_tokens_only_when_the_user_is_there():
    assert TINY.user_frame_bias
    t, n_lip = TINY.tokens_per_frame, TINY.region_tokens[0]
    for fusion in ("sdcm", "entangled"):
        model = make_model(dataclasses.replace(TINY, fusion=fusion))
        den = model.denoiser
        den.user_add.weight.normal_(0, 0.5)
        g = torch.Generator().manual_seed(1)
        audio_tok, mem = torch.randn(1, W, D, generator=g), random_memory(model, 1)
        u1, u2 = torch.randn(1, U, D, generator=g), torch.randn(1, U, D, generator=g)

        def bias(u, lengths):
            return den.prepare(audio_tok, mem, u, torch.tensor([lengths])).frame_bias.view(1, W, t, D)

        a, b = bias(u1, M + U), bias(u2, M + U)
        lips_equal = torch.equal(a[:, :, :n_lip], b[:, :, :n_lip])
        assert lips_equal == (fusion == "sdcm")
        assert (a[:, :, n_lip:] - b[:, :, n_lip:]).abs().max() > 1e-3
        # memory only (no user input this window) or the branch off: the user tokens add nothing
        for lengths in (M, 0):
            assert torch.equal(bias(u1, lengths), bias(u2, lengths))


def test_user_aux_loss_trains_the_user_path_in_stage_2_only():
    model = make_model(dataclasses.replace(TINY, user_aux_weight=0.5)).train()
    b = 3
    batch = synthetic_batch(b)
    x = window_inputs(b, seed=4)
    batch.update({k: x[k] for k in ("user_audio", "user_video", "user_blend", "user_present")})
    loss1, logs1 = model.loss(batch, 1)
    assert "user_aux" not in logs1
    loss1.backward()
    assert model.user_aux.weight.grad is None or not model.user_aux.weight.grad.any()
    model.zero_grad()
    loss2, logs2 = model.loss(batch, 2, user_drop=0.0)
    assert logs2["user_aux"] > 0
    loss2.backward()
    assert model.user_aux.weight.grad.abs().sum() > 0
    assert model.user_encoder.proj.weight.grad.abs().sum() > 0
    # without user input the auxiliary term is zero
    silent = dict(batch, user_present=torch.zeros_like(batch["user_present"]))
    assert model.loss(silent, 2)[1]["user_aux"] == 0.0
    # a config without it (tiny's default) has no head, so checkpoints written before it load unchanged
    assert make_model().user_aux is None


@torch.no_grad()
def test_user_guidance_extrapolates_away_from_the_user_free_prediction():
    model = make_model()
    model.denoiser.user_add.weight.normal_(0, 0.3)           # an untrained path would make guidance a no-op
    x = window_inputs(2, seed=5)
    mem = random_memory(model, 2, 3)
    plain = model.sample(**x, memory=mem, seeds=[1, 2])
    assert torch.equal(model.sample(**x, memory=mem, seeds=[1, 2], user_guidance=1.0), plain)
    g2 = model.sample(**x, memory=mem, seeds=[1, 2], user_guidance=2.0)
    nolip = ~torch.isin(torch.arange(58), torch.as_tensor(motion.REGION_SLICES["lips"]))
    assert (g2 - plain)[..., nolip].abs().max() > 1e-4
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="user_guidance"):
            model.sample(**x, memory=mem, seeds=[1, 2], user_guidance=bad)
    # windows without user input are untouched by guidance
    silent = dict(x, user_present=torch.zeros_like(x["user_present"]))
    assert torch.equal(model.sample(**silent, memory=mem, seeds=[1, 2], user_guidance=3.0),
                       model.sample(**silent, memory=mem, seeds=[1, 2]))

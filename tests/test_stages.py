"""Each stage's core, without Ray, and the inline pipeline that chains them."""
import os
import math

import numpy as np
import pytest
import torch

from echo_stream import config, motion, schemas
from echo_stream.config import get_config
from echo_stream.errors import InputError, SchemaError
from echo_stream.model import EchoModel
from echo_stream.pipeline import InlineRunner, PipelineOptions, SessionInputs, stream_session
from echo_stream.stages import Packet
from echo_stream.stages.decode import DecodeStage, chunks
from echo_stream.stages.diffusion import DiffusionStage
from echo_stream.stages.features import FeaturesStage
from echo_stream.stages.memory import MemoryStage, window_arrays
from echo_stream.stages.render import RenderStage
from echo_stream.transcript import Segment

from . import mediagen

CFG = get_config("tiny")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EchoModel(CFG).eval()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage_media")
    avatar = mediagen.write_audio(d / "avatar.wav", mediagen.speech_like(2.13, 16000, seed=1), 16000)
    frames = mediagen.real_face_frames(60)
    user_video = mediagen.write_video(d / "user.mp4", frames, fps=25,
                                      audio=mediagen.speech_like(2.4, 44100, seed=2), audio_rate=44100)
    silent_video = mediagen.write_video(d / "silent.mp4", frames[:10], fps=25)
    return {"avatar": str(avatar), "user_video": str(user_video), "silent_video": str(silent_video),
            "samples": int(round(2.13 * 16000))}


def _decode_all(media, **kw):
    dec = DecodeStage(chunk_frames=8)
    info = dec.open_session("s1", media["avatar"], **kw)
    return info, list(chunks(dec, "s1"))


def test_decode_chunks_in_pts_order_and_aligned(media):
    info, out = _decode_all(media, user_video=media["user_video"])
    assert info["has_user_audio"] and info["has_user_video"]  # user audio taken from the video's track
    assert [i["end"] for _, i in out] == [False] * (len(out) - 1) + [True]
    assert sum(len(i["avatar_audio"]) for _, i in out) == media["samples"]
    n_frames = math.ceil(media["samples"] / config.SAMPLES_PER_FRAME)
    assert sum(p.meta["frames"] for p, _ in out) == n_frames
    pts, seqs = [], []
    for p, _ in out:
        a = p.get(schemas.AUDIO_CHUNK)
        tracks = schemas.column(a, "track")
        assert (tracks == "avatar").sum() == (tracks == "user").sum() == p.meta["frames"]
        v = p.get(schemas.VIDEO_FRAMES)
        assert v.num_rows == p.meta["frames"] and schemas.column(v, "image").shape[1:] == (108, 192, 3)
        pts.extend(schemas.column(a, "pts")[tracks == "avatar"])
        seqs.extend(schemas.column(a, "seq"))
    assert np.allclose(np.diff(pts), 1 / 25) and np.all(np.diff(seqs) > 0)


def test_decode_bad_inputs(media, tmp_path):
    dec = DecodeStage()
    with pytest.raises(InputError, match="missing.wav"):
        dec.open_session("x", str(tmp_path / "missing.wav"))
    with pytest.raises(InputError, match="no audio stream"):
        dec.open_session("x", media["silent_video"])
    with pytest.raises(KeyError, match="unknown session"):
        dec.next_chunk("never-opened")


def _features(media, **kw):
    _, out = _decode_all(media, **kw)
    fs = FeaturesStage()
    return [fs.process(p) for p, _ in out]


def test_features_one_row_per_frame_with_presence(media):
    feats = _features(media, user_video=media["user_video"])
    rows = schemas.concat([f.get(schemas.FEATURES) for f in feats], schemas.FEATURES)
    n_frames = math.ceil(media["samples"] / config.SAMPLES_PER_FRAME)
    assert rows.num_rows == n_frames and feats[-1].end
    assert np.array_equal(schemas.column(rows, "frame"), np.arange(n_frames))
    present = schemas.column(rows, "user_present")
    # the user's face reaches the model as tracked motion (flag 2), as client blendshapes would
    assert present[:, 0].all() and not present[:, 1].any() and present[:, 2].mean() > 0.9
    assert not schemas.column(rows, "user_video").any()
    blend = schemas.column(rows, "user_blend")
    assert blend[present[:, 2] > 0].std(0).max() > 0.05
    alone = schemas.concat([f.get(schemas.FEATURES) for f in _features(media)], schemas.FEATURES)
    assert not schemas.column(alone, "user_present").any()
    assert np.array_equal(schemas.column(alone, "avatar_audio"), schemas.column(rows, "avatar_audio"))


def test_features_rejects_wrong_contract():
    fs = FeaturesStage()
    bad = schemas.make_batch(schemas.MOTION_WINDOW, dict(session_id=["s"], seq=[0], pts=[0.0], frame=[0],
                                                         window=[0], motion=np.zeros((1, 58))))
    with pytest.raises(SchemaError, match="not accepted by the features stage"):
        fs.process(Packet("s", {"MotionWindow": bad}))


def _windows(media, model, **kw):
    ms = MemoryStage(model=model)
    wins = []
    for f in _features(media, **kw):
        wins.extend(ms.process(f))
    return ms, wins


def test_memory_cuts_windows_with_overlap_and_lookahead(media, model):
    _, wins = _windows(media, model, user_video=media["user_video"])
    K, S, L, H = CFG.overlap_frames, CFG.new_frames, CFG.lookahead_frames, CFG.user_history_frames
    assert H > 0
    n_frames = math.ceil(media["samples"] / config.SAMPLES_PER_FRAME)
    assert len(wins) == math.ceil(n_frames / S) and wins[-1].end
    for w, p in enumerate(wins):
        frames = schemas.column(p.get(schemas.FEATURES), "frame")
        # the window's own frames and lookahead, after H frames of user history
        assert np.array_equal(frames, np.arange(w * S - K - H, w * S + S + L))
        arrays = window_arrays(p, CFG)
        assert arrays["avatar_audio"].shape[0] == CFG.window_frames + L
        assert arrays["user_audio"].shape[0] == CFG.user_frames
        rows = {int(f): i for i, f in enumerate(frames)}
        feats = p.get(schemas.FEATURES)
        # the user rows end with the window's last frame; the avatar rows start at its first
        assert np.array_equal(arrays["user_audio"][-1], schemas.column(feats, "user_audio")[rows[w * S + S - 1]])
        assert np.array_equal(arrays["avatar_audio"][0], schemas.column(feats, "avatar_audio")[rows[w * S - K]])
        tok = schemas.column(p.get(schemas.MEMORY_TOKENS), "tokens")
        assert tok.shape == (1, CFG.memory_rows, CFG.d_model)
    assert sum(p.meta["valid_frames"] for p in wins) == n_frames
    t_first = schemas.column(wins[0].get(schemas.MEMORY_TOKENS), "tokens")
    t_last = schemas.column(wins[-1].get(schemas.MEMORY_TOKENS), "tokens")
    assert not np.allclose(t_first, t_last)  # the memory absorbed the conversation


def test_memory_state_export_import_and_transcript(media, model):
    ms = MemoryStage(model=model)
    from echo_stream.pipeline import transcript_batch
    ms.add_transcript(transcript_batch("s1", [Segment(0.0, 1.0, "user", "I got the job, wonderful news")]))
    f = _features(media)
    ms.process(f[0]), ms.process(f[1]), ms.process(f[2])
    blob = ms.export_state("s1")
    ms2 = MemoryStage(model=model)
    ms2.import_state("s1", blob)
    assert torch.equal(ms2._sessions["s1"].memory, ms._sessions["s1"].memory)
    # a session the stage no longer holds (closed, or failed before it arrived): nothing to export
    ms2.close_session("s1")
    assert ms2.export_state("s1") is None and ms.export_state("never-opened") is None


def test_diffusion_continuous_deterministic_and_batched(media, model):
    _, wins = _windows(media, model)
    ds = DiffusionStage(model=model)
    ds.set_seed("s1", 7)
    outs = [ds.process(w)[0] for w in wins]
    mw = schemas.concat([o.get(schemas.MOTION_WINDOW) for o in outs], schemas.MOTION_WINDOW)
    n_frames = math.ceil(media["samples"] / config.SAMPLES_PER_FRAME)
    assert np.array_equal(schemas.column(mw, "frame"), np.arange(n_frames))
    m = schemas.column(mw, "motion")
    assert m.shape == (n_frames, motion.NUM_CHANNELS) and np.isfinite(m).all()
    assert (m >= motion.CHANNEL_MIN - 1e-6).all() and (m <= motion.CHANNEL_MAX + 1e-6).all()
    # same seed -> same motion; two sessions batched in one call -> same as alone
    ds2 = DiffusionStage(model=model)
    ds2.set_seed("s1", 7), ds2.set_seed("s2", 7)
    again = []
    for w in wins:
        twin = Packet("s2", dict(w.batches), w.end, dict(w.meta))
        a, b = ds2.process([w, twin])
        again.append(a.get(schemas.MOTION_WINDOW))
        assert np.allclose(schemas.column(a.get(schemas.MOTION_WINDOW), "motion"),
                           schemas.column(b.get(schemas.MOTION_WINDOW), "motion"), atol=1e-5)
    m2 = schemas.column(schemas.concat(again, schemas.MOTION_WINDOW), "motion")
    assert np.allclose(m, m2, atol=1e-5)


def test_render_stage_frames_and_passthrough(media, model):
    _, wins = _windows(media, model)
    ds = DiffusionStage(model=model)
    rs = RenderStage()
    from echo_stream.cli import ASSETS
    rs.open_session("s1", str(ASSETS / "portrait.jpg"), size=(64, 64))
    out = rs.process(ds.process(wins[0]))[0]
    rf = out.get(schemas.RENDERED_FRAMES)
    assert schemas.column(rf, "image").shape == (CFG.new_frames, 64, 64, 3)
    assert np.array_equal(schemas.column(rf, "frame"), schemas.column(out.get(schemas.MOTION_WINDOW), "frame"))


def test_inline_pipeline_streams_every_frame_once(media, model):
    opts = PipelineOptions(size=(64, 64))
    from echo_stream.cli import ASSETS
    stages = {"decode": DecodeStage(), "features": FeaturesStage(), "memory": MemoryStage(model=model),
              "diffusion": DiffusionStage(model=model), "render": RenderStage()}
    runner = InlineRunner(opts, stages)
    runner.setup()
    got_audio, frames, images = [], [], 0

    def on_output(p):
        nonlocal images
        frames.extend(schemas.column(p.get(schemas.MOTION_WINDOW), "frame"))
        images += p.rows(schemas.RENDERED_FRAMES)

    inp = SessionInputs(portrait=str(ASSETS / "portrait.jpg"), avatar_audio=media["avatar"],
                        user_video=media["user_video"], size=(64, 64),
                        transcript=[Segment(0.5, 1.0, "user", "so happy")])
    stream_session(runner, "s1", inp, got_audio.append, on_output, max_inflight=2)
    n_frames = math.ceil(media["samples"] / config.SAMPLES_PER_FRAME)
    assert frames == list(range(n_frames)) and images == n_frames
    assert sum(map(len, got_audio)) == media["samples"]
    stats = runner.stats()
    assert set(stats) == {"decode", "features", "memory", "diffusion", "render"}
    assert all(s["calls"] for s in stats.values())


# ---------------------------------------------------------------- low-latency stride

def _stride_windows(media, model, stride, **kw):
    ms = MemoryStage(model=model, stride=stride)
    wins = []
    for f in _features(media, **kw):
        wins.extend(ms.process(f))
    return ms, wins


@pytest.mark.parametrize("stride", [6, 5])
def test_stride_windows_keep_the_span_and_cover_every_frame_once(media, model, stride):
    ms, wins = _stride_windows(media, model, stride, user_video=media["user_video"])
    W, L, H = CFG.window_frames, CFG.lookahead_frames, CFG.user_history_frames
    K = W - stride
    n_frames = math.ceil(media["samples"] / config.SAMPLES_PER_FRAME)
    assert len(wins) == math.ceil(n_frames / stride) and wins[-1].end
    for w, p in enumerate(wins):
        frames = schemas.column(p.get(schemas.FEATURES), "frame")
        # H + W + L rows each: the user branch's history ends with the window, whatever the stride
        assert np.array_equal(frames, np.arange(w * stride - K - H, w * stride + stride + L))
    ds = DiffusionStage(model=model, stride=stride)
    ds.set_seed("s1", 3)
    mw = schemas.concat([ds.process(w)[0].get(schemas.MOTION_WINDOW) for w in wins], schemas.MOTION_WINDOW)
    assert np.array_equal(schemas.column(mw, "frame"), np.arange(n_frames))
    m = schemas.column(mw, "motion")
    assert np.isfinite(m).all() and m.std(axis=0).max() > 0


def test_stride_memory_advances_in_blocks_of_new_frames(media, model):
    """The LCU memory folds the same 16-frame blocks (and text) whatever the stride: same state after them."""
    from echo_stream.pipeline import transcript_batch

    seg = [Segment(0.2, 1.0, "user", "I got the job, wonderful news")]
    states = {}
    for stride in (None, 4):
        ms = MemoryStage(model=model, stride=stride)
        ms.add_transcript(transcript_batch("s1", seg))
        f = _features(media, user_video=media["user_video"])
        toks = []
        for p in f[:-1]:                         # not the end: the session's state stays
            toks += [schemas.column(w.get(schemas.MEMORY_TOKENS), "tokens")[0] for w in ms.process(p)]
        s = ms._sessions["s1"]
        states[stride] = (s.steps, s.memory.clone(), s.mem_frame)
    (n16, m16, f16), (n4, m4, f4) = states[None], states[4]
    assert n16 >= 1 and f16 == f4 == n16 * CFG.new_frames
    assert n4 == n16 and torch.allclose(m16, m4, atol=1e-6)


def test_stride_is_validated(model):
    with pytest.raises(ValueError, match="stride"):
        MemoryStage(model=model, stride=CFG.new_frames + 1).setup()
    with pytest.raises(ValueError, match="stride"):
        DiffusionStage(model=model, stride=0).setup()
    with pytest.raises(ValueError, match="known frames"):
        model.sample(torch.zeros(1, CFG.window_frames, motion.NUM_CHANNELS),
                     torch.zeros(1, CFG.window_frames + CFG.lookahead_frames, 2, config.AUDIO_FEAT_DIM))


def test_set_stride_after_a_transcript_takes_effect_then_is_fixed(media, model):
    """A transcript may open the session first: set_stride still gives it its geometry, until features arrive."""
    from echo_stream.pipeline import transcript_batch

    ms = MemoryStage(model=model)
    ms.add_transcript(transcript_batch("s1", [Segment(0.2, 1.0, "user", "hello there")]))
    ms.set_stride("s1", 6)
    s = ms._sessions["s1"]
    assert (s.stride, s.known) == (6, CFG.window_frames - 6) and len(s.texts) == 1
    wins = [w for p in _features(media)[:-1] for w in ms.process(p)]
    assert wins and all(w.meta["known_frames"] == CFG.window_frames - 6 for w in wins)
    with pytest.raises(ValueError, match="stride is fixed"):
        ms.set_stride("s1", 4)


def test_loss_with_longer_known_prefix_is_finite_and_differentiable(model):
    """long_known: items carry K' > overlap known frames; the loss and its gradient stay finite."""
    W, L = CFG.window_frames, CFG.lookahead_frames
    g = torch.Generator().manual_seed(0)
    batch = {"motion": torch.from_numpy(np.stack([motion.neutral_motion(W)] * 4)) + 0.01 * torch.randn(4, W, 58, generator=g),
             "avatar_audio": torch.randn(4, W + L, 2, config.AUDIO_FEAT_DIM, generator=g)}
    model.train()
    try:
        loss, logs = model.loss(batch, 2, long_known=1.0, generator=torch.Generator().manual_seed(1))
        loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    assert torch.isfinite(loss) and logs["fm"] > 0


def test_gpu_stages_reserve_gpu_shares_and_cuda_needs_gpus_in_the_cluster():
    from echo_stream.errors import InputError
    from echo_stream.pipeline import GPU_SHARES, PipelineOptions, build_stages, check_gpu_capacity, gpu_resources

    stages = build_stages(PipelineOptions(device="cuda"))
    gpu_resources(stages, "cuda")
    assert {n: s.resources.get("num_gpus", 0) for n, s in stages.items()} == {
        "decode": 0, "features": 0, "memory": 0, **GPU_SHARES}
    cpu = build_stages(PipelineOptions())
    gpu_resources(cpu, "cpu")
    assert all("num_gpus" not in s.resources for s in cpu.values())
    check_gpu_capacity("cpu", 0)            # no GPU needed
    check_gpu_capacity("cuda:0", 1)         # both shares fit one GPU
    with pytest.raises(InputError, match=r"--device: cuda asks for 1 GPU .* the Ray cluster has 0"):
        check_gpu_capacity("cuda", 0)


@pytest.mark.ray
def test_generate_with_cuda_on_a_cluster_without_gpus_refuses_in_one_line(tmp_path):
    import subprocess
    import sys

    from echo_stream import samples

    r = subprocess.run([sys.executable, "-m", "echo_stream.cli", "generate", "--portrait",
                        str(samples.ASSETS_DIR / "portrait.jpg"), "--avatar-audio",
                        str(samples.ASSETS_DIR / "sample" / "avatar_speech.ogg"), "-o", str(tmp_path / "o.mp4"),
                        "--device", "cuda", "--quiet"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("echo-stream: error:")]
    assert r.returncode == 1 and len(errors) == 1 and "--device" in errors[0] and "GPU" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "o.mp4").exists()

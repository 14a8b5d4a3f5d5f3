import numpy as np
import pytest
import torch

from echo_stream import config, evaluate, media, motion
from echo_stream.config import get_config
from echo_stream.model import EchoModel
from echo_stream.transcript import Segment

from . import mediagen


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EchoModel(get_config("tiny")).eval()


def test_pearson_frechet_band_energy():
    x = np.sin(np.linspace(0, 20, 500))
    assert evaluate.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert evaluate.pearson(x, -x) == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2000, 3))
    assert evaluate.frechet(a, a) == pytest.approx(0.0, abs=1e-6)
    assert evaluate.frechet(a, a + 1.0) == pytest.approx(3.0, rel=0.05)
    t = np.arange(250) / 25
    nod = np.where(t > 5, np.sin(2 * np.pi * 2 * t), 0.0)
    e = evaluate.band_energy(nod)
    assert e[150:230].mean() > 10 * (e[20:100].mean() + 1e-9)


def test_rollout_matches_the_inline_pipeline(tmp_path, model):
    """eval measures exactly what generate produces: same features, same stages, same seed."""
    from echo_stream.generate import GenerateRequest, generate
    from echo_stream.pipeline import InlineRunner, PipelineOptions, build_stages
    import pyarrow.parquet as pq

    wav = mediagen.write_audio(tmp_path / "a.wav", mediagen.speech_like(1.5, 16000, seed=2), 16000)
    stages = build_stages(PipelineOptions(size=(64, 64)))
    stages["memory"]._model = model
    stages["diffusion"]._model = model
    runner = InlineRunner(PipelineOptions(), stages)
    runner.setup()
    generate(GenerateRequest(portrait=str(evaluate.Path(__file__).resolve().parents[1] / "echo_stream/assets/portrait.jpg"),
                             avatar_audio=str(wav), motion_out=str(tmp_path / "m.parquet"), seed=5),
             progress=False, runner=runner)
    t = pq.read_table(tmp_path / "m.parquet")
    via_generate = np.stack([t.column(c).to_numpy() for c in motion.CHANNELS], 1)
    via_eval = evaluate.rollout(model, evaluate.audio_only_features(media.decode_audio(wav)), seed=5)
    assert np.allclose(via_generate, via_eval, atol=1e-6)


def test_transcript_reaches_behaviour_only_through_lcu(model):
    T = 5 * config.FPS
    feats = evaluate.audio_only_features(mediagen.speech_like(T / config.FPS, 16000, seed=1))
    runs = {}
    for use_memory in (True, False):
        a = evaluate.rollout(model, feats, [Segment(0.2, 1.0, "user", evaluate.POSITIVE)], use_memory=use_memory)
        b = evaluate.rollout(model, feats, [Segment(0.2, 1.0, "user", evaluate.NEGATIVE)], use_memory=use_memory)
        runs[use_memory] = np.abs(a - b)[-2 * config.FPS:].mean()
    assert runs[True] > 0 and runs[False] == 0.0


def test_listener_metrics_detect_nods_after_pauses():
    T = 10 * config.FPS
    user = np.concatenate([mediagen.speech_like(3.0, 16000, seed=3), np.zeros(7 * 16000, np.float32)])
    m = np.zeros((T, motion.NUM_CHANNELS), np.float32)
    t = np.arange(T) / config.FPS
    m[:, motion.CHANNEL_INDEX["headPitch"]] = np.where((t > 3.1) & (t < 4.2), 0.1 * np.sin(2 * np.pi * 2 * t), 0)
    smile = np.clip(np.sin(t), 0, 1)
    m[:, evaluate.SMILE[0]] = m[:, evaluate.SMILE[1]] = np.roll(smile, 12)
    r = evaluate.listener_metrics(m, user, smile)
    assert r["user_pauses"] >= 1
    assert r["nod_energy_after_pauses"] > 3 * r["nod_energy_elsewhere"]
    assert r["smile_mirroring_corr"] > 0.95


def test_user_guidance_argument_is_checked_at_parse_time():
    import argparse

    p = argparse.ArgumentParser()
    evaluate.add_arguments(p)
    assert p.parse_args(["--corpus", "c", "--user-guidance", "3"]).user_guidance == 3.0
    for bad in ("nan", "-1", "x", "inf"):
        with pytest.raises(SystemExit):
            p.parse_args(["--corpus", "c", "--user-guidance", bad])


def test_bootstrap_and_segment_lip_sync_measure_what_they_say():
    rng = np.random.default_rng(1)
    x = rng.normal(0.3, 1.0, 400)
    lo, hi = evaluate.bootstrap_ci(x)
    assert lo < 0.3 < hi and hi - lo < 0.4
    lo0, hi0 = evaluate.bootstrap_ci(np.zeros(50))
    assert lo0 == hi0 == 0.0
    # a jaw that follows the audio envelope in the first 10 s only
    sr, fps = config.SAMPLE_RATE, config.FPS
    t = np.arange(20 * sr) / sr
    audio = (np.sin(2 * np.pi * 150 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t))).astype(np.float32)
    env = evaluate.features.rms_envelope(audio)
    m = np.zeros((len(env), motion.NUM_CHANNELS), np.float32)
    m[: 10 * fps, motion.CHANNEL_INDEX["jawOpen"]] = env[: 10 * fps]
    seg = evaluate.segment_lip_sync(m, audio)
    assert seg.shape == (2,) and seg[0] > 0.99 and seg[1] == 0.0
    r = evaluate._interference([np.array([0.9, 0.8])], [np.array([1.0, 0.8])])
    assert r["drop"] == pytest.approx(0.05) and r["abs_diff"] == pytest.approx(0.05) and r["segments"] == 2


def test_real_user_changes_non_lip_motion_of_a_model_that_listens(model):
    """The real-user experiment runs end to end (real face tracked, real voice) and separates the regions."""
    from pathlib import Path

    tts = sorted((Path(__file__).parent / "data" / "tts").glob("*.ogg"))
    res = evaluate.real_user_effect(model, tts, seed=0)
    assert res["user_face_frames"] > 0.5 * res["seconds"] * config.FPS   # the face is found in most frames
    assert res["seconds"] > 19
    # an untrained SDCM model: the user branch reaches non-lip tokens only, and lip tokens never attend to it
    assert res["nonlip_mean_abs_diff"] > 0
    assert res["lip_mean_abs_diff"] < res["nonlip_mean_abs_diff"]

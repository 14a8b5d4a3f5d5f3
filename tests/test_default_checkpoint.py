"""The shipped default checkpoint: present, small, loadable, and trained (lip sync, idle listening)."""
import os

import numpy as np
import pytest

from echo_stream import config, evaluate, features, motion
from echo_stream.model import default_checkpoint_path, load_checkpoint

CKPT = default_checkpoint_path()


@pytest.fixture(scope="module")
def model():
    if not os.path.isdir(CKPT):
        pytest.fail(f"no default checkpoint at {CKPT}: run the training recipe in the README")
    return load_checkpoint(CKPT)


def test_checkpoint_is_small_and_has_a_config(model):
    size = sum(os.path.getsize(os.path.join(CKPT, f)) for f in os.listdir(CKPT))
    assert size <= 20 * 1024 * 1024
    assert model.cfg.name == "tiny"


def test_lips_follow_the_avatar_audio(model):
    from echo_stream.corpus import speech_with_targets

    sp = speech_with_targets("hello there, how are you doing today? I am pretty happy about it.", seed=3)
    m = evaluate.rollout(model, evaluate.audio_only_features(sp.audio), seed=1)
    r = evaluate.pearson(m[:, motion.CHANNEL_INDEX["jawOpen"]], features.rms_envelope(sp.audio))
    assert r > 0.5


def test_idle_listening_without_a_user(model):
    """No user stream, the avatar silent: it still blinks and moves its head a little."""
    T = 12 * config.FPS
    silent = np.zeros(T * config.SAMPLES_PER_FRAME, np.float32)
    m = evaluate.rollout(model, evaluate.audio_only_features(silent), seed=2)
    blink = m[:, motion.CHANNEL_INDEX["eyeBlinkLeft"]]
    assert blink.max() > 0.3 and (blink > 0.3).mean() < 0.5  # blinks happen, eyes mostly open
    head = m[:, [motion.CHANNEL_INDEX[c] for c in ("headPitch", "headYaw", "headRoll")]]
    assert head.std(0).max() > 0.003
    assert m[:, motion.CHANNEL_INDEX["jawOpen"]].mean() < 0.15  # silent: mouth mostly closed


def test_long_range_context_shifts_later_behaviour(model):
    """An affect said in the first seconds still shows 30+ s later with the LCU memory on, and not with it off."""
    from echo_stream.transcript import Segment

    T = 40 * config.FPS
    feats = evaluate.audio_only_features(np.zeros(T * config.SAMPLES_PER_FRAME, np.float32))
    late = slice(T - 10 * config.FPS, T)
    smile = [motion.CHANNEL_INDEX["mouthSmileLeft"], motion.CHANNEL_INDEX["mouthSmileRight"]]
    runs = {}
    for use_memory in (True, False):
        for name, text in (("pos", evaluate.POSITIVE), ("neg", evaluate.NEGATIVE)):
            m = evaluate.rollout(model, feats, [Segment(1.0, 5.0, "user", text)], seed=4, use_memory=use_memory)
            runs[use_memory, name] = m[late]
    assert runs[True, "pos"][:, smile].mean() - runs[True, "neg"][:, smile].mean() > 0.05
    np.testing.assert_array_equal(runs[False, "pos"], runs[False, "neg"])

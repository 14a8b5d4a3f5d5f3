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

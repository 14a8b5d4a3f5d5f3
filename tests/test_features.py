"""echo_stream.features: audio features (streaming == offline), behaviour features, blendshapes, envelope."""
from __future__ import annotations

import time

import numpy as np
import pytest

from echo_stream import features as F
from echo_stream import media, motion
from echo_stream.config import AUDIO_FEAT_DIM, MEL_BINS, MELS_PER_FRAME, SAMPLES_PER_FRAME
from echo_stream.errors import InputError

from . import mediagen as mg

SR = 16000
E, LF0, VOI = MEL_BINS, MEL_BINS + 1, MEL_BINS + 2     # prosody columns


@pytest.fixture(scope="module", autouse=True)
def _warm():
    F.warmup()


def stream(samples: np.ndarray, rng: np.random.Generator, max_chunk: int = 5000) -> np.ndarray:
    """Feed in random chunk sizes with random pop_frames calls; return all features."""
    ex = F.AudioFeatureExtractor()
    outs, pos = [], 0
    while pos < len(samples):
        n = int(rng.integers(1, max_chunk))
        ex.push(samples[pos:pos + n])
        pos += n
        r = rng.random()
        if r < 0.4:
            outs.append(ex.pop_frames())
        elif r < 0.7:
            until = ex.frames_emitted + int(rng.integers(0, 4))
            got = ex.pop_frames(until)
            assert ex.frames_emitted <= until and len(got) <= until
            outs.append(got)
    outs.append(ex.flush())
    return np.concatenate(outs)


# ============================================================================ audio features

@pytest.mark.parametrize("n", [0, 1, 639, 640, 641, 1280, 16000, 16001])
def test_feature_shape(n):
    x = mg.speech_like(n / SR, SR) if n else np.zeros(0, np.float32)
    x = x[:n] if len(x) >= n else np.pad(x, (0, n - len(x)))
    f = F.offline_audio_features(x)
    assert f.shape == (-(-n // SAMPLES_PER_FRAME), MELS_PER_FRAME, AUDIO_FEAT_DIM)
    assert f.dtype == np.float32 and np.all(np.isfinite(f))
    assert F.num_video_frames(n) == f.shape[0]


@pytest.mark.parametrize("seed", range(6))
def test_streaming_equals_offline_random_chunking(seed):
    rng = np.random.default_rng(seed)
    dur = float(rng.uniform(0.3, 3.0))
    x = mg.speech_like(dur, SR, seed=seed)
    x = x[: len(x) - int(rng.integers(0, 600))]          # arbitrary length, not a multiple of 640
    off = F.offline_audio_features(x)
    st = stream(x, rng, max_chunk=int(rng.choice([50, 700, 5000])))
    assert st.shape == off.shape
    np.testing.assert_allclose(st, off, rtol=0, atol=1e-5)


def test_streaming_equals_offline_one_sample_at_a_time():
    x = mg.speech_like(0.25, SR, seed=9)
    ex = F.AudioFeatureExtractor()
    outs = []
    for s in x:
        ex.push(np.array([s], np.float32))
        outs.append(ex.pop_frames())
    outs.append(ex.flush())
    np.testing.assert_allclose(np.concatenate(outs), F.offline_audio_features(x), atol=1e-5)


def test_frame_ready_only_when_its_windows_are_complete():
    x = mg.speech_like(1.0, SR)
    ex = F.AudioFeatureExtractor()
    need = SAMPLES_PER_FRAME + F.AUDIO_LOOKAHEAD_SAMPLES          # 640 + 160 for frame 0
    ex.push(x[:need - 1])
    assert ex.frames_ready == 0 and len(ex.pop_frames()) == 0
    ex.push(x[need - 1:need])
    assert ex.frames_ready == 1
    ex.push(x[need:need + 5 * SAMPLES_PER_FRAME])
    assert len(ex.pop_frames(3)) == 3 and ex.frames_emitted == 3
    assert len(ex.pop_frames(3)) == 0
    assert len(ex.pop_frames()) == 3                              # frames 3..5
    rest = ex.flush()
    assert ex.frames_emitted == F.num_video_frames(need + 5 * SAMPLES_PER_FRAME) == 6 + len(rest)
    with pytest.raises(RuntimeError):
        ex.push(x[:10])
    ex.reset()
    ex.push(x)
    np.testing.assert_allclose(np.concatenate([ex.pop_frames(), ex.flush()]), F.offline_audio_features(x), atol=1e-5)


def test_silence_vs_tone_energy_and_voicing():
    sil = F.offline_audio_features(np.zeros(SR, np.float32))
    tone = F.offline_audio_features(mg.tone(200, 1.0, SR, amplitude=0.5))
    assert np.all(sil[:, :, E] < -11) and np.all(sil[:, :, LF0] == 0) and np.all(sil[:, :, VOI] == 0)
    inner = tone[2:-2]
    assert np.all(inner[:, :, E] > -2.0)
    assert inner[:, :, E].mean() - sil[:, :, E].mean() > 9
    # the tone's energy sits in the mel bins around 200 Hz
    spectrum = inner[:, :, :E].mean(axis=(0, 1))
    import librosa

    centres = librosa.mel_frequencies(n_mels=MEL_BINS + 2, fmin=20, fmax=7600)[1:-1]
    assert abs(centres[int(np.argmax(spectrum))] - 200) < 40
    assert spectrum.max() > sil[:, :, :E].max() + 10
    assert np.all(inner[:, :, VOI] > 0.9)


@pytest.mark.parametrize("f0,harmonics", [(200, 1), (200, 6), (110, 6), (320, 3), (70, 6), (450, 1)])
def test_f0_recovered(f0, harmonics):
    f = F.offline_audio_features(mg.tone(f0, 1.0, SR, harmonics=harmonics))
    lf0 = f[2:-2, :, LF0].reshape(-1)
    assert np.all(lf0 != 0)
    est = 150.0 * 2.0 ** np.median(lf0)
    assert est == pytest.approx(f0, rel=0.02)


def test_noise_is_unvoiced():
    x = (0.2 * np.random.default_rng(0).standard_normal(SR)).astype(np.float32)
    f = F.offline_audio_features(x)
    assert (f[:, :, LF0] != 0).mean() < 0.1
    assert f[:, :, VOI].mean() < 0.5


def test_speech_like_has_voiced_and_paused_frames():
    x = mg.speech_like(3.0, SR, pause_every=1.0)
    f = F.offline_audio_features(x)
    voiced = (f[:, :, LF0] != 0).mean()
    assert 0.3 < voiced < 0.95
    pause = f[int(1.05 * 25):int(1.2 * 25), :, E]            # inside the 0.25 s pause after 1.0 s
    talk = f[:, :, E]
    assert pause.max() < np.percentile(talk, 75) - 3


def test_alignment_frame_centres():
    """An impulse at sample s lights up the energy of the feature frames whose windows hold it."""
    x = np.zeros(6400, np.float32)
    s = 640 * 4 + 480                           # centre of feature frame k = 9 (video frame 4, second half)
    x[s - 20:s + 20] = 0.8
    f = F.offline_audio_features(x).reshape(-1, AUDIO_FEAT_DIM)
    k = int(np.argmax(f[:, E]))
    assert k == 9
    assert f[k - 2, E] < -11 and f[k + 2, E] < -11   # 400-sample windows do not reach two hops away


def test_mel_matches_librosa():
    import librosa

    x = mg.speech_like(1.0, SR, seed=4)
    ours = F.offline_audio_features(x).reshape(-1, AUDIO_FEAT_DIM)[:, :MEL_BINS]
    # librosa on the same zero padding: frame k centred at 320 k + 160 -> window [320 k - 96, 320 k + 416)
    n = ours.shape[0]
    padded = np.zeros(96 + 320 * (n - 1) + 512, np.float32)
    padded[96:96 + len(x)] = x[: len(padded) - 96]
    mel = librosa.feature.melspectrogram(y=padded, sr=SR, n_fft=512, win_length=400, hop_length=320, center=False,
                                         fmin=20, fmax=7600, n_mels=80, power=2.0)
    ref = np.log(mel.T[:n] + 1e-6)
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_feature_cost_per_second_of_audio():
    x = mg.speech_like(10.0, SR)
    t = time.perf_counter()
    F.offline_audio_features(x)
    offline = (time.perf_counter() - t) / 10
    ex = F.AudioFeatureExtractor()
    t = time.perf_counter()
    for i in range(0, len(x), 640):             # one video frame of audio per call
        ex.push(x[i:i + 640])
        ex.pop_frames()
    ex.flush()
    streaming = (time.perf_counter() - t) / 10
    # target is ~20 ms of CPU per second of audio; allow slack for loaded CI machines
    assert offline < 0.1 and streaming < 0.1, (offline, streaming)


def test_non_finite_audio_rejected():
    x = np.zeros(1000, np.float32)
    x[10] = np.nan
    with pytest.raises(InputError):
        F.offline_audio_features(x)
    with pytest.raises(InputError):
        F.AudioFeatureExtractor().push(x)


def test_features_from_decoded_file_match(tmp_path):
    """decode_audio -> offline features == iter_audio_chunks -> streaming features."""
    x = mg.speech_like(1.5, 22050)
    p = mg.write_audio(tmp_path / "a.flac", x, 22050)
    off = F.offline_audio_features(media.decode_audio(p))
    ex = F.AudioFeatureExtractor()
    outs = []
    for _, chunk in media.iter_audio_chunks(p, 640 * 8):
        ex.push(chunk)
        outs.append(ex.pop_frames())
    outs.append(ex.flush())
    np.testing.assert_allclose(np.concatenate(outs), off, atol=1e-5)


# ============================================================================ rms envelope

def test_rms_envelope():
    x = np.concatenate([np.zeros(6400), mg.tone(200, 0.4, SR, amplitude=0.5), np.zeros(3000)]).astype(np.float32)
    env = F.rms_envelope(x, smooth_frames=1)
    assert env.shape == (-(-len(x) // 640),) and env.dtype == np.float32
    assert np.all(env[:10] == 0)
    assert env[12:19] == pytest.approx(0.5 / np.sqrt(2), rel=0.02)
    sm = F.rms_envelope(x, smooth_frames=5)
    assert sm.shape == env.shape
    assert 0 < sm[9] < env[12]                     # smoothing spreads the onset
    assert sm.sum() == pytest.approx(env.sum(), rel=0.15)
    assert len(F.rms_envelope(np.zeros(0))) == 0


# ============================================================================ blendshapes

def test_blendshape_dict_single_frame():
    out = F.blendshape_frames({"jawOpen": 0.7, "eyeBlinkLeft": 1.0, "headPitch": -0.1})
    assert out.shape == (1, motion.NUM_CHANNELS) and out.dtype == np.float32
    assert out[0, motion.CHANNEL_INDEX["jawOpen"]] == pytest.approx(0.7)
    assert out[0, motion.CHANNEL_INDEX["eyeBlinkLeft"]] == 1.0
    assert out[0, motion.CHANNEL_INDEX["headPitch"]] == pytest.approx(-0.1)
    assert np.count_nonzero(out) == 3


def test_blendshape_spellings_and_layouts():
    a = F.blendshape_frames({"eyeBlink_L": [0.1, 0.2], "MouthSmileRight": [0.3, 0.4], "HEADYAW": [0.0, 0.05]})
    b = F.blendshape_frames([{"eyeBlinkLeft": 0.1, "mouthSmileRight": 0.3},
                             {"eyeBlinkLeft": 0.2, "mouthSmileRight": 0.4, "headYaw": 0.05}])
    c = F.blendshape_frames((["eyeBlinkLeft", "mouthSmile_R", "headYaw"], np.array([[0.1, 0.3, 0], [0.2, 0.4, 0.05]])))
    np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(a, c)
    assert a.shape == (2, motion.NUM_CHANNELS)
    full = F.blendshape_frames((list(motion.CHANNELS), np.arange(motion.NUM_CHANNELS)[None] / 100.0))
    np.testing.assert_allclose(full[0], np.arange(motion.NUM_CHANNELS) / 100.0, rtol=1e-6)


def test_blendshape_errors():
    with pytest.raises(InputError) as e:
        F.blendshape_frames({"jawOpen": 0.2, "eyebrowWiggle": 0.5})
    assert "eyebrowWiggle" in str(e.value)
    with pytest.raises(InputError) as e:
        F.blendshape_frames([{"jawOpen": 0.1}, {"nope": 1.0}])
    assert "'nope'" in str(e.value)
    with pytest.raises(InputError):
        F.blendshape_frames({"jawOpen": [0.1, 0.2], "eyeBlinkLeft": [0.1]})
    with pytest.raises(InputError) as e:
        F.blendshape_frames({"jawOpen": float("nan")})
    assert "jawOpen" in str(e.value)

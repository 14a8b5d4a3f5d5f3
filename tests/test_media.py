"""echo_stream.media: decoding (audio, video, images), probing, errors, MP4 writing.

All media are made by the tests themselves (tests/mediagen.py).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from echo_stream import media
from echo_stream.errors import InputError
from echo_stream.media import fmp4

from . import mediagen as mg
from .fmp4_timing import audio_offset_s, parse_fmp4, presented_audio, served_stream

SR = 16000
DATA = Path(__file__).resolve().parent / "data"


def dominant_freq(x: np.ndarray, sr: int = SR) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(np.argmax(spec))
    # parabolic refinement
    if 0 < k < len(spec) - 1:
        a, b, c = np.log(spec[k - 1:k + 2] + 1e-12)
        k = k + 0.5 * (a - c) / (a - 2 * b + c)
    return k * sr / len(x)


def best_lag(a: np.ndarray, b: np.ndarray, max_lag: int = 800) -> int:
    """Lag (samples) of b relative to a that maximises their correlation."""
    n = min(len(a), len(b)) - 2 * max_lag
    ref = a[max_lag:max_lag + n]
    scores = [float(np.dot(ref, b[max_lag + L:max_lag + L + n])) for L in range(-max_lag, max_lag + 1)]
    return int(np.argmax(scores)) - max_lag


def assert_input_error(exc_info, path, *words):
    err = exc_info.value
    msg = str(err)
    assert "\n" not in msg
    assert err.what == str(path), msg
    assert msg.startswith(f"{path}: "), msg
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"


# ============================================================================ audio decoding

AUDIO_CASES = [
    # (extension, source rate, channels, codec)
    (".wav", 8000, 1, None),
    (".wav", 44100, 2, None),
    (".mp3", 22050, 2, None),
    (".mp3", 44100, 1, None),
    (".m4a", 44100, 1, None),
    (".m4a", 48000, 2, None),
    (".ogg", 48000, 2, None),          # opus
    (".ogg", 22050, 1, None),          # opus cannot store 22.05 kHz: written at 24 kHz
    (".ogg", 44100, 2, "vorbis"),
    (".opus", 8000, 1, None),
    (".flac", 22050, 2, None),
    (".flac", 48000, 1, None),
    (".mka", 16000, 1, None),
]


@pytest.mark.parametrize("ext,rate,channels,codec", AUDIO_CASES,
                         ids=[f"{e[1:]}-{r}-{c}ch-{k or 'default'}" for e, r, c, k in AUDIO_CASES])
def test_decode_audio_formats(tmp_path, ext, rate, channels, codec):
    src = mg.tone(440.0, 1.0, rate, amplitude=0.5)
    path = mg.write_audio(tmp_path / f"a{ext}", src, rate, channels=channels, codec=codec)
    y = media.decode_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    # length: 1 s at 16 kHz, within encoder padding/priming slack
    assert abs(len(y) - SR) <= 0.07 * SR, len(y)
    assert np.all(np.abs(y) <= 1.0)
    mid = y[2000:14000]
    assert dominant_freq(mid) == pytest.approx(440.0, abs=3.0)
    # mono sources keep their level; stereo ones (gains 1.0 / 0.8) average to 0.9
    expect = 0.5 * (0.9 if channels == 2 or codec == "vorbis" else 1.0)
    peak = float(np.percentile(np.abs(mid), 99.5))
    assert peak == pytest.approx(expect, rel=0.12), peak
    info = media.probe(path)
    assert info.has_audio and not info.has_video
    assert info.duration == pytest.approx(1.0, abs=0.08)


def test_stereo_is_averaged_to_mono(tmp_path):
    x = mg.tone(300.0, 0.5, SR, amplitude=0.6)
    planar = np.stack([x, 0.5 * x])                 # L = x, R = x / 2 -> mono 0.75 x
    path = mg.write_audio(tmp_path / "st.flac", planar, SR, channels=2)
    y = media.decode_audio(path)
    assert len(y) == len(x)
    np.testing.assert_allclose(y, 0.75 * x, atol=2e-3)
    # opposite-phase channels cancel (an average, not a sum or a pick of one channel)
    path2 = mg.write_audio(tmp_path / "anti.flac", np.stack([x, -x]), SR, channels=2)
    assert np.abs(media.decode_audio(path2)).max() < 2e-3


def test_loud_stereo_stays_in_range(tmp_path):
    x = mg.tone(200.0, 0.5, 44100, amplitude=0.99)
    path = mg.write_audio(tmp_path / "loud.wav", np.stack([x, x]), 44100, channels=2)
    y = media.decode_audio(path)
    assert np.abs(y).max() <= 1.0
    assert np.abs(y).max() > 0.9


def test_resampled_content_matches_source(tmp_path):
    """44.1 kHz -> 16 kHz keeps the waveform (a sum of sines, known at both rates) with no delay."""
    freqs, amps = (180.0, 1250.0, 3100.0, 5400.0), (0.3, 0.2, 0.15, 0.1)

    def signal(sr, n):
        t = np.arange(n) / sr
        return sum(a * np.sin(2 * np.pi * f * t + f / 1000) for f, a in zip(freqs, amps)).astype(np.float32)

    path = mg.write_audio(tmp_path / "s.wav", signal(44100, 88200), 44100)
    y = media.decode_audio(path)
    assert len(y) == 32000
    ref = signal(SR, 32000)
    assert best_lag(ref, y, 50) == 0
    np.testing.assert_allclose(y[200:-200], ref[200:-200], atol=0.02)


def test_decode_audio_other_sample_rate(tmp_path):
    path = mg.write_audio(tmp_path / "a.wav", mg.tone(1000, 1.0, 44100), 44100)
    y = media.decode_audio(path, sample_rate=8000)
    assert len(y) == 8000
    assert dominant_freq(y[1000:7000], 8000) == pytest.approx(1000, abs=5)


def test_iter_audio_chunks_equals_decode(tmp_path):
    path = mg.write_audio(tmp_path / "c.mp3", mg.speech_like(1.3, 22050), 22050, channels=2)
    whole = media.decode_audio(path)
    chunks = list(media.iter_audio_chunks(path, 1000))
    sizes = [len(c) for _, c in chunks]
    assert all(s == 1000 for s in sizes[:-1]) and 0 < sizes[-1] <= 1000
    starts = [s for s, _ in chunks]
    assert starts == list(range(0, 1000 * len(chunks), 1000))
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), whole)
    assert all(c.dtype == np.float32 for _, c in chunks)


def test_audio_chunker():
    ch = media.AudioChunker(4)
    out = ch.push(np.arange(3, dtype=np.float32))
    assert out == []
    out = ch.push(np.arange(3, 10, dtype=np.float32))
    assert [s for s, _ in out] == [0, 4]
    np.testing.assert_array_equal(out[1][1], [4, 5, 6, 7])
    last = ch.flush()
    assert last[0][0] == 8 and list(last[0][1]) == [8, 9]
    assert ch.flush() == []
    with pytest.raises(ValueError):
        media.AudioChunker(0)


def test_audio_with_nonzero_start_time(tmp_path):
    # mka keeps timestamps: the audio starts at 0.5 s; stream start is t = 0
    src = mg.tone(330, 1.0, SR)
    path = mg.write_audio(tmp_path / "late.mka", src, SR, start_time=0.5)
    assert media.probe(path).audio_start == pytest.approx(0.5, abs=0.01)
    y = media.decode_audio(path)
    assert len(y) == SR
    np.testing.assert_allclose(y, src, atol=2e-3)   # nothing prepended, nothing lost


def _gap_file(path, late_samples):
    """1 s of tone in two halves, the second ``late_samples`` late (pts jump), as Matroska PCM."""
    import av
    from fractions import Fraction

    x = mg.tone(250, 1.0, SR)
    with av.open(str(path), "w", format="matroska") as c:
        s = c.add_stream("pcm_s16le", rate=SR)
        s.codec_context.layout = "mono"
        for start, pts in ((0, 0), (8000, 8000 + late_samples)):
            fr = av.AudioFrame.from_ndarray((x[start:start + 8000] * 32767).astype(np.int16)[None], format="s16",
                                            layout="mono")
            fr.sample_rate, fr.pts, fr.time_base = SR, pts, Fraction(1, SR)
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return x


def test_audio_gap_is_filled_with_silence(tmp_path):
    """A dropout in the timestamps (a recording that lost 0.5 s) keeps later audio in place."""
    path = tmp_path / "gap.mka"
    x = _gap_file(path, 8000)                                  # second half 0.5 s late
    y = media.decode_audio(path)
    assert len(y) == pytest.approx(24000, abs=40)
    assert np.abs(y[8100:15900]).max() < 1e-3           # the gap is silent
    np.testing.assert_allclose(y[-7000:], x[-7000:], atol=2e-3)


# ============================================================================ video decoding

def coded_frames(n: int, w: int = 64, h: int = 48) -> np.ndarray:
    """Uniform grey frames whose level encodes their index (survives lossy coding)."""
    levels = ((16 + 9 * np.arange(n)) % 240).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(levels[:, None, None, None], (n, h, w, 3)))


def frame_index(rgb: np.ndarray, n: int) -> int:
    levels = (16 + 9 * np.arange(n)) % 240
    return int(np.argmin(np.abs(levels - float(rgb.mean()))))


VIDEO_CASES = [".mp4", ".mkv", ".webm", ".mov", ".avi"]


@pytest.mark.parametrize("ext", VIDEO_CASES)
@pytest.mark.parametrize("with_audio", [True, False], ids=["av", "video-only"])
def test_decode_video_containers(tmp_path, ext, with_audio):
    frames = mg.face_frames(25, 160, 120, motion="nod")
    audio = mg.speech_like(1.0, 44100) if with_audio else None
    path = mg.write_video(tmp_path / f"v{ext}", frames, fps=25, audio=audio, audio_rate=44100)
    out = list(media.iter_video_frames(path))
    assert [i for i, _, _ in out] == list(range(25))
    assert [t for _, t, _ in out] == pytest.approx([i / 25 for i in range(25)])
    img = out[10][2]
    assert img.shape == (120, 160, 3) and img.dtype == np.uint8
    assert np.abs(img.astype(int) - frames[10]).mean() < 12
    info = media.probe(path)
    assert info.has_video and info.width == 160 and info.height == 120
    assert info.fps == pytest.approx(25.0)
    assert info.video_codec in {"h264", "vp9", "mpeg4"}
    assert info.has_audio == with_audio
    if with_audio:
        y = media.decode_audio(path)
        assert abs(len(y) - SR) < 0.1 * SR
    else:
        with pytest.raises(InputError) as e:
            media.decode_audio(path)
        assert_input_error(e, path, "no audio stream")


def test_video_resize(tmp_path):
    path = mg.write_video(tmp_path / "v.mp4", mg.face_frames(5, 160, 120))
    out = list(media.iter_video_frames(path, size=(96, 64)))
    assert len(out) == 5 and out[0][2].shape == (64, 96, 3)


@pytest.mark.parametrize("src_fps,n", [(10, 10), (30, 30), (50, 50)])
def test_constant_rate_conversion(tmp_path, src_fps, n):
    """1 s at 10/30/50 fps lands on 25 frames, each the latest source frame at or before its time."""
    path = mg.write_video(tmp_path / f"r{src_fps}.mkv", coded_frames(n), fps=src_fps)
    out = list(media.iter_video_frames(path))
    assert len(out) == 25
    for i, t, rgb in out:
        assert frame_index(rgb, n) == int(np.floor(t * src_fps + 1e-6)), (i, t)


def test_variable_frame_rate_lands_on_grid(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    pts = np.round(np.concatenate([[0.0], np.cumsum(rng.uniform(0.01, 0.09, n - 1))]), 3)
    path = mg.write_video(tmp_path / "vfr.mp4", coded_frames(n), pts=pts)
    info = media.read_mp4_info(path)
    end = info.video_duration
    out = list(media.iter_video_frames(path))
    assert len(out) == int(np.ceil(end * 25 - 1e-3))
    for i, t, rgb in out:
        expect = int(np.searchsorted(pts, t + 1e-4, side="right") - 1)
        assert frame_index(rgb, n) == expect, (i, t)


def test_video_with_nonzero_start_time(tmp_path):
    frames = coded_frames(25)
    path = mg.write_video(tmp_path / "late.mkv", frames, start_time=0.5, audio=mg.tone(300, 1.0), audio_rate=SR)
    info = media.probe(path)
    assert info.video_start == pytest.approx(0.5, abs=0.01)
    out = list(media.iter_video_frames(path))
    assert len(out) == 25 and frame_index(out[0][2], 25) == 0 and frame_index(out[-1][2], 25) == 24
    assert abs(len(media.decode_audio(path)) - SR) < 0.05 * SR


def test_mp4_with_nonzero_start_time(tmp_path):
    path = mg.write_video(tmp_path / "late.mp4", coded_frames(25), start_time=0.4)
    out = list(media.iter_video_frames(path))
    assert len(out) == 25 and frame_index(out[0][2], 25) == 0


def test_read_mp4_info_counts_packets(tmp_path):
    path = mg.write_video(tmp_path / "c.webm", mg.face_frames(30, 64, 48), audio=mg.tone(200, 1.2))
    header = media.probe(path)
    counted = media.read_mp4_info(path)
    assert counted.counted and counted.video_frames == 30
    assert counted.video_duration == pytest.approx(1.2, abs=0.05)
    assert header.video_codec == counted.video_codec == "vp9"
    assert counted.audio_codec == "opus"


# ============================================================================ bad inputs

@pytest.fixture(scope="module")
def good_media(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    y = mg.speech_like(3.0, SR)
    frames = mg.face_frames(75, 160, 120, motion="nod")
    return {
        "mp4": mg.write_video(d / "v.mp4", frames, audio=y),
        "mkv": mg.write_video(d / "v.mkv", frames, audio=y),
        "wav": mg.write_audio(d / "a.wav", y, SR),
        "mp3": mg.write_audio(d / "a.mp3", y, SR),
        "flac": mg.write_audio(d / "a.flac", y, SR),
    }


def decoders():
    return {
        "decode_audio": lambda p: media.decode_audio(p),
        "iter_audio_chunks": lambda p: list(media.iter_audio_chunks(p, 4000)),
        "iter_video_frames": lambda p: list(media.iter_video_frames(p)),
        "probe": lambda p: media.probe(p),
    }


@pytest.mark.parametrize("fn", list(decoders()))
def test_missing_file(tmp_path, fn):
    p = tmp_path / "nope.wav"
    with pytest.raises(InputError) as e:
        decoders()[fn](p)
    assert_input_error(e, p, "not found")


@pytest.mark.parametrize("fn", list(decoders()))
def test_directory(tmp_path, fn):
    with pytest.raises(InputError) as e:
        decoders()[fn](tmp_path)
    assert_input_error(e, tmp_path, "directory")


@pytest.mark.parametrize("name", ["notes.txt", "fake.wav", "fake.mp4", "fake.mp3"])
@pytest.mark.parametrize("fn", list(decoders()))
def test_text_file_is_not_media(tmp_path, name, fn):
    p = mg.write_text(tmp_path / name)
    with pytest.raises(InputError) as e:
        decoders()[fn](p)
    assert_input_error(e, p, "not a media file")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.mp3"
    p.write_bytes(b"")
    with pytest.raises(InputError) as e:
        media.decode_audio(p)
    assert_input_error(e, p, "empty")


def test_random_bytes(tmp_path):
    p = tmp_path / "noise.m4a"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError) as e:
        media.decode_audio(p)
    assert_input_error(e, p)


def test_zero_length_audio(tmp_path):
    p = mg.write_audio(tmp_path / "zero.wav", np.zeros(0, np.float32), SR)
    for fn in (media.decode_audio, lambda q: list(media.iter_audio_chunks(q, 640))):
        with pytest.raises(InputError) as e:
            fn(p)
        assert_input_error(e, p, "zero length")


def test_cover_art_is_not_video(tmp_path):
    p = mg.write_audio(tmp_path / "song.mp3", mg.tone(300, 1.0), SR, cover=mg.face_frame(64, 48))
    info = media.probe(p)
    assert info.has_audio and not info.has_video
    assert abs(len(media.decode_audio(p)) - SR) < 0.05 * SR
    with pytest.raises(InputError) as e:
        list(media.iter_video_frames(p))
    assert_input_error(e, p, "no video stream", "cover picture")


def test_no_video_stream(tmp_path):
    p = mg.write_audio(tmp_path / "a.flac", mg.tone(200, 0.3), SR)
    with pytest.raises(InputError) as e:
        list(media.iter_video_frames(p))
    assert_input_error(e, p, "no video stream")


@pytest.mark.parametrize("kind", ["mp4", "wav", "mp3", "flac", "mkv"])
def test_truncated_media(tmp_path, good_media, kind):
    src = good_media[kind]
    p = mg.write_truncated(src, tmp_path / f"trunc{src.suffix}", 0.5)
    fn = media.decode_audio
    with pytest.raises(InputError) as e:
        fn(p)
    assert_input_error(e, p, "truncated")
    if kind in ("mp4", "mkv"):
        with pytest.raises(InputError) as e:
            list(media.iter_video_frames(p))
        assert_input_error(e, p, "truncated")


def test_truncated_mid_stream_reports_time(tmp_path, good_media):
    p = mg.write_truncated(good_media["mkv"], tmp_path / "t.mkv", 0.5)
    got = []
    with pytest.raises(InputError) as e:
        for item in media.iter_video_frames(p):
            got.append(item)
    assert "corrupt or truncated video at t=" in str(e.value)
    assert 10 < len(got) < 75        # the good part came through first


@pytest.mark.parametrize("kind", ["mp4", "mp3"])
def test_corrupt_media(tmp_path, good_media, kind):
    p = mg.write_corrupted(good_media[kind], tmp_path / f"bad.{kind}", start_fraction=0.3, length_fraction=0.3)
    with pytest.raises(InputError) as e:
        media.decode_audio(p)
    assert_input_error(e, p, "corrupt or truncated", "t=")
    if kind == "mp4":
        with pytest.raises(InputError) as e:
            list(media.iter_video_frames(p))
        assert_input_error(e, p, "corrupt or truncated video at t=")


def test_no_av_exception_escapes_on_garbage(tmp_path, good_media):
    """Many random corruptions: each either decodes or raises InputError (nothing else, no hang)."""
    rng = np.random.default_rng(1)
    for k in range(12):
        src = good_media[["mp4", "mkv", "mp3", "flac"][k % 4]]
        p = mg.write_corrupted(src, tmp_path / f"g{k}{src.suffix}", start_fraction=float(rng.uniform(0, 0.8)),
                               length_fraction=float(rng.uniform(0.01, 0.3)), seed=k)
        for fn in decoders().values():
            try:
                fn(p)
            except InputError as e:
                assert str(e).startswith(str(p))


# ============================================================================ images

def test_load_image_modes(tmp_path):
    base = mg.face_frame(160, 120)
    for mode, ext in (("RGB", ".png"), ("RGBA", ".png"), ("L", ".png"), ("P", ".gif"), ("RGB", ".jpg"),
                      ("RGB", ".webp"), ("RGB", ".bmp")):
        p = mg.write_image(tmp_path / f"im_{mode}{ext}", base, mode=mode)
        img = media.load_image(p)
        assert img.shape == (120, 160, 3) and img.dtype == np.uint8, (mode, ext)
        tol = 40 if mode in ("L", "P") or ext in (".jpg", ".webp") else 1
        assert np.abs(img.astype(int) - base).mean() < tol, (mode, ext)


def test_load_image_transparency_on_white(tmp_path):
    from PIL import Image

    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[:, :15] = (255, 0, 0, 255)           # opaque red left half, transparent right half
    p = tmp_path / "t.png"
    Image.fromarray(rgba, "RGBA").save(p)
    img = media.load_image(p)
    assert tuple(img[5, 5]) == (255, 0, 0) and tuple(img[5, 25]) == (255, 255, 255)


def test_load_image_exif_orientation(tmp_path):
    base = mg.face_frame(160, 120)
    p = mg.write_image(tmp_path / "rot.jpg", base, exif_orientation=6)   # "rotate 90 CW to display"
    img = media.load_image(p)
    assert img.shape == (160, 120, 3)
    expect = np.rot90(base, k=-1)
    assert np.abs(img.astype(int) - expect).mean() < 10


def test_load_image_errors(tmp_path):
    with pytest.raises(InputError) as e:
        media.load_image(tmp_path / "none.png")
    assert_input_error(e, tmp_path / "none.png", "not found")
    p = mg.write_text(tmp_path / "x.png")
    with pytest.raises(InputError) as e:
        media.load_image(p)
    assert_input_error(e, p, "not a PNG/JPEG")
    good = mg.write_image(tmp_path / "g.jpg", mg.face_frame(160, 120))
    p = mg.write_truncated(good, tmp_path / "cut.jpg", 0.4)
    with pytest.raises(InputError) as e:
        media.load_image(p)
    assert_input_error(e, p, "corrupt or truncated")
    with pytest.raises(InputError) as e:
        media.load_image(tmp_path)
    assert_input_error(e, tmp_path, "directory")


# ============================================================================ writing

def leftovers(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def test_mp4_writer_h264_aac(tmp_path):
    n = 50
    frames = mg.face_frames(n, 160, 120, motion="talk")
    audio = mg.speech_like(n / 25, SR, seed=5)
    out = tmp_path / "out.mp4"
    with media.Mp4Writer(out, 160, 120, fps=25, audio=audio) as w:
        for i in range(0, n, 7):
            w.write(frames[i:i + 7])
    assert leftovers(tmp_path) == ["out.mp4"]
    info = media.read_mp4_info(out)
    assert info.video_codec == "h264" and info.audio_codec == "aac"
    assert info.pix_fmt == "yuv420p" and (info.width, info.height) == (160, 120)
    assert info.fps == pytest.approx(25.0)
    assert info.video_frames == n
    assert info.video_duration == pytest.approx(n / 25, abs=1e-3)
    assert info.duration == pytest.approx(n / 25, abs=0.03)
    dec = list(media.iter_video_frames(out))
    assert len(dec) == n
    assert np.abs(dec[20][2].astype(int) - frames[20]).mean() < 6
    y = media.decode_audio(out)
    assert len(y) == len(audio)
    assert best_lag(audio, y) == 0          # audio/video sync: AAC priming is compensated
    assert np.corrcoef(audio, y)[0, 1] > 0.95


def test_mp4_writer_streamed_audio_and_silent(tmp_path):
    frames = mg.face_frames(30, 64, 48)
    audio = mg.tone(220, 30 / 25)
    out = tmp_path / "s.mp4"
    with media.Mp4Writer(out, 64, 48) as w:      # track decided by the first write_audio
        w.write(frames[:10])
        for i in range(0, len(audio), 3000):
            w.write_audio(audio[i:i + 3000])
        w.write(frames[10:])
    info = media.read_mp4_info(out)
    assert info.has_audio and info.video_frames == 30
    assert len(media.decode_audio(out)) == len(audio)
    silent = tmp_path / "silent.mp4"
    with media.Mp4Writer(silent, 64, 48) as w:
        w.write(frames)
    info = media.read_mp4_info(silent)
    assert not info.has_audio and info.video_frames == 30


def test_mp4_writer_exception_leaves_nothing(tmp_path):
    out = tmp_path / "x.mp4"
    with pytest.raises(RuntimeError):
        with media.Mp4Writer(out, 64, 48, audio=np.zeros(SR, np.float32)) as w:
            w.write(mg.face_frames(40, 64, 48))
            assert any(n.startswith(".x.mp4.tmp-") for n in leftovers(tmp_path))
            raise RuntimeError("boom")
    assert leftovers(tmp_path) == []


def test_mp4_writer_abort_keeps_existing_file(tmp_path):
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"old")
    w = media.Mp4Writer(out, 64, 48, with_audio=True)
    w.write(mg.face_frames(40, 64, 48))
    w.write_audio(np.zeros(SR, np.float32))
    w.abort()
    assert leftovers(tmp_path) == ["keep.mp4"] and out.read_bytes() == b"old"
    with pytest.raises(InputError):
        w.write(mg.face_frames(1, 64, 48))


def test_mp4_writer_argument_errors(tmp_path):
    with pytest.raises(InputError) as e:
        media.Mp4Writer(tmp_path / "odd.mp4", 65, 48)
    assert_input_error(e, tmp_path / "odd.mp4", "even")
    with pytest.raises(InputError) as e:
        media.Mp4Writer(tmp_path / "missing" / "o.mp4", 64, 48)
    assert "does not exist" in str(e.value)
    w = media.Mp4Writer(tmp_path / "o.mp4", 64, 48)
    with pytest.raises(InputError):
        w.write(np.zeros((2, 48, 60, 3), np.uint8))
    with pytest.raises(InputError):
        w.write(np.zeros((2, 48, 64, 3), np.float32))
    w.abort()
    assert leftovers(tmp_path) == []


def test_fragmented_mp4_stream(tmp_path):
    n = 60
    frames = mg.face_frames(n, 64, 48, motion="nod")
    audio = mg.speech_like(n / 25, SR)
    enc = media.FragmentedMp4Encoder(64, 48, gop=25)
    chunks = [enc.encode(frames[i:i + 5], audio[i * 640:(i + 5) * 640]) for i in range(0, n, 5)]
    chunks.append(enc.close())
    assert chunks[0][4:8] == b"ftyp" and b"moov" in chunks[0]
    assert sum(1 for c in chunks if b"moof" in c) >= 2          # bytes flow before the end
    data = b"".join(chunks)
    p = tmp_path / "frag.mp4"
    p.write_bytes(data)
    info = media.read_mp4_info(p)
    assert info.video_codec == "h264" and info.audio_codec == "aac" and info.video_frames == n
    assert len(list(media.iter_video_frames(p))) == n             # the AAC priming is cut by the edit list
    assert abs(len(media.decode_audio(p)) - len(audio)) < 0.05 * SR


def test_fragmented_mp4_counts_the_frames_it_has_emitted(tmp_path):
    """Streaming: with the audio given 3 frames ahead, every encode call returns all its frames (none held back for
    the next call); frames_emitted says exactly which frames the returned bytes hold."""
    n, step = 48, 6
    frames = mg.face_frames(n, 64, 48, motion="nod")
    audio = mg.speech_like((n + 3) / 25, SR)
    enc = media.FragmentedMp4Encoder(64, 48, gop=16)
    data, emitted = b"", []
    for i in range(0, n, step):
        lo, hi = (0 if i == 0 else (i + 3) * 640), (i + step + 3) * 640     # audio 3 frames ahead of the video
        data += enc.encode(frames[i:i + step], audio[lo:hi])
        emitted.append(enc.frames_emitted)
        p = tmp_path / f"part{i}.mp4"
        p.write_bytes(data)
        assert len(list(media.iter_video_frames(p))) >= enc.frames_emitted   # the bytes do hold those frames
    assert emitted == [i + step for i in range(0, n, step)]
    data += enc.close()
    assert enc.frames_emitted == n
    p = tmp_path / "all.mp4"
    p.write_bytes(data)
    assert media.read_mp4_info(p).video_frames == n


def test_served_fmp4_video_frames_last_one_frame_each_from_pts_0():
    """Every video sample lasts 1/25 s (512 ticks of 12800) and the first is presented at 0: the stream's
    frames are not late and it reads 25 fps, as a finished Mp4Writer file (the first frame used to last
    786 ticks, stretched over the AAC priming)."""
    n = 40
    data = served_stream(mg.face_frames(n, 64, 48, motion="nod"), mg.speech_like((n + 3) / 25, SR))
    tracks = parse_fmp4(data)
    (video,) = [t for t in tracks.values() if t.handler == "vide"]
    assert video.timescale == 12800 and len(video.samples) == n
    assert [d for _, d, _ in video.samples] == [512] * n
    assert video.pts == [512 * i for i in range(n)]
    assert all(media_time == 0 for _, media_time in video.edits)        # no shift of the video either
    (audio,) = [t for t in tracks.values() if t.handler == "soun"]
    assert audio.edits and audio.edits[0][1] > 0                        # the encoder's priming is cut


@pytest.mark.parametrize("source", ["speech", "clicks"])
def test_served_fmp4_audio_lines_up_with_the_source(tmp_path, source):
    """The served stream's audio, decoded with PyAV and placed by its timestamps, lies within 1 ms of the
    source (it was 21 ms late: 1024 samples of AAC priming without an edit list)."""
    n = 50
    if source == "speech":
        audio = media.decode_audio(DATA / "tts" / "tts0.ogg")[:(n + 3) * 640]
    else:
        audio = np.zeros((n + 3) * 640, np.float32)
        audio[1000::2400] = 0.9                                        # a click every 150 ms
    p = tmp_path / "served.mp4"
    p.write_bytes(served_stream(mg.face_frames(n, 64, 48), audio))
    assert abs(audio_offset_s(audio, presented_audio(p, SR), SR)) <= 0.001


def test_fragment_counter_handles_arbitrary_pieces():
    """The counter counts a fragment once its moof and mdat are both complete, however the bytes are split."""
    enc = media.FragmentedMp4Encoder(64, 48, gop=8)
    data = enc.encode(mg.face_frames(12, 64, 48), np.zeros(15 * 640, np.float32)) + enc.close()
    whole = fmp4._FragmentCounter(1)
    whole.feed(data)
    assert whole.samples == 12
    pieces = fmp4._FragmentCounter(1)
    seen = []
    for k in range(0, len(data), 97):
        pieces.feed(data[k:k + 97])
        seen.append(pieces.samples)
    assert pieces.samples == 12 and seen == sorted(seen)
    ends = [hi for kind, _, hi in fmp4._boxes(data, 0, len(data)) if kind == b"mdat"]
    counts = []
    for e in ends:
        c = fmp4._FragmentCounter(1)
        c.feed(data[:e])
        counts.append(c.samples)
    k = next(i for i, n in enumerate(counts) if n > (counts[i - 1] if i else 0))   # first mdat with video
    before = counts[k - 1] if k else 0
    held = fmp4._FragmentCounter(1)
    held.feed(data[:ends[k] - 1])                # that mdat lacks one byte: its samples are not counted yet
    assert held.samples == before
    held.feed(data[ends[k] - 1:ends[k]])
    assert held.samples == counts[k] > before
    held.feed(data[ends[k]:])
    assert held.samples == 12


def test_mp4_writer_to_file_object(tmp_path):
    buf = io.BytesIO()
    with media.Mp4Writer(buf, 64, 48) as w:
        w.write(mg.face_frames(10, 64, 48))
    p = tmp_path / "b.mp4"
    p.write_bytes(buf.getvalue())
    assert media.read_mp4_info(p).video_frames == 10


def test_a_timestamp_jump_of_an_hour_is_refused_not_allocated(tmp_path):
    """A small file whose timestamps jump by an hour: one line naming the file, no hour of silence."""
    path = tmp_path / "jump.mka"
    _gap_file(path, 3600 * SR)
    assert path.stat().st_size < 100_000
    with pytest.raises(InputError, match=r"jump.mka: audio timestamps jump by 3600 s at t=0.50s"):
        media.decode_audio(path)

"""Test helpers that *make* test media with PyAV (no fixtures on disk, no network).

Everything here is deterministic (seeded) and small, so tests stay fast:

* signals: :func:`tone`, :func:`speech_like`, :func:`silence`
* audio files: :func:`write_audio` (wav / mp3 / m4a(aac) / ogg(opus or vorbis) /
  opus / flac / mka; any sample rate; mono or stereo; optional non-zero start time)
* synthetic faces: :func:`face_frame` draws one cartoon face that OpenCV's Haar
  frontal-face cascade detects; :func:`face_frames` animates it (``static``,
  ``nod``, ``shake``, ``talk``, ``approach``) and :func:`blank_frames` has no face
* videos: :func:`write_video` (mp4 / mov / mkv / webm / avi; with or without an
  audio track; constant rate or explicit per-frame timestamps for variable
  frame rate; optional non-zero start time)
* bad inputs: :func:`write_text`, :func:`write_truncated`, :func:`write_corrupted`,
  :func:`write_image`

Other test modules import these helpers; keep signatures stable.
"""
from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np

__all__ = [
    "AUDIO_FORMATS", "VIDEO_FORMATS",
    "tone", "silence", "speech_like",
    "write_audio", "face_frame", "face_frames", "blank_frames",
    "write_video", "write_text", "write_truncated", "write_corrupted", "write_image",
]

#: extension -> (container format, default audio codec)
AUDIO_FORMATS: dict[str, tuple[str, str]] = {
    ".wav": ("wav", "pcm_s16le"),
    ".mp3": ("mp3", "libmp3lame"),
    ".m4a": ("mp4", "aac"),
    ".aac": ("adts", "aac"),
    ".ogg": ("ogg", "libopus"),
    ".opus": ("ogg", "libopus"),
    ".flac": ("flac", "flac"),
    ".mka": ("matroska", "flac"),
}

#: extension -> (container format, default video codec, default audio codec)
VIDEO_FORMATS: dict[str, tuple[str, str, str]] = {
    ".mp4": ("mp4", "libx264", "aac"),
    ".mov": ("mov", "libx264", "aac"),
    ".mkv": ("matroska", "libx264", "libopus"),
    ".webm": ("webm", "libvpx-vp9", "libopus"),
    ".avi": ("avi", "mpeg4", "pcm_s16le"),
}


# --------------------------------------------------------------------------- signals

def tone(freq: float, duration: float, sample_rate: int = 16000, amplitude: float = 0.5,
         *, harmonics: int = 1) -> np.ndarray:
    """A float32 mono sine of ``freq`` Hz (``harmonics`` > 1 adds decaying overtones)."""
    t = np.arange(int(round(duration * sample_rate))) / sample_rate
    y = np.zeros_like(t)
    for h in range(1, harmonics + 1):
        y += np.sin(2 * np.pi * freq * h * t) / h
    y *= amplitude / max(1e-9, float(np.max(np.abs(y))) if y.size else 1.0)
    return y.astype(np.float32)


def silence(duration: float, sample_rate: int = 16000) -> np.ndarray:
    """float32 zeros of ``duration`` seconds."""
    return np.zeros(int(round(duration * sample_rate)), dtype=np.float32)


def speech_like(duration: float, sample_rate: int = 16000, *, f0: float = 140.0,
                seed: int = 0, amplitude: float = 0.5, pause_every: float = 1.2) -> np.ndarray:
    """Deterministic speech-like float32 mono audio.

    Harmonic "voice" (12 harmonics, slowly wandering pitch around ``f0``, two
    moving formant-like resonances) amplitude-modulated at a syllable rate of
    about 4 Hz, with a 0.25 s pause about every ``pause_every`` seconds and a
    little breath noise. Peak amplitude is ``amplitude``.
    """
    rng = np.random.default_rng(seed)
    n = int(round(duration * sample_rate))
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    t = np.arange(n) / sample_rate
    # pitch contour: slow declination + vibrato-ish wander
    pitch = f0 * (1.0 + 0.08 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6.28))
                  + 0.04 * np.sin(2 * np.pi * 2.3 * t) - 0.05 * (t / max(duration, 1e-9)))
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    f1 = 600 + 250 * np.sin(2 * np.pi * 3.1 * t)
    f2 = 1700 + 400 * np.sin(2 * np.pi * 2.2 * t + 1.0)
    voice = np.zeros(n)
    for h in range(1, 13):
        fh = pitch * h
        # gain: spectral tilt times two resonances
        g = (1.0 / h) * (1.0 + 3.0 * np.exp(-((fh - f1) / 200.0) ** 2) + 2.0 * np.exp(-((fh - f2) / 300.0) ** 2))
        g = np.where(fh < sample_rate / 2 - 200, g, 0.0)
        voice += g * np.sin(h * phase)
    # syllables: raised-cosine bumps at ~4 Hz with jittered lengths
    env = np.zeros(n)
    pos = 0.05
    while pos < duration:
        length = rng.uniform(0.15, 0.3)
        a, b = int(pos * sample_rate), min(n, int((pos + length) * sample_rate))
        if b > a:
            env[a:b] = np.maximum(env[a:b], rng.uniform(0.5, 1.0) * np.sin(np.linspace(0, np.pi, b - a)) ** 0.7)
        pos += length + rng.uniform(0.02, 0.08)
    # pauses
    if pause_every > 0:
        p = pause_every
        while p < duration:
            a, b = int(p * sample_rate), min(n, int((p + 0.25) * sample_rate))
            env[a:b] = 0.0
            p += pause_every
    noise = rng.standard_normal(n) * 0.02 * (env > 0.05)
    y = voice * env + noise
    y *= amplitude / max(1e-9, float(np.max(np.abs(y))))
    return y.astype(np.float32)


# --------------------------------------------------------------------------- audio files

def _supported_rate(codec: av.codec.Codec, rate: int) -> int:
    rates = codec.audio_rates
    if not rates or rate in rates:
        return rate
    return min(rates, key=lambda r: (abs(r - rate), -r))


def _as_planar(samples: np.ndarray, channels: int) -> np.ndarray:
    """(channels, n) float32 from mono (n,) or (channels, n) / (n, channels) input."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 1:
        if channels == 1:
            return x[None, :]
        # give each channel a slightly different gain so stereo is really stereo
        gains = np.linspace(1.0, 0.8, channels, dtype=np.float32)[:, None]
        return x[None, :] * gains
    if x.shape[0] != channels and x.shape[1] == channels:
        x = x.T
    if x.shape[0] != channels:
        raise ValueError(f"samples have shape {x.shape}, expected {channels} channels")
    return np.ascontiguousarray(x)


def _encode_audio_into(container, stream, planar: np.ndarray, in_rate: int, start_time: float,
                       block: int = 4096):
    """Encode (C, n) float32 audio at ``in_rate`` into ``stream``; yields nothing, muxes directly."""
    layout = "mono" if planar.shape[0] == 1 else "stereo"
    out_rate = stream.codec_context.sample_rate
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=out_rate)
    offset = int(round(start_time * out_rate))
    written = 0

    def emit(frames):
        nonlocal written
        for fr in frames:
            fr.pts = offset + written
            fr.time_base = Fraction(1, out_rate)
            written += fr.samples
            for pkt in stream.encode(fr):
                container.mux(pkt)

    for a in range(0, planar.shape[1], block):
        chunk = np.ascontiguousarray(planar[:, a:a + block])
        fr = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        fr.sample_rate = in_rate
        fr.pts = a
        fr.time_base = Fraction(1, in_rate)
        emit(resampler.resample(fr))
    emit(resampler.resample(None))
    for pkt in stream.encode(None):
        container.mux(pkt)


def write_audio(path: str | os.PathLike, samples: np.ndarray, sample_rate: int = 16000, *,
                channels: int = 1, codec: str | None = None, bitrate: int | None = None,
                start_time: float = 0.0, cover: np.ndarray | None = None) -> Path:
    """Encode ``samples`` (float32 in [-1, 1]) into an audio file chosen by extension.

    ``samples`` is mono ``(n,)`` (duplicated, with slightly different gains, when
    ``channels`` is 2) or already ``(channels, n)``. ``codec`` overrides the
    extension's default (e.g. ``"vorbis"`` for ``.ogg``; the native vorbis
    encoder is experimental and stereo only, so it is always written as
    stereo). When the codec cannot store ``sample_rate`` (opus: 8/12/16/24/48
    kHz only) the audio is resampled to the nearest rate it can. A non-zero
    ``start_time`` (seconds) shifts the first packet's timestamp (meaningful in
    containers that keep timestamps: mka/ogg/m4a). ``cover`` (an RGB uint8
    image, ``.mp3`` only) embeds album art as an attached-picture video
    stream. Returns the path.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in AUDIO_FORMATS:
        raise ValueError(f"unsupported audio extension {ext!r}; use one of {sorted(AUDIO_FORMATS)}")
    fmt, default_codec = AUDIO_FORMATS[ext]
    codec = codec or default_codec
    if codec == "vorbis":
        channels = 2
    planar = _as_planar(samples, channels)
    with av.open(str(path), "w", format=fmt) as container:
        c = av.codec.Codec(codec, "w")
        rate = _supported_rate(c, sample_rate)
        stream = container.add_stream(codec, rate=rate)
        stream.codec_context.layout = "mono" if channels == 1 else "stereo"
        if codec == "vorbis":
            stream.codec_context.options = {"strict": "experimental"}
        if bitrate:
            stream.codec_context.bit_rate = bitrate
        art = None
        if cover is not None:
            if ext != ".mp3":
                raise ValueError("cover art is supported for .mp3 only")
            cover = np.ascontiguousarray(cover, dtype=np.uint8)
            art = container.add_stream("png")
            art.width, art.height, art.pix_fmt = cover.shape[1], cover.shape[0], "rgb24"
            art.disposition = av.stream.Disposition.attached_pic
        container.start_encoding()  # write the header even when there are no samples
        if art is not None:
            fr = av.VideoFrame.from_ndarray(cover, format="rgb24")
            fr.pts = 0
            for pkt in list(art.encode(fr)) + list(art.encode(None)):
                container.mux(pkt)
        _encode_audio_into(container, stream, planar, sample_rate, start_time)
    return path


# --------------------------------------------------------------------------- synthetic faces

def face_frame(width: int = 320, height: int = 240, *, cx: float = 0.5, cy: float = 0.5,
               scale: float = 0.55, mouth_open: float = 0.2, smile: float = 0.0,
               eye_open: float = 1.0, brow_raise: float = 0.0,
               background: tuple[int, int, int] = (70, 90, 110)) -> np.ndarray:
    """One (height, width, 3) uint8 RGB frame with a cartoon face Haar cascades detect.

    ``cx``, ``cy``: face centre as fractions of width/height; ``scale``: face
    height as a fraction of the frame height; ``mouth_open``, ``smile``,
    ``eye_open``, ``brow_raise`` in [0, 1] move the features.
    """
    import cv2

    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = background
    # a soft vertical gradient so frame differences are not trivially zero-structured
    grad = np.linspace(-12, 12, height, dtype=np.float32)[:, None, None]
    img = np.clip(img.astype(np.float32) + grad, 0, 255).astype(np.uint8)
    fh = scale * height
    fw = 0.78 * fh
    x0, y0 = cx * width, cy * height

    def P(u, v):  # face coordinates in [-1, 1] -> pixel ints
        return int(round(x0 + u * fw / 2)), int(round(y0 + v * fh / 2))

    def S(a, b):
        return max(1, int(round(a * fw / 2))), max(1, int(round(b * fh / 2)))

    skin = (225, 180, 150)
    dark = (45, 30, 25)
    hair = (60, 40, 30)
    # hair, face, neck
    cv2.ellipse(img, P(0, -0.08), S(1.08, 1.05), 0, 180, 360, hair, -1, cv2.LINE_AA)
    cv2.ellipse(img, P(0, 0), S(1.0, 1.0), 0, 0, 360, skin, -1, cv2.LINE_AA)
    cv2.rectangle(img, P(-0.35, 0.9), P(0.35, 1.6), (205, 160, 130), -1)
    # brows
    by = -0.38 - 0.08 * brow_raise
    for s in (-1, 1):
        cv2.line(img, P(s * 0.55, by + 0.02), P(s * 0.18, by - 0.03), dark,
                 max(2, int(round(0.05 * fh))), cv2.LINE_AA)
    # eyes: white, iris, lid
    for s in (-1, 1):
        cv2.ellipse(img, P(s * 0.36, -0.2), S(0.17, 0.08 * max(eye_open, 0.1)), 0, 0, 360, (245, 245, 245), -1, cv2.LINE_AA)
        cv2.circle(img, P(s * 0.36, -0.2), max(2, int(round(0.05 * fh * max(eye_open, 0.2)))), dark, -1, cv2.LINE_AA)
        cv2.ellipse(img, P(s * 0.36, -0.2), S(0.19, 0.1 * max(eye_open, 0.1)), 0, 180, 360, (150, 110, 90), 2, cv2.LINE_AA)
    # nose shadow
    cv2.line(img, P(0.02, -0.12), P(0.06, 0.18), (185, 140, 115), max(2, int(round(0.02 * fh))), cv2.LINE_AA)
    cv2.ellipse(img, P(0, 0.2), S(0.12, 0.04), 0, 0, 180, (170, 120, 100), -1, cv2.LINE_AA)
    # mouth: dark opening whose height follows mouth_open, width follows smile
    mw = 0.28 + 0.12 * smile
    mh = 0.03 + 0.14 * mouth_open
    cv2.ellipse(img, P(0, 0.5), S(mw, mh), 0, 0, 360, (90, 25, 30), -1, cv2.LINE_AA)
    cv2.ellipse(img, P(0, 0.5 - 0.03 * smile), S(mw + 0.02, mh + 0.03), 0, 0, 360, (170, 80, 80), 2, cv2.LINE_AA)
    return img


def face_frames(n: int, width: int = 320, height: int = 240, *, motion: str = "static",
                fps: float = 25.0, amplitude: float = 0.08, seed: int = 0) -> np.ndarray:
    """(n, height, width, 3) uint8 frames of an animated :func:`face_frame`.

    ``motion``: ``static`` (nothing moves), ``nod`` (vertical head oscillation at
    1.5 Hz, ``amplitude`` fraction of the frame height), ``shake`` (horizontal),
    ``talk`` (head still, mouth opening/closing at 4 Hz, blinks), ``approach``
    (face grows), ``smile`` (mouth widens over the clip).
    """
    rng = np.random.default_rng(seed)
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    phase0 = rng.uniform(0, 0.2)
    for i in range(n):
        t = i / fps
        kw: dict = {}
        if motion == "static":
            pass
        elif motion == "nod":
            kw["cy"] = 0.5 + amplitude * math.sin(2 * math.pi * 1.5 * t + phase0)
        elif motion == "shake":
            kw["cx"] = 0.5 + amplitude * math.sin(2 * math.pi * 1.5 * t + phase0)
        elif motion == "talk":
            kw["mouth_open"] = 0.5 + 0.5 * math.sin(2 * math.pi * 4 * t)
            kw["eye_open"] = 0.15 if (i % 40) in (20, 21) else 1.0
        elif motion == "approach":
            kw["scale"] = 0.45 + 0.2 * i / max(1, n - 1)
        elif motion == "smile":
            kw["smile"] = i / max(1, n - 1)
        else:
            raise ValueError(f"unknown motion {motion!r}")
        frames[i] = face_frame(width, height, **kw)
    return frames


REAL_FACE_VIDEO = Path(__file__).parent / "data" / "real" / "WolfgangLanger_Pexels.mp4"


def real_face_frames(n: int, start_s: float = 6.0, size: tuple[int, int] = (320, 180)) -> np.ndarray:
    """(n, h, w, 3) frames of the real face video (tests/data/real), from ``start_s`` on the 25 fps grid."""
    from echo_stream import media

    first = int(round(start_s * 25))
    out = []
    for i, _, rgb in media.iter_video_frames(REAL_FACE_VIDEO, size=size):
        if i >= first:
            out.append(rgb)
        if len(out) == n:
            break
    return np.stack(out)


def blank_frames(n: int, width: int = 320, height: int = 240, *, moving: bool = True,
                 seed: int = 0) -> np.ndarray:
    """(n, height, width, 3) uint8 frames with no face: a textured background and,
    when ``moving``, a drifting grey square (so motion features are not all zero)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 120, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    base = np.repeat(np.repeat(base, 8, 0), 8, 1)[:height, :width]
    frames = np.repeat(base[None], n, axis=0).copy()
    if moving:
        s = max(4, height // 6)
        for i in range(n):
            x = int((i * 3) % max(1, width - s))
            frames[i, height // 3:height // 3 + s, x:x + s] = 160
    return frames


# --------------------------------------------------------------------------- video files

def write_video(path: str | os.PathLike, frames: np.ndarray, *, fps: float = 25.0,
                pts: Sequence[float] | None = None, codec: str | None = None,
                audio: np.ndarray | None = None, audio_rate: int = 16000,
                audio_codec: str | None = None, audio_channels: int = 1,
                start_time: float = 0.0, crf: int = 28) -> Path:
    """Encode RGB ``frames`` (N, H, W, 3) uint8 (even H and W) into a video file chosen by extension.

    * constant frame rate: frame i at ``start_time + i / fps``;
    * variable frame rate: pass ``pts`` (N increasing times in seconds); they are
      stored with millisecond precision (time base 1/1000);
    * ``audio`` (float32 mono at ``audio_rate``) adds an audio track, encoded
      with the container's default audio codec or ``audio_codec``, starting at
      ``start_time`` too.

    Returns the path.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in VIDEO_FORMATS:
        raise ValueError(f"unsupported video extension {ext!r}; use one of {sorted(VIDEO_FORMATS)}")
    fmt, vcodec, acodec = VIDEO_FORMATS[ext]
    vcodec = codec or vcodec
    acodec = audio_codec or acodec
    frames = np.asarray(frames)
    n, h, w, _ = frames.shape
    if pts is None:
        times = [start_time + i / fps for i in range(n)]
        if start_time == 0 and float(fps).is_integer():
            tb = Fraction(1, int(fps))
        else:
            tb = Fraction(1, 1000)
    else:
        if len(pts) != n:
            raise ValueError("pts must have one time per frame")
        times = [start_time + float(t) for t in pts]
        tb = Fraction(1, 1000)
    with av.open(str(path), "w", format=fmt) as container:
        rate = Fraction(fps).limit_denominator(1001)
        vs = container.add_stream(vcodec, rate=rate)
        vs.width, vs.height = w, h
        vs.pix_fmt = "yuv420p"
        vs.codec_context.time_base = tb
        if vcodec == "libx264":
            vs.codec_context.options = {"crf": str(crf), "preset": "ultrafast"}
        elif vcodec.startswith("libvpx"):
            vs.codec_context.options = {"deadline": "realtime", "cpu-used": "8", "crf": "40", "b": "0"}
        astream = None
        if audio is not None:
            c = av.codec.Codec(acodec, "w")
            arate = _supported_rate(c, audio_rate)
            astream = container.add_stream(acodec, rate=arate)
            astream.codec_context.layout = "mono" if audio_channels == 1 else "stereo"
        container.start_encoding()
        for i in range(n):
            fr = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            fr.pts = int(round(times[i] / tb))
            fr.time_base = tb
            for pkt in vs.encode(fr):
                container.mux(pkt)
        for pkt in vs.encode(None):
            container.mux(pkt)
        if astream is not None:
            _encode_audio_into(container, astream, _as_planar(audio, audio_channels), audio_rate, start_time)
    return path


# --------------------------------------------------------------------------- bad inputs

def write_text(path: str | os.PathLike, text: str = "this is not a media file\n" * 20) -> Path:
    """A plain text file (for "not media" / "not an image" errors)."""
    path = Path(path)
    path.write_text(text)
    return path


def write_truncated(src: str | os.PathLike, dst: str | os.PathLike, keep_fraction: float = 0.5) -> Path:
    """Copy the first ``keep_fraction`` of ``src``'s bytes to ``dst`` (a truncated download)."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * keep_fraction)])
    return dst


def write_corrupted(src: str | os.PathLike, dst: str | os.PathLike, *, start_fraction: float = 0.3,
                    length_fraction: float = 0.4, seed: int = 0) -> Path:
    """Copy ``src`` to ``dst`` with a span of its bytes replaced by random garbage.

    The span starts ``start_fraction`` into the file and covers
    ``length_fraction`` of it; headers before it stay intact so the file still
    opens and fails (or degrades) mid-stream.
    """
    data = bytearray(Path(src).read_bytes())
    a = int(len(data) * start_fraction)
    b = min(len(data), a + max(1, int(len(data) * length_fraction)))
    data[a:b] = np.random.default_rng(seed).integers(0, 256, size=b - a, dtype=np.uint8).tobytes()
    dst = Path(dst)
    dst.write_bytes(bytes(data))
    return dst


def write_image(path: str | os.PathLike, image: np.ndarray | None = None, *, mode: str = "RGB",
                exif_orientation: int | None = None) -> Path:
    """Save an image with Pillow (format from the extension).

    ``image`` defaults to :func:`face_frame` (240x320). ``mode`` converts before
    saving (``RGB``, ``RGBA``, ``L``, ``P``). ``exif_orientation`` (1-8) writes
    an EXIF Orientation tag (JPEG/PNG/WebP).
    """
    from PIL import Image

    if image is None:
        image = face_frame(320, 240)
    im = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if mode != im.mode:
        im = im.convert(mode)
    path = Path(path)
    kw = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = int(exif_orientation)
        kw["exif"] = exif.tobytes()
    im.save(path, **kw)
    return path

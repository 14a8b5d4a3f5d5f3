"""A hostile-input corpus for ``echo-stream generate``, made by the tests themselves (nothing on disk).

Each :class:`Case` is one bad input a user could hand the CLI: broken, lying or
hostile media, images, transcripts, landmarks sidecars and option values.
:func:`generate_cases` writes the files into a directory and returns the cases;
``tests/test_hostile_generate.py`` runs each through ``echo-stream generate``
and asserts one line naming the input and its problem, exit status 1, no
traceback and nothing left on disk.
"""
from __future__ import annotations

import os
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from . import mediagen


@dataclass
class Case:
    """One hostile input: the generate options it replaces, what the error must name, and a word of its problem."""

    name: str
    #: generate options that differ from the good defaults (``--avatar-audio`` etc. -> value)
    options: dict[str, str] = field(default_factory=dict)
    #: the error line must contain this (a file's name or an option)
    names: str = ""
    #: and one of these words (lower case) describing the problem
    problem: tuple[str, ...] = ()


# --------------------------------------------------------------------------- raw file makers

def _wav_bytes(samples: np.ndarray, rate: int = 16000, channels: int = 1, *, fmt: int = 1, bits: int = 16,
               declared_data: int | None = None, declared_channels: int | None = None,
               declared_rate: int | None = None) -> bytes:
    """A RIFF/WAVE file written by hand, so that its header can lie."""
    if fmt == 3:
        data = np.asarray(samples, "<f4").tobytes()
    else:
        data = np.clip(np.asarray(samples) * 32767, -32768, 32767).astype("<i2").tobytes()
    ch = channels if declared_channels is None else declared_channels
    rate_h = rate if declared_rate is None else declared_rate
    block = max(ch, 1) * bits // 8
    fmt_chunk = struct.pack("<HHIIHH", fmt, ch, rate_h, rate_h * block, block, bits)
    n = len(data) if declared_data is None else declared_data
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk + b"data" + struct.pack("<I", n) + data
    return b"RIFF" + struct.pack("<I", min(len(body), 0xFFFFFFFF)) + body


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (one compressed all-zero image: a decompression bomb)."""
    raw = zlib.compress(b"\0" * 0, 9)
    sig = b"\x89PNG\r\n\x1a\n"

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return sig + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _bomb_png(path: Path, side: int) -> Path:
    """A real, valid PNG of side x side black pixels that compresses to a few hundred KB."""
    row = b"\0" + b"\0" * (side * 3)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(side)]
    parts.append(comp.flush())
    idat = b"".join(parts)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _audio_with_jump(path: Path, jump_s: float, fmt: str = "matroska", codec: str = "pcm_s16le",
                     rate: int = 16000) -> Path:
    """An audio file whose timestamps jump forward by ``jump_s`` seconds half-way (0.5 s, jump, 0.5 s)."""
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate, layout="mono")
        s.time_base = Fraction(1, rate)
        y = (mediagen.speech_like(1.0, rate) * 32767).astype(np.int16)
        for i, start in enumerate((0, int(rate * 0.5))):
            chunk = y[start:start + rate // 2]
            f = av.AudioFrame.from_ndarray(chunk[None, :], format="s16", layout="mono")
            f.sample_rate = rate
            f.pts = start + (int(round(jump_s * rate)) if i else 0)
            f.time_base = Fraction(1, rate)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def _garbage_h264(path: Path, src: Path) -> Path:
    """A valid mp4 container whose H.264 frame data (mdat) is random bytes."""
    data = bytearray(src.read_bytes())
    i = data.find(b"mdat")
    size = struct.unpack(">I", data[i - 4:i])[0]
    rng = np.random.default_rng(3)
    data[i + 4:i - 4 + size] = rng.integers(0, 256, size=size - 8, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --------------------------------------------------------------------------- the corpus

def generate_cases(d: str | os.PathLike) -> list[Case]:
    """Write every hostile file into ``d``; returns the cases (options relative to good defaults)."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    rate = 16000
    speech = mediagen.speech_like(1.0, rate, seed=2)
    cases: list[Case] = []

    def audio(name: str, problem: tuple[str, ...], opt: str = "--avatar-audio", data: bytes | None = None,
              path: Path | None = None) -> None:
        p = path if path is not None else d / name
        if data is not None:
            p.write_bytes(data)
        cases.append(Case(f"{opt.strip('-')}:{name}", {opt: str(p)}, name, problem))

    # -- avatar audio: missing, not a file, not media
    audio("missing.wav", ("not found",), path=d / "missing.wav")
    (d / "folder.wav").mkdir(exist_ok=True)
    audio("folder.wav", ("directory",), path=d / "folder.wav")
    audio("empty.wav", ("empty", "zero"), data=b"")
    audio("random.wav", ("not", "unsupported", "media"), data=np.random.default_rng(0).bytes(4096))
    audio("random.mp3", ("not", "mp3", "media", "undecodable"), data=np.random.default_rng(1).bytes(8192))
    audio("text.ogg", ("not", "media"), data=b"hello, this is text\n" * 50)
    png = d / "image.png"
    mediagen.write_image(png)
    audio("image.wav", ("no audio", "not", "image"), data=png.read_bytes())
    # -- WAV headers that lie
    audio("zero-samples.wav", ("zero", "no samples", "empty"), data=_wav_bytes(np.zeros(0, np.float32)))
    audio("zero-channels.wav", ("channel",), data=_wav_bytes(speech, declared_channels=0))
    audio("claims-67000s.wav", ("header", "claims", "truncated"),
          data=_wav_bytes(speech, declared_data=67000 * rate * 2))
    audio("rate-zero.wav", ("rate",), data=_wav_bytes(speech, declared_rate=0))
    audio("nan.wav", ("nan", "finite"), data=_wav_bytes(np.full(rate, np.nan, np.float32), fmt=3, bits=32))
    audio("inf.wav", ("nan", "finite", "infinite"),
          data=_wav_bytes(np.where(np.arange(rate) % 7, 0.1, np.inf).astype(np.float32), fmt=3, bits=32))
    audio("huge-values.wav", ("range", "finite", "amplitude", "clip"),
          data=_wav_bytes(np.full(rate, 1e30, np.float32), fmt=3, bits=32))
    # -- truncated / corrupt compressed audio
    long_mp3 = mediagen.write_audio(d / "src.mp3", mediagen.speech_like(2.0, 44100), 44100)
    long_m4a = mediagen.write_audio(d / "src.m4a", mediagen.speech_like(2.0, 44100), 44100)
    long_ogg = mediagen.write_audio(d / "src.ogg", mediagen.speech_like(2.0, 48000), 48000)
    ogg6 = mediagen.write_audio(d / "src6.ogg", mediagen.speech_like(6.0, 48000), 48000)
    for keep in (0.6, 0.9):
        name = f"trunc-{int(keep * 100)}.ogg"
        mediagen.write_truncated(ogg6, d / name, keep)
        audio(name, ("truncated",), path=d / name)
    for src, name, keep in ((long_mp3, "trunc.mp3", 0.02), (long_m4a, "trunc.m4a", 0.4),
                            (long_ogg, "trunc.ogg", 0.5), (long_m4a, "head-only.m4a", 0.01)):
        mediagen.write_truncated(src, d / name, keep)
        audio(name, ("truncated", "corrupt", "incomplete", "not", "no audio", "undecodable", "moov"),
              path=d / name)
    # -- timestamps that jump (unbounded gap filling)
    audio("jump-1e6s.mka", ("gap", "jump", "timestamp"), path=_audio_with_jump(d / "jump-1e6s.mka", 1e6))
    audio("jump-1h.mka", ("gap", "jump", "timestamp"), path=_audio_with_jump(d / "jump-1h.mka", 3600.0))
    # -- a video with no audio as avatar audio
    silent = mediagen.write_video(d / "silent.mp4", mediagen.face_frames(10, 64, 64))
    audio("silent.mp4", ("no audio",), path=silent)

    # -- user audio
    audio("user-nan.wav", ("nan", "finite"), "--user-audio",
          data=_wav_bytes(np.full(rate, np.nan, np.float32), fmt=3, bits=32))
    audio("user-random.mp3", ("not", "mp3", "media", "undecodable"), "--user-audio",
          data=np.random.default_rng(4).bytes(6000))
    audio("user-zero.wav", ("zero", "no samples", "empty"), "--user-audio", data=_wav_bytes(np.zeros(0)))

    # -- user video
    good_video = mediagen.write_video(d / "user-src.mp4", mediagen.face_frames(20, 64, 64))
    audio("user-random.mp4", ("not", "media"), "--user-video", data=np.random.default_rng(5).bytes(9000))
    audio("user-garbage-h264.mp4", ("undecodable", "corrupt", "no decodable", "frames"), "--user-video",
          path=_garbage_h264(d / "user-garbage-h264.mp4", good_video))
    mediagen.write_truncated(good_video, d / "user-trunc.mp4", 0.3)
    audio("user-trunc.mp4", ("truncated", "corrupt", "not", "moov", "no decodable", "frames"), "--user-video",
          path=d / "user-trunc.mp4")
    audio("user-audio-only.m4a", ("no video",), "--user-video",
          data=long_m4a.read_bytes())
    audio("user-text.mp4", ("not", "media"), "--user-video", data=b"not a video\n" * 100)
    (d / "user-folder.mp4").mkdir(exist_ok=True)
    audio("user-folder.mp4", ("directory",), "--user-video", path=d / "user-folder.mp4")

    # -- portrait
    def portrait(name: str, problem: tuple[str, ...], data: bytes | None = None, path: Path | None = None):
        p = path if path is not None else d / name
        if data is not None:
            p.write_bytes(data)
        cases.append(Case(f"portrait:{name}", {"--portrait": str(p)}, name, problem))

    portrait("text.png", ("not", "image"), data=b"hello\n" * 100)
    portrait("empty.jpg", ("empty",), data=b"")
    portrait("missing.jpg", ("not found",), path=d / "missing.jpg")
    portrait("trunc.png", ("truncated", "corrupt"), data=png.read_bytes()[: len(png.read_bytes()) // 3])
    portrait("claims-huge.png", ("pixels", "large"), data=_png_header_only(60000, 60000))
    portrait("bomb-12000.png", ("pixels", "large"), path=_bomb_png(d / "bomb-12000.png", 12000))
    portrait("tiny.png", ("small",), path=mediagen.write_image(d / "tiny.png", np.zeros((8, 8, 3), np.uint8)))
    portrait("no-face.png", ("no face",),
             path=mediagen.write_image(d / "no-face.png", np.full((240, 320, 3), 128, np.uint8)))
    portrait("gif-stub.gif", ("not", "corrupt", "truncated", "image"), data=b"GIF89a" + b"\0" * 10)
    from PIL import Image

    Image.fromarray(mediagen.face_frame(320, 240)).save(d / "face.gif")
    portrait("face.gif", ("not a supported image",), path=d / "face.gif")
    (d / "face.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n")
    portrait("face.eps", ("not a supported image",), path=d / "face.eps")

    # -- transcript
    def tr(name: str, text: str | bytes, problem: tuple[str, ...]) -> None:
        p = d / name
        p.write_bytes(text.encode() if isinstance(text, str) else text)
        cases.append(Case(f"transcript:{name}", {"--transcript": str(p)}, name, problem))

    tr("nested.json", _nested(100000), ("nested",))
    tr("nan.json", '[{"start": NaN, "end": 1.0, "speaker": "avatar", "text": "hi"}]', ("nan", "finite"))
    tr("inf.json", '[{"start": 0, "end": Infinity, "speaker": "avatar", "text": "hi"}]', ("finite", "infinity"))
    tr("backwards.json", '[{"start": 2.0, "end": 1.0, "speaker": "avatar", "text": "hi"}]', ("end", "before"))
    tr("negative.json", '[{"start": -5, "end": 1.0, "speaker": "avatar", "text": "hi"}]', ("negative", ">= 0"))
    tr("object.json", '{"start": 0}', ("list",))
    tr("strings.json", '["hello", "world"]', ("start", "object", "list of"))
    tr("bad-types.json", '[{"start": "soon", "end": 1, "speaker": "avatar", "text": "hi"}]', ("number", "start"))
    tr("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"), ("utf-8",))
    tr("bad.srt", "1\n00:00:xx,000 --> 00:00:02,000\nhello\n", ("time", "cue", "timestamp", "srt"))
    tr("huge-time.json", '[{"start": 0, "end": 1e300, "speaker": "avatar", "text": "hi"}]', ("end", "long", "large"))
    tr("bad-speaker.json", '[{"start": 0, "end": 1, "speaker": 7, "text": "hi"}]', ("speaker",))

    # -- landmarks sidecar
    def lm(name: str, text: str, problem: tuple[str, ...]) -> None:
        p = d / name
        p.write_text(text)
        cases.append(Case(f"landmarks:{name}", {"--landmarks": str(p)}, name, problem))

    lm("lm-nested.json", _nested(100000), ("nested",))
    lm("lm-notjson.json", "left_eye = 1, 2", ("json",))
    rest = '"nose": [160, 130], "mouth_left": [140, 160], "mouth_right": [180, 160]'
    lm("lm-nan.json", '{"left_eye": [NaN, 100], "right_eye": [190, 100], ' + rest + '}', ("finite",))
    lm("lm-outside.json", '{"left_eye": [-500, 100], "right_eye": [190, 100], ' + rest + '}', ("outside",))
    lm("lm-upside-down.json", '{"left_eye": [130, 180], "right_eye": [190, 180], "nose": [160, 130], '
       '"mouth_left": [140, 100], "mouth_right": [180, 100]}', ("below", "orientation"))
    lm("lm-list.json", "[1, 2, 3]", ("object",))
    lm("lm-missing.json", '{"left_eye": [100, 100]}', ("missing",))

    # -- option values
    def opt(name: str, options: dict[str, str], names: str, problem: tuple[str, ...]) -> None:
        cases.append(Case(f"option:{name}", options, names, problem))

    opt("size-odd", {"--size": "97"}, "--size", ("even",))
    opt("size-huge", {"--size": "100000"}, "--size", ("at most", "large", "pixels"))
    opt("out-no-dir", {"-o": str(d / "no" / "such" / "dir" / "o.mp4")}, "o.mp4", ("does not exist",))
    opt("out-is-dir", {"-o": str(d / "folder.wav")}, "folder.wav", ("directory",))
    (d / "bad.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all}")
    opt("checkpoint-corrupt", {"--checkpoint": str(d / "bad.safetensors")}, "bad.safetensors",
        ("corrupt", "not", "safetensors", "checkpoint"))
    nested_ckpt = d / "nested-ckpt"
    nested_ckpt.mkdir(exist_ok=True)
    shutil.copy(Path(__file__).resolve().parent.parent / "echo_stream" / "assets" / "checkpoints" / "tiny" /
                "model.safetensors", nested_ckpt / "model.safetensors")
    (nested_ckpt / "config.json").write_text(_nested(100000))
    opt("checkpoint-nested-config", {"--checkpoint": str(nested_ckpt)}, "config.json", ("nested",))
    (d / "nested-config.json").write_text(_nested(100000))
    opt("config-nested", {"--config": str(d / "nested-config.json")}, "nested-config.json", ("nested",))
    opt("config-unknown", {"--config": "enormous"}, "enormous", ("unknown",))
    opt("checkpoint-missing", {"--checkpoint": str(d / "none.safetensors")}, "none.safetensors", ("not found",))
    return cases


def good_inputs(d: str | os.PathLike) -> dict[str, str]:
    """Small valid inputs the cases replace one at a time."""
    d = Path(d)
    from echo_stream import cli

    wav = d / "good-avatar.wav"
    if not wav.exists():
        wav.write_bytes(_wav_bytes(mediagen.speech_like(1.0, 16000, seed=9)))
    return {"--portrait": str(cli.ASSETS / "portrait.jpg"), "--avatar-audio": str(wav)}


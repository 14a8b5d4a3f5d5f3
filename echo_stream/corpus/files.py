"""Writing a corpus to disk: media, motion, transcript, events, manifest (atomic, resumable)."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import wave
from fractions import Fraction

import numpy as np

from .. import atomic, manifest
from ..errors import InputError
from .base import CORPUS_VERSION, FPS, SPF, SR
from .conversation import Conversation, _check_timing, synthesize_conversation

_CONV_RE = re.compile(r"^conv(\d{4,})$")
_TMP_RE = re.compile(r"^\.conv\d{4,}\.tmp-[0-9a-f]+$")
_TINT = np.array([1.07, 0.96, 0.88], np.float32)


def _write_wav(path: str, audio: np.ndarray) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(pcm.tobytes())


def user_portrait(path: str | os.PathLike | None = None):
    """The "user": the portrait (default: the bundled one) mirrored and tinted warmer, as a placed Portrait."""
    import io

    from PIL import Image

    from .. import media
    from ..render import SAMPLE_PORTRAIT, load_portrait

    rgb = media.load_image(path or SAMPLE_PORTRAIT)[:, ::-1].astype(np.float32)
    rgb = np.clip(rgb * _TINT + np.array([4.0, 0.0, -6.0], np.float32) + 0.5, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return load_portrait(buf.getvalue())


def _write_user_webm(path: str, user_motion: np.ndarray, user_audio: np.ndarray, renderer, size: int,
                     chunk: int = 100) -> None:
    """Render the user's face from its motion and mux it with the user's audio: VP9 + Opus in WebM."""
    import av

    n = user_motion.shape[0]
    with av.open(path, "w", format="webm") as c:
        vs = c.add_stream("libvpx-vp9", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = size, size, "yuv420p"
        vs.codec_context.time_base = Fraction(1, FPS)
        vs.options = {"crf": "36", "b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "1",
                      "lag-in-frames": "0", "g": str(2 * FPS)}
        aus = c.add_stream("libopus", rate=48000)
        aus.layout = "mono"
        aus.bit_rate = 32_000
        res = av.AudioResampler(format="s16", layout="mono", rate=48000)
        a_out = 0

        def encode_audio(frames):
            nonlocal a_out
            for rf in frames:
                rf.pts = a_out
                rf.time_base = Fraction(1, 48000)
                a_out += rf.samples
                for pkt in aus.encode(rf):
                    c.mux(pkt)

        for f0 in range(0, n, chunk):
            f1 = min(n, f0 + chunk)
            seg = user_audio[f0 * SPF:f1 * SPF]
            af = av.AudioFrame.from_ndarray((np.clip(seg, -1, 1) * 32767).round().astype(np.int16)[None],
                                            format="s16", layout="mono")
            af.sample_rate, af.pts, af.time_base = SR, f0 * SPF, Fraction(1, SR)
            encode_audio(res.resample(af))
            for i, img in enumerate(renderer.render(user_motion[f0:f1])):
                vf = av.VideoFrame.from_ndarray(img, format="rgb24")
                vf.pts = f0 + i
                vf.time_base = Fraction(1, FPS)
                for pkt in vs.encode(vf):
                    c.mux(pkt)
        encode_audio(res.resample(None))
        for pkt in aus.encode(None):
            c.mux(pkt)
        for pkt in vs.encode(None):
            c.mux(pkt)


def _row(conv: Conversation, user_media: str) -> dict:
    cid = conv.conversation_id
    return {
        "conversation_id": cid,
        "avatar_media": f"{cid}/avatar.wav",
        "user_media": f"{cid}/{user_media}",
        "transcript": f"{cid}/transcript.json",
        "avatar_motion": f"{cid}/avatar_motion.parquet",
        "user_motion": f"{cid}/user_motion.parquet",
        "events": f"{cid}/events.json",
        "duration_s": conv.duration_s,
        "split": conv.split,
        "synthetic": True,
        "affect": conv.affect,
        "group": conv.group,
    }


def _write_conversation(out_dir: str, conv: Conversation, renderer, size: int, render_video: bool) -> None:
    """Write one conversation into a temp dir, then rename it into place (all or nothing)."""
    import pyarrow.parquet as pq
    from ..generate import motion_table

    final = os.path.join(out_dir, conv.conversation_id)
    tmp = os.path.join(out_dir, f".{conv.conversation_id}.tmp-{secrets.token_hex(4)}")
    os.makedirs(tmp)
    try:
        _write_wav(os.path.join(tmp, "avatar.wav"), conv.avatar_audio)
        frames = np.arange(conv.num_frames)
        pq.write_table(motion_table(frames, conv.avatar_motion), os.path.join(tmp, "avatar_motion.parquet"),
                       compression="zstd")
        pq.write_table(motion_table(frames, conv.user_motion), os.path.join(tmp, "user_motion.parquet"),
                       compression="zstd")
        with open(os.path.join(tmp, "transcript.json"), "w", encoding="utf-8") as f:
            json.dump(conv.transcript, f, indent=1)
        with open(os.path.join(tmp, "events.json"), "w", encoding="utf-8") as f:
            json.dump(conv.events, f, indent=1)
        if render_video:
            user_media = "user.webm"
            _write_user_webm(os.path.join(tmp, user_media), conv.user_motion, conv.user_audio, renderer, size)
        else:
            user_media = "user.wav"
            _write_wav(os.path.join(tmp, user_media), conv.user_audio)
        with open(os.path.join(tmp, "conversation.json"), "w", encoding="utf-8") as f:
            json.dump(_row(conv, user_media), f, indent=1)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):     # not "finished by someone else meanwhile"
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _complete_rows(out_dir: str) -> dict[int, dict]:
    rows = {}
    for name in os.listdir(out_dir):
        m = _CONV_RE.match(name)
        if not m:
            continue
        p = os.path.join(out_dir, name, "conversation.json")
        try:
            with open(p, encoding="utf-8") as f:
                rows[int(m.group(1))] = json.load(f)
        except (OSError, ValueError):
            continue
    return rows


def _write_manifest(out_dir: str) -> tuple[str, int]:
    rows = _complete_rows(out_dir)
    text = "".join(json.dumps(rows[i], sort_keys=False) + "\n" for i in sorted(rows))
    path = os.path.join(out_dir, "manifest.jsonl")
    atomic.write_text(path, text)
    return path, len(rows)


def read_manifest(path: str) -> list[dict]:
    """Rows of a ``manifest.jsonl`` (a corpus directory or the file itself); see :mod:`echo_stream.manifest`."""
    return manifest.read_manifest(path)


_README = """\
# SYNTHETIC dyadic conversation corpus

**Everything here is synthetic.** It was generated by `echo_stream.corpus`
(echo-stream's own generator, `echo-stream corpus`), not recorded from people:

* speech is machine-made pseudo-speech (source-filter synthesis: glottal pulses
  through formant resonators, noise for fricatives, silence for stop closures),
  with phones derived from the transcript's spelling; it is not intelligible;
* the user's "webcam" video is the bundled portrait, mirrored and tinted,
  animated by echo-stream's own renderer from `user_motion.parquet`;
* the avatar's motion (`avatar_motion.parquet`) is ground truth written by rules.

Settings: {settings}

## Layout

`manifest.jsonl`: one JSON object per conversation (paths relative to this
directory): `conversation_id`, `avatar_media` (16 kHz WAV), `user_media`
(WebM: VP9 video + Opus audio; or WAV without video), `transcript` (JSON list
of `{{start, end, speaker, text}}`), `avatar_motion` / `user_motion` (Parquet:
`frame`, `pts`, then the 58 motion channels in `echo_stream.motion.CHANNELS`
order, 25 fps), `events` (JSON: every scripted event and rule parameter),
`duration_s`, `split` (train / heldout), `synthetic` (true), `affect`
(positive / negative / neutral), `group` (matched triple).

## Rules (what a model can learn from it)

1. Lips: avatar lip/jaw channels are the known articulation targets of its own
   speech (jawOpen = 0.7 x vowel openness x loudness; funnel/pucker for rounded
   vowels; mouthClose/mouthPress for p b m; stretch for i), smoothed 25 ms.
2. Nods: 0.2-0.6 s after each sentence the user ends, the avatar nods
   (headPitch, 1.8-2.2 Hz, 0.5-1.0 s).
3. Mirrored smiles: each user smile is mirrored by the avatar 0.5-1.0 s later
   (probability and strength depend on the affect).
4. Always: blinks, slow idle head motion, gaze shifts; brows raise 0.1-0.3 s
   after the user starts a turn.
5. Long-range context: the first {early_s:g} s establish an affect in the
   transcript (positive / negative / neutral). From then on the avatar's
   baseline differs (positive: smile, raised brows, bigger nods, livelier head;
   negative: inner brows up, frown, lowered and slower head, fewer smiles).
   All later text is affect-neutral, and conversations 3k, 3k+1, 3k+2 share
   everything after {early_s:g} s except the avatar's affect-dependent behaviour.
   Measure the effect from `late_start_s` (events.json) = end of the affect
   exchange + {context_gap_s:g} s.
6. Deterministic under the seed; one group in seven is `heldout`.

See docs/corpus.md in the echo-stream repository for details.
"""


def _settings(minutes, seed, size, render_video, early_s, context_gap_s, portrait) -> dict:
    return {"generator": "echo_stream.corpus", "version": CORPUS_VERSION, "synthetic": True,
            "minutes": float(minutes), "seed": int(seed), "size": int(size), "render_video": bool(render_video),
            "early_s": float(early_s), "context_gap_s": float(context_gap_s),
            "portrait": os.path.abspath(portrait) if portrait else "bundled"}


def generate_corpus(out_dir: str | os.PathLike, n_conversations: int = 20, minutes: float = 1.0, seed: int = 0,
                    size: int = 192, progress: bool = True, *, render_video: bool = True, early_s: float = 20.0,
                    context_gap_s: float = 30.0, portrait: str | os.PathLike | None = None) -> str:
    """Write (or complete) a synthetic corpus of ``n_conversations`` conversations of ``minutes`` each.

    Returns the path of ``OUT_DIR/manifest.jsonl``. Each conversation is
    written into a temporary directory and renamed into place; the manifest
    is rewritten atomically after each one, so an interrupted run leaves a
    consistent corpus and running again resumes (conversations already
    present are skipped). A directory holding a corpus made with different
    settings is refused.
    """
    out_dir = os.fspath(out_dir)
    if int(n_conversations) < 1:
        raise InputError("--conversations", f"must be >= 1, got {n_conversations}")
    if not (minutes > 0):
        raise InputError("--minutes", f"must be > 0, got {minutes}")
    if render_video and (size < 64 or size % 2):
        raise InputError("--size", f"{size} is not an even number of pixels >= 64")
    duration = round(float(minutes) * 60.0 * FPS) / FPS
    _check_timing(duration, early_s, context_gap_s)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(out_dir, "exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise InputError(out_dir, "output directory is not writable")

    done = _complete_rows(out_dir)
    todo = [i for i in range(int(n_conversations)) if i not in done]
    renderer = None
    if todo and render_video:                        # first: a bad portrait fails before anything is written
        from ..render import PortraitRenderer
        renderer = PortraitRenderer(user_portrait(portrait), size=(size, size))

    settings = _settings(minutes, seed, size, render_video, early_s, context_gap_s, portrait)
    spath = os.path.join(out_dir, "corpus.json")
    if os.path.exists(spath):
        try:
            with open(spath, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            raise InputError(spath, "unreadable corpus settings file; remove it or use a new directory") from None
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            what = ", ".join(f"{k}={old.get(k)!r} (now {settings[k]!r})" for k in diff)
            raise InputError(out_dir, f"holds a corpus made with other settings: {what}; "
                                      "use a new directory or the same settings")
    elif done:
        raise InputError(out_dir, "holds conversations but no corpus.json; use a new directory")
    else:
        atomic.write_text(spath, json.dumps(settings, indent=1) + "\n")
    for name in os.listdir(out_dir):                 # leftovers of an interrupted run
        if _TMP_RE.match(name):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    atomic.write_text(os.path.join(out_dir, "README.md"),
                       _README.format(settings=json.dumps(settings), early_s=early_s, context_gap_s=context_gap_s))

    manifest, _ = _write_manifest(out_dir)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=int(n_conversations), initial=int(n_conversations) - len(todo), unit="conv",
                   desc="corpus")
    try:
        for i in todo:
            conv = synthesize_conversation(i, seed=seed, minutes=minutes, early_s=early_s,
                                           context_gap_s=context_gap_s)
            _write_conversation(out_dir, conv, renderer, size, render_video)
            manifest, _ = _write_manifest(out_dir)
            if bar is not None:
                bar.set_postfix_str(f"{conv.conversation_id} {conv.affect}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return manifest



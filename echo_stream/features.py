"""Features: the one implementation used by streaming sessions and offline preprocessing.

Audio (speech that drives the lips)
-----------------------------------
16 kHz mono float32 in, ``(N, 2, 83)`` float32 out: for every 25 fps video
frame ``i`` two 50 Hz feature frames ``k = 2i, 2i + 1``. Feature frame ``k`` is
centred at sample ``320 k + 160``, so video frame ``i`` (samples
``[640 i, 640 i + 640)``) has one feature frame centred in each half. An
audio of ``S`` samples has ``N = ceil(S / 640)`` video frames; the signal is
taken as zero before sample 0 and after sample ``S``.

Columns of the last axis (see :data:`AUDIO_FEATURE_COLUMNS`):

* ``0..79`` log-mel: ``ln(mel + 1e-6)`` of the power spectrum (``|STFT|^2``) of a
  400-sample (25 ms) periodic Hann window centred on the frame, FFT size 512,
  mapped through ``librosa.filters.mel(sr=16000, n_fft=512, n_mels=80,
  fmin=20, fmax=7600)`` (Slaney mel scale and area normalisation). This is
  exactly ``librosa.feature.melspectrogram(n_fft=512, win_length=400,
  hop_length=320, fmin=20, fmax=7600, n_mels=80, center=False)`` of the
  zero-padded signal, computed on explicitly framed windows instead.
* ``80`` log energy: ``ln(rms + 1e-5)`` over the same 400 samples (silence
  about -11.5, a full-scale sine about -0.35).
* ``81`` normalised log-f0: ``log2(f0 / 150 Hz)`` of the YIN pitch (60..500 Hz),
  ``0`` when the frame is unvoiced.
* ``82`` voicing probability in ``[0, 1]``: ``1 - d'(T)`` where ``d'`` is YIN's
  cumulative-mean-normalised difference at the chosen period ``T``; ``0``
  below an energy gate (rms < 1e-3, about -60 dBFS).

YIN runs on a 640-sample frame (40 ms: difference window 320 samples, lags
32..267 = 500..60 Hz) centred on the feature frame, so video frame ``i`` needs
samples up to ``640 (i + 1) + 160``: 10 ms of look-ahead past its own end
(:data:`AUDIO_LOOKAHEAD_SAMPLES`).

Streaming and offline are the same computation: :class:`AudioFeatureExtractor`
keeps a buffer and evaluates whole video frames once every sample their
windows read has arrived; :func:`offline_audio_features` pads the whole signal
and evaluates every frame at once. Both call :func:`_frames_from_segment`
(float64 inside), so the result does not depend on how the audio was chunked.

Video (the user's webcam)
-------------------------
:class:`VideoBehaviourExtractor` turns RGB frames into ``(N, 16)`` behaviour
features (:data:`USER_VIDEO_FEATURES`). Client-side ARKit blendshapes are
mapped into the motion vector by :func:`blendshape_frames`.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from . import motion
from .config import (AUDIO_FEAT_DIM, FPS, MEL_BINS, MEL_HOP, MELS_PER_FRAME, SAMPLE_RATE,
                     SAMPLES_PER_FRAME, USER_VIDEO_DIM)
from .errors import InputError

__all__ = [
    "AUDIO_FEATURE_COLUMNS", "AUDIO_LOOKAHEAD_SAMPLES", "AudioFeatureExtractor",
    "offline_audio_features", "num_video_frames", "warmup",
    "USER_VIDEO_FEATURES", "VideoBehaviourExtractor",
    "blendshape_frames", "rms_envelope",
]

# ----------------------------------------------------------------------------- audio constants
N_FFT = 512
WIN_LENGTH = 400
FMIN, FMAX = 20.0, 7600.0
LOG_MEL_FLOOR = 1e-6
LOG_ENERGY_FLOOR = 1e-5
F0_MIN, F0_MAX = 60.0, 500.0
F0_REF = 150.0
YIN_FRAME = 640                       # samples per YIN analysis frame
YIN_WINDOW = 320                      # difference-function integration window
YIN_THRESHOLD = 0.1                   # absolute threshold of YIN step 4
VOICED_PROBABILITY = 0.6              # voicing probability above which f0 is reported
ENERGY_GATE = 1e-3                    # rms below this: unvoiced

_HALF = MEL_HOP // 2                  # 160: frame k is centred at 320 k + 160
#: Zero samples assumed before the signal: the first YIN frame starts at -160.
_LEFT = YIN_FRAME // 2 - _HALF        # 160
#: Samples past the end of video frame i that its features read.
AUDIO_LOOKAHEAD_SAMPLES = YIN_FRAME // 2 - _HALF   # 160 (10 ms)
_MEL_OFFSET = (YIN_FRAME - WIN_LENGTH) // 2        # mel window start inside the YIN frame (120)
_TAU_MIN = int(math.floor(SAMPLE_RATE / F0_MAX))   # 32
_TAU_MAX = int(math.ceil(SAMPLE_RATE / F0_MIN))    # 267

assert MEL_HOP * MELS_PER_FRAME == SAMPLES_PER_FRAME
assert _TAU_MAX + 1 < YIN_FRAME - YIN_WINDOW

AUDIO_FEATURE_COLUMNS: tuple[str, ...] = tuple(f"logmel_{b:02d}" for b in range(MEL_BINS)) + (
    "log_energy", "log_f0_norm", "voicing")
assert len(AUDIO_FEATURE_COLUMNS) == AUDIO_FEAT_DIM


#: Where the mel filterbank is cached (see :func:`_mel_cache_path`); ``ECHO_STREAM_CACHE_DIR`` overrides it.
CACHE_ENV = "ECHO_STREAM_CACHE_DIR"


def _mel_cache_path() -> str | None:
    """``<cache dir>/mel_<key>.npy``: the key names everything the table depends on (the parameters, the
    librosa and numpy versions), so another version computes and caches its own. ``None`` when librosa's
    version cannot be read without importing it."""
    import hashlib
    import os
    from importlib import metadata

    try:
        versions = f"librosa={metadata.version('librosa')},numpy={np.__version__}"
    except metadata.PackageNotFoundError:
        return None
    params = f"sr={SAMPLE_RATE},n_fft={N_FFT},n_mels={MEL_BINS},fmin={FMIN},fmax={FMAX},slaney,float64,{versions}"
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "echo-stream")
    return os.path.join(base, f"mel_{hashlib.sha256(params.encode()).hexdigest()[:16]}.npy")


def _mel_filterbank() -> np.ndarray:
    """``librosa.filters.mel(sr=16000, n_fft=512, n_mels=80, fmin=20, fmax=7600)`` in float64, ``(80, 257)``.

    Importing librosa (with scipy.signal and numba) costs about a second of CPU and 130 MB per process,
    only for this constant table; so the table librosa computed is kept in a per-user cache file (keyed
    by the librosa and numpy versions) and later processes load it (bit for bit the same numbers)
    without importing librosa. An unreadable or malformed cache file is recomputed; a cache directory
    that cannot be written is skipped.
    """
    import os

    path = _mel_cache_path()
    if path is not None and os.path.isfile(path):
        try:
            fb = np.load(path, allow_pickle=False)
            if fb.shape == (MEL_BINS, N_FFT // 2 + 1) and fb.dtype == np.float64 and np.all(np.isfinite(fb)):
                return fb
        except (OSError, ValueError, EOFError):   # EOFError: an empty file
            pass
    import librosa

    fb = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=MEL_BINS, fmin=FMIN, fmax=FMAX, dtype=np.float64)
    if path is not None:
        try:
            from . import atomic

            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, np.asarray(fb, np.float64), allow_pickle=False)
        except OSError:
            pass
    return fb


class _Tables:
    """Lazily built constant tables (mel filterbank, window)."""

    mel_fb: np.ndarray | None = None      # (257, 80) float64
    window: np.ndarray | None = None      # (400,) float64

    @classmethod
    def get(cls) -> tuple[np.ndarray, np.ndarray]:
        if cls.mel_fb is None:
            fb = _mel_filterbank()
            n = np.arange(WIN_LENGTH)
            cls.window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / WIN_LENGTH)  # periodic Hann (fftbins=True)
            cls.mel_fb = np.ascontiguousarray(fb.T)
        return cls.mel_fb, cls.window


def num_video_frames(num_samples: int) -> int:
    """``ceil(num_samples / 640)``: video frames covering an audio of that length."""
    return -(-int(num_samples) // SAMPLES_PER_FRAME)


def _yin(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """YIN on ``(K, 640)`` float64 frames -> (f0 Hz, aperiodicity d'(T)); f0 is 0 where undefined."""
    K = frames.shape[0]
    W = YIN_WINDOW
    taus = np.arange(_TAU_MAX + 2)
    # r(tau) = sum_{j<W} x[j] x[j+tau]: circular cross-correlation over the 640-sample frame,
    # which does not wrap because j + tau <= 319 + 268 < 640
    X = np.fft.rfft(frames, axis=1)
    head = frames.copy()
    head[:, W:] = 0.0
    A = np.fft.rfft(head, axis=1)
    r = np.fft.irfft(np.conj(A) * X, YIN_FRAME, axis=1)[:, : _TAU_MAX + 2]
    sq = np.concatenate([np.zeros((K, 1)), np.cumsum(frames * frames, axis=1)], axis=1)
    e0 = sq[:, W:W + 1]                                    # sum_{j<W} x[j]^2
    et = sq[:, taus + W] - sq[:, taus]                     # sum_{j<W} x[j+tau]^2
    d = np.maximum(e0 + et - 2.0 * r, 0.0)
    d[:, 0] = 0.0
    cum = np.cumsum(d[:, 1:], axis=1)
    cmnd = np.ones_like(d)
    with np.errstate(divide="ignore", invalid="ignore"):
        cmnd[:, 1:] = np.where(cum > 1e-12, d[:, 1:] * taus[1:] / cum, 1.0)
    band = cmnd[:, _TAU_MIN:_TAU_MAX + 1]                  # lags 32..267
    # YIN step 4: the first local minimum under the threshold, else the global minimum
    inner = band[:, 1:-1]
    trough = (inner <= band[:, :-2]) & (inner < band[:, 2:]) & (inner < YIN_THRESHOLD)
    has = trough.any(axis=1)
    first = np.argmax(trough, axis=1) + 1
    best = np.where(has, first, np.argmin(band, axis=1))
    tau = best + _TAU_MIN
    rows = np.arange(K)
    # step 5: parabolic interpolation of the period
    left = cmnd[rows, np.maximum(tau - 1, 1)]
    mid = cmnd[rows, tau]
    right = cmnd[rows, np.minimum(tau + 1, _TAU_MAX + 1)]
    denom = left - 2.0 * mid + right
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(np.abs(denom) > 1e-12, 0.5 * (left - right) / denom, 0.0)
    shift = np.clip(shift, -1.0, 1.0)
    period = tau + shift
    f0 = np.where(period > 0, SAMPLE_RATE / period, 0.0)
    return f0, mid


def _frames_from_segment(seg: np.ndarray, n_video: int) -> np.ndarray:
    """Features of ``n_video`` consecutive video frames.

    ``seg`` (float) starts at absolute sample ``640 i0 - 160`` for the first
    video frame ``i0`` and holds at least ``640 n_video + 320`` samples.
    Returns ``(n_video, 2, 83)`` float32.
    """
    if n_video <= 0:
        return np.zeros((0, MELS_PER_FRAME, AUDIO_FEAT_DIM), dtype=np.float32)
    mel_fb, window = _Tables.get()
    K = n_video * MELS_PER_FRAME
    seg = np.asarray(seg, dtype=np.float64)
    need = MEL_HOP * (K - 1) + YIN_FRAME
    assert seg.shape[0] >= need, (seg.shape, need)
    view = np.lib.stride_tricks.sliding_window_view(seg[:need], YIN_FRAME)[::MEL_HOP]   # (K, 640)
    yin_frames = np.ascontiguousarray(view)
    win = yin_frames[:, _MEL_OFFSET:_MEL_OFFSET + WIN_LENGTH]                           # (K, 400)
    spec = np.fft.rfft(win * window, N_FFT, axis=1)
    power = spec.real ** 2 + spec.imag ** 2
    logmel = np.log(power @ mel_fb + LOG_MEL_FLOOR)
    rms = np.sqrt(np.mean(win * win, axis=1))
    f0, aperiodicity = _yin(yin_frames)
    voicing = np.clip(1.0 - aperiodicity, 0.0, 1.0)
    voicing = np.where(rms >= ENERGY_GATE, voicing, 0.0)
    voiced = (voicing >= VOICED_PROBABILITY) & (f0 >= F0_MIN * 0.95) & (f0 <= F0_MAX * 1.05)
    with np.errstate(divide="ignore"):
        lf0 = np.where(voiced, np.log2(np.maximum(f0, 1e-9) / F0_REF), 0.0)
    out = np.empty((K, AUDIO_FEAT_DIM), dtype=np.float64)
    out[:, :MEL_BINS] = logmel
    out[:, MEL_BINS] = np.log(rms + LOG_ENERGY_FLOOR)
    out[:, MEL_BINS + 1] = lf0
    out[:, MEL_BINS + 2] = voicing
    return out.astype(np.float32).reshape(n_video, MELS_PER_FRAME, AUDIO_FEAT_DIM)


def _as_mono(samples) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        x = x.reshape(-1)
    if x.size and not np.all(np.isfinite(x)):
        raise InputError("audio", "samples contain NaN or infinity")
    return x


def offline_audio_features(samples: np.ndarray) -> np.ndarray:
    """``(ceil(S / 640), 2, 83)`` float32 features of a whole 16 kHz mono signal.

    Identical (bit for bit in practice; tests allow 1e-5) to concatenating the
    output of :class:`AudioFeatureExtractor` fed the same samples in any
    chunking and flushed.
    """
    x = _as_mono(samples)
    n = num_video_frames(x.size)
    padded = np.zeros(_LEFT + SAMPLES_PER_FRAME * n + AUDIO_LOOKAHEAD_SAMPLES, dtype=np.float64)
    padded[_LEFT:_LEFT + x.size] = x
    return _frames_from_segment(padded, n)


class AudioFeatureExtractor:
    """Streaming audio features for one session.

    ``push(samples)`` appends 16 kHz mono float32 audio; ``pop_frames(until)``
    returns features ``(n, 2, 83)`` of the next video frames whose windows are
    complete (frame ``i`` is ready once ``640 (i + 1) + 160`` samples were
    pushed), at most up to frame ``until`` (exclusive) when given;
    ``flush()`` ends the stream, pads it with zeros to ``ceil(S / 640)`` frames
    and returns the rest. ``frames_emitted`` counts frames returned so far.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._parts: list[np.ndarray] = [np.zeros(_LEFT, dtype=np.float64)]
        self._buf_start = -_LEFT      # absolute sample index of the buffer's first sample
        self._buf_len = _LEFT
        self.samples_pushed = 0
        self.frames_emitted = 0
        self._flushed = False

    @property
    def frames_ready(self) -> int:
        """How many frames :meth:`pop_frames` would return now (without a limit)."""
        return max(0, self._available_frames() - self.frames_emitted)

    def _available_frames(self) -> int:
        if self._flushed:
            return num_video_frames(self.samples_pushed)
        end = self.samples_pushed - AUDIO_LOOKAHEAD_SAMPLES
        return max(0, end // SAMPLES_PER_FRAME)

    def push(self, samples: np.ndarray) -> None:
        if self._flushed:
            raise RuntimeError("push() after flush(): call reset() to start a new stream")
        x = _as_mono(samples)
        if x.size:
            self._parts.append(x.astype(np.float64))
            self._buf_len += x.size
            self.samples_pushed += x.size

    def pop_frames(self, until_frame: int | None = None) -> np.ndarray:
        end = self._available_frames()
        if until_frame is not None:
            end = min(end, int(until_frame))
        n = end - self.frames_emitted
        if n <= 0:
            return np.zeros((0, MELS_PER_FRAME, AUDIO_FEAT_DIM), dtype=np.float32)
        buf = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
        first = SAMPLES_PER_FRAME * self.frames_emitted - _LEFT - self._buf_start
        need = SAMPLES_PER_FRAME * n + _LEFT + AUDIO_LOOKAHEAD_SAMPLES
        seg = buf[first:first + need]
        if seg.size < need:  # only after flush: the zero padding at the end
            seg = np.concatenate([seg, np.zeros(need - seg.size)])
        out = _frames_from_segment(seg, n)
        self.frames_emitted = end
        # keep what the next frame reads: from 640 * next - 160 on
        keep_from = SAMPLES_PER_FRAME * end - _LEFT - self._buf_start
        rest = buf[keep_from:]
        self._parts = [rest]
        self._buf_start += keep_from
        self._buf_len = rest.size
        return out

    def flush(self) -> np.ndarray:
        """End of stream: the remaining frames (zero-padded), ``(n, 2, 83)``."""
        self._flushed = True
        return self.pop_frames(None)


def warmup() -> float:
    """Build the tables and run the extractor once (moves import/first-call cost to start-up).

    Returns the seconds it took.
    """
    import time

    t = time.perf_counter()
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(SAMPLE_RATE // 2)).astype(np.float32)
    ex = AudioFeatureExtractor()
    ex.push(x)
    ex.pop_frames()
    ex.flush()
    offline_audio_features(x[:1000])
    return time.perf_counter() - t


def rms_envelope(samples: np.ndarray, fps: int = FPS, smooth_frames: int = 3,
                 sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Per-video-frame RMS of ``samples``, smoothed: ``(ceil(S / (sr / fps)),)`` float32.

    Frame ``i`` covers samples ``[i * sr / fps, (i + 1) * sr / fps)`` (zero
    padded at the end); the RMS values are then averaged over a centred
    window of ``smooth_frames`` frames (an odd count; 1 = no smoothing;
    shorter at the edges). Linear amplitude, not log.
    """
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    hop = sample_rate / fps
    if not float(hop).is_integer():
        raise ValueError(f"sample_rate / fps must be an integer, got {sample_rate}/{fps}")
    hop = int(hop)
    n = -(-x.size // hop)
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    padded = np.zeros(n * hop)
    padded[:x.size] = x
    rms = np.sqrt(np.mean(padded.reshape(n, hop) ** 2, axis=1))
    k = max(1, int(smooth_frames))
    if k > 1:
        half = k // 2
        c = np.concatenate([[0.0], np.cumsum(rms)])
        lo = np.clip(np.arange(n) - half, 0, n)
        hi = np.clip(np.arange(n) + half + 1, 0, n)
        rms = (c[hi] - c[lo]) / (hi - lo)
    return rms.astype(np.float32)


# ============================================================================ ARKit blendshapes

def _canonical(name: str) -> str:
    """Lower-cased channel name with ARKit raw-value suffixes (``_L``/``_R``) spelled out."""
    n = str(name).strip()
    if n.endswith("_L"):
        n = n[:-2] + "Left"
    elif n.endswith("_R"):
        n = n[:-2] + "Right"
    return n.lower()


_CANONICAL_INDEX: dict[str, int] = {_canonical(c): i for c, i in motion.CHANNEL_INDEX.items()}


def blendshape_frames(values: Mapping[str, float | Sequence[float] | np.ndarray]
                      | Sequence[Mapping[str, float]]
                      | tuple[Sequence[str], np.ndarray]) -> np.ndarray:
    """Client-side ARKit blendshapes (and head pose) as ``(N, motion.NUM_CHANNELS)`` float32.

    Accepts any of:

    * ``{name: value}`` for one frame, or ``{name: sequence of N values}``;
    * a list of ``{name: value}`` dicts, one per frame;
    * ``(names, array)`` with ``array`` of shape ``(N, len(names))`` (or ``(len(names),)``).

    Names are the 52 ARKit blendshapes plus ``headPitch``/``headYaw``/``headRoll``
    (radians) and ``headTx``/``headTy``/``headTz``, matched case-insensitively,
    also in ARKit's raw spelling (``eyeBlink_L``) and Live Link Face's
    (``EyeBlinkLeft``). Channels not given are 0 (neutral). Values are taken
    as is (not clipped). An unknown name or a non-finite value raises
    :class:`InputError` naming it.
    """
    what = "blendshapes"

    def index_of(name) -> int:
        i = _CANONICAL_INDEX.get(_canonical(name))
        if i is None:
            raise InputError(what, f"unknown blendshape or head-pose name '{name}' "
                                   f"(expected ARKit names such as 'jawOpen', 'eyeBlinkLeft', 'headPitch')")
        return i

    if isinstance(values, tuple) and len(values) == 2 and not isinstance(values[0], (str, bytes)) \
            and not isinstance(values, Mapping):
        names, arr = values
        names = list(names)
        a = np.asarray(arr, dtype=np.float64)
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or a.shape[1] != len(names):
            raise InputError(what, f"array of shape {a.shape} does not match {len(names)} names")
        idx = [index_of(n) for n in names]
        if len(set(idx)) != len(idx):
            raise InputError(what, "a channel name is given twice")
        cols = {i: a[:, j] for j, i in enumerate(idx)}
        n_frames = a.shape[0]
        names_for = {i: names[j] for j, i in enumerate(idx)}
    elif isinstance(values, Mapping):
        cols, names_for = {}, {}
        n_frames = None
        for name, v in values.items():
            i = index_of(name)
            col = np.atleast_1d(np.asarray(v, dtype=np.float64)).reshape(-1)
            if n_frames is None:
                n_frames = col.size
            elif col.size != n_frames:
                raise InputError(what, f"'{name}' has {col.size} values, others have {n_frames}")
            cols[i] = col
            names_for[i] = str(name)
        if n_frames is None:
            n_frames = 1
    else:
        frames_list = list(values)
        n_frames = len(frames_list)
        cols, names_for = {}, {}
        for f, d in enumerate(frames_list):
            if not isinstance(d, Mapping):
                raise InputError(what, f"frame {f} is {type(d).__name__}, expected a dict of name -> value")
            for name, v in d.items():
                i = index_of(name)
                if i not in cols:
                    cols[i] = np.zeros(n_frames)
                    names_for[i] = str(name)
                cols[i][f] = float(v)
    out = np.zeros((n_frames, motion.NUM_CHANNELS), dtype=np.float32)
    for i, col in cols.items():
        if not np.all(np.isfinite(col)):
            raise InputError(what, f"'{names_for[i]}' has a NaN or infinite value")
        out[:, i] = col
    return out


# ============================================================================ user video behaviour

USER_VIDEO_FEATURES: tuple[str, ...] = (
    "face_present",       # 0  1 while a face is tracked in this frame, else 0
    "face_x",             # 1  face-box centre x / frame width (0 = left edge); holds its last value without a face
    "face_y",             # 2  face-box centre y / frame height (0 = top); holds
    "face_size",          # 3  face-box height / frame height; holds
    "face_vx",            # 4  d face_x / dt in 1/s (head shake, turning); 0 without a face
    "face_vy",            # 5  d face_y / dt in 1/s (nods show here); 0 without a face
    "face_vsize",         # 6  d face_size / dt in 1/s (leaning in / out); 0 without a face
    "mouth_motion",       # 7  mean |grey difference to the previous frame| / 255 in the mouth region; 0 without a face
    "eye_motion",         # 8  same in the eye band (blinks, gaze shifts)
    "brow_motion",        # 9  same in the brow band (raised / furrowed brows)
    "face_motion",        # 10 same over the whole face box
    "frame_motion",       # 11 same over the whole frame (global motion, camera shake, gestures)
    "brightness_change",  # 12 (mean grey of this frame - of the previous frame) / 255 (lighting changes)
    "mouth_open",         # 13 height of the dark mouth region / face-box height (speaking, laughing); 0 without a face
    "smile",              # 14 width of the dark mouth region / face-box width (smile proxy); 0 without a face
    "face_brightness",    # 15 mean grey in the face box / 255; holds its last value
)
assert len(USER_VIDEO_FEATURES) == USER_VIDEO_DIM

# Sub-regions of the face box as (x0, x1, y0, y1) fractions of its width/height.
# The box is Haar-cascade shaped: about 1.4 face widths square, eyes at ~0.4 of its height, mouth at ~0.75.
_BROW_REGION = (0.18, 0.82, 0.22, 0.38)
_EYE_REGION = (0.18, 0.82, 0.36, 0.52)
_MOUTH_REGION = (0.28, 0.72, 0.62, 0.90)
_TEMPLATE_REGION = (0.2, 0.8, 0.25, 0.9)      # face interior used for tracking between detections
_HAAR_BOX_PER_FACE_WIDTH = 1.45


def _cv2():
    import cv2

    return cv2


class _HaarDetector:
    """OpenCV's Haar frontal-face cascade (OpenCV 4.x)."""

    name = "haar"

    def __init__(self):
        cv2 = _cv2()
        path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
        self._c = cv2.CascadeClassifier(path)
        if self._c.empty():
            raise RuntimeError(f"cannot load Haar cascade {path}")

    def __call__(self, grey: np.ndarray, rgb_small: np.ndarray,
                 near: np.ndarray | None = None) -> list[tuple[float, float, float, float]]:
        """Face boxes ``(x, y, w, h)``; with ``near`` (the tracked box) only around it, at similar scales."""
        H, W = grey.shape
        if near is not None:
            x, y, w, h = near
            side = max(w, h)
            x0, y0 = max(0, int(x - 0.5 * side)), max(0, int(y - 0.5 * side))
            x1, y1 = min(W, int(x + w + 0.5 * side) + 1), min(H, int(y + h + 0.5 * side) + 1)
            lo, hi = max(16, int(0.7 * side)), int(1.45 * side) + 1
            if x1 - x0 >= lo and y1 - y0 >= lo:
                boxes = self._c.detectMultiScale(grey[y0:y1, x0:x1], scaleFactor=1.1, minNeighbors=3,
                                                 minSize=(lo, lo), maxSize=(hi, hi))
                if len(boxes):
                    return [(float(bx + x0), float(by + y0), float(bw), float(bh)) for bx, by, bw, bh in boxes]
                return []
        m = max(16, int(0.2 * H))
        boxes = self._c.detectMultiScale(grey, scaleFactor=1.15, minNeighbors=3, minSize=(m, m))
        return [tuple(map(float, b)) for b in (boxes if len(boxes) else [])]


class _SkinDetector:
    """Fallback when this OpenCV has no Haar cascades (OpenCV 5 moved them out of the main package).

    Finds the largest face-shaped blob of skin colour (YCrCb range of Chai &
    Ngan), cuts the neck off (height at most 1.3 widths) and returns a
    Haar-shaped square box around it, so that the sub-region layout and the
    feature scales match the Haar path.
    """

    name = "skin"

    def __call__(self, grey: np.ndarray, rgb_small: np.ndarray,
                 near: np.ndarray | None = None) -> list[tuple[float, float, float, float]]:
        cv2 = _cv2()
        ycc = cv2.cvtColor(rgb_small, cv2.COLOR_RGB2YCrCb)
        y, cr, cb = ycc[..., 0], ycc[..., 1], ycc[..., 2]
        mask = ((cr >= 133) & (cr <= 173) & (cb >= 77) & (cb <= 127) & (y >= 40)).astype(np.uint8)
        k3 = np.ones((3, 3), np.uint8)
        opened = cv2.morphologyEx(mask, cv2.MORPH_OPEN, k3)
        mask = cv2.morphologyEx(opened, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        H, W = mask.shape
        best = None
        for i in range(1, n):
            x, yy, w, h, area = (int(v) for v in stats[i])
            if area < 0.01 * H * W or w < 8 or h < 8:
                continue
            h_face = min(h, int(round(1.3 * w)))
            if not 0.7 <= h_face / w <= 1.8:
                continue
            if area / float(w * h) < 0.35:
                continue
            blob = labels[yy:yy + h_face, x:x + w] == i
            # skin has one hue: a patchwork of skin-ish colours (a wall, a poster) does not
            if max(float(cr[yy:yy + h_face, x:x + w][blob].std()), float(cb[yy:yy + h_face, x:x + w][blob].std())) > 7.0:
                continue
            # a face has features: darker non-skin holes (eyes, brows) inside its upper part
            skin = opened[yy:yy + h_face, x:x + w].astype(bool)
            upper = (blob & ~skin)[: max(1, int(0.6 * h_face))]
            nh, hl, hs, _ = cv2.connectedComponentsWithStats(upper.astype(np.uint8), connectivity=4)
            holes = 0
            for j in range(1, nh):
                hx, hy, hw, hh, ha = (int(v) for v in hs[j])
                inside = hx > 0 and hy > 0 and hx + hw < w - 1
                if inside and ha >= max(2, 0.002 * w * h_face):
                    holes += 1
            if holes < 1:
                continue
            if best is None or area > best[4]:
                best = (x, yy, w, h_face, area)
        if best is None:
            return []
        x, yy, w, h, _ = best
        side = _HAAR_BOX_PER_FACE_WIDTH * w
        cx, cy = x + w / 2.0, yy + h / 2.0
        return [(cx - side / 2.0, cy - side / 2.0, side, side)]


def _default_detector():
    cv2 = _cv2()
    if hasattr(cv2, "CascadeClassifier"):
        try:
            return _HaarDetector()
        except Exception:
            pass
    return _SkinDetector()


class VideoBehaviourExtractor:
    """Per-session user behaviour features from webcam RGB frames (see :data:`USER_VIDEO_FEATURES`).

    Frames are analysed at ``analysis_width`` pixels wide (grey). The face
    detector (OpenCV's Haar frontal-face cascade on the whole frame while no
    face is tracked, around the tracked box otherwise; a skin-colour blob
    detector where the installed OpenCV has no cascades, see
    :attr:`detector_name`) runs every ``detect_every``-th frame; the face box
    follows the face by template matching (sub-pixel) on every frame, and
    detections re-initialise it when it drifted (centre off by > 20 % of the
    face size) or correct its size (when off by > 8 %), so detector jitter
    does not read as head motion. The box is smoothed (exponential,
    ``smoothing`` = weight of the new measurement). A face missed by
    ``max_misses`` detections in a row, or lost by the tracker on a frame
    where the detector misses it, is dropped. Deterministic: the same frames
    give the same features, however they are split into calls.

    Cost: about 1-2 ms per frame on one core (Haar at 160x120 every 5th frame).
    """

    def __init__(self, fps: int = FPS, *, detect_every: int = 5, analysis_width: int = 160,
                 smoothing: float = 0.6, max_misses: int = 2, detector: str = "auto"):
        self.fps = int(fps)
        self.detect_every = max(1, int(detect_every))
        self.analysis_width = int(analysis_width)
        self.smoothing = float(smoothing)
        self.max_misses = int(max_misses)
        if detector == "auto":
            self._detector = _default_detector()
        elif detector == "haar":
            self._detector = _HaarDetector()
        elif detector == "skin":
            self._detector = _SkinDetector()
        else:
            raise ValueError(f"detector must be 'auto', 'haar' or 'skin', got {detector!r}")
        self.reset()

    @property
    def detector_name(self) -> str:
        return self._detector.name

    def reset(self) -> None:
        self._frame_index = 0
        self._prev_grey: np.ndarray | None = None
        self._raw: np.ndarray | None = None        # tracked (x, y, w, h) in analysis pixels
        self._box: np.ndarray | None = None        # smoothed box: what the features are measured on
        self._template: np.ndarray | None = None
        self._misses = 0
        self._present = False
        self._force_detect = False
        self._geom = np.array([0.5, 0.5, 0.0], dtype=np.float64)   # last face_x, face_y, face_size
        self._prev_geom: np.ndarray | None = None
        self._face_brightness = 0.0

    # ------------------------------------------------------------------ helpers
    def _small(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cv2 = _cv2()
        H, W = rgb.shape[:2]
        w = min(self.analysis_width, W)
        h = max(1, int(round(H * w / W)))
        small = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA) if (w, h) != (W, H) else rgb
        small = np.ascontiguousarray(small)
        return small, cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)

    @staticmethod
    def _clip_box(box, W, H):
        x, y, w, h = box
        x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
        x1, y1 = min(W, int(round(x + w))), min(H, int(round(y + h)))
        return x0, y0, x1, y1

    def _region(self, box, frac, W, H):
        x, y, w, h = box
        fx0, fx1, fy0, fy1 = frac
        return self._clip_box((x + fx0 * w, y + fy0 * h, (fx1 - fx0) * w, (fy1 - fy0) * h), W, H)

    def _track(self, grey: np.ndarray) -> np.ndarray | None:
        """Template-match the last face patch near the current box; the moved box or None."""
        cv2 = _cv2()
        if self._template is None or self._raw is None:
            return None
        H, W = grey.shape
        th, tw = self._template.shape
        x, y, w, h = self._raw
        mx, my = 0.3 * w + 2, 0.3 * h + 2
        sx0, sy0 = max(0, int(x - mx)), max(0, int(y - my))
        sx1, sy1 = min(W, int(x + w + mx) + 1), min(H, int(y + h + my) + 1)
        if sx1 - sx0 < tw + 1 or sy1 - sy0 < th + 1:
            return None
        res = cv2.matchTemplate(grey[sy0:sy1, sx0:sx1], self._template, cv2.TM_CCOEFF_NORMED)
        _, score, _, loc = cv2.minMaxLoc(res)
        if not np.isfinite(score) or score < 0.5:
            return None
        # sub-pixel peak (parabola through the neighbours) so slow motion is not quantised to pixels
        px, py = float(loc[0]), float(loc[1])
        cx, cy = loc
        if 0 < cx < res.shape[1] - 1:
            l, c, r = res[cy, cx - 1], res[cy, cx], res[cy, cx + 1]
            d = l - 2 * c + r
            px += float(np.clip(0.5 * (l - r) / d, -0.5, 0.5)) if d < 0 else 0.0
        if 0 < cy < res.shape[0] - 1:
            u, c, b = res[cy - 1, cx], res[cy, cx], res[cy + 1, cx]
            d = u - 2 * c + b
            py += float(np.clip(0.5 * (u - b) / d, -0.5, 0.5)) if d < 0 else 0.0
        return np.array([sx0 + px - self._tpl_off[0], sy0 + py - self._tpl_off[1], w, h], dtype=np.float64)

    def _set_template(self, grey: np.ndarray, box: np.ndarray) -> None:
        """Remember the face interior (inside the box: less background, cheaper to match)."""
        H, W = grey.shape
        bx, by, bw, bh = box
        inner = (bx + _TEMPLATE_REGION[0] * bw, by + _TEMPLATE_REGION[2] * bh,
                 (_TEMPLATE_REGION[1] - _TEMPLATE_REGION[0]) * bw, (_TEMPLATE_REGION[3] - _TEMPLATE_REGION[2]) * bh)
        x0, y0, x1, y1 = self._clip_box(inner, W, H)
        if x1 - x0 >= 8 and y1 - y0 >= 8:
            self._template = np.ascontiguousarray(grey[y0:y1, x0:x1])
            self._tpl_off = (x0 - box[0], y0 - box[1])
        else:
            self._template = None

    # ------------------------------------------------------------------ main
    def process(self, frames: np.ndarray) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 RGB (or one ``(H, W, 3)`` frame) -> ``(N, 16)`` float32."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise InputError("user video", f"frames must be uint8 (N, H, W, 3) RGB, got {frames.dtype} {frames.shape}")
        out = np.zeros((frames.shape[0], USER_VIDEO_DIM), dtype=np.float32)
        for n in range(frames.shape[0]):
            out[n] = self._process_one(frames[n])
        return out

    def _process_one(self, rgb: np.ndarray) -> np.ndarray:
        small, grey = self._small(rgb)
        H, W = grey.shape
        prev = self._prev_grey
        if prev is not None and prev.shape != grey.shape:
            prev = None
            self._template = None
        diff = np.abs(grey.astype(np.int16) - prev.astype(np.int16)).astype(np.float32) if prev is not None else None
        feats = np.zeros(USER_VIDEO_DIM, dtype=np.float64)

        # --- face box. Detection (every k-th frame, while lost, or after a tracking failure) finds
        # the face; template matching follows it. On detection frames a detection that agrees with
        # the tracked box (centre within 20 % of the face size) only corrects the size, and only
        # when it differs by more than 8 %: Haar boxes jitter by a pixel or two from frame to
        # frame, which would otherwise show up as head motion.
        measured = None
        reinit = False
        detect_now = (self._frame_index % self.detect_every == 0) or not self._present or self._force_detect
        self._force_detect = False
        if detect_now:
            near = self._raw if (self._present and self._raw is not None) else None
            boxes = self._detector(grey, small, near)
            if boxes:
                if near is not None:
                    c = near[:2] + near[2:] / 2
                    boxes.sort(key=lambda bb: (bb[0] + bb[2] / 2 - c[0]) ** 2 + (bb[1] + bb[3] / 2 - c[1]) ** 2)
                else:
                    boxes.sort(key=lambda bb: -bb[2] * bb[3])
                det = np.array(boxes[0], dtype=np.float64)
                self._misses = 0
                tracked = self._track(grey) if near is not None else None
                if tracked is None:
                    measured, reinit = det, True
                else:
                    shift = np.abs((det[:2] + det[2:] / 2) - (tracked[:2] + tracked[2:] / 2)).max()
                    if shift > 0.2 * tracked[3]:
                        measured, reinit = det, True
                    else:
                        measured = tracked
                        if abs(det[3] - tracked[3]) > 0.08 * tracked[3]:
                            grow = det[2:] - tracked[2:]
                            measured = np.concatenate([tracked[:2] - grow / 2, det[2:]])
                            self._tpl_off = (self._tpl_off[0] + grow[0] / 2, self._tpl_off[1] + grow[1] / 2)
            elif self._present:
                # missed detection (turned head, motion blur): follow the face for a few more tries
                self._misses += 1
                measured = self._track(grey) if self._misses <= self.max_misses else None
                if measured is None:
                    self._present = False
        elif self._present:
            measured = self._track(grey)
            if measured is None:
                self._force_detect = True   # keep the box this frame, re-detect on the next one

        if measured is not None:
            if reinit:
                self._set_template(grey, measured)
            self._raw = measured
            if not self._present or self._box is None:
                self._box = measured.copy()
                self._prev_geom = None
            else:
                self._box = self._box + self.smoothing * (measured - self._box)
            self._present = True

        if self._present and self._box is not None:
            x, y, w, h = self._box
            geom = np.array([(x + w / 2) / W, (y + h / 2) / H, h / H])
            self._geom = geom
            feats[0] = 1.0
            if self._prev_geom is not None:
                feats[4:7] = (geom - self._prev_geom) * self.fps
            self._prev_geom = geom
            fx0, fy0, fx1, fy1 = self._clip_box(self._box, W, H)
            if fx1 > fx0 and fy1 > fy0:
                face = grey[fy0:fy1, fx0:fx1]
                self._face_brightness = float(face.mean()) / 255.0
                if diff is not None:
                    for col, frac in ((7, _MOUTH_REGION), (8, _EYE_REGION), (9, _BROW_REGION)):
                        rx0, ry0, rx1, ry1 = self._region(self._box, frac, W, H)
                        if rx1 > rx0 and ry1 > ry0:
                            feats[col] = float(diff[ry0:ry1, rx0:rx1].mean()) / 255.0
                    feats[10] = float(diff[fy0:fy1, fx0:fx1].mean()) / 255.0
                # dark mouth region: height (openness) and width (smile proxy)
                rx0, ry0, rx1, ry1 = self._region(self._box, _MOUTH_REGION, W, H)
                if rx1 > rx0 and ry1 > ry0:
                    mouth = grey[ry0:ry1, rx0:rx1]
                    dark = mouth < 0.7 * float(np.median(face))
                    rows = np.flatnonzero(dark.sum(axis=1) >= 2)
                    cols = np.flatnonzero(dark.sum(axis=0) >= 2)
                    if rows.size:
                        feats[13] = (rows[-1] - rows[0] + 1) / h
                    if cols.size:
                        feats[14] = (cols[-1] - cols[0] + 1) / w
        else:
            self._prev_geom = None
        if not self._present:
            feats[0] = 0.0
        feats[1:4] = self._geom
        if diff is not None:
            feats[11] = float(diff.mean()) / 255.0
            feats[12] = (float(grey.mean()) - float(prev.mean())) / 255.0
        feats[15] = self._face_brightness
        self._prev_grey = grey
        self._frame_index += 1
        return feats.astype(np.float32)

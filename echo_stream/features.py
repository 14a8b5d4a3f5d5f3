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

The user's face
---------------
Client-side ARKit blendshapes are mapped into the motion vector by
:func:`blendshape_frames`; the user's webcam video goes through the bundled
face tracker (:mod:`echo_stream.face`) into the same 58-channel space, so the
model sees the user's face one way whichever side tracked it.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from . import motion
from .config import (AUDIO_FEAT_DIM, FPS, MEL_BINS, MEL_HOP, MELS_PER_FRAME, SAMPLE_RATE,
                     SAMPLES_PER_FRAME)
from .errors import InputError

__all__ = [
    "AUDIO_FEATURE_COLUMNS", "AUDIO_LOOKAHEAD_SAMPLES", "AudioFeatureExtractor",
    "offline_audio_features", "num_video_frames", "warmup",
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

"""The face tracker: frames in, head pose and ARKit blendshape estimates out.

Per frame: where the previous frame's mesh was, read the mesh again (the
region follows the face: MediaPipe's tracking rule); when there is no face yet,
or the mesh's presence score falls below 0.5, run the detector on the whole
frame first (the face with the largest area times score wins). Then the iris points, the measures of
:mod:`echo_stream.face.expressions`, and — against the person's neutral — the
58-channel motion vector of :mod:`echo_stream.motion`.

Two ways to use it:

* **streaming** (:meth:`FaceTracker.process`, the user's webcam in a
  session): the neutral is the statistic of :func:`expressions.neutral_of` over
  the last 20 s of this session's face frames (every second frame), so it
  settles within the first seconds and follows lighting and seating changes;
  outputs pass a One-Euro filter. The first frame with a face reads as neutral.
* **offline** (:func:`track_frames`, ``echo-stream track`` and
  ``preprocess``): the neutral comes from the whole video, frames without a
  face up to 0.5 s are bridged by interpolation (longer gaps are neutral with
  ``face_present = 0``), then the same filter runs.

Deterministic: the same frames give the same numbers, however they are split
into calls. CPU by default (LiteRT, one thread each), about 3-5 ms per frame.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .. import motion
from ..errors import InputError
from . import expressions as ex
from . import roi as roimod
from .detector import FaceDetector
from .filters import OneEuro
from .mesh import MESH_ROI_SCALE, PRESENCE_THRESHOLD, FaceMesh, Iris, roi_from_mesh

#: One-Euro settings of the outputs (Hz, and Hz per unit/s of speed). The brows are read from small
#: points of the eye model and jitter most: a lower resting cut-off for them (the speed term still
#: lets a quick raise through).
FILTER_BETA = 0.3
FILTER_MIN_CUTOFF = np.full(motion.NUM_CHANNELS, 1.0)
FILTER_MIN_CUTOFF[motion.REGION_SLICES["brows"]] = 0.5
#: Streaming neutral: statistics over this many face frames, taking every ``_NEUTRAL_STEP``-th.
_NEUTRAL_SAMPLES = 250
_NEUTRAL_STEP = 2
#: Mesh reads of a frame where the face was (re)detected.
_SETTLE_READS = 3
#: Offline: longest run of face-less frames bridged by interpolation.
MAX_BRIDGE_S = 0.5


@dataclass
class Observation:
    """What the models saw in one frame (no calibration, no filtering)."""

    present: bool
    confidence: float                       # the mesh's face-presence probability (0 without a face)
    points: np.ndarray | None = None        # (468, 3) image pixels
    eyes: np.ndarray | None = None          # (2, 19, 2) image pixels per eye: iris centre, eye contour, brow
    measures: np.ndarray | None = None      # (len(expressions.MEASURES),)


@dataclass
class Track:
    """A tracked clip: per-frame motion, presence and confidence (and the raw observations)."""

    motion: np.ndarray                      # (N, 58) float32
    present: np.ndarray                     # (N,) bool: a face was found in this frame
    confidence: np.ndarray                  # (N,) float32
    neutral: np.ndarray | None = None       # (len(MEASURES),) the person's neutral measures
    observations: list[Observation] = field(default_factory=list, repr=False)


class FaceModels:
    """The loaded models (detector, mesh, eyes), shareable by the trackers of many sessions in one thread."""

    def __init__(self, *, iris: bool = True, threads: int = 1):
        self.detector = FaceDetector(threads=threads)
        self.mesh = FaceMesh(threads=threads)
        self.iris = Iris(threads=threads) if iris else None


_SHARED: dict[int, FaceModels] = {}


def shared_models() -> FaceModels:
    """This thread's :class:`FaceModels`, loaded on first use (interpreters are not shared across threads)."""
    import threading

    key = threading.get_ident()
    if key not in _SHARED:
        _SHARED[key] = FaceModels()
    return _SHARED[key]


class FaceTracker:
    """One face stream's tracker: its region, neutral and filter; the models may be shared (``models``)."""

    def __init__(self, fps: int = motion.FPS, *, iris: bool = True, smooth: bool = True, threads: int = 1,
                 models: FaceModels | None = None):
        self.fps = int(fps)
        self.models = models or FaceModels(iris=iris, threads=threads)
        self._detector = self.models.detector
        self._mesh = self.models.mesh
        self._iris = self.models.iris
        self.smooth = bool(smooth)
        self.reset()

    def reset(self) -> None:
        """Forget the face, the neutral and the filter (a new session)."""
        self._roi: roimod.Roi | None = None
        self._history: deque[np.ndarray] = deque(maxlen=_NEUTRAL_SAMPLES)
        self._neutral: np.ndarray | None = None     # of the history: changes only when a sample is added
        self._face_frames = 0
        self._filter = OneEuro(self.fps, FILTER_MIN_CUTOFF, FILTER_BETA)
        self._last = motion.neutral_motion(1)[0]

    # ------------------------------------------------------------------ perception
    def _detect_roi(self, rgb: np.ndarray) -> roimod.Roi | None:
        dets = self._detector.detect(rgb)
        if not dets:
            return None
        d = dets[0]
        corners = d.box.reshape(2, 2)
        left, right = d.eyes
        return roimod.roi_from_points(corners, left, right, MESH_ROI_SCALE, centre=corners.mean(0))

    def observe(self, rgb: np.ndarray) -> Observation:
        """Run the models on one ``(H, W, 3)`` uint8 RGB frame, following the face from the last frame."""
        rgb = _check_frame(rgb)
        result = None
        if self._roi is not None:
            result = self._mesh.run(rgb, [self._roi])[0]
            if result.presence < PRESENCE_THRESHOLD:
                result = None
        if result is None:
            roi = self._detect_roi(rgb)
            if roi is not None:
                result = self._mesh.run(rgb, [roi])[0]
                if result.presence < PRESENCE_THRESHOLD:
                    result = None
                else:   # read again from the mesh's own region, as every following frame will be, until
                    for _ in range(_SETTLE_READS):    # it settles: a first frame read from the detector's
                        again = self._mesh.run(rgb, [roi_from_mesh(result.points)])[0]   # box sits apart
                        if again.presence < PRESENCE_THRESHOLD:
                            break
                        result = again
        if result is None:
            self._roi = None
            return Observation(False, 0.0)
        self._roi = roi_from_mesh(result.points)
        eyes = self._iris.run(rgb, result.points) if self._iris is not None else None
        return Observation(True, result.presence, result.points, eyes, ex.measures(result.points, eyes))

    def landmarks(self, rgb: np.ndarray) -> Observation:
        """One still image: detect, then the mesh settled from its own region (what :meth:`observe` does
        on a frame where the face is found anew); the tracker's region is left as it was before."""
        roi, self._roi = self._roi, None
        try:
            return self.observe(rgb)
        finally:
            self._roi = roi

    # ------------------------------------------------------------------ streaming
    def process(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, H, W, 3)`` uint8 RGB -> ``(N, 58)`` float32 motion and ``(N,)`` float32 confidence.

        Frames without a face hold the last estimate with confidence 0.
        """
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        out = np.zeros((len(frames), motion.NUM_CHANNELS), np.float32)
        conf = np.zeros(len(frames), np.float32)
        for i, frame in enumerate(frames):
            obs = self.observe(frame)
            if obs.present:
                if self._face_frames % _NEUTRAL_STEP == 0:
                    self._history.append(obs.measures)
                    self._neutral = ex.neutral_of(np.stack(self._history))
                self._face_frames += 1
                raw = ex.blendshapes(obs.measures, self._neutral)[0]
                self._last = (self._filter(raw) if self.smooth else raw).astype(np.float32)
                conf[i] = obs.confidence
            out[i] = self._last
        return out, conf


def _check_frame(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise InputError("video frame", f"expected (H, W, 3) uint8 RGB, got {rgb.dtype} {rgb.shape}")
    return rgb


def track_frames(frames, tracker: FaceTracker | None = None, fps: int = motion.FPS, progress=None,
                 keep_observations: bool = False) -> Track:
    """Track a whole clip offline (see the module notes): an iterable of RGB frames -> :class:`Track`."""
    tracker = tracker or FaceTracker(fps)
    tracker.reset()
    obs: list[Observation] = []
    rows: list[np.ndarray | None] = []          # per frame: the measures only (memory: 27 numbers a frame)
    confidence_list: list[float] = []
    for frame in frames:
        o = tracker.observe(frame)
        rows.append(o.measures)
        confidence_list.append(o.confidence)
        if keep_observations:
            obs.append(o)
        if progress is not None:
            progress(1)
    n = len(rows)
    present = np.array([r is not None for r in rows], bool)
    confidence = np.array(confidence_list, np.float32)
    out = motion.neutral_motion(n)
    if not present.any():
        return Track(out, present, confidence, None, obs)
    meas = np.zeros((n, len(ex.MEASURES)))
    meas[present] = np.stack([r for r in rows if r is not None])
    neutral = ex.neutral_of(meas[present])
    raw = ex.blendshapes(meas, neutral)
    # bridge short gaps by interpolation between the frames around them; longer gaps stay neutral
    bridge = int(round(MAX_BRIDGE_S * fps))
    idx = np.flatnonzero(present)
    filled = present.copy()
    for a, b in zip(idx[:-1], idx[1:]):
        if 1 < b - a <= bridge + 1:
            t = (np.arange(a + 1, b) - a) / (b - a)
            raw[a + 1:b] = (1 - t)[:, None] * raw[a] + t[:, None] * raw[b]
            filled[a + 1:b] = True
    raw[~filled] = 0.0
    if tracker.smooth:
        filt = OneEuro(fps, FILTER_MIN_CUTOFF, FILTER_BETA)
        for i in range(n):
            if filled[i]:
                raw[i] = filt(raw[i])
            else:
                filt.reset()
    out = motion.clamp_motion(raw).astype(np.float32)
    return Track(out, present, confidence, neutral, obs)


def track_video(path, *, tracker=None, fps: int = motion.FPS, num_frames: int | None = None,
                progress: bool = False, keep_observations: bool = False) -> Track:
    """Track a video file on the ``fps`` grid (PyAV decode; display rotation applied); at most ``num_frames``.

    ``tracker``: a :class:`FaceTracker`, a callable making one (called once the file is known to hold
    video, so a bad file is refused before any model loads), or None for a new default tracker.

    Raises :class:`~echo_stream.errors.InputError` for a file that is missing, not media, has no
    video stream or no decodable frame.
    """
    from .. import media

    info = media.probe(path)
    if not info.has_video:
        raise InputError(path, "has no video stream: the face tracker needs video")
    if tracker is not None and not isinstance(tracker, FaceTracker):
        tracker = tracker()
    total = int(round((info.duration or 0.0) * fps)) or None
    if num_frames is not None:
        total = num_frames if total is None else min(total, num_frames)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="frame", desc="tracking", dynamic_ncols=True)

    def frames():
        for i, _, rgb in media.iter_video_frames(path, fps=fps):
            if num_frames is not None and i >= num_frames:
                break
            yield rgb

    try:
        result = track_frames(frames(), tracker, fps, bar.update if bar else None, keep_observations)
    finally:
        if bar is not None:
            bar.close()
    if len(result.present) == 0:
        raise InputError(path, "video stream has no decodable frames")
    return result

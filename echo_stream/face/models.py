"""The three MediaPipe face models, run by LiteRT on the CPU.

Files (``echo_stream/assets/face/``, Apache-2.0, see ``assets/ATTRIBUTION.md``):

* ``face_detection_short_range.tflite`` — BlazeFace, 128x128 input in [-1, 1],
  896 anchors; faces within about 2 m (webcams, talking heads).
* ``face_detection_full_range.tflite`` — BlazeFace, 192x192, 2304 anchors;
  small faces far from the camera (the fallback when short range finds none).
* ``face_landmark.tflite`` — the 468-point face mesh, 192x192 input in [0, 1];
  points in crop pixels (x, y, and a depth z on the scale of x) and a face-presence logit.
* ``iris_landmark.tflite`` — 64x64 crop of one (left-looking) eye in [0, 1]:
  71 eye-contour points and 5 iris points (centre first).

:class:`Model` wraps one interpreter; its ``run`` takes a batch of crops and
resizes the input tensor when the batch size changes (all four models accept
any batch size): both eyes are one call. Frames of one face are read one after
the other (each frame's crop comes from the previous frame's mesh). An
interpreter is not thread-safe: a :class:`~echo_stream.face.tracker.FaceModels`
is shared by the trackers of one thread (a stage's sessions), never across threads.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from pathlib import Path

import numpy as np

MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "face"
DETECTOR_SHORT = "face_detection_short_range"
DETECTOR_FULL = "face_detection_full_range"
MESH = "face_landmark"
IRIS = "iris_landmark"


@functools.lru_cache(maxsize=None)
def _model_bytes(name: str) -> bytes:
    path = MODEL_DIR / f"{name}.tflite"
    if not path.is_file():
        raise FileNotFoundError(f"face model {path} is missing: reinstall echo-stream (the .tflite files ship in "
                                f"echo_stream/assets/face)")
    return path.read_bytes()


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:  # pragma: no cover - a broken install
        raise ImportError("the face tracker needs LiteRT: pip install ai-edge-litert "
                          "(a dependency of echo-stream; reinstall with `make setup`)") from e
    return Interpreter


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 briefly: LiteRT's C++ logs an INFO line on creating its CPU delegate,
    and no environment variable turns that off. Python-level writes are flushed first; the window
    is the interpreter's construction only (models load once per process and tracker: at a stage's
    set-up, a worker's start, a command's start), and whatever another thread writes to stderr in
    those milliseconds is lost too."""
    import sys

    with _STDERR_LOCK:
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):   # no usable stderr: nothing to silence
            yield
            return
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, 2)
            finally:
                os.close(devnull)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The models' logits -> probabilities (clipped: exp of a large logit would overflow float32)."""
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -80, 80)))


class Model:
    """One LiteRT model: ``run(x)`` with ``x`` float32 ``(N, H, W, 3)`` -> list of output arrays (N, ...)."""

    def __init__(self, name: str, threads: int = 1):
        interp_cls = _interpreter_class()
        self.name = name
        with _quiet_native_stderr():
            self._it = interp_cls(model_content=_model_bytes(name), num_threads=max(1, int(threads)))
            self._it.allocate_tensors()
        inp = self._it.get_input_details()[0]
        self._input = inp["index"]
        self.input_size = int(inp["shape"][1])
        # outputs sorted by their last dimension, largest first: (points/boxes, scores)
        outs = self._it.get_output_details()
        self._outputs = [d["index"] for d in sorted(outs, key=lambda d: -int(np.prod(d["shape"][1:])))]
        self._batch = 1

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[0]
        if n == 0:
            return []
        if n != self._batch:
            self._it.resize_tensor_input(self._input, [n, self.input_size, self.input_size, 3])
            self._it.allocate_tensors()
            self._batch = n
        self._it.set_tensor(self._input, x)
        self._it.invoke()
        return [self._it.get_tensor(i).reshape(n, -1).copy() for i in self._outputs]

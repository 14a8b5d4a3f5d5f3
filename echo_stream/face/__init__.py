"""Face perception: the bundled face tracker (MediaPipe face mesh on LiteRT) and what is built on it.

* :class:`~echo_stream.face.tracker.FaceTracker` — frames -> 58-channel motion (ARKit blendshape
  estimates + head pose), streaming (:meth:`process`) or offline (:func:`track_frames`,
  :func:`track_video`); see :mod:`echo_stream.face.tracker`.
* :mod:`echo_stream.face.expressions` — which channels are estimated and how.
* :mod:`echo_stream.face.portrait` — the renderer's landmarks of a portrait from its mesh.
* :class:`VideoMotionTracker` — the motion targets ``preprocess`` makes from avatar video.
* ``echo-stream track`` — :mod:`echo_stream.face.cli`.

Modules load lazily: importing :mod:`echo_stream.face` loads no model.
"""
from __future__ import annotations

#: Least share of frames with a face for a video to give motion targets.
MIN_FACE_SHARE = 0.5


class VideoMotionTracker:
    """Motion targets from a whole avatar video (``preprocess``'s default tracker).

    ``track_video(path, num_frames) -> (motion (num_frames, 58), frames tracked)``; the neutral is
    taken over the whole video. A video whose face is found in fewer than :data:`MIN_FACE_SHARE`
    of its frames raises :class:`~echo_stream.errors.InputError` (the conversation is quarantined
    with that reason). Frames past the video's end hold its last values.
    """

    def __init__(self):
        from .tracker import FaceTracker, shared_models

        self._tracker = FaceTracker(models=shared_models())

    def track_video(self, path, num_frames: int):
        import numpy as np

        from .. import motion
        from ..errors import InputError
        from .tracker import track_video

        tr = track_video(path, tracker=self._tracker, num_frames=num_frames)
        share = float(tr.present.mean())
        if share < MIN_FACE_SHARE:
            raise InputError(path, f"no usable face: the face tracker found a face in {share:.0%} of the video's "
                                   f"frames (need {MIN_FACE_SHARE:.0%})")
        out = np.zeros((num_frames, motion.NUM_CHANNELS), np.float32)
        used = min(len(tr.motion), num_frames)
        out[:used] = tr.motion[:used]
        out[used:] = out[used - 1]
        return out, used

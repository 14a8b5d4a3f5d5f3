"""Batched warping renderer: animate one portrait photo from per-frame motion coefficients.

Overview
--------
``load_portrait(path)`` reads a photo (png/jpeg/..., any size, EXIF orientation
honoured) and places the face on it: from a *landmarks sidecar* (see below),
or, without one, from the bundled face tracker's 468-point mesh
(:mod:`echo_stream.face.portrait`: eyes, lids, corners, brows, nose tip, mouth
corners, lips, chin and jaw outline where they are), falling back to
Viola-Jones Haar cascades (frontal face + eyes, ``cv2.CascadeClassifier``,
:mod:`.haar`) with canonical face proportions when the mesh finds no face.

One concern a file: :mod:`.portrait` (reading, placement, the crop),
:mod:`.landmarks` (the template, face units, sidecars), :mod:`.haar` (the
fallback placement), :mod:`.fields` (expression fields), :mod:`.renderer`
(the renderer).

``PortraitRenderer(portrait, size=(256, 256))`` crops a square around the face
(face ~50% of the crop height, eyes level at 44% of the height, edges
replicated where the crop leaves the photo), resizes it to the working size
and precomputes everything that depends only on the portrait:

* a basis of dense backward flows, one per motion channel that moves facial
  geometry (jaw, lips, mouth corners, eyelids, brows, cheeks, nose), built from
  sparse control displacements with smooth Gaussian / lip-line-split influence
  maps, restricted to the face's bounding box;
* per-frame: ``flow = motion @ basis`` (one matmul), one ``grid_sample`` of the
  face box, then appearance layers that warping cannot produce (mouth interior
  with a teeth hint revealed exactly where the warped lips part; eyelid skin
  and lash line covering the eyes with ``eyeBlink``), blended with soft masks;
* head pose (roll, yaw/pitch as depth-weighted shifts with foreshortening,
  translation, scale) as a second sampling grid built by one matmul from
  precomputed maps weighted by a soft head-and-neck mask, so the background
  (image corners) stays put, and one full-frame ``grid_sample``.

``render(motion)`` takes an ``(N, 58)`` array in :mod:`echo_stream.motion`
order and returns ``(N, H, W, 3)`` uint8 frames. Everything per frame is torch
and runs on CPU or CUDA.

Conventions
-----------
* ``...Left`` / ``...Right`` channels follow ARKit: the *subject's* left, which
  is the image right of an unmirrored photo.
* ``headYaw > 0`` turns the face toward the image right, ``headPitch > 0``
  tilts it down (nose toward the chin), ``headRoll > 0`` tilts the head
  clockwise in the image (the top moves to the image right). ``headTx > 0``
  moves right, ``headTy > 0`` moves down, ``headTz > 0`` moves closer (larger);
  translations are in units of the face height (hairline to chin).

Landmarks sidecar
-----------------
A JSON file, picked up automatically when ``<image>.landmarks.json`` (e.g.
``me.jpg.landmarks.json``) sits beside the image, or passed explicitly as
``landmarks_path``. Coordinates are pixels of the image as stored (after EXIF
orientation), x to the right, y down::

    {
      "left_eye":    [x, y],   # eye centre on the image-left side
      "right_eye":   [x, y],   # eye centre on the image-right side
      "nose":        [x, y],   # nose tip
      "mouth_left":  [x, y],   # mouth corner on the image-left side
      "mouth_right": [x, y],   # mouth corner on the image-right side
      "chin":        [x, y]    # optional: lowest point of the chin
    }

or ``{"points68": [[x, y], ... 68 points]}`` in the common iBUG-300W / dlib
68-point order (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67),
which gives the most precise placement. Both forms may be combined (the five
named points then win). Any extra keys are ignored. Left/right are taken from
the image: a file that names them from the subject's side is swapped back.
Every point must lie inside the image and the nose, mouth and chin below the
eyes; otherwise :class:`~echo_stream.errors.InputError` names the bad key.

API
---
``load_portrait(path_or_bytes, landmarks_path=None) -> Portrait`` (detections
are cached per image content); ``crop_portrait(portrait, size) -> FaceCrop``;
``PortraitRenderer(portrait_or_path, size=(256, 256), device="cpu")`` with
``.render(motion) -> uint8 (N, H, W, 3)``, ``.render_torch(motion) -> float32
(N, 3, H, W)`` in 0..255 on the device, ``.crop`` (the FaceCrop). Sizes are
(height, width), even, 64..4096. ``SAMPLE_PORTRAIT`` is the bundled photo.
"""
from __future__ import annotations

from .landmarks import LANDMARK_NAMES
from .paths import ASSETS_DIR, SAMPLE_PORTRAIT
from .portrait import EYE_LINE, FACE_FRACTION, DecodedImage, FaceCrop, Portrait, crop_portrait, load_portrait
from .renderer import PortraitRenderer

__all__ = ["ASSETS_DIR", "EYE_LINE", "FACE_FRACTION", "FaceCrop", "LANDMARK_NAMES", "Portrait", "PortraitRenderer",
           "SAMPLE_PORTRAIT", "crop_portrait", "load_portrait", "DecodedImage"]

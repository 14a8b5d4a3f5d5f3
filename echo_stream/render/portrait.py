"""Portraits: reading a photo, placing its face (mesh, Haar fallback, or a sidecar), cutting the working crop."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import haar
from .landmarks import (
    _HAIRLINE_Y,
    _frame,
    _to_face,
    complete_landmarks,
    parse_sidecar,
    refine_mouth_line,
)
from .paths import SAMPLE_PORTRAIT  # noqa: F401  (re-exported)


@dataclass
class Portrait:
    """One reference photo and where its face is.

    ``image`` is (H, W, 3) uint8 RGB as stored (EXIF orientation applied); ``landmarks`` maps each
    name of :data:`LANDMARK_NAMES` to (2,) float32 pixel coordinates (``"jaw"``: (11, 2), image-left
    temple over the chin to the image-right temple); ``source`` is ``"sidecar"`` or ``"detected"``.
    """

    image: np.ndarray
    landmarks: dict[str, np.ndarray]
    source: str
    path: str | None = None
    face_box: np.ndarray | None = None   # (x, y, w, h) of the detected face, when detected
    detector: str | None = None          # "mesh" or "haar" when detected

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    def crop(self, size: int | tuple[int, int] = (256, 256)) -> "FaceCrop":
        """The face-centred crop at working size ``size`` (see :func:`crop_portrait`)."""
        return crop_portrait(self, size)


@dataclass
class FaceCrop:
    """The portrait cropped around its face at the working size; landmarks in crop pixels."""

    image: np.ndarray                  # (H, W, 3) uint8
    landmarks: dict[str, np.ndarray]
    matrix: np.ndarray                 # (2, 3): image pixel -> crop pixel
    iod: float                         # inter-ocular distance in crop pixels
    face_height: float                 # hairline-to-chin in crop pixels


#: Largest portrait accepted (checked from the image header, before decoding).
MAX_PORTRAIT_SIDE = 8192
MAX_PORTRAIT_PIXELS = 40_000_000
#: Formats a portrait may be in (PIL's names; MPO is the multi-picture JPEG of many phones).
PORTRAIT_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "TIFF")


@dataclass
class DecodedImage:
    """A portrait already decoded (and checked) elsewhere, e.g. at the server's edge: ``rgb`` (H, W, 3)
    uint8, ``digest`` identifies its content (cache key), ``label`` names it in errors."""

    rgb: np.ndarray
    digest: str
    label: str = "portrait"


def jpeg_draft_scale(size: tuple[int, int], max_side: int | None) -> int:
    """The 1/n scale (1, 2, 4 or 8) at which libjpeg would decode a JPEG of ``size`` for ``max_side``:
    the smallest image that still has at least ``max_side`` pixels on its long side (and 32 on its short one)."""
    if not max_side:
        return 1
    n = 1
    while n < 8 and max(size) / (2 * n) >= max_side and min(size) / (2 * n) >= 32:
        n *= 2
    return n


def _decode_image(data: bytes, what: str, max_side: int | None = None) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB (EXIF orientation applied, alpha over white).

    ``max_side``: scale the result down to at most this many pixels on its long side (a JPEG is then
    decoded at 1/2, 1/4 or 1/8 scale by libjpeg when that still leaves enough pixels: cheaper).
    """
    import io
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise InputError(what, "empty file, expected a portrait image (png/jpeg)")
    try:
        with warnings.catch_warnings():
            # Pillow warns (on stderr) about images between its two bomb limits; the check below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # only the formats a portrait comes in: Pillow would otherwise hand EPS to Ghostscript, etc.
            # (MPO, a phone's multi-picture JPEG, opens through the JPEG plugin: not an opener of its own)
            im = Image.open(io.BytesIO(data), formats=[f for f in PORTRAIT_FORMATS if f != "MPO"])
        with im:
            # the size comes from the header: refuse a huge image before decoding a pixel of it (a
            # 12000x12000 PNG of a few hundred KB would cost the shared render actor seconds and GBs)
            w, h = im.size
            if w * h > MAX_PORTRAIT_PIXELS or max(w, h) > MAX_PORTRAIT_SIDE:
                raise InputError(what, f"image is {w}x{h} pixels; a portrait may have at most "
                                       f"{MAX_PORTRAIT_SIDE} pixels a side and {MAX_PORTRAIT_PIXELS // 10**6} "
                                       f"megapixels: scale it down")
            n = jpeg_draft_scale((w, h), max_side) if im.format in ("JPEG", "MPO") else 1
            if n > 1:
                im.draft("RGB", (-(-w // n), -(-h // n)))
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:          # unreadable EXIF: keep the pixels as stored  # noqa: BLE001
                im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                # High-bit-depth grey: scale to 8 bits instead of letting convert() clip.
                a = np.asarray(im, dtype=np.float64)
                hi = 65535.0 if im.mode != "F" and a.max() > 255 else max(float(a.max()), 1.0)
                if im.mode == "F" and a.max() <= 1.0:
                    hi = 1.0
                g = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
                arr = np.repeat(g[..., None], 3, axis=2)
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except UnidentifiedImageError:
        raise InputError(what, "not a supported image (expected png, jpeg, webp, bmp or tiff)") from None
    except Image.DecompressionBombError as e:
        raise InputError(what, f"image too large ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise InputError(what, f"corrupt or truncated image ({e})") from None
    if arr.ndim != 3 or arr.shape[0] < 32 or arr.shape[1] < 32:
        raise InputError(what, f"image is too small ({arr.shape[1]}x{arr.shape[0]}); need at least 32x32 pixels")
    if max_side and max(arr.shape[:2]) > max_side:      # area-averaged (PIL's box filter: no OpenCV needed)
        k = max_side / max(arr.shape[:2])
        size = (max(32, round(arr.shape[1] * k)), max(32, round(arr.shape[0] * k)))
        arr = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BOX), dtype=np.uint8).copy()
    return arr


def _gray(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


#: (image sha1, PLACEMENT) -> (known points, face box, jaw outline or None, detector name)
_DETECTION_CACHE: dict[tuple[str, str], tuple] = {}
_DETECTION_CACHE_SIZE = 16


def load_portrait(path: str | os.PathLike | bytes | DecodedImage,
                  landmarks_path: str | os.PathLike | None = None) -> Portrait:
    """Read a portrait photo (a path, encoded image bytes, or a :class:`DecodedImage`) and place its face.

    Landmarks come from the sidecar (``landmarks_path``, or ``<image>.landmarks.json`` beside a
    path) when there is one, else from face detection (results are cached per image content).
    Raises :class:`~echo_stream.errors.InputError` for a missing, unsupported or corrupt image, an
    invalid landmarks sidecar, or when no face is found (the message tells how to pass landmarks).
    """
    import hashlib

    rgb = None
    if isinstance(path, DecodedImage):
        rgb, what, src_path, digest = path.rgb, path.label, None, path.digest
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 32:
            raise InputError(what, f"expected (H, W, 3) uint8 RGB of at least 32x32, got {rgb.dtype} {rgb.shape}")
    elif isinstance(path, (bytes, bytearray, memoryview)):
        data, what, src_path = bytes(path), "portrait", None
    else:
        src_path = Path(path)
        what = str(src_path)
        if not src_path.exists():
            raise InputError(src_path, "portrait image not found")
        if src_path.is_dir():
            raise InputError(src_path, "is a directory, expected a portrait image file (png/jpeg)")
        try:
            data = src_path.read_bytes()
        except OSError as e:
            raise InputError(src_path, f"cannot read the image ({e.strerror or e})") from None
        if landmarks_path is None:
            auto = src_path.with_name(src_path.name + ".landmarks.json")
            landmarks_path = auto if auto.exists() else None
    if rgb is None:
        rgb = _decode_image(data, what)
        digest = hashlib.sha1(data).hexdigest()
    h, w = rgb.shape[:2]
    if landmarks_path is not None:
        known, jaw = parse_sidecar(Path(landmarks_path), w, h)
        if "mouth_centre" not in known:                # five points: find the lip line between the corners
            frame = _frame(known["left_eye"], known["right_eye"])
            ml, mr = _to_face(known["mouth_left"], frame), _to_face(known["mouth_right"], frame)
            half = (mr[0] - ml[0]) / 2
            refine_mouth_line(_gray(rgb), known, (ml[1] + mr[1]) / 2 + 0.02, float(np.clip(0.3 * half, 0.06, 0.15)),
                               (ml[0] + mr[0]) / 2)
        lms = complete_landmarks(known, jaw)
        check_face_geometry(lms, (h, w), what)
        return Portrait(rgb, lms, "sidecar", what if src_path else None)
    key = (digest, PLACEMENT)
    hit = _DETECTION_CACHE.get(key)
    if hit is None:
        hit = _place_face(rgb, what)
        if len(_DETECTION_CACHE) >= _DETECTION_CACHE_SIZE:
            _DETECTION_CACHE.pop(next(iter(_DETECTION_CACHE)))
        _DETECTION_CACHE[key] = hit
    known, box, jaw, detector = hit
    known = {k: v.copy() for k, v in known.items()}
    lms = complete_landmarks(known, jaw)
    check_face_geometry(lms, (h, w), what)
    return Portrait(rgb, lms, "detected", what if src_path else None, box.copy(), detector)


def check_face_geometry(lm: dict[str, np.ndarray], size: tuple[int, int], what: str) -> None:
    """Refuse a placement no face has: the eyes not above the mouth (an upside-down photo: the face's
    eyes-to-mouth direction points up the image; sideways photos pass, the crop turns them upright), the
    mouth and chin not below the eyes in the face's own frame, or an inter-ocular distance that is not
    plausible for the image (under 4 px, or wider than the image)."""
    h, w = size
    le, re_ = np.asarray(lm["left_eye"], np.float64), np.asarray(lm["right_eye"], np.float64)
    iod = float(np.hypot(*(re_ - le)))
    if not 4.0 <= iod <= max(h, w):
        raise InputError(what, f"the face found is not plausible (eyes {iod:.0f} px apart in a {w}x{h} image): "
                               "use a frontal, upright portrait, or pass a landmarks sidecar")
    mid = (le + re_) / 2
    down = np.asarray(lm["mouth_centre"], np.float64) - mid
    if down[1] < -0.25 * float(np.hypot(*down)):       # more than ~105 degrees from pointing down the image
        raise InputError(what, "the face is upside down (its eyes are below its mouth): rotate the photo upright "
                               "(or pass a landmarks sidecar)")
    frame = _frame(le, re_)
    mouth_y = float(_to_face(lm["mouth_centre"], frame)[1])
    chin_y = float(_to_face(lm["chin"], frame)[1])
    if not (0.3 <= mouth_y <= 3.0 and chin_y > mouth_y):
        raise InputError(what, "the face found is not plausible (mouth or chin not below the eyes): use a frontal, "
                               "upright portrait, or pass a landmarks sidecar")


#: How a portrait without a sidecar is placed: ``"mesh"`` (the face tracker's 468-point mesh, with the
#: Haar cascades as the fallback when the mesh finds no face) or ``"haar"`` (the cascades only).
PLACEMENT = "mesh"


def _place_face(rgb: np.ndarray, what: str):
    """(known points, face box, jaw outline or None, detector name) of the photo's face."""
    if PLACEMENT == "mesh":
        from ..face.portrait import UpsideDown, mesh_landmarks

        try:
            found = mesh_landmarks(rgb)
        except UpsideDown:
            raise InputError(what, "the face is upside down: rotate the photo upright (or pass a landmarks "
                                   "sidecar)") from None
        if found is not None:
            known, jaw, box = found
            return known, box, jaw.astype(np.float32), "mesh"
    else:                              # the cascades read an upright face into an upside-down photo too
        from ..face.portrait import is_upside_down

        if is_upside_down(rgb):
            raise InputError(what, "the face is upside down: rotate the photo upright (or pass a landmarks "
                                   "sidecar)")
    known, box = haar.detect_landmarks(rgb, what)
    return known, box, None, "haar"


def _parse_size(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    try:
        hh, ww = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError("size", f"expected an int or (height, width), got {size!r}") from None
    if hh % 2 or ww % 2 or hh < 64 or ww < 64 or hh > 4096 or ww > 4096:
        raise InputError("size", f"render size must be even and between 64 and 4096 pixels, got {ww}x{hh} (WxH)")
    if not (0.5 <= ww / hh <= 2.0):
        raise InputError("size", f"aspect ratio {ww}x{hh} is too extreme (width/height must be in 0.5..2)")
    return hh, ww


#: Vertical position of the eye line in the crop, as a fraction of the crop height.
EYE_LINE = 0.44
#: Face height (hairline to chin) as a fraction of the crop height.
FACE_FRACTION = 0.5


def crop_portrait(portrait: Portrait, size: int | tuple[int, int] = (256, 256)) -> FaceCrop:
    """Cut the face-centred, eye-levelled crop (face = 50% of its height, eyes at 44%) at ``size``."""
    import cv2

    hh, ww = _parse_size(size)
    lm = portrait.landmarks
    o, ux, uy, iod = _frame(lm["left_eye"].astype(np.float64), lm["right_eye"].astype(np.float64))
    chin_y = float(_to_face(lm["chin"], (o, ux, uy, iod))[1])
    face_units = chin_y - _HAIRLINE_Y                       # face height in IODs
    crop_h = face_units * iod / FACE_FRACTION                # crop height in image pixels
    k = hh / crop_h                                          # image px -> crop px
    # crop = k * R (p - o) + (ww/2, EYE_LINE*hh), R rows = (ux, uy)
    rot = np.stack([ux, uy])
    mat = np.concatenate([k * rot, (np.array([ww / 2, EYE_LINE * hh]) - k * rot @ o)[:, None]], 1)
    img = portrait.image
    pre = 1.0
    if k < 0.5:                                              # anti-alias strong reductions
        pre = min(1.0, 2.0 * k)
        img = cv2.resize(img, (max(1, round(img.shape[1] * pre)), max(1, round(img.shape[0] * pre))),
                         interpolation=cv2.INTER_AREA)
    m2 = mat.copy()
    m2[:, :2] /= pre
    interp = cv2.INTER_CUBIC if k > 1.2 else cv2.INTER_LINEAR
    crop = cv2.warpAffine(img, m2, (ww, hh), flags=interp, borderMode=cv2.BORDER_REPLICATE)
    lms = {}
    for name, p in lm.items():
        p = np.asarray(p, np.float64)
        lms[name] = (p @ mat[:, :2].T + mat[:, 2]).astype(np.float32)
    return FaceCrop(crop, lms, mat.astype(np.float64), float(iod * k), float(face_units * iod * k))

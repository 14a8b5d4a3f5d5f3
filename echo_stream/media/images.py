"""Images: a portrait file -> RGB uint8 through Pillow."""
from __future__ import annotations

import os

import numpy as np

from ..errors import InputError
from .inputs import _check_path


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as RGB uint8 ``(H, W, 3)`` via Pillow.

    EXIF orientation is applied. Greyscale, palette, CMYK and 16-bit images are
    converted to RGB; images with transparency (RGBA, LA, palette with a
    transparent colour) are composited onto white.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = _check_path(path)
    try:
        with Image.open(p) as im:
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # broken EXIF: keep the pixels as stored
                pass
            has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
                im.mode == "P" and "transparency" in im.info)
            if has_alpha:
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, rgba).convert("RGB")
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.float64)
                top = 65535.0 if a.max() > 255 else 255.0
                g = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(g[:, :, None], 3, axis=2)
            elif im.mode != "RGB":
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError:
        raise InputError(p, "not a PNG/JPEG/WebP/BMP/GIF/TIFF image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise InputError(p, f"image is too large to load safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(p, f"corrupt or truncated image ({' '.join(str(e).split())})") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise InputError(p, f"image decoded to an unusable shape {arr.shape}")
    return np.ascontiguousarray(arr)

"""Training images on disk: their header (size, EXIF orientation) and their pixels, upright and cropped.

Scanning reads only headers, so validating thousands of photos is quick; pixels are decoded
when a batch needs them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .buckets import Size
from .problems import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that displays the image upright (phone photos).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def read_image_header(path: Path, max_pixels: int) -> tuple[Size, int]:
    """(upright size, EXIF orientation) from the header alone; DatasetError names the file on failure."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = 1
            if "exif" in im.info:  # only EXIF already parsed with the header; asking otherwise may decode
                try:
                    orientation = int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
                except Exception:  # a broken EXIF block is no reason to refuse the picture
                    orientation = 1
    except Image.DecompressionBombError:
        raise DatasetError(f"{path}: image is too large (over PIL's decompression-bomb limit of "
                           f"{Image.MAX_IMAGE_PIXELS * 2:,} pixels); downscale it", path, "too_large") from None
    except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, struct.error...)
        raise DatasetError(f"{path}: cannot read image ({type(e).__name__}: {e})", path, "unreadable") from None
    if w * h > max_pixels:
        raise DatasetError(f"{path}: image is {w}x{h} ({w * h / 1e6:.1f} megapixels), over the max_pixels limit of "
                           f"{max_pixels / 1e6:g} megapixels; downscale it or raise max_pixels", path, "too_large")
    if w <= 0 or h <= 0:
        raise DatasetError(f"{path}: image has no pixels ({w}x{h})", path, "unreadable")
    return ((h, w) if orientation in (5, 6, 7, 8) else (w, h)), orientation


def load_pixels(path: Path, orientation: int, resized: Size, window: tuple[int, int], bucket: Size,
                flip: bool) -> torch.Tensor:
    """Decode upright, resize to ``resized``, crop the ``bucket``-sized window at (left, top), flip.

    Returns float32 CHW in [-1, 1], the VAE's input range.
    """
    swapped = orientation in (5, 6, 7, 8)
    try:
        with Image.open(path) as im:
            # JPEG can decode at 1/2..1/8 scale directly (never below the requested size): far
            # faster for big photos.  The file is stored un-rotated, so ask in stored orientation.
            im.draft("RGB", resized[::-1] if swapped else resized)
            img = _to_rgb(im)
    except MemoryError:
        raise
    except Exception as e:  # truncated/corrupt data only shows up when decoding
        raise DatasetError(f"{path}: cannot decode image ({e})", path, "unreadable") from e
    if orientation in _UPRIGHT:
        img = img.transpose(_UPRIGHT[orientation])
    if img.size != resized:
        img = img.resize(resized, Image.Resampling.LANCZOS)
    left, top = window
    img = img.crop((left, top, left + bucket[0], top + bucket[1]))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white (plain convert() would expose whatever hides under alpha=0)."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")

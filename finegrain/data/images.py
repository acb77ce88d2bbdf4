"""Decode any real-world image file to an RGB uint8 array, or say clearly why not.

Handles JPEG, PNG, WebP, BMP, GIF, TIFF in grayscale, palette, CMYK, RGBA/LA (composited on
white), 16-bit and 32-bit integer modes (scaled to 8 bits) and EXIF orientation. Refuses
decompression bombs before decoding a single pixel.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from finegrain.errors import BadImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Pillow's own default; images above this many pixels are refused as possible decompression bombs.
DEFAULT_MAX_PIXELS = 89_478_485
# Smaller images are almost always broken downloads or placeholders (1x1 tracking pixels).
MIN_SIDE = 8


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image.

    Attributes:
        pixels: (H, W, 3) uint8 RGB array, EXIF orientation applied.
        original_size: (width, height) in pixels of the full-resolution oriented image, which is
            the frame bounding boxes are given in. `pixels` may be smaller when decoded in draft mode.
    """

    pixels: np.ndarray
    original_size: tuple[int, int]

    @property
    def scale(self) -> float:
        """pixels width / original width (1.0 unless decoded at reduced size)."""
        return self.pixels.shape[1] / self.original_size[0]


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image of any mode to (H, W, 3) uint8 RGB."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        # 16-bit data arrives as I;16 or (in some Pillow versions) as 32-bit I: scale 65535 -> 255.
        top = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
        gray = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        gray = np.clip(np.rint((arr - lo) / max(hi - lo, 1e-12) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def decode_image(
    source: str | os.PathLike | bytes,
    *,
    min_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> DecodedImage:
    """Decode an image file (or its bytes) to RGB.

    Args:
        source: a path, or the file's bytes.
        min_side: if given, JPEGs may be decoded at a reduced scale (libjpeg DCT scaling) as long as
            the shorter side stays >= `min_side` pixels. Much faster for large photos.
        max_pixels: refuse images with more pixels than this (decompression bombs).
        name: how to name the file in errors (defaults to the path).

    Returns:
        DecodedImage with (H, W, 3) uint8 pixels.

    Raises:
        BadImageError: missing, empty, not an image, truncated/corrupt, too small or too large.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise BadImageError(label, "file not found") from None
        except IsADirectoryError:
            raise BadImageError(label, "is a directory, not an image file") from None
        except OSError as e:
            raise BadImageError(label, f"cannot read file ({e.strerror or e})") from None
    if not data:
        raise BadImageError(label, "empty file (0 bytes)")
    with warnings.catch_warnings():
        # We check the pixel count ourselves (below) with a clear message.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise BadImageError(label, "not an image file (unknown format)") from None
        except Image.DecompressionBombError as e:
            raise BadImageError(label, f"refused as a possible decompression bomb ({e})") from None
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image
            raise BadImageError(label, f"cannot open image ({e})") from None
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise BadImageError(
                    label,
                    f"{w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                    "(refused as a possible decompression bomb)",
                )
            if min(w, h) < MIN_SIDE:
                raise BadImageError(label, f"image is only {w}x{h} pixels (minimum side {MIN_SIDE})")
            original_size = _oriented_size(img)
            if min_side is not None and img.format == "JPEG":
                s = min_side / min(w, h)
                if s < 1.0:
                    img.draft(img.mode, (math.ceil(w * s), math.ceil(h * s)))
            try:
                img.load()
                img = ImageOps.exif_transpose(img)
                pixels = _to_rgb(img)
            except Exception as e:  # noqa: BLE001
                reason = str(e) or type(e).__name__
                if "truncated" in reason:
                    reason = f"truncated file ({reason})"
                raise BadImageError(label, f"does not decode: {reason}") from None
    return DecodedImage(np.ascontiguousarray(pixels), original_size)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image after EXIF orientation, read from its header only."""
    with Image.open(path) as img:
        return _oriented_size(img)


def resize_shorter(pixels: np.ndarray, shorter_side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the same, downscaled (area interpolation) so the shorter side is at most `shorter_side`."""
    import cv2

    h, w = pixels.shape[:2]
    s = shorter_side / min(h, w)
    if s >= 1.0:
        return pixels
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)

"""Decoding of every odd kind of image file a user's folder contains, using real encoded files."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, features

from finegrain.data.images import DEFAULT_MAX_PIXELS, decode_image, image_size
from finegrain.errors import BadImageError


def _check_rgb(decoded, shape):
    assert decoded.pixels.dtype == np.uint8
    assert decoded.pixels.shape == (*shape, 3)


@pytest.mark.parametrize("fmt,suffix", [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"), ("BMP", ".bmp"), ("TIFF", ".tif"), ("GIF", ".gif")])
def test_common_formats_decode_to_rgb(tmp_path, fmt, suffix):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    arr = np.zeros((30, 40, 3), np.uint8)
    arr[:, :20] = (200, 30, 30)
    arr[:, 20:] = (30, 30, 200)
    path = tmp_path / f"img{suffix}"
    Image.fromarray(arr).save(path, format=fmt)
    decoded = decode_image(path)
    _check_rgb(decoded, (30, 40))
    assert decoded.original_size == (40, 30)
    left, right = decoded.pixels[:, :15].mean((0, 1)), decoded.pixels[:, 25:].mean((0, 1))
    assert left[0] > left[2] + 100 and right[2] > right[0] + 100


def test_grayscale_and_bilevel(tmp_path):
    Image.fromarray(np.full((20, 25), 77, np.uint8), "L").save(tmp_path / "g.png")
    d = decode_image(tmp_path / "g.png")
    _check_rgb(d, (20, 25))
    assert np.all(d.pixels == 77)
    Image.new("1", (16, 16), 1).save(tmp_path / "b.png")
    assert np.all(decode_image(tmp_path / "b.png").pixels == 255)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    d = decode_image(tmp_path / "c.jpg")
    _check_rgb(d, (24, 24))
    r, g, b = d.pixels.reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((10, 20, 4), np.uint8)
    arr[:, :10] = (255, 0, 0, 255)  # opaque red
    arr[:, 10:] = (0, 0, 0, 0)  # fully transparent
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    d = decode_image(tmp_path / "a.png")
    assert tuple(d.pixels[5, 2]) == (255, 0, 0)
    assert tuple(d.pixels[5, 15]) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (12, 12), 0)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    img.paste(1, (0, 0, 6, 12))
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    d = decode_image(tmp_path / "p.png")
    assert tuple(d.pixels[6, 2]) == (0, 200, 0)
    assert tuple(d.pixels[6, 10]) == (255, 255, 255)


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    arr = np.tile(np.array([0, 32896, 65535], np.uint16), (12, 4))  # 12 x 12
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    d = decode_image(tmp_path / "g16.png")
    _check_rgb(d, (12, 12))
    assert set(np.unique(d.pixels[..., 0])) == {0, 128, 255}


def test_16bit_rgb_png(tmp_path):
    rgb = np.zeros((10, 10, 3), np.uint16)
    rgb[...] = (65535, 32896, 0)
    assert cv2.imwrite(str(tmp_path / "c16.png"), rgb[..., ::-1])  # OpenCV writes BGR
    d = decode_image(tmp_path / "c16.png")
    _check_rgb(d, (10, 10))
    assert tuple(d.pixels[0, 0]) == (255, 128, 0)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 tall
    arr[:5, :5] = (255, 0, 0)  # red marker at stored top-left
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    assert image_size(tmp_path / "r.jpg") == (20, 40)
    d = decode_image(tmp_path / "r.jpg")
    _check_rgb(d, (40, 20))
    assert d.original_size == (20, 40)
    assert d.pixels[1, 18, 0] > 150 and d.pixels[1, 1, 0] < 80  # marker now top-right


def test_draft_decoding_keeps_min_side(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 800, 3), np.uint8)).save(tmp_path / "big.jpg")
    d = decode_image(tmp_path / "big.jpg", min_side=100)
    assert min(d.pixels.shape[:2]) >= 100 and d.pixels.shape[0] < 600
    assert d.original_size == (800, 600)
    assert d.scale == pytest.approx(d.pixels.shape[1] / 800)


def _png_with_header_size(path, width, height):
    """A real PNG whose IHDR claims width x height (a decompression-bomb header)."""
    tmp = path.with_suffix(".small.png")
    Image.new("L", (10, 10)).save(tmp)
    raw = bytearray(tmp.read_bytes())
    # IHDR chunk: 8-byte signature, 4-byte length, b"IHDR", 13 bytes of data, 4-byte CRC.
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind", ["zero_byte", "truncated", "text", "tiny", "bomb", "missing", "directory"])
def test_bad_files_raise_with_path_and_reason(tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 200, 3), np.uint8)).save(tmp_path / "ok.jpg")
        data = (tmp_path / "ok.jpg").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("this is not a picture of a bird\n")
    elif kind == "tiny":
        Image.new("RGB", (1, 1)).save(path)
    elif kind == "bomb":
        path = tmp_path / "bomb.png"
        side = int(DEFAULT_MAX_PIXELS**0.5) + 100
        _png_with_header_size(path, side, side)
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(BadImageError) as info:
        decode_image(path)
    assert info.value.path == str(path)
    expected = {"zero_byte": "empty", "truncated": "truncated", "text": "not an image", "tiny": "1x1",
                "bomb": "decompression bomb", "missing": "not found", "directory": "directory"}[kind]
    assert expected in info.value.reason

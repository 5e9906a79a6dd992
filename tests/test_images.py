import io

import numpy as np
import pytest
from PIL import Image

from similar_finder.images import ImageError, load_image


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    # A wide image whose left half is black; orientation 6 means "rotate 90° clockwise to view".
    pixels = np.full((20, 40, 3), 255, np.uint8)
    pixels[:, :20] = 0
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _bytes(Image.fromarray(pixels), "JPEG", exif=exif, quality=95)
    out, fixes = load_image(data, 40)
    assert fixes == ["rotated by EXIF orientation 6"]
    # After the rotation the black half is on top.
    assert out[:15].mean() < 40 and out[-15:].mean() > 215


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.full((8, 8), 32768, np.uint16)
    out, fixes = load_image(_bytes(Image.fromarray(values), "PNG"), 8)
    assert any("scaled to 8 bits" in f for f in fixes)
    assert 120 <= out.mean() <= 135 and out.shape == (8, 8, 3)


def test_transparency_is_flattened_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    out, fixes = load_image(_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), 8)
    assert "transparency flattened on white" in fixes
    assert out.min() == 255


@pytest.mark.parametrize(
    "mode, fmt, fix",
    [("CMYK", "JPEG", "CMYK converted to RGB"), ("L", "PNG", "grayscale expanded to RGB"),
     ("P", "GIF", "palette expanded"), ("RGB", "WEBP", None), ("RGB", "BMP", None), ("RGB", "TIFF", None)],
)
def test_modes_and_formats_become_rgb(mode, fmt, fix):
    img = Image.fromarray((np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3)).convert(mode)
    out, fixes = load_image(_bytes(img, fmt), 12)
    assert out.shape == (12, 12, 3) and out.dtype == np.uint8
    assert fixes == ([fix] if fix else [])


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out, fixes = load_image(buf.getvalue(), 8)
    assert "first of 2 frames" in fixes
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50


def test_large_jpeg_is_decoded_in_draft_mode_to_the_same_picture():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((1024, 1024), Image.NEAREST)
    out, _ = load_image(_bytes(big, "JPEG", quality=95), 64)
    reference = np.asarray(big.resize((64, 64), Image.BILINEAR)).astype(int)
    assert np.abs(out.astype(int) - reference).mean() < 8


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty file"), (b"this is not an image", "not an image"),
     (_bytes(Image.new("RGB", (64, 64), "red"), "JPEG")[:200], "truncated")],
)
def test_bad_files_raise_a_clear_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        load_image(data, 32)


def test_decompression_bomb_is_refused():
    bomb = _bytes(Image.new("1", (20_000, 20_000)), "PNG")  # tiny file, 400 megapixels
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(bomb, 32)

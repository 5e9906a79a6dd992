"""A photo as another camera or source would have taken it: the shifts a new query differs from a library by.

A library's photos often share one style (stock shots on white, one phone, one scanner); a person's query is a
new photo of the same thing from elsewhere. :func:`other_source_views` makes, from one photo, the views such a
query differs by — tighter framing, low resolution, a colour cast, heavy JPEG, punchier processing, a tilt,
under-exposure — each returned as the uint8 array :func:`~similar_finder.images.load_image` would decode, so it
is embedded exactly as a library photo is. The gate's calibration is measured against these views (see
``bench/gate_bench.py`` and ``tests/test_trust.py``): a rule that refuses them refuses good queries.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from .images import load_image

# Each shift is mild enough that a person still sees the same subject, strong enough to move the features.
SHIFTS = ("crop", "low-res", "colour cast", "jpeg", "punchy", "tilt", "dark")
CROP_KEEP = 0.7  # tighter framing: the central 70% of each side
LOW_RES_SIDE = 48  # a small thumbnail, then enlarged again by decoding
CAST = (1.15, 1.0, 0.8)  # a warm (tungsten) cast: red up, blue down
JPEG_QUALITY = 12  # heavy compression: visible blocks
TILT_DEGREES = 10  # a hand-held tilt; the rotated corners are cropped off
DARK = 0.55  # under-exposure by about one stop


def _shifted(img: Image.Image, shift: str) -> Image.Image:
    w, h = img.size
    if shift == "crop":
        dx, dy = int(w * (1 - CROP_KEEP) / 2), int(h * (1 - CROP_KEEP) / 2)
        return img.crop((dx, dy, w - dx, h - dy))
    if shift == "low-res":
        scale = min(1.0, LOW_RES_SIDE / max(w, h))
        return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    if shift == "colour cast":
        bands = [band.point(lambda v, f=f: min(255, int(v * f))) for band, f in zip(img.split(), CAST)]
        return Image.merge("RGB", bands)
    if shift == "jpeg":
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=JPEG_QUALITY)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if shift == "punchy":
        return ImageEnhance.Color(ImageEnhance.Contrast(img).enhance(1.4)).enhance(1.5)
    if shift == "tilt":
        keep = 0.8  # the inscribed part of a 10-degree rotation: no black corners
        rotated = img.rotate(TILT_DEGREES, resample=Image.Resampling.BILINEAR)
        dx, dy = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
        return rotated.crop((dx, dy, w - dx, h - dy))
    if shift == "dark":
        return ImageEnhance.Brightness(img).enhance(DARK)
    raise ValueError(f"unknown shift {shift!r}; choose from {', '.join(SHIFTS)}")


def other_source_views(photo: str | Path, size: int, shifts=SHIFTS) -> dict[str, np.ndarray]:
    """``{shift: (size, size, 3) uint8}``: ``photo`` changed by each of ``shifts``, decoded as a library photo is."""
    rgb, _ = load_image(photo, max(size, 2 * LOW_RES_SIDE) * 2)  # decoded upright and RGB, larger than the model's
    img = Image.fromarray(rgb)
    views = {}
    for shift in shifts:
        buffer = io.BytesIO()
        _shifted(img, shift).save(buffer, "PNG")  # lossless: only the jpeg shift compresses
        views[shift] = load_image(buffer.getvalue(), size)[0]
    return views

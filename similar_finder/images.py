"""Decode any photo file into a fixed-size RGB array, saying what had to be fixed.

``load_image(path, size)`` is the entry point. It never lets a bad file
escape as a raw PIL traceback: it raises :class:`ImageError` with a short,
specific reason (truncated, not an image, decompression bomb, ...), which the
extraction step turns into one ``skipped`` line. :func:`scan_images` lists the
photos of a folder, and :func:`class_of` tells a photo's class by the one rule
the project has: its first folder.
"""
from __future__ import annotations

import io
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import SimilarFinderError, UsageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# PIL's own limit (about 89 megapixels) is the threshold at which it only warns;
# we refuse at that size so a crafted file cannot exhaust memory.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageError(SimilarFinderError, ValueError):
    """A file that cannot be used as an image; ``str(err)`` is the reason."""


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def scan_images(images_dir: str | os.PathLike) -> pd.DataFrame:
    """List image files under ``images_dir`` recursively: path (relative), size, mtime_ns."""
    root = Path(images_dir)
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not is_image_file(name):
                continue
            full = Path(dirpath) / name
            stat = full.stat()
            rows.append((full.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    frame = pd.DataFrame(rows, columns=["path", "size", "mtime_ns"])
    return frame.sort_values("path", ignore_index=True)


def class_of(path: str) -> str:
    """The class of a photo: its first folder under the images root ("" for a photo at the top)."""
    parts = Path(path).parts
    return parts[0] if len(parts) > 1 else ""


def labels_from_paths(paths, *, required: bool = False) -> np.ndarray | None:
    """The class of each image (:func:`class_of`).

    None when the photos do not sit in two or more class folders, or an error
    saying so with ``required=True``.
    """
    labels = np.array([class_of(p) for p in paths])
    if len(labels) == 0 or (labels == "").any() or len(set(labels)) < 2:
        if required:
            raise UsageError("this needs a folder with one subfolder per class (at least two classes)")
        return None
    return labels


def load_image(source: str | Path | bytes, size: int, *, keep_aspect: bool = False) -> tuple[np.ndarray, list[str]]:
    """Return ``(uint8 array of shape (size, size, 3), fixes)`` for an image file or its bytes.

    ``keep_aspect``: the longer side is ``size`` and the other keeps the photo's proportions
    (near-duplicate matching compares geometry, which squashing would distort).

    ``fixes`` lists what was done to make the picture a plain upright RGB image
    (EXIF rotation, palette or alpha flattened, CMYK or 16-bit converted, ...).
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if not data:
        raise ImageError("empty file (0 bytes)")
    fixes: list[str] = []
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise ImageError(
                    f"decompression bomb: {width}x{height} pixels is over the limit of {MAX_PIXELS}"
                )
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
                fixes.append(f"first of {img.n_frames} frames")
            if img.format == "JPEG" and min(width, height) >= 2 * size:
                # Decoding at 1/2, 1/4 or 1/8 scale straight from the DCT is several
                # times faster than decoding the full photo only to shrink it.
                img.draft("RGB", (size, size))
            img.load()
            img = _upright(img, fixes)
            rgb = _to_rgb(img, fixes)
            shape = (size, size)
            if keep_aspect:
                scale = size / max(rgb.size)
                shape = (max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale)))
            rgb = rgb.resize(shape, Image.Resampling.BILINEAR, reducing_gap=3.0)
            return np.asarray(rgb, dtype=np.uint8), fixes
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised file format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None


def _upright(img: Image.Image, fixes: list[str]) -> Image.Image:
    orientation = img.getexif().get(0x0112, 1)
    if orientation not in (None, 1):
        fixes.append(f"rotated by EXIF orientation {orientation}")
        return ImageOps.exif_transpose(img)
    return img


def _to_rgb(img: Image.Image, fixes: list[str]) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        fixes.append("palette expanded")
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's convert("L") clips 16-bit values at 255; scale the real range instead.
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max() > 255 else max(values.max(), 1.0)
        fixes.append(f"{mode} scaled to 8 bits")
        img = Image.fromarray(np.clip(values / top * 255.0, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        fixes.append("transparency flattened on white")
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "CMYK":
        fixes.append("CMYK converted to RGB")
    elif mode in ("L", "1"):
        fixes.append("grayscale expanded to RGB")
    elif mode != "RGB":
        fixes.append(f"{mode} converted to RGB")
    return img.convert("RGB")


# --- facts read from a photo's header (the catalog's columns) ------------------------

PHOTO_FACTS = ("width", "height", "taken", "camera")


def folder_of(path: str) -> str:
    """The folder of a relative path ("" for a photo at the top of the library)."""
    parent = Path(path).parent.as_posix()
    return "" if parent == "." else parent


def photo_facts(file: str | os.PathLike) -> dict:
    """Width and height (upright), EXIF date taken (ISO 8601) and camera, from the file's header only."""
    facts = dict.fromkeys(PHOTO_FACTS)
    try:
        with Image.open(file) as img:
            width, height = img.size
            exif = img.getexif()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return facts  # extraction already said why such a file is unusable
    if exif.get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # turned a quarter: shown the other way up
        width, height = height, width
    facts.update(width=width, height=height)
    taken = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.DateTimeOriginal) or exif.get(ExifTags.Base.DateTime)
    facts["taken"] = _iso_date(taken)
    camera = " ".join(str(exif.get(tag, "")).strip("\x00 ") for tag in (ExifTags.Base.Make, ExifTags.Base.Model))
    facts["camera"] = camera.strip() or None
    return facts


def _iso_date(value) -> str | None:
    try:
        return datetime.strptime(str(value).strip("\x00 "), "%Y:%m:%d %H:%M:%S").isoformat()
    except (TypeError, ValueError):
        return None  # absent, or a camera's "0000:00:00 00:00:00"

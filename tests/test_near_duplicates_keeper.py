"""Which copy is kept and how the others are labelled: 12 food photos plus edited copies of two of them.

The visible case of issue 22: a mirrored copy saved at a higher JPEG quality than its original, and a centre
crop of the original, must leave the original as the one to keep (the others are edits *of* it), and each copy
is labelled with every way it differs from the original.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from similar_finder.near_duplicates import RELATIONS, find_duplicates

ORIGINALS = ("burger/burger1_resized.jpeg", "salad/salad4_resized.jpg")


def _centre_crop(im: Image.Image, share: float) -> Image.Image:
    w, h = round(im.width * share), round(im.height * share)
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((left, top, left + w, top + h))


# copy name: (its original, how it is made, how it is saved, the label it should get against the original)
COPIES = {
    "burger/burger1_mirror_q90.jpg": (ORIGINALS[0], ImageOps.mirror, {"quality": 90}, "mirrored, recompressed"),
    "burger/burger1_crop84_q60.jpg": (ORIGINALS[0], lambda im: _centre_crop(im, 0.84), {"quality": 60},
                                      "cropped, recompressed"),
    "salad/salad4_small_q30.jpg": (ORIGINALS[1], lambda im: im.resize((im.width * 3 // 5, im.height * 3 // 5),
                                                                      Image.Resampling.LANCZOS),
                                   {"quality": 30}, "recompressed, resized"),
    "salad/salad4_crop_mirror.jpg": (ORIGINALS[1], lambda im: ImageOps.mirror(_centre_crop(im, 0.8)), "same",
                                     "cropped, mirrored"),
}


@pytest.fixture(scope="module")
def folder(food_db, tmp_path_factory) -> Path:
    """Photos 1 and 4 of each food class (12, the two originals among them) and the four copies."""
    root = tmp_path_factory.mktemp("keeper") / "photos"
    for label in sorted(p.name for p in food_db.iterdir() if p.is_dir()):
        for source in sorted((food_db / label).iterdir())[0:4:3]:  # photos 1 and 4
            (root / label).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, root / label / source.name)
    assert all((root / o).is_file() for o in ORIGINALS)
    for name, (original, edit, options, _) in COPIES.items():
        with Image.open(root / original) as img:
            if options == "same":  # saved as compressed as the original: only the geometry differs
                options = {"qtables": img.quantization}
            edit(img.convert("RGB")).save(root / name, **options)
        # Older than their originals: the original must be kept for being what the copies were made from,
        # not for its date.
        earlier = (root / original).stat().st_mtime - 3600
        os.utime(root / name, (earlier, earlier))
    return root


@pytest.fixture(scope="module")
def groups(folder, features_of):
    return find_duplicates(folder, library=features_of(folder))


def test_the_original_is_kept_over_a_less_compressed_mirror_and_a_crop(groups):
    kept = {g.keeper: set(g) for g in groups}
    assert set(kept) == set(ORIGINALS), [list(g) for g in groups]
    for original, members in kept.items():
        assert members == {original} | {c for c, (o, *_) in COPIES.items() if o == original}


def test_each_copy_is_labelled_with_every_way_it_differs_from_the_keeper(groups):
    labels = {path: g.relation[path] for g in groups for path in g[1:]}
    assert labels == {name: label for name, (*_, label) in COPIES.items()}
    for label in labels.values():  # each part a known relation, in RELATIONS order
        parts = label.split(", ")
        assert set(parts) <= set(RELATIONS) and parts == sorted(parts, key=RELATIONS.index)


def test_a_photo_and_its_mirror_alone_keep_the_less_compressed(folder, tmp_path, features_of):
    """A mirror is a mirror both ways: with nothing else to tell, the better-saved file is kept."""
    root = tmp_path / "photos"
    (root / "burger").mkdir(parents=True)
    for label in ("steak", "fries"):
        shutil.copytree(folder / label, root / label)
    shutil.copyfile(folder / ORIGINALS[0], root / ORIGINALS[0])
    shutil.copyfile(folder / "burger/burger1_mirror_q90.jpg", root / "burger/burger1_mirror_q90.jpg")
    (group,) = find_duplicates(root, library=features_of(root))
    assert group.keeper == "burger/burger1_mirror_q90.jpg"
    assert group.relation == {ORIGINALS[0]: "mirrored, recompressed"}

"""Which copy is kept and how the others are labelled: 12 food photos plus edited copies of two of them.

The visible case of issue 22: a mirrored copy saved at a higher JPEG quality than its original, and a centre
crop of the original, must leave the original as the one to keep (the others are edits *of* it), and each copy
is labelled with every way it differs from the original.
"""
from __future__ import annotations

import io
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


# --- the app's per-photo near-duplicates: the same verified finder, for a library photo and for an upload ---

@pytest.fixture(scope="module")
def client(folder, features_of):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from similar_finder.app import create_app
    from similar_finder.library import Library

    library = Library(features_of(folder))
    with TestClient(create_app(library), base_url="http://127.0.0.1:8000") as client:
        yield client, library


def _near(client, library, path, n=5):
    body = client.get(f"/api/similar/{library.image_id(path)}", params={"approach": "duplicates", "n": n}).json()
    assert body["approach"] == "duplicates" and body["query"]["path"] == path
    return body


def test_a_library_photo_gets_its_verified_copies_each_with_how_it_differs(client):
    client, library = client
    body = _near(client, library, ORIGINALS[0])
    assert {r["path"]: r["relation"] for r in body["results"]} == {
        name: label for name, (original, *_, label) in COPIES.items() if original == ORIGINALS[0]}
    # asked from the mirror image, the labels are relative to it: the crop is of the mirror's mirror image
    body = _near(client, library, "burger/burger1_mirror_q90.jpg")
    assert {r["path"]: r["relation"] for r in body["results"]} == {
        ORIGINALS[0]: "mirrored, recompressed", "burger/burger1_crop84_q60.jpg": "cropped, mirrored, recompressed"}
    assert [r["distance"] for r in body["results"]] == sorted(r["distance"] for r in body["results"])


def test_a_photo_without_copies_gets_no_near_duplicates_found(client):
    client, library = client
    for path in ("steak/steak1_resized.jpg", "fries/fries4_resized.jpeg"):
        body = _near(client, library, path)
        assert body["results"] == [] and body["message"] == "No near-duplicates found" and body["reason"]


def test_an_uploaded_copy_is_answered_by_the_verified_finder(client, folder, food_db):
    client, library = client
    out = io.BytesIO()  # a copy the library does not hold: the salad turned by 5 degrees, saved again
    with Image.open(folder / ORIGINALS[1]) as img:
        img.convert("RGB").rotate(5, resample=Image.Resampling.BICUBIC).save(out, "JPEG", quality=80)
    response = client.post("/api/search", files={"file": ("tilted.jpg", out.getvalue(), "image/jpeg")},
                           data={"n": "5", "approach": "duplicates"})
    assert response.status_code == 200, response.text
    relations = {r["path"]: r["relation"] for r in response.json()["results"]}
    assert set(relations) <= {ORIGINALS[1], *(c for c, (o, *_) in COPIES.items() if o == ORIGINALS[1])}
    assert "rotated" in relations[ORIGINALS[1]].split(", ")
    # another photo of a burger (the food queries are not in the library): no copy of it there
    data = (food_db.parent / "queries" / "burger_test.jpeg").read_bytes()
    body = client.post("/api/search", files={"file": ("burger_test.jpeg", data, "image/jpeg")},
                       data={"approach": "duplicates"}).json()
    assert body["results"] == [] and body["message"] == "No near-duplicates found"


# --- the bound: verification grows as n x MAX_CANDIDATES, never n² ---

def test_the_pairs_verified_are_capped_per_photo(food_db, food_features):
    from similar_finder.near_duplicates import MAX_CANDIDATES

    timings: dict = {}
    find_duplicates(food_db, library=food_features, timings=timings)
    n = timings["photos"]
    assert n == 36 and MAX_CANDIDATES * n < n * (n - 1) / 2  # the cap is below all pairs here: it can bite
    assert 0 < timings["pairs"] <= MAX_CANDIDATES * n
    assert {"read", "candidates", "verify", "label"} <= set(timings)


def test_candidates_stay_linear_in_the_number_of_photos():
    """Thousands of photos with clustered vectors and hashes (many near ties): still at most MAX_CANDIDATES
    pairs a photo."""
    import numpy as np

    from similar_finder.near_duplicates import MAX_CANDIDATES, _candidates, _Photo

    rng = np.random.default_rng(0)
    n = 3000
    centres = rng.normal(size=(30, 64))
    vectors = (centres[rng.integers(0, 30, n)] + 0.05 * rng.normal(size=(n, 64))).astype(np.float32)
    bits = rng.integers(0, 2, (30, 2, 64))[rng.integers(0, 30, n)].astype(np.float32)
    photos = [_Photo(f"{i}.jpg", 1, 1, 1, 0.0, 0.0, str(i), 50.0, (1, 1), bits[i], ()) for i in range(n)]
    pairs = _candidates(photos, vectors)
    assert len(pairs) <= MAX_CANDIDATES * n
    assert all(0 <= i < j < n for i, j in pairs)

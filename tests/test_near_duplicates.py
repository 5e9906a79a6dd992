"""Near-duplicates verified by local features: the food photos plus edited copies of three of them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from similar_finder.cli import main
from similar_finder.near_duplicates import RELATIONS, find_duplicates

# Each copy: (original, edit, the label it should get).
EDITS = {
    "crop": (lambda im: im.crop((8, 8, im.width - 8, im.height - 8)), "cropped"),
    "mirror": (ImageOps.mirror, "mirrored"),
    "rotate": (lambda im: im.rotate(6, resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255)), "rotated"),
    "resize": (lambda im: im.resize((im.width * 3 // 5, im.height * 3 // 5), Image.Resampling.LANCZOS), "resized"),
    "q20": (lambda im: im, "recompressed"),
    "bright": (lambda im: ImageEnhance.Brightness(im).enhance(1.4), "edited"),
    "caption": (lambda im: _caption(im), "edited"),
    "grey": (lambda im: ImageOps.grayscale(im).convert("RGB"), "edited"),
}
COPIES = {"burger1_resized": ("crop", "mirror", "rotate"), "salad4_resized": ("resize", "q20", "bright"),
          "steak2_resized": ("caption", "grey", "same")}


def _caption(im):
    im = im.copy()
    ImageDraw.Draw(im).rectangle((0, im.height - 14, im.width, im.height), fill=(10, 10, 10))
    return im


@pytest.fixture(scope="module")
def edited(food_db, tmp_path_factory) -> tuple[Path, dict[str, tuple[str, str]]]:
    """The folder and, for each copy, (its original, the label it should get)."""
    folder = tmp_path_factory.mktemp("dups") / "photos"
    shutil.copytree(food_db, folder)
    truth = {}
    for stem, edits in COPIES.items():
        original = next(folder.rglob(f"{stem}.*"))
        for name in edits:
            copy = original.with_name(f"{stem}_{name}.jpg")
            if name == "same":
                shutil.copyfile(original, copy)
                label = "same file"
            else:
                edit, label = EDITS[name]
                with Image.open(original) as img:  # saved as compressed as the original, but q20
                    options = {"quality": 20} if name == "q20" else {"qtables": img.quantization}
                    edit(img.convert("RGB")).save(copy, **options)
            later = original.stat().st_mtime + 60  # a copy is made after its original (the keeper's tie-break)
            os.utime(copy, (later, later))
            truth[copy.relative_to(folder).as_posix()] = (original.relative_to(folder).as_posix(), label)
    return folder, truth


@pytest.fixture(scope="module")
def edited_library(edited, features_of):
    return features_of(edited[0])


@pytest.fixture(scope="module")
def groups(edited, edited_library):
    return find_duplicates(edited[0], library=edited_library)


def test_every_copy_is_found_with_its_original_and_nothing_else(groups, edited):
    _, truth = edited
    originals = {original for original, _ in truth.values()}
    assert len(groups) == len(originals), groups
    for group in groups:
        assert group.keeper in originals  # the original: most pixels, least compressed, older
        assert set(group) == {group.keeper} | {c for c, (o, _) in truth.items() if o == group.keeper}


def test_each_edit_gets_its_label(groups, edited):
    _, truth = edited
    labels = {path: group.relation[path] for group in groups for path in group[1:]}
    assert set(labels.values()) <= set(RELATIONS)
    assert labels == {copy: label for copy, (_, label) in truth.items()}


def test_the_pure_hash_answer_keeps_working(edited):
    folder, truth = edited
    hashed = find_duplicates(folder, max_distance=6)
    together = {p for g in hashed for p in g}
    copies = {c: o for c, (o, _) in truth.items()}
    # a hash sees resized, recompressed and identical copies, never a mirror image
    assert {"salad/salad4_resized_resize.jpg", "salad/salad4_resized_q20.jpg", "steak/steak2_resized_same.jpg"} <= together
    assert "burger/burger1_resized_mirror.jpg" not in together
    assert all(len({copies.get(p, p) for p in g}) == 1 for g in hashed)
    by_dhash = find_duplicates(folder, kind="dhash")
    assert by_dhash and all("dhash within" in r for g in by_dhash for r in g.relation.values())


def test_an_unreadable_file_is_listed_not_fatal(edited, edited_library, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(edited[0], folder)
    (folder / "broken.jpg").write_bytes(b"not a photo at all")
    left_out: dict[str, str] = {}
    found = find_duplicates(folder, cnn=False, left_out=left_out)
    assert set(left_out) == {"broken.jpg"} and found
    main(["duplicates", str(folder), "--features-file", str(edited_library), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "left out broken.jpg" in printed and "keep burger/burger1_resized.jpeg" in printed


def test_the_command_writes_keeper_and_labels(edited, edited_library, tmp_path, capsys):
    folder, truth = edited
    main(["duplicates", str(folder), "--features-file", str(edited_library), "--out", str(tmp_path / "out")])
    table = pd.read_csv(tmp_path / "out" / "duplicates.csv")
    assert table["keep"].sum() == 3 and (tmp_path / "out" / "group_0000.png").is_file()
    assert dict(zip(table.loc[~table["keep"], "path"], table.loc[~table["keep"], "relation"])) == {
        c: label for c, (_, label) in truth.items()}
    main(["duplicates", str(folder), "--max-distance", "6", "--out", str(tmp_path / "hash")])
    assert "phash within 6 bits" in capsys.readouterr().out


def test_the_app_lists_groups_with_the_keeper_first(edited, edited_library):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from similar_finder.app import create_app
    from similar_finder.library import Library

    _, truth = edited
    with TestClient(create_app(Library(edited_library)), base_url="http://127.0.0.1:8000") as client:
        body = client.get("/api/duplicates").json()
        hashed = client.get("/api/duplicates", params={"max_distance": 6}).json()
    assert len(body["groups"]) == 3
    for group in body["groups"]:
        assert group[0]["keep"] and not any(m["keep"] for m in group[1:])
        assert all(m["relation"] == truth[m["path"]][1] for m in group[1:])
    assert {m["path"] for g in hashed["groups"] for m in g} != {m["path"] for g in body["groups"] for m in g}

"""The SQLite catalog beside the feature store, and a clean first screen."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from conftest import FAST, make_images
from similar_finder import store as store_module
from similar_finder._quiet import NOISE
from similar_finder import extract_features
from similar_finder.catalog import Catalog
from similar_finder.images import photo_facts


def photo_with_exif(path: Path, *, taken="2021:07:14 10:30:00", make="Canon", model="EOS 5D", orientation=1,
                    size=(60, 40)):
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = make
    exif[ExifTags.Base.Model] = model
    exif[ExifTags.Base.Orientation] = orientation
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = taken
    pixels = (np.random.default_rng(len(str(path))).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif, quality=90)
    return path


def test_photo_facts_read_exif_date_camera_and_upright_size(tmp_path):
    facts = photo_facts(photo_with_exif(tmp_path / "a.jpg", orientation=6))
    assert facts == {"width": 40, "height": 60, "taken": "2021-07-14T10:30:00", "camera": "Canon EOS 5D"}
    plain = make_images(tmp_path, 1, size=30)[0]
    assert photo_facts(plain) == {"width": 30, "height": 30, "taken": None, "camera": None}
    assert photo_facts(photo_with_exif(tmp_path / "z.jpg", taken="0000:00:00 00:00:00"))["taken"] is None
    (tmp_path / "bad.jpg").write_bytes(b"not a photo")
    assert photo_facts(tmp_path / "bad.jpg") == dict.fromkeys(("width", "height", "taken", "camera"))


def test_extract_keeps_the_catalog_in_step_incrementally(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    make_images(photos / "trips" / "alps_2021", 3)
    make_images(photos / "trips" / "alps%2022", 2, seed=1)
    photo_with_exif(photos / "family" / "birthday.jpg")
    (photos / "family" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    read = []
    real = store_module.photo_facts
    monkeypatch.setattr(store_module, "photo_facts", lambda path: read.append(Path(path).name) or real(path))

    library = extract_features(photos, tmp_path / "f.csv", **FAST)
    catalog = library.catalog()
    assert catalog.path == tmp_path / "f.sqlite" and len(read) == 6
    total, rows = catalog.images(limit=100)
    assert total == 6 and [r["path"] for r in rows] == library.paths
    assert [r["image_id"] for r in rows] == list(range(6))  # a new library's ids follow its photos' order
    birthday = catalog.get(library.row_of["family/birthday.jpg"])
    assert birthday["taken"] == "2021-07-14T10:30:00" and birthday["camera"] == "Canon EOS 5D"
    assert birthday["sha256"] == dict(zip(library.audit["path"], library.audit["sha256"]))["family/birthday.jpg"]
    [skipped] = catalog.skipped()
    assert skipped["path"] == "family/broken.jpg" and "not an image" in skipped["reason"]
    # A folder filter takes the folder and its subfolders, and treats _ and % as plain characters.
    assert catalog.images(folder="trips")[0] == 5
    assert [r["path"] for r in catalog.images(folder="trips/alps_2021")[1]] == [
        f"trips/alps_2021/img{i:04d}.jpg" for i in range(3)]
    assert catalog.images(folder="trips/alps%2022")[0] == 2 and catalog.images(folder="trip")[0] == 0
    assert catalog.images(sort="taken")[1][0]["path"] == "family/birthday.jpg"
    assert {f["folder"]: f["photos"] for f in catalog.folders()} == {
        "family": 1, "trips/alps%2022": 2, "trips/alps_2021": 3}

    catalog.set_clusters(dict(zip(range(6), [0, 1, 0, 1, 0, 1])), library.fingerprint)
    assert extract_features(photos, tmp_path / "f.csv", **FAST).catalog().get(0)["cluster"] == 0  # unchanged
    assert len(read) == 6

    (photos / "trips" / "alps_2021" / "img0000.jpg").unlink()
    make_images(photos / "new", 1, seed=7)
    library = extract_features(photos, tmp_path / "f.csv", **FAST)
    assert read[6:] == ["img0000.jpg"]  # only the new photo's header is read
    total, rows = library.catalog().images(limit=100)
    assert total == 6 and [r["path"] for r in rows] == sorted(library.paths) and "new/img0000.jpg" in library.paths
    assert {r["cluster"] for r in rows} == {None}  # clusters of another library are not kept
    assert not list(tmp_path.glob(".f.sqlite.*"))  # written to a temporary file and renamed


def test_a_missing_or_corrupt_catalog_is_rebuilt(tmp_path):
    make_images(tmp_path / "photos", 4)
    library = extract_features(tmp_path / "photos", tmp_path / "f.csv", **FAST)
    library.files.catalog.write_bytes(b"garbage, not SQLite")
    assert library.catalog().images()[0] == 4
    library.files.catalog.unlink()
    assert Catalog(library.catalog().path).fingerprint == library.fingerprint


def test_catalog_rejects_an_unknown_sort(tmp_path):
    make_images(tmp_path / "photos", 3)
    catalog = extract_features(tmp_path / "photos", tmp_path / "f.csv", **FAST).catalog()
    with pytest.raises(ValueError, match="unknown sort 'colour'"):
        catalog.images(sort="colour")


# --- a clean first screen ------------------------------------------------------------------

def test_tensorflow_start_up_lines_are_silenced_and_real_errors_kept(tmp_path):
    make_images(tmp_path / "photos", 2)
    script = ("import os, sys\n"
              "from similar_finder.cli import main\n"
              "code = main(['extract', sys.argv[1], '--features-file', sys.argv[2], '--backbone', 'efficientnet_lite0',"
              " '--weights', 'none', '--input-size', '32', '--quiet'])\n"
              "os.write(2, b'a real error after start-up\\n')\n"
              "raise SystemExit(code)\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "photos"), str(tmp_path / "f.csv")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == "a real error after start-up", done.stderr
    assert not [line for line in lines if NOISE.search(line)], done.stderr


def test_importing_the_package_changes_nothing_in_the_process():
    script = ("import os, sys, similar_finder, similar_finder.library, similar_finder.features\n"
              "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), len(sys.meta_path))\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    baseline = subprocess.run([sys.executable, "-c", "import sys; print(None, len(sys.meta_path))"],
                              capture_output=True, text=True, env=env, check=True).stdout
    imported = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert imported.stdout == baseline, imported.stdout


def test_the_filter_writes_back_what_is_not_start_up_noise(capfd):
    from similar_finder._quiet import native_stderr_filtered

    with native_stderr_filtered():
        os.write(2, b"E0000 cuda_platform.cc:52] failed call to cuInit: CUDA error\n")
        os.write(2, b"Segmentation fault in my own extension\n")
        os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on.\n")
    assert capfd.readouterr().err == "Segmentation fault in my own extension\n"


def test_a_bare_csv_gets_each_photos_own_facts(tmp_path):
    from similar_finder.library import Library

    Image.new("RGB", (40, 30)).save(tmp_path / "small.jpg")
    Image.new("RGB", (300, 200)).save(tmp_path / "large.jpg")
    (tmp_path / "shared.csv").write_text("path,f0,f1\nsmall.jpg,1,0\nlarge.jpg,0,1\n")  # no sidecar, no audit
    catalog = Library(tmp_path / "shared.csv").catalog()
    assert {r["path"]: (r["width"], r["height"]) for r in catalog.images()[1]} == {
        "small.jpg": (40, 30), "large.jpg": (300, 200)}

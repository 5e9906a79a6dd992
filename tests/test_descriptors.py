import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import labels_of
from similar_finder import Library, load_features, recommend
from similar_finder.kinds import describe
from similar_finder.near_duplicates import find_duplicates
from similar_finder.projector import write_projector
from similar_finder.reduce import fit_pca


@pytest.fixture(scope="module")
def library(food_features, tmp_path_factory):
    folder = tmp_path_factory.mktemp("desc") / "feat"
    shutil.copytree(food_features.parent, folder)
    return folder / food_features.name


def _copies(food_db, folder, names):
    """The food photos plus, for each of ``names``, a JPEG-recompressed and a resized copy."""
    shutil.copytree(food_db, folder)
    for name in names:
        original = next(folder.rglob(name))
        with Image.open(original) as img:
            img = img.convert("RGB")
            img.save(original.with_name("recompressed_" + original.stem + ".jpg"), quality=30)
            img.resize((img.width * 3 // 5, img.height * 3 // 5)).save(original.with_name("resized_" + original.stem + ".png"))


def test_descriptors_have_the_right_shapes_and_are_deterministic(food_db):
    photo = next(food_db.rglob("burger1*"))
    histogram = describe(photo, "color")
    assert histogram.shape == (512,) and histogram.sum() == pytest.approx(1.0) and (histogram >= 0).all()
    for kind in ("ahash", "dhash", "phash"):
        bits = describe(photo, kind)
        assert bits.shape == (64,) and set(np.unique(bits)) <= {0.0, 1.0}
        np.testing.assert_array_equal(bits, describe(photo, kind))
    np.testing.assert_array_equal(histogram, describe(photo, "color"))
    other = describe(next(food_db.rglob("salad1*")), "color")
    assert not np.allclose(histogram, other)


def test_copies_are_found_as_duplicates_and_distinct_photos_are_not(food_db, tmp_path):
    names = ["burger1_resized.jpeg", "salad4_resized.jpg", "steak2_resized.jpg"]
    _copies(food_db, tmp_path / "photos", names)
    groups = find_duplicates(tmp_path / "photos")
    assert len(groups) == 3, groups
    for group in groups:
        stems = {p.rsplit("/", 1)[1].split(".")[0].replace("recompressed_", "").replace("resized_", "", 1)
                 for p in group}
        assert len(group) == 3 and len(stems) == 1


def test_duplicates_command_lists_and_draws_groups(food_db, tmp_path):
    _copies(food_db, tmp_path / "photos", ["fries2_resized.jpeg"])
    result = subprocess.run([sys.executable, "-m", "similar_finder", "duplicates", str(tmp_path / "photos"),
                             "--out", str(tmp_path / "dup")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "group 0:" in result.stdout and "1 groups, 3 images" in result.stdout
    assert pd.read_csv(tmp_path / "dup" / "duplicates.csv")["group"].tolist() == [0, 0, 0]
    with Image.open(tmp_path / "dup" / "group_0000.png") as img:
        assert np.asarray(img.convert("L")).std() > 10


def test_library_descriptors_are_cached_and_follow_the_library(library, food_db):
    opened = Library(library)
    matrix = opened.vectors("color")
    assert matrix.shape == (36, 512)
    np.testing.assert_allclose(matrix[0], describe(food_db / opened.paths[0], "color"), rtol=1e-6)
    cache = opened.files.cache("photos-color")
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    again = Library(library).vectors("color")  # a fresh object: read from the cache
    np.testing.assert_allclose(again, matrix, rtol=1e-6)
    assert cache.stat().st_mtime_ns == stamp  # nothing recomputed or rewritten


def test_recommend_by_colour_and_by_hash(library, food_db, tmp_path):
    photo = next(food_db.rglob("potato3*"))
    by_colour = recommend(photo, 3, 10.0, kind="color", library=library, gate=np.inf)  # ordering, not gating
    assert len(by_colour) == 3 and by_colour["distance"].is_monotonic_increasing
    assert (by_colour["distance"] < 10.0).all()
    copy = tmp_path / "copy.jpg"
    Image.open(photo).convert("RGB").save(copy, quality=40)
    by_hash = recommend(copy, 1, 64, kind="phash", library=library, gate=np.inf)
    assert by_hash["path"][0] == photo.relative_to(food_db).as_posix() and by_hash["distance"][0] <= 6


def test_pca_keeps_precision_and_reports_variance(library):
    paths, matrix, _ = load_features(library)
    pca = fit_pca(matrix, 16)
    assert pca.n_components_ == 16 and 0.5 < pca.variance_kept_ < 1.0
    reduced = Library(library).pca(16).transform(matrix)
    assert reduced.shape == (36, 16) and Library(library).vectors("pca").shape == (36, 36)
    query = load_features(library)[2]["images_root"] + "/" + paths[0]
    result = recommend(query, 3, 2.0, kind="pca", library=library)
    assert len(result) == 3 and paths[0] not in set(result["path"])


def test_evaluation_compares_every_feature_kind(food_db, library, tmp_path):
    from similar_finder.evaluate import evaluate

    table = evaluate(food_db, features_csv=library, out_dir=tmp_path, progress=False).table.set_index("method")
    names = " | ".join(table.index)
    for kind in ("CNN PCA", "colour histogram", "average hash", "difference hash", "perceptual hash", "raw pixels"):
        assert kind in names
    cnn = table.filter(like="cosine recommender", axis=0)["precision@5"].iloc[0]
    assert cnn > table.loc["colour histogram, chi2", "precision@5"]
    assert (table["dims"] > 0).all() and table.filter(like="PCA", axis=0)["dims"].iloc[0] < 1280


def test_projector_files_match(library, tmp_path):
    out = write_projector(library, tmp_path / "projector")
    tensors = np.loadtxt(out / "tensors.tsv", delimiter="\t")
    metadata = pd.read_csv(out / "metadata.tsv", sep="\t")
    assert tensors.shape == (36, 1280) and len(metadata) == 36
    assert list(metadata.columns) == ["path", "cluster", "class"]
    assert list(metadata["class"]) == list(labels_of(metadata["path"]))
    with Image.open(out / "sprite.png") as sprite:
        assert sprite.size == (6 * 64, 6 * 64)  # 36 thumbnails of 64 px in a 6 x 6 grid
    config = (out / "projector_config.pbtxt").read_text()
    assert 'sprite' in config and "single_image_dim: 64" in config

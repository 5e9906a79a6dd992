"""The package's shape: one library object, one answer shape, one CLI, no surprises on import."""
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import similar_finder
from conftest import FAST, as_exports_only, make_images
from similar_finder import Library, cli
from similar_finder import store as store_module


def test_no_public_name_is_shadowed_by_a_submodule():
    import similar_finder.recommender as module

    assert module.Recommender is similar_finder.Recommender
    assert callable(similar_finder.recommend) and not isinstance(similar_finder.recommend, type(module))
    package = Path(similar_finder.__file__).parent
    submodules = {p.stem for p in package.glob("*.py")}
    assert not submodules & set(similar_finder.__all__)
    for name in sorted(submodules - {"__main__"}):
        importlib.import_module(f"similar_finder.{name}")  # every module imports cleanly


def test_default_folders_follow_the_working_directory(tmp_path, monkeypatch):
    make_images(tmp_path / "photos" / "a", 3)
    make_images(tmp_path / "photos" / "b", 3, seed=1)
    monkeypatch.chdir(tmp_path)
    code = cli.main(["extract", "photos", "--backbone", "efficientnet_lite0", "--weights", "none",
                     "--input-size", "64", "--quiet"])
    assert code == 0 and (tmp_path / "data" / "features.csv").is_file()
    assert Library(tmp_path / "data" / "features.csv").root == (tmp_path / "photos").resolve()


def test_the_cli_turns_only_the_projects_errors_into_one_line(tmp_path, monkeypatch, capsys):
    assert cli.main(["recommend", str(tmp_path / "x.jpg"), "--features-file", str(tmp_path / "none.csv")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: no features file at")

    def bug(*args, **kwargs):
        raise ValueError("a real bug")

    monkeypatch.setattr("similar_finder.features.extract_features", bug)
    with pytest.raises(ValueError, match="a real bug"):  # not swallowed: the traceback is what helps here
        cli.main(["extract", str(tmp_path)])


def test_console_script_and_module_entry_points_agree(tmp_path):
    script = Path(sys.executable).with_name("similar-finder")
    assert script.is_file(), "pip install -e . installs the similar-finder command"
    help_text = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("extract", "cluster", "recommend", "evaluate", "duplicates", "projector", "run-all"):
        assert command in help_text
    module = subprocess.run([sys.executable, "-m", "similar_finder", "cluster", "--features-file",
                             str(tmp_path / "none.csv")], capture_output=True, text=True)
    assert module.returncode == 2 and "error: no features file" in module.stderr


def test_run_all_accepts_weights_none_like_extract(tmp_path):
    make_images(tmp_path / "photos", 8)
    result = subprocess.run([sys.executable, "-m", "similar_finder.run_all", str(tmp_path / "photos"),
                             "--out", str(tmp_path / "out"), "--backbone", "efficientnet_lite0",
                             "--weights", "none", "--input-size", "64", "--limit", "2", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Library(tmp_path / "out" / "features.csv").meta["weights"] == "random"


def test_run_all_reads_the_features_file_once(food_db, tmp_path, monkeypatch):
    from similar_finder.run_all import run_all

    reads = []
    original = store_module.read_store
    monkeypatch.setattr(store_module, "read_store", lambda csv, **kw: reads.append(csv) or original(csv, **kw))
    for module in ("library", "features", "incremental"):
        monkeypatch.setattr(f"similar_finder.{module}.read_store", store_module.read_store)
    shutil.copytree(food_db, tmp_path / "food")
    for run in range(2):  # a first run, and a second that finds everything already embedded
        reads.clear()
        run_all(tmp_path / "food", out=tmp_path / "out", backbone="efficientnet_lite0", limit=2, progress=False)
        assert len(reads) == 1, (run, reads)


def test_both_approaches_answer_in_the_same_shape(food_features, food_db):
    from similar_finder.clustering import ClusterRecommender
    from similar_finder.recommender import Recommender

    library = Library(food_features)
    query = food_db / library.paths[0]
    answers = {}
    for approach in (Recommender(threshold=2.0).fit(library), ClusterRecommender().fit(library)):
        distances, indices = approach.kneighbors(None, 4, rows=[0, 1])
        assert distances.shape == indices.shape == (2, 4)
        assert not (indices[:, :len(np.flatnonzero(indices[0] >= 0))] == [[0], [1]]).any()  # never itself
        answers[approach.approach] = approach.recommend(query, 4)
    assert list(answers["cosine"].columns) == ["path", "image_id", "distance"]
    assert list(answers["kmeans"].columns) == ["path", "image_id", "distance", "cluster"]
    assert library.paths[0] not in set(answers["kmeans"]["path"]) | set(answers["cosine"]["path"])


def test_thresholds_have_their_own_file_and_the_sidecar_one_writer(food_features, tmp_path):
    from similar_finder.recommender import Recommender

    shutil.copytree(food_features.parent, tmp_path / "feat")
    library = Library(tmp_path / "feat" / food_features.name)
    sidecar = library.files.meta.read_bytes()
    calibration = Recommender().fit(library).calibrate(library.labels())
    assert library.files.meta.read_bytes() == sidecar
    assert library.thresholds["cnn/cosine"]["value"] == calibration["value"]
    assert library.thresholds["cnn/cosine"]["fingerprint"] == library.fingerprint


def test_the_library_logs_and_never_prints(food_features, tmp_path, capsys):
    from similar_finder.clustering import tune_k
    from similar_finder.recommender import recommend

    library = Library(food_features)
    tune_k(library.matrix, range(2, 4))
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    from PIL import Image

    Image.fromarray(noise).save(tmp_path / "noise.png")
    assert recommend(tmp_path / "noise.png", 3, threshold=0.0, library=library).empty  # logged, not printed
    assert capsys.readouterr().out == ""


def test_a_changed_library_gets_a_new_fingerprint_and_fresh_derived_values(tmp_path):
    from similar_finder import extract_features

    images = tmp_path / "photos"
    make_images(images / "a", 4)
    make_images(images / "b", 4, seed=1)
    first = extract_features(images, tmp_path / "f.csv", **FAST)
    colours = first.vectors("color")
    assert extract_features(images, tmp_path / "f.csv", **FAST).fingerprint == first.fingerprint
    make_images(images / "b", 1, seed=9, prefix="new")
    second = extract_features(images, tmp_path / "f.csv", **FAST)
    assert second.fingerprint != first.fingerprint and second.vectors("color").shape == (9, 512)
    np.testing.assert_allclose(second.vectors("color")[:4], colours[:4])  # per-photo values reused
    assert second.pca(4) is not first.pca(4)


def test_faiss_answers_a_single_vector_query():
    pytest.importorskip("faiss")
    from similar_finder.recommender import Recommender

    data = np.random.default_rng(0).random((200, 16), dtype=np.float32)
    distances, indices = Recommender(threshold=np.inf, index="faiss").fit(data).kneighbors(data[3], 2)
    assert indices.shape == (1, 2) and indices[0, 0] == 3 and distances[0, 0] < 1e-5


def test_recommend_command_prints_results_or_says_none(food_features, food_db, tmp_path, capsys):
    from similar_finder.clustering import fit_baseline

    library = Library(food_features)
    query = str(food_db / library.paths[0])
    assert cli.main(["recommend", query, "-n", "3", "--threshold", "2", "--features-file", str(food_features)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["path", "image_id", "distance"] and len(lines) == 4
    assert library.paths[0] not in "\n".join(lines)
    assert cli.main(["recommend", query, "--threshold", "0", "--features-file", str(food_features)]) == 0
    assert capsys.readouterr().out.strip() == similar_finder.NO_RESULTS
    fit_baseline(library, model_path=tmp_path / "k.joblib", clusters_csv=tmp_path / "c.csv")
    assert cli.main(["recommend", query, "--approach", "kmeans", "--model", str(tmp_path / "k.joblib"),
                     "--features-file", str(food_features)]) == 0
    assert capsys.readouterr().out.split()[:4] == ["path", "image_id", "distance", "cluster"]


def test_a_store_written_by_version_0_1_opens_and_keeps_its_threshold(tmp_path):
    import json

    from similar_finder import extract_features

    images = tmp_path / "photos"
    make_images(images / "a", 4)
    make_images(images / "b", 4, seed=1)
    library = extract_features(images, tmp_path / "f.csv", **FAST)
    sidecar = json.loads(library.files.meta.read_text())
    del sidecar["fingerprint"]  # as 0.1 wrote it: no fingerprint, thresholds inside the sidecar
    sidecar["thresholds"] = {"cnn/cosine": {"value": 0.123, "metric": "cosine", "center": True}}
    library.files.meta.write_text(json.dumps(sidecar))
    as_exports_only(library.files)
    reopened = Library(tmp_path / "f.csv")
    assert reopened.fingerprint == library.fingerprint and reopened.threshold_for("cnn", "cosine", True)
    make_images(images / "b", 1, seed=9, prefix="new")
    refreshed = extract_features(images, tmp_path / "f.csv", **FAST)
    assert refreshed.thresholds["cnn/cosine"]["value"] == 0.123  # moved to its own file, not lost
    assert refreshed.threshold_for("cnn", "cosine", True) is None  # made on an earlier version: not used


def test_an_edited_csv_is_not_served_stale(food_features, tmp_path):
    import pandas as pd

    from similar_finder.recommender import recommend

    shutil.copytree(food_features.parent, tmp_path / "feat")
    csv = tmp_path / "feat" / food_features.name
    query = Library(csv).paths[0]
    first = recommend(query, 1, threshold=2.0, gate=np.inf, library=csv)
    frame = pd.read_csv(csv)
    frame.iloc[1:, 1:] = -frame.iloc[1:, 1:].to_numpy()  # every other photo now points the other way
    frame.iloc[5, 1:] = frame.iloc[0, 1:].to_numpy()  # ... but one is an exact copy of the query
    frame.to_csv(csv, index=False)
    second = recommend(query, 1, threshold=2.0, gate=np.inf, library=csv)
    assert second["path"][0] == frame["path"][5] != first["path"][0] or second["distance"][0] < 1e-5


def test_the_kmeans_answer_keeps_its_cluster_column_under_an_explicit_threshold(food_features, food_db):
    from similar_finder.clustering import ClusterRecommender

    library = Library(food_features)
    result = ClusterRecommender().fit(library).recommend(food_db / library.paths[0], 4, threshold=0.5)
    assert list(result.columns) == ["path", "image_id", "distance", "cluster"] and (result["distance"] < 0.5).all()

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import FAST, make_images
from similar_finder import extract_features, load_features
from similar_finder import store as store_module
from similar_finder.backbones import Backbone
from similar_finder.library import labels_from_paths
from similar_finder.store import FeatureFiles, FeaturesError


def _extract(images, out, **kw):
    return extract_features(images, out, **{**FAST, "batch_size": 4, **kw})


def test_writes_csv_sidecar_audit_and_binary_copy(tmp_path):
    make_images(tmp_path / "imgs" / "sub", 6)
    make_images(tmp_path / "imgs", 3, prefix="top")
    out = tmp_path / "feat" / "features.csv"
    library = _extract(tmp_path / "imgs", out)
    files = FeatureFiles(out)

    csv = pd.read_csv(out)
    assert list(csv.columns) == ["path"] + [f"f{i}" for i in range(1280)]
    assert len(csv) == 9 and "sub/img0000.jpg" in set(csv["path"])  # recursive, relative paths
    meta = load_features(out)[2]
    assert meta["backbone"] == "efficientnet_lite0" and meta["dim"] == 1280
    assert meta["input_size"] == 64 and meta["pooling"] == "avg" and meta["weights"] == "random"
    assert meta["images_root"] == str((tmp_path / "imgs").resolve())
    assert {"keras", "numpy", "scikit-learn"} <= set(meta["versions"])
    assert np.array_equal(np.load(files.npy), csv.iloc[:, 1:].to_numpy(np.float32))
    assert np.array_equal(library.matrix, np.load(files.npy))
    assert library.frame().equals(pd.read_csv(out).astype({f"f{i}": np.float32 for i in range(1280)}))
    assert set(pd.read_csv(files.audit)["status"]) == {"ok"}


def test_load_features_falls_back_to_the_csv_when_the_binary_copy_is_stale(tmp_path):
    make_images(tmp_path / "imgs", 4)
    out = tmp_path / "features.csv"
    _extract(tmp_path / "imgs", out)
    paths, matrix, _ = load_features(out)
    csv = pd.read_csv(out)
    csv.loc[0, "f0"] = 123.0  # a user edits the CSV by hand
    csv.to_csv(out, index=False)
    paths2, matrix2, _ = load_features(out)
    assert paths2 == paths and matrix2[0, 0] == 123.0
    assert np.array_equal(matrix2[1:], matrix[1:])


def test_inference_is_batched_and_matches_one_by_one(tmp_path, monkeypatch):
    make_images(tmp_path / "imgs", 10)
    calls = []
    original = Backbone.embed
    monkeypatch.setattr(Backbone, "embed", lambda self, x: calls.append(len(x)) or original(self, x))
    batched = _extract(tmp_path / "imgs", tmp_path / "a.csv", batch_size=4)
    assert calls == [4, 4, 4]  # the last short batch is padded to a fixed shape
    calls.clear()
    single = _extract(tmp_path / "imgs", tmp_path / "b.csv", batch_size=1)
    assert len(calls) == 10
    np.testing.assert_allclose(batched.matrix, single.matrix, rtol=1e-4, atol=1e-5)


def test_incremental_runs_embed_only_what_changed(tmp_path):
    images = tmp_path / "imgs"
    paths = make_images(images, 6)
    out = tmp_path / "features.csv"
    first = _extract(images, out)
    assert first.stats.embedded == 6

    make_images(images, 1, seed=7, prefix="new")                     # added
    make_images(images, 1, seed=8, prefix="img")                     # img0000 content changed
    paths[1].rename(images / "renamed.jpg")                          # moved: same content
    paths[2].unlink()                                                # deleted
    os.utime(paths[3], ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: same content
    second = _extract(images, out)
    stats = second.stats
    assert stats.embedded == 2 and stats.removed == 2 and stats.images == 6
    assert set(second.paths) == {"img0000.jpg", "img0003.jpg", "img0004.jpg", "img0005.jpg",
                                   "new0000.jpg", "renamed.jpg"}
    old = first.frame().set_index("path")
    new = second.frame().set_index("path")
    np.testing.assert_array_equal(new.loc["renamed.jpg"], old.loc["img0001.jpg"])
    assert not np.allclose(new.loc["img0000.jpg"], old.loc["img0000.jpg"], rtol=1e-3, atol=0)

    third = _extract(images, out)
    assert third.stats.embedded == 0 and len(third) == 6


def test_bad_files_are_skipped_listed_and_never_end_the_run(tmp_path):
    images = tmp_path / "imgs"
    make_images(images, 3)
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.png").write_text("not a picture")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(jpeg, "JPEG")
    (images / "truncated.jpg").write_bytes(jpeg.getvalue()[:300])
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, "PNG")
    (images / "bomb.png").write_bytes(bomb.getvalue())
    Image.new("P", (32, 32)).save(images / "palette.gif")
    (images / "readme.txt").write_text("ignored: not an image extension")

    out = tmp_path / "features.csv"
    library = _extract(images, out)
    assert sorted(library.paths) == ["img0000.jpg", "img0001.jpg", "img0002.jpg", "palette.gif"]
    skipped = pd.read_csv(FeatureFiles(out).skipped).set_index("path")["reason"]
    assert set(skipped.index) == {"empty.jpg", "notes.png", "truncated.jpg", "bomb.png"}
    assert "empty" in skipped["empty.jpg"] and "not an image" in skipped["notes.png"]
    assert "truncated" in skipped["truncated.jpg"] and "decompression bomb" in skipped["bomb.png"]
    audit = pd.read_csv(FeatureFiles(out).audit, keep_default_na=False).set_index("path")
    assert audit.loc["palette.gif", "status"] == "fixed" and "palette" in audit.loc["palette.gif", "detail"]
    assert library.stats.skipped == 4
    # Known bad files are not retried on the next run.
    assert _extract(images, out).stats.embedded == 0


def test_mixing_backbones_is_refused_unless_overwriting(tmp_path):
    make_images(tmp_path / "imgs", 3)
    out = tmp_path / "features.csv"
    _extract(tmp_path / "imgs", out)
    with pytest.raises(FeaturesError, match="--overwrite"):
        _extract(tmp_path / "imgs", out, backbone="resnet50")
    with pytest.raises(FeaturesError, match="cannot be mixed"):
        _extract(tmp_path / "imgs", out, input_size=96)
    replaced = _extract(tmp_path / "imgs", out, backbone="resnet50", overwrite=True)
    assert replaced.matrix.shape == (3, 2048) and load_features(out)[2]["backbone"] == "resnet50"
    # Without a backbone argument, a re-run keeps the one the file holds.
    kept = extract_features(tmp_path / "imgs", out, progress=False)
    assert kept.meta["backbone"] == "resnet50" and kept.stats.embedded == 0


def test_a_failed_write_leaves_the_previous_files_intact(tmp_path, monkeypatch):
    make_images(tmp_path / "imgs", 3)
    out = tmp_path / "features.csv"
    _extract(tmp_path / "imgs", out)
    before = out.read_bytes()
    make_images(tmp_path / "imgs", 1, seed=5, prefix="new")

    def crash(handle, paths, matrix):
        handle.write("path,f0\npartial,")
        raise OSError("disk full")

    monkeypatch.setattr(store_module, "write_feature_csv", crash)
    with pytest.raises(OSError, match="disk full"):
        _extract(tmp_path / "imgs", out)
    assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_an_interrupted_run_resumes_without_losing_work(tmp_path):
    images = tmp_path / "imgs"
    make_images(images, 100, size=32)  # 50 batches of 2: the kill comes after 3 of them
    out = tmp_path / "features.csv"
    partial = FeatureFiles(out).partial
    cmd = [sys.executable, "-m", "similar_finder", "extract", str(images), "--out", str(out),
           "--backbone", "efficientnet_lite0", "--weights", "none", "--input-size", "64",
           "--batch-size", "2", "--checkpoint-every", "2", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial.glob("chunk-*.npz"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and len(list(partial.glob("chunk-*.npz"))) >= 3

    resumed = _extract(images, out, batch_size=2)
    stats = resumed.stats
    assert stats.reused >= 6 and stats.embedded + stats.reused == 100
    assert not partial.exists() and len(resumed) == 100
    fresh = _extract(images, tmp_path / "fresh.csv", batch_size=2)
    np.testing.assert_allclose(resumed.matrix, fresh.matrix, rtol=1e-4, atol=1e-5)


def test_cli_reports_errors_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "similar_finder", "extract", str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "error: images folder" in result.stderr and "Traceback" not in result.stderr


def test_a_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "notes.txt").write_text("no pictures here")
    with pytest.raises(FeaturesError, match="no images under .*looked for .*jpg"):
        _extract(tmp_path / "imgs", tmp_path / "features.csv")


def test_missing_features_file_says_how_to_make_it(tmp_path):
    with pytest.raises(FeaturesError, match="similar-finder extract"):
        load_features(tmp_path / "features.csv")


def test_pretrained_features_find_same_class_neighbours(food_features):
    """Leave-one-out precision@5 by cosine, computed here independently of the project's code."""
    csv = pd.read_csv(food_features)
    labels = labels_from_paths(csv["path"], required=True)
    x = csv.iloc[:, 1:].to_numpy(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    top5 = np.argsort(-similarity, axis=1)[:, :5]
    precision = (labels[top5] == labels[:, None]).mean()
    assert precision >= 0.8, precision


def test_demo_library_is_built_from_bundled_photos(tmp_path):
    from similar_finder.demo import ensure_demo_library

    root = ensure_demo_library(tmp_path / "demo")
    groups = sorted(p.name for p in root.iterdir())
    assert len(groups) == 10 and "cat" in groups
    for group in groups:
        assert len(list((root / group).glob("*.jpg"))) == 6
    assert ensure_demo_library(root) == root  # built once


def test_the_same_code_runs_on_the_jax_backend(food_features, tmp_path):
    """Decoding and batching are plain NumPy/PIL, so Keras's JAX backend gives the same features."""
    pytest.importorskip("jax")
    reference_paths, on_tensorflow, meta = load_features(food_features)
    # One photo of each class, linked in place: the JAX model embeds 6 photos on the CPU, not 36 (10 s less).
    photos = tmp_path / "photos"
    chosen = [i for i, path in enumerate(reference_paths) if path.endswith(("1_resized.jpeg", "1_resized.jpg"))]
    assert len(chosen) == 6
    for i in chosen:
        (photos / reference_paths[i]).parent.mkdir(parents=True, exist_ok=True)
        (photos / reference_paths[i]).symlink_to(Path(meta["images_root"]) / reference_paths[i])
    out = tmp_path / "jax.csv"
    script = ("import sys; from similar_finder import extract_features; "
              "extract_features(sys.argv[1], sys.argv[2], 'efficientnet_lite0', batch_size=8, progress=False)")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "-c", script, str(photos), str(out)], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    paths, on_jax, meta = load_features(out)
    assert meta["versions"]["keras_backend"] == "jax" and paths == [reference_paths[i] for i in chosen]
    np.testing.assert_allclose(on_jax, on_tensorflow[chosen], atol=1e-4, rtol=1e-3)

"""Search at scale: the index chosen by size, its recall, and the trained index kept beside the features."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pandas as pd
import pytest

from similar_finder import Library
from similar_finder import neighbors as nb
from similar_finder.neighbors import Neighbors
from similar_finder.recommender import Recommender
from similar_finder.store import AUDIT_COLUMNS, FeatureFiles, write_store
from similar_finder.thresholds import calibrate_threshold

faiss = pytest.importorskip("faiss")

DIM = 64
SMALL = {"ivf_above": 2_000, "pq_above": 5_000}  # limits that put every index within a few thousand vectors


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """FAISS's two OpenMP threads wait on each other on a busy shared CPU (training 3-4x slower): one here."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def clustered(n: int, dim: int = DIM, seed: int = 0, centres: int = 50) -> np.ndarray:
    """Non-negative vectors around a few centres (like ReLU features), so that neighbours mean something."""
    rng = np.random.default_rng(seed)
    middle = rng.random((centres, dim), dtype=np.float32)
    return middle[rng.integers(0, centres, n)] + 0.5 * rng.random((n, dim), dtype=np.float32)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def synthetic_library(folder, matrix: np.ndarray):
    """A feature store of ``matrix`` written as extraction writes one (no photos: none are needed here)."""
    paths = [f"c{i % 5}/{i:06d}.jpg" for i in range(len(matrix))]
    audit = pd.DataFrame({"path": paths, "status": "ok", "detail": "", "size": 0, "mtime_ns": 0,
                          "sha256": [hashlib.sha256(p.encode()).hexdigest() for p in paths]})[AUDIT_COLUMNS]
    files = FeatureFiles(folder / "features.csv")
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    config = {"backbone": "efficientnet_lite0", "weights": "imagenet", "input_size": 224, "pooling": "avg",
              "dim": matrix.shape[1]}
    write_store(files, folder / "photos", audit, matrix, config)
    return Library(files.csv)


def test_auto_chooses_the_index_by_size():
    data = clustered(6_000)
    chosen = {n: Neighbors(center=True, pq_bytes=16, **SMALL).fit(data[:n]).index_type_ for n in (1_500, 3_000, 6_000)}
    assert chosen == {1_500: "brute", 3_000: "ivf", 6_000: "ivfpq"}
    # The defaults: brute force far below the limits, as for every library of the other tests.
    assert Neighbors().index == "auto" and Recommender().fit(data).neighbors_.index_type_ == "brute"
    assert Neighbors().index_for(nb.IVF_ABOVE) == "brute" and Neighbors().index_for(nb.IVF_ABOVE + 1) == "ivf"
    assert Neighbors().index_for(nb.PQ_ABOVE + 1) == "ivfpq"
    # Metrics FAISS lacks stay exact under auto; asked for explicitly, they are an error.
    assert Neighbors("chi2", **SMALL).index_for(6_000) == "brute"
    with pytest.raises(ValueError, match="FAISS index supports"):
        Neighbors("hamming", index="ivfpq").fit(data[:100] > 0.5)
    # index="faiss" keeps its old meaning: exact below 10k vectors, IVF-Flat above.
    assert Neighbors(index="faiss").index_for(9_999) == "flat" and Neighbors(index="faiss").index_for(10_000) == "ivf"
    settings = Neighbors(index="ivfpq").index_settings(10_000_000, 1280)
    assert (settings["nlist"], settings["m"], settings["nbits"]) == (nb.NLIST_MAX, 64, 8)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_recall_at_5_against_brute_force(metric):
    data = clustered(8_000)
    rows = np.arange(0, 8_000, 40)
    queries = clustered(100, seed=1)
    exact = Neighbors(metric, center=True, index="brute").fit(data)
    truth_rows, truth_new = exact.kneighbors(None, 5, rows=rows)[1], exact.kneighbors(queries, 5)[1]
    # Measured on this data (16 bytes a vector): IVF-Flat 1.00; IVF-PQ re-ranking 24 candidates 0.86-0.98,
    # 1,024 (the default) 0.99-1.00, the codes alone 0.44-0.67.
    floors = {("ivf", nb.RERANK): 0.9, ("ivfpq", nb.RERANK): 0.95, ("ivfpq", 24): 0.8, ("ivfpq", 0): 0.35}
    models = {index: Neighbors(metric, center=True, index=index, pq_bytes=16).fit(data) for index in ("ivf", "ivfpq")}
    for (index, rerank), floor in floors.items():
        model = models[index]
        model.rerank = rerank  # a search setting: the same trained index
        distances, found = model.kneighbors(None, 5, rows=rows)
        assert not (found == rows[:, None]).any()  # never the row itself
        assert (np.diff(distances, axis=1) >= 0).all()
        assert recall(found, truth_rows) >= floor, (index, rerank, recall(found, truth_rows))
        assert recall(model.kneighbors(queries, 5)[1], truth_new) >= floor
        if rerank:  # re-ranked distances are the exact ones
            d_exact = exact.distances(queries[:5])
            d_found, i_found = model.kneighbors(queries[:5], 5)
            np.testing.assert_allclose(d_found, np.take_along_axis(d_exact, i_found, 1), atol=1e-4)


def test_fewer_found_than_asked_are_padded_and_never_the_row_itself():
    data = clustered(3_000)
    model = Neighbors(center=True, index="ivf", nprobe=1).fit(data)  # one list of ~55 probed
    rows = np.arange(0, 3_000, 100)
    distances, found = model.kneighbors(None, 200, rows=rows)
    assert distances.shape == (30, 200)
    assert not (found == rows[:, None]).any()
    padded = ~np.isfinite(distances)
    assert padded.any() and (found[padded] == -1).all() and (found[~padded] >= 0).all()
    _, _, gate = model.search(None, 5, rows=rows)  # the gate skips the padding
    assert np.isfinite(gate).all()


def test_gate_and_calibration_work_on_compressed_indexes():
    data = clustered(6_000)
    labels = np.array([f"c{i % 3}" for i in range(6_000)])
    exact = calibrate_threshold(data, labels, neighbors=Neighbors(center=True, index="brute").fit(data))
    approx = calibrate_threshold(data, labels, neighbors=Neighbors(center=True, index="ivfpq", pq_bytes=16).fit(data))
    assert approx["gate"] == pytest.approx(exact["gate"], rel=0.02)
    assert approx["value"] == pytest.approx(exact["value"], rel=0.05)
    model = Recommender(index="ivfpq", pq_bytes=16).fit(data)
    assert np.isfinite(model.gate_) and np.isfinite(model.threshold_)
    far = np.full((1, DIM), 5.0, np.float32)
    far[0, ::2] = 0.0  # another direction entirely: refused by the gate
    d, i, g = model.search(far, 5)
    assert model.answer(d[0], i[0], g[0]).empty
    d, i, g = model.search(data[7], 5)
    assert len(model.answer(d[0], i[0], g[0])) >= 1 and i[0, 0] == 7


@pytest.fixture
def library(tmp_path):
    return synthetic_library(tmp_path / "feat", clustered(3_000))


def test_the_trained_index_is_saved_beside_the_features_and_memory_mapped(library, monkeypatch):
    first = Recommender(**SMALL).fit(library)
    path = library.files.csv.with_suffix(".faiss")
    assert first.neighbors_.index_type_ == "ivf" and not first.neighbors_.index_loaded_ and path.is_file()
    stamp = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(nb, "build_index", no_training)
    second = Recommender(**SMALL).fit(Library(library.files.csv))
    assert second.neighbors_.index_loaded_ and path.stat().st_mtime_ns == stamp
    lists = faiss.extract_index_ivf(second.neighbors_.faiss_index_).invlists
    assert isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)  # mapped, not read
    for a, b in zip(first.kneighbors(None, 5, rows=range(50)), second.kneighbors(None, 5, rows=range(50))):
        np.testing.assert_array_equal(a, b)
    # Another kind, metric or centring has its own file in the cache, named by what it holds.
    monkeypatch.undo()
    Recommender("euclidean", index="ivfpq", pq_bytes=16).fit(library)
    assert (library.files.csv.parent / "features.cache" / "cnn-euclidean-plain-ivfpq.faiss").is_file()
    # A bare matrix builds in memory only.
    before = sorted(p.name for p in library.files.csv.parent.rglob("*"))
    Recommender(**SMALL).fit(library.matrix)
    assert sorted(p.name for p in library.files.csv.parent.rglob("*")) == before


def test_a_changed_library_rebuilds_its_index(library, tmp_path, monkeypatch):
    Recommender(**SMALL).fit(library)
    grown = synthetic_library(tmp_path / "feat", np.vstack([library.matrix, clustered(1, seed=9)]))  # one photo more
    assert grown.fingerprint != library.fingerprint
    built = []
    monkeypatch.setattr(nb, "build_index", lambda *a, build=nb.build_index: built.append(1) or build(*a))
    model = Recommender(**SMALL).fit(grown)
    assert built and not model.neighbors_.index_loaded_ and model.neighbors_.faiss_index_.ntotal == 3_001
    assert Recommender(**SMALL).fit(grown).neighbors_.index_loaded_ and len(built) == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no key"])
def test_a_damaged_index_file_is_rebuilt_with_a_warning(library, damage, caplog):
    reference = Recommender(**SMALL).fit(library).kneighbors(None, 5, rows=range(20))
    path = library.files.csv.with_suffix(".faiss")
    size = path.stat().st_size
    if damage == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())
    elif damage == "truncated":
        os.truncate(path, size // 2)
    else:
        path.with_name(path.name + ".json").unlink()
    with caplog.at_level("WARNING", logger="similar_finder"):
        model = Recommender(**SMALL).fit(library)
    assert not model.neighbors_.index_loaded_ and "rebuilding it" in caplog.text
    np.testing.assert_array_equal(model.kneighbors(None, 5, rows=range(20))[1], reference[1])
    assert path.stat().st_size == size and Recommender(**SMALL).fit(library).neighbors_.index_loaded_

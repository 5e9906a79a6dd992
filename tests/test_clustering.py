import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from conftest import FOOD_QUERIES, labels_of, make_images, FAST
from similar_finder import extract_features, load_features
from similar_finder.clustering import (ClusteringError, KMeansBaseline, fit_baseline,
                                       recommend_by_cluster, tune_k)


@pytest.fixture(scope="module")
def fitted(food_features, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kmeans")
    model = fit_baseline(food_features, model_path=folder / "kmeans.joblib",
                         clusters_csv=folder / "clusters.csv")
    return model, folder


def test_silhouette_picks_a_sensible_k_and_clusters_match_the_classes(fitted, food_features):
    model, folder = fitted
    assert 4 <= model.k_ <= 8
    table = model.tuning_
    assert list(table["k"]) == list(range(2, 11)) and table["silhouette"].idxmax() == model.k_ - 2
    clusters = pd.read_csv(folder / "clusters.csv")
    assert adjusted_rand_score(labels_of(clusters["path"]), clusters["cluster"]) >= 0.5
    assert (clusters["distance"] >= 0).all() and clusters["cluster"].nunique() == model.k_
    assert model.metadata_["backbone"] == "efficientnet_lite0" and model.metadata_["dim"] == 1280
    assert model.metadata_["k"] == model.k_ and "scikit-learn" in model.metadata_["versions"]


def test_tune_k_logs_one_line_per_k(food_features, caplog):
    _, matrix, _ = load_features(food_features)
    with caplog.at_level("INFO", logger="similar_finder.clustering"):
        table, best = tune_k(matrix, range(2, 5))
    lines = caplog.messages
    assert len(lines) == 3 and lines[0].startswith("For n_clusters = 2")
    assert best in (2, 3, 4) and len(table) == 3


def test_joblib_round_trip_predicts_the_same(fitted, food_features):
    model, folder = fitted
    _, matrix, _ = load_features(food_features)
    loaded = KMeansBaseline.load(folder / "kmeans.joblib")
    np.testing.assert_array_equal(loaded.predict(matrix), model.predict(matrix))


def test_orders_distance_and_file(fitted, food_features):
    _, folder = fitted
    model = folder / "kmeans.joblib"
    query = sorted(FOOD_QUERIES.iterdir())[0]
    by_distance = recommend_by_cluster(query, 4, library=food_features, model=model)
    by_file = recommend_by_cluster(query, 4, order="file", library=food_features, model=model)
    assert by_distance["distance"].is_monotonic_increasing
    assert list(by_file["path"]) == sorted(by_file["path"])  # file order: the CSV's sorted paths
    clusters = pd.read_csv(folder / "clusters.csv")
    members = clusters.loc[clusters["cluster"] == by_file["cluster"][0], "path"]
    assert list(by_file["path"]) == list(members[:4])
    assert set(by_distance["path"]) <= set(members) and by_distance["cluster"].nunique() == 1


def test_a_library_image_is_looked_up_and_left_out(fitted, food_features, food_db):
    _, folder = fitted
    query = food_db / "burger" / "burger1_resized.jpeg"
    result = recommend_by_cluster(query, 50, library=food_features, model=folder / "kmeans.joblib")
    assert "burger/burger1_resized.jpeg" not in set(result["path"])
    assert result["distance"].min() > 1e-4


def test_errors_are_specific(fitted, food_features, tmp_path):
    _, folder = fitted
    model = folder / "kmeans.joblib"
    query = sorted(FOOD_QUERIES.iterdir())[0]
    with pytest.raises(ValueError, match="n_sample must be at least 1"):
        recommend_by_cluster(query, 0, library=food_features, model=model)
    with pytest.raises(ValueError, match="unknown order 'random'"):
        recommend_by_cluster(query, 2, order="random", library=food_features, model=model)
    with pytest.raises(Exception, match="similar-finder extract"):
        recommend_by_cluster(query, 2, library=tmp_path / "missing.csv", model=model)
    with pytest.raises(ClusteringError, match="similar-finder cluster"):
        recommend_by_cluster(query, 2, library=food_features, model=tmp_path / "none.joblib")
    _, matrix, _ = load_features(food_features)
    with pytest.raises(ValueError, match="only 36 images"):
        tune_k(matrix, range(2, 40))
    # A model fitted on other features (another backbone and dimension) is refused.
    make_images(tmp_path / "imgs", 12)
    other = tmp_path / "other.csv"
    extract_features(tmp_path / "imgs", other, **{**FAST, "backbone": "resnet50"})
    with pytest.raises(ClusteringError, match="fitted on efficientnet_lite0 features"):
        recommend_by_cluster(tmp_path / "imgs" / "img0000.jpg", 2, library=other, model=model)
    bad = tmp_path / "bad.csv"
    bad.write_text("not,a,features\nfile")
    with pytest.raises(Exception, match="path"):
        fit_baseline(bad, model_path=tmp_path / "m.joblib", clusters_csv=tmp_path / "c.csv")


def test_large_libraries_are_clustered_chunk_by_chunk_without_a_normalised_copy(monkeypatch):
    from sklearn.metrics import adjusted_rand_score

    from similar_finder import clustering

    monkeypatch.setattr(clustering, "MINIBATCH_ABOVE", 1_000)
    monkeypatch.setattr(clustering, "CHUNK_ROWS", 512)
    monkeypatch.setattr(clustering, "MINIBATCH_ROWS", 128)
    normalised_rows = []
    real = clustering.l2_normalize
    monkeypatch.setattr(clustering, "l2_normalize", lambda x, **kw: normalised_rows.append(len(x)) or real(x, **kw))
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 3_000)
    features = rng.random((4, 64), dtype=np.float32)[truth] * 3 + rng.random((3_000, 64), dtype=np.float32)
    model, labels, inertia = clustering.fit_kmeans(4, features)
    assert type(model).__name__ == "MiniBatchKMeans" and len(labels) == 3_000 and inertia > 0
    assert adjusted_rand_score(truth, labels) > 0.95
    assert max(normalised_rows) <= 20 * 128  # chunks and the initial sample, never all 3,000 rows at once
    table, best = clustering.tune_k(features, range(2, 7))
    assert best == 4 and len(table) == 5


def test_the_kmeans_estimators_follow_scikit_learns_rules(fitted, food_features):
    import inspect

    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    from similar_finder import Library
    from similar_finder.clustering import ClusterRecommender
    from similar_finder.recommender import Recommender

    model, _ = fitted
    library = Library(food_features)
    approach = ClusterRecommender(model, order="random")  # checked by fit, not here
    assert approach.get_params()["order"] == "random" and not hasattr(approach, "threshold_")
    with pytest.raises(NotFittedError):
        check_is_fitted(approach)
    with pytest.raises(ValueError, match="unknown order 'random'"):
        approach.fit(library)
    approach.set_params(order="distance")
    check_is_fitted(approach.fit(library))
    assert approach.kmeans_ is model and approach.threshold_ == approach.gate_ == np.inf  # K-Means always answers
    # A clone holds an unfitted copy of the model: it fits its own, to the same clusters.
    twin = clone(approach)
    assert twin.get_params()["model"] is not model and not hasattr(twin.get_params()["model"], "model_")
    np.testing.assert_array_equal(twin.fit(library).labels_, approach.labels_)
    with pytest.raises(NotFittedError):
        KMeansBaseline().predict(library.matrix)
    assert clone(model).get_params() == model.get_params()
    # The two approaches are fitted alike; the K-Means model like any scikit-learn clusterer.
    assert list(inspect.signature(ClusterRecommender.fit).parameters) == \
        list(inspect.signature(Recommender.fit).parameters) == ["self", "X", "paths"]
    assert list(inspect.signature(KMeansBaseline.fit).parameters) == ["self", "X", "y"]

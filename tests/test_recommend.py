import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn.neighbors import NearestNeighbors

from conftest import FOOD_QUERIES, labels_of
from similar_finder import Library, load_features
from similar_finder.evaluate import evaluate_features, threshold_honesty
from similar_finder.recommender import NO_RESULTS, Recommender, recommend
from similar_finder.thresholds import calibrate_threshold


@pytest.fixture(scope="module")
def library(food_features, tmp_path_factory):
    """A private copy of the food features with a labelled threshold stored beside them."""
    folder = tmp_path_factory.mktemp("rec") / "feat"
    shutil.copytree(food_features.parent, folder)
    csv = folder / food_features.name
    opened = Library(csv)
    opened.save_threshold(calibrate_threshold(opened.matrix, opened.labels()))
    return csv


def test_cosine_beats_the_kmeans_baseline(library):
    paths, matrix, _ = load_features(library)
    table = evaluate_features(matrix, labels_of(paths)).table.set_index("method")
    cosine = table.loc["cosine recommender", "precision@5"]
    kmeans = table.filter(like="K-Means", axis=0)["precision@5"]
    assert cosine >= 0.8 and (cosine >= kmeans).all(), table


def test_new_photos_get_their_own_class_first_or_are_farther_than_any_library_photo(library):
    opened = Library(library)
    model = Recommender().fit(opened)
    own_scores = model.search(None, 1)[2]
    answered = 0
    for query in sorted(FOOD_QUERIES.iterdir()):
        result = recommend(query, 3, library=library)
        if len(result):
            answered += 1
            assert result["path"][0].split("/")[0] == query.name.split("_")[0]
            assert result["distance"].is_monotonic_increasing
        else:  # the gate refused it: then it really is farther from the library than any library photo
            score = model.search(opened.describer()(query), 1)[2][0]
            assert score >= model.gate_ > own_scores.max(), query.name
            ungated = Recommender(gate=np.inf).fit(opened).recommend(query, 3)
            assert ungated["path"][0].split("/")[0] == query.name.split("_")[0]
    assert answered >= 2


def test_unrelated_images_get_no_similar_images_found(library, tmp_path, caplog):
    import skimage.data

    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "astronaut.png")
    noise = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    for name in ("astronaut.png", "noise.png"):
        caplog.clear()
        with caplog.at_level("INFO", logger="similar_finder"):
            result = recommend(tmp_path / name, 5, library=library)
        assert result.empty and list(result.columns) == ["path", "image_id", "distance"]
        assert caplog.messages == [f"{tmp_path / name}: {NO_RESULTS}"]


def test_held_out_classes_mostly_get_no_results(library):
    paths, matrix, _ = load_features(library)
    honesty = threshold_honesty(matrix, labels_of(paths))
    assert honesty["held-out: no result"] > 0.5
    assert honesty["in library: answered"] > 0.5


def test_a_library_image_never_recommends_itself(library, food_db):
    paths, _, _ = load_features(library)
    for path in paths[::5]:
        result = recommend(food_db / path, 100, threshold=2.0, library=library)
        assert path not in set(result["path"]) and len(result) == len(paths) - 1  # more than exist: no error


def test_kneighbors_matches_scikit_learn(library):
    _, matrix, _ = load_features(library)
    queries = 0.8 * matrix[:7] + 0.2 * matrix[7:14]  # near, but not on, library points
    for metric in ("cosine", "euclidean", "manhattan"):
        ours = Recommender(metric, center=False).fit(matrix)
        d, i = ours.kneighbors(queries, 4)
        ref = NearestNeighbors(n_neighbors=4, metric=metric, algorithm="brute").fit(matrix)
        ref_d, ref_i = ref.kneighbors(queries)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(d, ref_d, rtol=1e-4, atol=1e-4)


def test_centering_is_cosine_of_mean_centred_vectors(library):
    _, matrix, _ = load_features(library)
    centred = matrix - matrix.mean(0)
    d, i = Recommender().fit(matrix).kneighbors(None, 3, rows=np.arange(5))
    ref_d, ref_i = NearestNeighbors(n_neighbors=4, metric="cosine").fit(centred).kneighbors(centred[:5])
    np.testing.assert_array_equal(i, ref_i[:, 1:])
    np.testing.assert_allclose(d, ref_d[:, 1:], atol=1e-4)


def test_faiss_index_gives_the_same_answers():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 64)).astype(np.float32)
    data = centres[rng.integers(0, 40, 12_000)] + 0.1 * rng.standard_normal((12_000, 64)).astype(np.float32)
    for metric in ("cosine", "euclidean"):
        brute = Recommender(metric).fit(data).kneighbors(None, 10, rows=np.arange(50))[1]
        approx = Recommender(metric, index="faiss").fit(data).kneighbors(None, 10, rows=np.arange(50))[1]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, brute)])
        assert recall >= 0.9, (metric, recall)


def test_unlabelled_threshold_is_the_tukey_fence_of_nearest_neighbour_distances(library):
    _, matrix, _ = load_features(library)
    result = calibrate_threshold(matrix, center=False)
    nn = NearestNeighbors(n_neighbors=2, metric="cosine").fit(matrix).kneighbors(matrix)[0][:, 1]
    q1, q3 = np.percentile(nn, [25, 75])
    assert result["method"] == "nn-tukey-fence"
    assert result["value"] == pytest.approx(q3 + 1.5 * (q3 - q1), abs=1e-4)
    # A recommender with no stored threshold applies the same rule to its library.
    assert Recommender(center=False).fit(matrix).threshold_ == pytest.approx(result["value"], abs=1e-6)


def test_stored_threshold_is_the_default(library):
    stored = Library(library).thresholds["cnn/cosine"]
    assert stored["method"] == "labelled-youden"
    assert Recommender.from_library(library).threshold_ == pytest.approx(stored["value"])


def test_errors_are_specific(library, tmp_path):
    query = sorted(FOOD_QUERIES.iterdir())[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        recommend(tmp_path / "missing.jpg", library=library)
    (tmp_path / "fake.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="not an image"):
        recommend(tmp_path / "fake.jpg", library=library)
    with pytest.raises(Exception, match="similar-finder extract"):
        recommend(query, library=tmp_path / "none.csv")
    with pytest.raises(ValueError, match="n_sample must be at least 1"):
        recommend(query, 0, library=library)
    with pytest.raises(ValueError, match="unknown metric 'cosin'"):
        recommend(query, metric="cosin", library=library)
    with pytest.raises(ValueError, match="FAISS index supports"):
        Recommender("manhattan", index="faiss").fit(np.ones((5, 3)))


def test_query_expansion_reranks_without_ever_returning_the_query(library, food_db):
    from similar_finder.evaluate import retrieval_scores

    opened = Library(library)
    labels = labels_of(opened.paths)
    rows = np.arange(len(opened))
    scores = {}
    for expansion in (0, 5):
        model = Recommender(threshold=np.inf, gate=np.inf, query_expansion=expansion).fit(opened)
        distances, indices, _ = model.search(None, 5, rows=rows)
        assert not (indices == rows[:, None]).any() and (np.diff(distances, axis=1) >= 0).all()
        scores[expansion] = retrieval_scores(list(indices), labels, 5)["precision@5"]
    assert scores[5] >= scores[0] - 1e-9
    result = recommend(food_db / opened.paths[0], 3, threshold=2.0, library=library, expand=True)
    assert len(result) == 3 and opened.paths[0] not in set(result["path"])
    with pytest.raises(ValueError, match="needs the cosine metric"):
        Recommender("manhattan", query_expansion=5).fit(opened.matrix)  # checked by fit, not by __init__


def test_query_expansion_on_a_tiny_library_never_answers_a_photo_with_itself():
    data = np.random.default_rng(0).random((4, 8), dtype=np.float32)
    model = Recommender(threshold=np.inf, gate=np.inf, query_expansion=5).fit(data)
    _, indices, _ = model.search(None, 5, rows=np.arange(4))
    assert not (indices == np.arange(4)[:, None]).any()


def test_the_recommender_follows_scikit_learns_estimator_rules(library):
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    _, matrix, _ = load_features(library)
    model = Recommender(threshold=0.4, gate=np.inf, metric="cosin", query_expansion=2)  # checked by fit, not here
    assert model.get_params()["metric"] == "cosin" and not hasattr(model, "threshold_")
    with pytest.raises(NotFittedError):
        check_is_fitted(model)
    with pytest.raises(ValueError, match="unknown metric 'cosin'"):
        model.fit(matrix)
    model.set_params(metric=None)
    check_is_fitted(model.fit(matrix))
    assert (model.metric_, model.threshold_, model.gate_) == ("cosine", 0.4, np.inf)
    copy = clone(model)
    assert copy.get_params() == model.get_params() and not hasattr(copy, "calibration_")
    # A parameter set after construction reaches the search: centring off is plain cosine.
    plain = Recommender()
    plain.center = False
    d, i = plain.fit(matrix).kneighbors(matrix[:4], 3)
    ref_d, ref_i = NearestNeighbors(n_neighbors=3, metric="cosine").fit(matrix).kneighbors(matrix[:4])
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(d, ref_d, atol=1e-4)
    assert not plain.neighbors_.center and plain.calibration_.center is False

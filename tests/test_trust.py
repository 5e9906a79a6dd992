"""Answers people can trust: the default rule answers library photos and refuses photos from elsewhere.

Real EfficientNet-Lite0 features of every shared set (clothing and CIFAR-10 as stratified samples of 500,
see conftest.py); each set in turn is the library. ``bench/quality_bench.py --part trust`` checks the same
with the whole clothing set and a 2,000-photo CIFAR-10 sample as libraries.
"""
import numpy as np
import pandas as pd
import pytest

from conftest import FOOD_QUERIES
from similar_finder import Library, Recommender, recommend
from similar_finder.cli import main

# The refusals measured under 0.95 on the samples: the 500 clothing photos as the library refused 0.944 of the
# food photos (all 3,781 refuse all of them, checked by the bench at 0.95; with no gate the sample refuses none);
# the 500 CIFAR-10 photos refuse 0.806 of the food photos since the gate leaves room for new photos from another
# source (thresholds.SHIFT_MARGIN; bench/gate_bench.py measures 0.39-0.81 on CIFAR-10 libraries, the rule's weak spot).
SAMPLE_REFUSALS = {("clothing sample", "food"): 0.85, ("cifar10 sample", "food"): 0.75}


@pytest.fixture(scope="module")
def sets(food_features, clothing_features, cifar_sample, non_photos, features_of):
    return {"food": Library(food_features), "clothing sample": Library(clothing_features),
            "cifar10 sample": Library(features_of(cifar_sample)), "food queries": Library(features_of(FOOD_QUERIES)),
            "non-photos": Library(features_of(non_photos))}


def _answered(model: Recommender, vectors=None) -> np.ndarray:
    distances, indices, gates = model.search(vectors, 1)
    return np.array([len(model.answer(d, i, g)) > 0 for d, i, g in zip(distances, indices, gates)])


@pytest.mark.parametrize("name", ["food", "clothing sample", "cifar10 sample"])
def test_default_rule_answers_its_own_photos_and_refuses_other_domains(sets, name):
    library = sets[name]
    model = Recommender(threshold=None).fit(library.matrix, library.paths)  # no stored calibration: the default
    assert _answered(model).mean() >= 0.97  # leave-one-out: each photo against all the others
    same_domain = {name, "food queries"} if name == "food" else {name}
    refusals = {other: 1 - _answered(model, sets[other].matrix).mean() for other in set(sets) - same_domain}
    short = {other: refused for other, refused in refusals.items()
             if refused < SAMPLE_REFUSALS.get((name, other), 0.95)}
    assert not short, (name, refusals)


def test_new_photos_from_another_source_are_answered_with_their_class(food_features):
    """Each food photo in turn held out of the library (one a class at a time), changed as another camera would
    change it (views.other_source_views): the gate answers them and the first result is of their class. Measured:
    0.992 answered, 0.960 with a first result of their class; Tukey's fence of the library's own scores, the rule
    before, answered 0.948 (0.917 of their class)."""
    from conftest import FOOD_DB
    from similar_finder.embedding import model_for
    from similar_finder.views import SHIFTS, other_source_views

    library = Library(food_features)
    labels = library.labels()
    embedder = model_for({"config": library.config})
    views = {row: embedder.embed(np.stack(list(other_source_views(FOOD_DB / path, 224).values())))
             for row, path in enumerate(library.paths)}
    by_class = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    answered, right = [], []
    for turn in range(min(len(rows) for rows in by_class)):
        held = np.array([rows[turn] for rows in by_class])
        kept = np.setdiff1d(np.arange(len(library)), held)
        model = Recommender(threshold=None).fit(library.matrix[kept], [library.paths[i] for i in kept])
        for row in held:
            distances, indices, gates = model.search(views[row], 1)
            for d, i, g in zip(distances, indices, gates):
                result = model.answer(d, i, g)
                answered.append(len(result) > 0)
                right.append(len(result) > 0 and result["path"].iloc[0].split("/")[0] == labels[row])
    assert len(answered) == len(library) * len(SHIFTS)
    assert np.mean(answered) >= 0.95 and np.mean(right) >= 0.9, (np.mean(answered), np.mean(right))


def test_the_gate_is_the_median_plus_a_margin_of_the_spread_by_hand():
    from similar_finder.thresholds import SHIFT_MARGIN, domain_gate, mean_distance

    gating = domain_gate([0.1, 0.2, 0.3, 0.4, 5.0], spread=0.5)
    assert gating["gate"] == pytest.approx(0.3 + SHIFT_MARGIN * 0.5)  # the median: one outlier moves nothing
    assert gating["gate_fence"] == pytest.approx(0.4 + 1.5 * 0.2)
    vectors = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    pairs = 1 - unit @ unit.T
    assert mean_distance(vectors) == pytest.approx(pairs[~np.eye(20, dtype=bool)].mean(), abs=1e-5)
    euclid = np.linalg.norm(vectors[:, None] - vectors[None], axis=2)
    assert mean_distance(vectors, "euclidean") == pytest.approx(euclid[~np.eye(20, dtype=bool)].mean(), rel=1e-4)


def test_a_food_photo_gets_no_clothing(sets):
    result = recommend(FOOD_QUERIES / "asparagus_test.jpg", 5, library=sets["clothing sample"])
    assert result.empty


def test_labelled_threshold_keeps_nine_in_ten_answered_and_shows_the_tradeoff(sets):
    library = sets["clothing sample"]
    model = Recommender(threshold=np.inf, gate=np.inf).fit(library.matrix)
    calibration = model.calibrate(library.labels())
    assert calibration["value"] >= calibration["youden"]
    assert _answered(model).mean() >= 0.90
    curve = pd.DataFrame(calibration["curve"])
    assert len(curve) == 50 and curve["library answered"].is_monotonic_increasing
    assert curve["other classes kept out"].is_monotonic_decreasing
    assert curve["library answered"].iloc[0] < 0.1 < 0.9 < curve["library answered"].iloc[-1]


def test_evaluate_reports_other_domain_refusals_for_every_kind(food_db, food_features, non_photos, tmp_path, capsys):
    assert main(["evaluate", str(food_db), "--features-file", str(food_features), "--ood", str(non_photos),
                 "--out", str(tmp_path), "--quiet"]) == 0
    table = pd.read_csv(tmp_path / "evaluation.csv").set_index("method")
    assert {"other-domain: no result", "library: answered"} <= set(table.columns)
    cnn = table.filter(like="cosine recommender", axis=0).iloc[0]
    assert cnn["other-domain: no result"] >= 0.95 and cnn["library: answered"] >= 0.97
    assert table["other-domain: no result"].notna().all() and "other-domain: no result" in capsys.readouterr().out


def test_answered_floor_by_hand():
    from similar_finder.thresholds import answered_floor, tukey_fence

    nearest = np.array([0.1, 0.2, 0.3, 0.4])
    assert 0.2 < answered_floor(nearest, np.ones(4, bool), 0.5) < 0.2 + 1e-9  # 2 of 4 strictly under it
    assert 0.3 < answered_floor(nearest, np.array([1, 1, 1, 0], bool), 0.9) < 0.3 + 1e-9  # all the gate allows
    assert tukey_fence([1, 2, 3, 4, 5]) == pytest.approx(4 + 1.5 * 2)

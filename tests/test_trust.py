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

# The one refusal measured under 0.95 on the samples: the 500 clothing photos as the library refused 0.944 of the
# food photos (all 3,781 refuse all of them, checked by the bench at 0.95; with no gate the sample refuses none).
SAMPLE_REFUSALS = {("clothing sample", "food"): 0.85}


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
    for other in set(sets) - same_domain:
        refused = 1 - _answered(model, sets[other].matrix).mean()
        assert refused >= SAMPLE_REFUSALS.get((name, other), 0.95), (name, other, refused)


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

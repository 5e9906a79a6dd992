"""Answers people can trust: the default rule answers library photos and refuses photos from elsewhere.

Real EfficientNet-Lite0 features of every shared set; each set in turn is the library.
"""
import numpy as np
import pandas as pd
import pytest

from conftest import FOOD_QUERIES
from similar_finder import Library, Recommender, extract_features, recommend
from similar_finder.cli import main


@pytest.fixture(scope="module")
def sets(food_features, clothing_features, cifar_sample, non_photos, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trust")
    cifar = extract_features(cifar_sample, folder / "cifar.csv", "efficientnet_lite0", progress=False)
    queries = extract_features(FOOD_QUERIES, folder / "queries.csv", "efficientnet_lite0", progress=False)
    others = extract_features(non_photos, folder / "non_photos.csv", "efficientnet_lite0", progress=False)
    food = Library(food_features)
    return {"food": food, "clothing": Library(clothing_features), "cifar10 sample": cifar,
            "food queries": queries, "non-photos": others}


def _answered(model: Recommender, vectors=None) -> np.ndarray:
    distances, indices, gates = model.search(vectors, 1)
    return np.array([len(model.answer(d, i, g)) > 0 for d, i, g in zip(distances, indices, gates)])


@pytest.mark.parametrize("name", ["food", "clothing", "cifar10 sample"])
def test_default_rule_answers_its_own_photos_and_refuses_other_domains(sets, name):
    library = sets[name]
    model = Recommender(threshold=None).fit(library.matrix, library.paths)  # no stored calibration: the default
    assert _answered(model).mean() >= 0.97  # leave-one-out: each photo against all the others
    same_domain = {name, "food queries"} if name == "food" else {name}
    for other in set(sets) - same_domain:
        refused = 1 - _answered(model, sets[other].matrix).mean()
        assert refused >= 0.95, (name, other, refused)


def test_a_food_photo_gets_no_clothing(sets):
    result = recommend(FOOD_QUERIES / "asparagus_test.jpg", 5, library=sets["clothing"])
    assert result.empty


def test_labelled_threshold_keeps_nine_in_ten_answered_and_shows_the_tradeoff(sets):
    library = sets["clothing"]
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

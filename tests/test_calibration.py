"""The one home of "answer or refuse": Calibration, its stored form, and threshold and gate kept apart."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, as_exports_only, labels_of, make_images
from similar_finder import Library, cli
from similar_finder.clustering import ClusterRecommender
from similar_finder.evaluate import default_rule_honesty, threshold_honesty
from similar_finder.recommender import Recommender, recommend
from similar_finder.thresholds import NO_RESULTS, Calibration, calibrate_threshold, choose_calibration


@pytest.fixture(scope="module")
def library(food_features, tmp_path_factory):
    """A private copy of the food features with a labelled calibration stored beside them."""
    folder = tmp_path_factory.mktemp("calibration") / "feat"
    shutil.copytree(food_features.parent, folder)
    opened = Library(folder / food_features.name)
    opened.save_threshold(calibrate_threshold(opened.matrix, opened.labels()))
    return opened


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    """A photo of nothing: the gate of the food library refuses it."""
    path = tmp_path_factory.mktemp("noise") / "noise.png"
    Image.fromarray((np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)).save(path)
    return path


# --- the decision ---------------------------------------------------------------------


def test_keep_is_threshold_and_gate_and_real_neighbours():
    calibration = Calibration(0.3, 0.2)
    np.testing.assert_array_equal(calibration.keep([0.1, 0.29, 0.3, 0.1], [4, 5, 6, -1], 0.1),
                                  [True, True, False, False])  # strictly under; -1 padding is never a result
    assert not calibration.keep([0.1, 0.2], [1, 2], 0.2).any()  # a gate score not under the gate: no answer
    assert calibration.keep([0.1], [1], None).all()  # an approach without a gate score: the threshold alone
    many = calibration.keep(np.array([[0.1, 0.5], [0.1, 0.2]]), np.array([[1, 2], [3, 4]]), np.array([0.1, 0.3]))
    np.testing.assert_array_equal(many, [[True, False], [False, False]])  # the gate refuses the second query
    with pytest.raises(ValueError, match="3 gate scores for 2 queries"):
        calibration.keep(np.zeros((2, 2)), np.zeros((2, 2), int), np.zeros(3))


def test_threshold_zero_refuses_every_neighbour_and_gate_inf_admits_every_query():
    nothing = Calibration(0.0, np.inf)
    assert not nothing.keep([-1e-7, 0.0, 0.5], [1, 2, 3], 0.0).any()  # an exact copy's rounding included
    no_gate = Calibration(np.inf, np.inf)
    assert no_gate.keep([0.9], [1], np.inf).all() and no_gate.admits(np.inf)
    with pytest.raises(ValueError, match="np.inf turns the gate off"):
        Calibration(0.3, np.nan)


def test_threshold_and_gate_are_overridden_each_on_its_own():
    stored = Calibration(0.3, 0.2, metric="cosine", center=True, chosen="labelled", gate_chosen="unlabelled",
                         method="labelled-youden")
    loose = stored.overridden(threshold=2.0)
    assert (loose.threshold, loose.gate, loose.chosen, loose.gate_chosen) == (2.0, 0.2, "explicit", "unlabelled")
    open_gate = stored.overridden(gate=np.inf)
    assert (open_gate.threshold, open_gate.gate, open_gate.chosen, open_gate.gate_chosen) == (
        0.3, np.inf, "labelled", "explicit")
    assert stored.overridden() is stored


def test_choose_calibration_takes_each_number_from_where_it_is_given(food_features):
    matrix = Library(food_features).matrix
    unlabelled = Calibration.from_dict(calibrate_threshold(matrix))
    asked = []

    def fresh():
        asked.append(1)
        return unlabelled

    stored = Calibration(0.25, 0.15, metric="cosine", center=True, chosen="labelled", gate_chosen="unlabelled")
    assert choose_calibration(stored=stored, unlabelled=fresh) == stored and not asked  # stored: nothing recomputed
    mixed = choose_calibration(threshold=0.5, stored=stored, unlabelled=fresh)
    assert (mixed.threshold, mixed.gate) == (0.5, 0.15) and not asked
    default = choose_calibration(gate=np.inf, unlabelled=fresh)
    assert (default.threshold, default.gate, default.chosen) == (unlabelled.threshold, np.inf, "unlabelled")
    assert default.gate_chosen == "explicit" and asked
    # A record of version 0.1 has a threshold and no gate: the gate comes from the unlabelled rule.
    old = choose_calibration(stored=Calibration.from_dict({"value": 0.123, "metric": "cosine", "center": True}),
                             unlabelled=fresh)
    assert (old.threshold, old.gate, old.gate_chosen) == (0.123, unlabelled.gate, "unlabelled")
    tiny = choose_calibration(unlabelled=lambda: None, metric="cosine")  # too few photos to calibrate
    assert (tiny.threshold, tiny.gate, tiny.metric) == (np.inf, np.inf, "cosine")


# --- the stored form ------------------------------------------------------------------


def test_a_labelled_calibration_round_trips_through_the_library_file(library):
    stored = library.threshold_for("cnn", "cosine", True)
    assert isinstance(stored, Calibration)
    assert (stored.chosen, stored.gate_chosen, stored.method) == ("labelled", "unlabelled", "labelled-youden")
    assert 0 < stored.gate < 1 and 0 < stored.threshold < 1
    record = Library(library.files.csv).thresholds["cnn/cosine"]  # as stored in the library's database
    assert {"value", "gate", "method", "metric", "center", "curve", "fingerprint"} <= set(record)
    assert Calibration.from_dict(record) == stored and Calibration.from_dict(record).to_dict() == record
    assert Recommender().fit(library).calibration_ == stored  # what the recommender answers with


def test_records_of_every_version_are_read(tmp_path):
    # 0.2 records from before Calibration: no "chosen", known by their method.
    unlabelled = Calibration.from_dict({"value": 0.2, "gate": 0.1, "method": "nn-tukey-fence", "metric": "cosine",
                                        "center": True, "images": 36})
    assert (unlabelled.chosen, unlabelled.gate_chosen, unlabelled.details) == ("unlabelled", "unlabelled",
                                                                               {"images": 36})
    # Version 0.1 kept them in the sidecar, without gate or fingerprint: opened, and completed when used.
    images = tmp_path / "photos"
    make_images(images / "a", 4)
    make_images(images / "b", 4, seed=1)
    from similar_finder import extract_features

    built = extract_features(images, tmp_path / "f.csv", **FAST)
    sidecar = json.loads(built.files.meta.read_text())
    del sidecar["fingerprint"]
    sidecar["thresholds"] = {"cnn/cosine": {"value": 0.123, "metric": "cosine", "center": True}}
    built.files.meta.write_text(json.dumps(sidecar))
    as_exports_only(built.files)
    old = Library(tmp_path / "f.csv")
    assert old.threshold_for("cnn", "cosine", True).gate is None
    model = Recommender().fit(old)
    assert model.threshold_ == pytest.approx(0.123) and np.isfinite(model.gate_)
    with pytest.raises(ValueError, match="needs a 'value'"):
        Calibration.from_dict({"gate": 0.1})


# --- threshold and gate apart, on real photos -----------------------------------------


def test_an_explicit_threshold_leaves_the_gate_on(library, noise):
    model = Recommender().fit(library)
    score = model.search(library.describer()(noise), 1)[2][0]
    assert not model.calibration_.admits(score)  # the gate refuses the noise photo
    assert recommend(noise, 3, threshold=2.0, library=library).empty  # a looser threshold does not open the gate
    assert len(recommend(noise, 3, threshold=2.0, gate=np.inf, library=library)) == 3
    assert len(Recommender(threshold=2.0, gate=np.inf).fit(library).recommend(noise, 3)) == 3
    assert Recommender(threshold=2.0).fit(library).recommend(noise, 3).empty


def test_an_explicit_gate_leaves_the_threshold_on(library, food_db):
    query = food_db / library.paths[0]
    limit = library.threshold_for("cnn", "cosine", True).threshold
    result = recommend(query, 35, gate=np.inf, library=library)
    assert 0 < len(result) < 35 and (result["distance"] < limit).all()  # the calibrated threshold still cuts
    assert recommend(query, 35, threshold=0.0, gate=np.inf, library=library).empty


def test_the_recommend_command_has_threshold_and_gate_apart(library, noise, capsys):
    csv = str(library.files.csv)
    assert cli.main(["recommend", str(noise), "-n", "3", "--threshold", "2", "--features-file", csv]) == 0
    assert capsys.readouterr().out.strip() == NO_RESULTS
    assert cli.main(["recommend", str(noise), "-n", "3", "--threshold", "2", "--gate", "off",
                     "--features-file", csv]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["path", "image_id", "distance"] and len(lines) == 4
    with pytest.raises(SystemExit) as exit_:
        cli.main(["recommend", str(noise), "--gate", "maybe", "--features-file", csv])
    assert exit_.value.code == 2 and "neither a number nor 'off'" in capsys.readouterr().err
    assert cli.main(["recommend", str(noise), "--approach", "kmeans", "--gate", "off", "--features-file", csv]) == 2
    assert "--gate apply to the cosine approach only" in capsys.readouterr().err


# --- one home -------------------------------------------------------------------------


def test_every_answer_is_decided_by_calibration_keep(library, food_db, monkeypatch):
    """Refuse everything in Calibration.keep alone: the recommender, K-Means, evaluation and the app all follow."""
    from similar_finder.service import LibraryService

    query = food_db / library.paths[0]
    cosine, kmeans = Recommender(threshold=2.0, gate=np.inf).fit(library), ClusterRecommender().fit(library)
    service = LibraryService(library)
    assert len(cosine.recommend(query, 3)) == 3 and len(kmeans.recommend(query, 3)) == 3
    assert service.similar(0, 3).results
    labels = labels_of(library.paths)
    assert threshold_honesty(library.matrix, labels)["in library: answered"] > 0.5

    monkeypatch.setattr(Calibration, "keep", lambda self, distances, indices, gate_score=None:
                        np.zeros(np.shape(distances), bool))
    assert cosine.recommend(query, 3).empty and kmeans.recommend(query, 3).empty
    assert service.similar(0, 3).results == [] and service.similar(0, 3, "kmeans").results == []
    honesty = threshold_honesty(library.matrix, labels)
    assert honesty["in library: answered"] == 0 and honesty["held-out: no result"] == 1
    assert default_rule_honesty(library.matrix, "cosine", np.arange(5), library.matrix[:3],
                                cosine.neighbors_) == {"library: answered": 0.0, "other-domain: no result": 1.0}

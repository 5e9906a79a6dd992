import numpy as np
import pandas as pd
import pytest

from similar_finder.evaluate import evaluate, retrieval_scores
from similar_finder.library import Library, labels_from_paths


def test_retrieval_scores_by_hand():
    labels = np.array(["a", "a", "a", "b", "b"])
    rankings = [np.array([1, 3, 2, 4]), np.array([3, 4]), np.array([0, 1]),
                np.array([4]), np.array([])]
    scores = retrieval_scores(rankings, labels, k=2)
    # precision@2: 1/2, 0, 2/2, 1/2, 0
    assert scores["precision@2"] == pytest.approx((0.5 + 0 + 1 + 0.5 + 0) / 5)
    # recall@2: 1/2, 0, 2/2, 1/1, 0
    assert scores["recall@2"] == pytest.approx((0.5 + 0 + 1 + 1 + 0) / 5)
    # AP: query 0 finds hits at ranks 1 and 3 -> (1/1 + 2/3) / 2
    assert scores["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 0 + 1 + 1 + 0) / 5)


def test_labels_need_class_subfolders():
    assert list(labels_from_paths(["cat/1.jpg", "dog/2.jpg"])) == ["cat", "dog"]
    with pytest.raises(ValueError, match="one subfolder per class"):
        labels_from_paths(["1.jpg", "dog/2.jpg"], required=True)
    assert labels_from_paths(["1.jpg", "dog/2.jpg"]) is None


def test_evaluate_writes_the_comparison_table(food_db, food_features, tmp_path):
    table = evaluate(food_db, features_csv=food_features, out_dir=tmp_path, progress=False).table
    methods = list(table["method"])
    assert methods[0] == "cosine recommender (CNN efficientnet_lite0)" and "raw pixels, cosine" in methods
    assert sum(m.startswith("K-Means baseline") for m in methods) == 2
    written = pd.read_csv(tmp_path / "evaluation.csv")
    assert list(written["method"]) == methods
    markdown = (tmp_path / "evaluation.md").read_text()
    assert "| cosine recommender" in markdown and "precision@5" in markdown
    pixels = table.set_index("method").loc["raw pixels, cosine", "precision@5"]
    assert pixels < 0.5 < table.loc[0, "precision@5"]  # learnt features far above raw pixels


def test_a_sample_of_queries_scores_like_all_of_them(food_features):
    from similar_finder import load_features
    from similar_finder.evaluate import evaluate_features

    paths, matrix, _ = load_features(food_features)
    labels = labels_from_paths(paths)
    full = evaluate_features(matrix, labels)
    sampled = evaluate_features(matrix, labels, max_queries=12)
    assert full.queries == 36 and sampled.queries == 12
    # 12 evenly spread queries, 2 per class, score close to all 36
    assert abs(sampled.table.loc[0, "precision@5"] - full.table.loc[0, "precision@5"]) < 0.15


def test_an_unavailable_other_backbone_is_left_out_with_its_reason(food_db, food_features, tmp_path,
                                                                   monkeypatch, caplog):
    import keras

    from similar_finder import backbones

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.setattr(keras.applications, "VGG19", offline)
    backbones.clear_cache()
    try:
        with caplog.at_level("WARNING", logger="similar_finder"):
            table = evaluate(food_db, features_csv=food_features, other_backbones=("vgg19",),
                             out_dir=tmp_path, progress=False).table
    finally:
        backbones.clear_cache()
    assert not any("vgg19" in m for m in table["method"])
    assert "left out vgg19" in caplog.text and "--weights PATH" in caplog.text


def test_other_backbones_take_a_pooling_and_backbone_rows_carry_their_throughput(tmp_path):
    from conftest import make_images
    from similar_finder.evaluate import split_backbone_option

    assert split_backbone_option("efficientnet_lite0:gem") == ("efficientnet_lite0", "gem")
    assert split_backbone_option("efficientnet_lite0+efficientnet_lite2") == (
        "efficientnet_lite0+efficientnet_lite2", None)
    for i, label in enumerate("abc"):
        make_images(tmp_path / "photos" / label, 3, seed=i)
    run = dict(features_csv=tmp_path / "f.csv", other_backbones=("efficientnet_lite0:gem",), out_dir=tmp_path,
               progress=False, backbone="efficientnet_lite0", weights=None, input_size=64)
    first = evaluate(tmp_path / "photos", **run).table.set_index("method")
    gem = first.loc["CNN efficientnet_lite0:gem, cosine"]
    assert gem["dims"] == 1280 and gem["photos/s"] > 0
    assert (tmp_path / "f-efficientnet_lite0-gem.json").is_file()
    main_row = first.loc["cosine recommender (CNN efficientnet_lite0)"]
    assert main_row["photos/s"] > 0 and np.isnan(first.loc["raw pixels, cosine", "photos/s"])
    # A re-run embeds nothing, and reports the throughput its features were made at.
    again = evaluate(tmp_path / "photos", **run).table.set_index("method")
    assert again.loc["CNN efficientnet_lite0:gem, cosine", "photos/s"] == gem["photos/s"]
    assert again.loc["cosine recommender (CNN efficientnet_lite0)", "photos/s"] == main_row["photos/s"]


def test_chi2_over_each_querys_filled_bins_is_sklearns_dense_chi2(food_features):
    from sklearn.metrics.pairwise import additive_chi2_kernel

    from similar_finder.neighbors import chi2_distances

    histograms = Library(food_features).vectors("color")  # real colour histograms: most of their bins empty
    assert (histograms == 0).mean() > 0.5
    dense = -0.5 * additive_chi2_kernel(histograms, histograms)
    ours = chi2_distances(histograms, histograms)
    assert np.abs(ours - dense).max() < 1e-5
    assert (np.argsort(ours, 1, kind="stable")[:, :6] == np.argsort(dense, 1, kind="stable")[:, :6]).mean() > 0.99
    empty = np.zeros((1, histograms.shape[1]), np.float32)  # a query with no filled bin: half of each row's sum
    np.testing.assert_allclose(chi2_distances(empty, histograms)[0], 0.5 * histograms.sum(1), rtol=1e-6)
    with pytest.raises(ValueError, match="every value must be 0 or more"):
        chi2_distances(-histograms[:1], histograms)

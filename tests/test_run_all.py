import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from similar_finder.backbones import OFFLINE_BACKBONE
from similar_finder.run_all import run_all


def _assert_real_picture(path, min_side=150):
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert min(pixels.shape) >= min_side, (path, pixels.shape)
    assert pixels.std() > 10, f"{path} looks blank"


@pytest.fixture(scope="module")
def food_run(food_db, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "food"
    return run_all(food_db, out=out, backbone="efficientnet_lite0", progress=False), out


def test_food_run_draws_every_grid_the_plots_and_the_report(food_run, food_db):
    summary, out = food_run
    images = sorted(p for p in food_db.rglob("*") if p.is_file())
    for approach in ("cosine", "kmeans"):
        grids = sorted((out / "rec" / approach).glob("*.jpg"))
        assert len(grids) == len(images) == 36
        for grid in grids[::9]:
            _assert_real_picture(grid)
    for plot in ("tsne.png", "silhouette.png", "distances.png", "threshold.png"):  # UMAP on request: notebook 04
        _assert_real_picture(out / plot, 250)
    report = (out / "report.md").read_text()
    assert f"k = {summary.kmeans.k_}" in report and 4 <= summary.kmeans.k_ <= 8
    assert "| cosine recommender" in report and "K-Means baseline (distance order" in report
    html = (out / "report.html").read_text()
    assert "![threshold](threshold.png)" in report and "gate" in report
    assert html.count("data:image/png;base64,") >= 3 and "<table" in html and "<td>" in html
    assert pd.read_csv(out / "evaluation.csv")["method"].iloc[0].startswith("cosine recommender")


def test_second_run_reuses_the_features(food_run, food_db):
    first, out = food_run
    second = run_all(food_db, out=out, backbone="efficientnet_lite0", progress=False, limit=3)
    assert second.library.stats.embedded == 0 and second.library.stats.reused == 36
    assert second.timings["extract features"] < first.timings["extract features"] / 3


def test_embedded_default_and_a_corrupt_file(tmp_path):
    from similar_finder.demo import ensure_demo_library

    demo = ensure_demo_library()  # the real default location, data/demo
    library = tmp_path / "library"
    shutil.copytree(demo, library)
    (library / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole JPEG")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # offline, the default ResNet50 falls back to EfficientNet-Lite2
        summary = run_all(library, out=tmp_path / "out", progress=False)
    assert summary.library.meta["backbone"] in ("resnet50", OFFLINE_BACKBONE)
    assert len(summary.library) == 60 and len(summary.skipped) == 1
    assert len(list((tmp_path / "out" / "rec" / "cosine").glob("*.jpg"))) == 60
    report = (tmp_path / "out" / "report.md").read_text()
    assert "cat/broken.jpg" in report and "1 skipped" in report
    table = summary.evaluation.table
    assert table.loc[0, "method"].startswith("cosine recommender") and table.loc[0, "precision@5"] > 0.8


def test_colour_histograms_can_drive_the_recommender(food_run, food_db):
    _, out = food_run
    summary = run_all(food_db, out=out, backbone="efficientnet_lite0", kind="color", limit=3, progress=False)
    assert summary.threshold["metric"] == "chi2" and len(list((out / "rec" / "color").glob("*.jpg"))) == 3
    assert "color features, chi2 distance" in (out / "report.md").read_text()


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(ValueError, match="n_sample must be at least 1"):
        run_all(tmp_path, n_sample=0)
    with pytest.raises(ValueError, match="unknown feature kind 'colour'"):
        run_all(tmp_path, kind="colour")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_all(tmp_path / "missing")


def test_only_and_limit_choose_what_a_run_makes_and_its_report_says_so(food_run, food_db):
    first, out = food_run
    summary = run_all(food_db, out=out, backbone="efficientnet_lite0", progress=False, limit=4,
                      only=["grids", "report"])
    assert summary.grids == len(summary.grid_files) == 4 and set(summary.timings) >= {"recommendation grids", "report"}
    assert not {"maps", "evaluate"} & set(summary.timings) and summary.evaluation is None
    report = (out / "report.md").read_text()
    assert "recommendation grids: 4 photos (an even sample of the 36 photos, --limit)" in report
    # Only this run's grids are shown, though the first run's 36 are still in rec/.
    assert report.count("](rec/cosine/") == 4 and len(list((out / "rec" / "cosine").glob("*.jpg"))) == 36
    assert "maps: not drawn in this run" in report and "Evaluation\n\nNot run in this run" in report


def test_only_maps_and_report_from_the_command_line_draws_no_grid(food_run, food_db, capsys):
    from similar_finder import cli

    _, out = food_run
    (out / "tsne.png").unlink()
    assert cli.main(["run-all", str(food_db), "--out", str(out), "--backbone", "efficientnet_lite0",
                     "--only", "maps,report", "--quiet"]) in (0, None)
    printed = capsys.readouterr().out
    assert "report:" in printed and "grids:" not in printed and "tsne.png" in printed
    assert (out / "tsne.png").is_file()
    report = (out / "report.md").read_text()
    assert "recommendation grids: none drawn in this run" in report and "](rec/" not in report


def test_bad_parts_and_limits_are_clear(food_db):
    with pytest.raises(ValueError, match="unknown part 'gridz'; choose one of grids, maps, evaluation, report"):
        run_all(food_db, only="gridz")
    with pytest.raises(ValueError, match="limit must be at least 1"):
        run_all(food_db, limit=0)

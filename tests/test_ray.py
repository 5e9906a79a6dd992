"""Extraction on a real local Ray (2 CPUs): the same features as in-process, incremental, and fault-tolerant."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest

from conftest import CLOTHING, FOOD_DB

from similar_finder.ray_engine import RayUnavailableError, import_ray, start_ray  # noqa: E402

try:
    ray = import_ray(local=True)  # before anyone else imports it: a local Ray then listens on loopback only
except RayUnavailableError as exc:
    pytest.skip(str(exc), allow_module_level=True)

from similar_finder import extract_features  # noqa: E402
from similar_finder.store import FeaturesError  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # Started as the engine starts it, on loopback only: the test talks to nothing but 127.0.0.1.
    start_ray(num_cpus=2)
    assert ray._private.worker.global_worker.node.gcs_address.startswith("127.0.0.1:")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The 36 food photos and 64 clothing photos (linked in place, not copied), and one corrupt file: four
    batches of 32, enough for a worker to be killed between two of them."""
    folder = tmp_path_factory.mktemp("ray-photos")
    clothing = sorted(p for p in CLOTHING.rglob("*.jpg"))
    for photo, where in [*((p, "food") for p in sorted(FOOD_DB.rglob("*.jp*g"))),
                         *((p, "clothing") for p in clothing[:: len(clothing) // 64][:64])]:
        target = folder / where / photo.parent.name / photo.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(photo)
    (folder / "clothing" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return folder


@pytest.fixture(scope="module")
def in_process(photos, tmp_path_factory):
    return extract_features(photos, tmp_path_factory.mktemp("local") / "features.csv", "efficientnet_lite0",
                            progress=False)


def test_ray_gives_the_in_process_features_and_a_second_run_embeds_nothing(photos, in_process, tmp_path):
    out = tmp_path / "features.csv"
    library = extract_features(photos, out, "efficientnet_lite0", progress=False, engine="ray")
    assert library.paths == in_process.paths and len(library) == 100
    assert np.abs(library.matrix - in_process.matrix).max() < 1e-5
    assert library.meta["config"] == in_process.meta["config"]
    skipped = pd.read_csv(library.files.skipped)
    assert skipped["path"].tolist() == ["clothing/broken.jpg"] and "truncated" in skipped["reason"][0]
    assert library.stats.embedded == 101 and not library.files.shards.exists()

    again = extract_features(photos, out, "efficientnet_lite0", progress=False, engine="ray")
    assert again.stats.embedded == 0 and again.stats.reused == 101
    with pytest.raises(FeaturesError, match="cannot be mixed"):
        extract_features(photos, out, "efficientnet_lite0", pooling="max", progress=False, engine="ray")


def _embedding_actors() -> list[int]:
    # Ray's own record of its actors (the state API without the dashboard): the pids of the model workers.
    from ray._private import state

    return [a["Pid"] for a in state.actors().values()
            if "Embedder" in a.get("ActorClassName", "") and a.get("State") == "ALIVE"]


@pytest.fixture(scope="module")
def killed_run(photos, tmp_path_factory):
    """A Ray run into a Parquet store during which a model worker is killed (SIGKILL) once shards are written:
    ``(folder, store, pid killed, errors)``. Two tests read it: one Ray run instead of two (each costs 20 s)."""
    from similar_finder.store import FeatureFiles

    folder = tmp_path_factory.mktemp("killed")
    out = folder / "features.parquet"
    result, errors = {}, []

    def run():
        try:
            result["library"] = extract_features(photos, out, "efficientnet_lite0", progress=False, engine="ray")
        except Exception as exc:  # noqa: BLE001 - re-raised by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    shards, killed = FeatureFiles(out).shards, None
    deadline = time.monotonic() + 240
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        pids = _embedding_actors()
        if pids and list(shards.glob("shard-*.parquet")):  # mid-run: some batches written, not all
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(600)
    return folder, result.get("library"), killed, errors


def test_a_worker_killed_mid_run_loses_and_doubles_no_photo(killed_run, in_process):
    _, library, killed, errors = killed_run
    assert killed is not None, "the run ended before a worker could be killed"
    assert not errors, errors
    assert library.paths == in_process.paths and len(set(library.paths)) == len(library.paths)
    assert np.abs(library.matrix - in_process.matrix).max() < 1e-5
    assert killed not in _embedding_actors()


def test_shards_of_a_driver_that_died_are_reused(photos, in_process, tmp_path, monkeypatch):
    from similar_finder.incremental import KnownResults

    out = tmp_path / "features.csv"
    real = KnownResults.add_shards

    def driver_dies(self, folder, dim, spec=None):
        if list(folder.glob("shard-*.parquet")) and spec is None:  # after the workers, before the merge
            raise KeyboardInterrupt
        return real(self, folder, dim, spec)

    monkeypatch.setattr(KnownResults, "add_shards", driver_dies)
    with pytest.raises(KeyboardInterrupt):
        extract_features(photos, out, "efficientnet_lite0", progress=False, engine="ray")
    assert len(list(out.with_suffix(".shards").glob("shard-*.parquet"))) > 1 and not out.exists()
    monkeypatch.setattr(KnownResults, "add_shards", real)

    library = extract_features(photos, out, "efficientnet_lite0", progress=False)  # any engine resumes
    assert library.stats.embedded == 0
    assert library.paths == in_process.paths and np.abs(library.matrix - in_process.matrix).max() < 1e-5


def test_a_parquet_store_is_read_by_everything_without_a_csv(photos, in_process, killed_run, tmp_path):
    from similar_finder import Library, recommend
    from similar_finder.clustering import fit_baseline

    folder, library, _, errors = killed_run  # written by Ray, a worker killed on the way
    assert not errors, errors
    out = folder / "features.parquet"
    assert library.meta["store_format"] == "parquet" and out.is_dir() and list(out.glob("part-*.parquet"))
    # No feature CSV and no .npy: only the audit and the skipped list are CSVs.
    assert {p.name for p in folder.glob("*.csv")} == {"features.files.csv", "features.skipped.csv"}
    assert not library.files.npy.exists()
    reopened = Library(out)
    assert reopened.paths == in_process.paths and np.abs(reopened.matrix - in_process.matrix).max() < 1e-5
    answer = recommend("food/burger/burger1_resized.jpeg", 3, library=out)
    assert len(answer) and answer["path"].str.startswith("food/burger/").all()
    model = fit_baseline(out, model_path=tmp_path / "kmeans.joblib", clusters_csv=tmp_path / "clusters.csv")
    assert len(model.labels_) == len(in_process)
    assert extract_features(photos, out, progress=False).stats.embedded == 0  # the format is kept

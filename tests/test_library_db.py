"""The library's one commit point: a crash at any write step, damage to any file, and ids that never move."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST, make_images
from similar_finder import Library, add_photos, extract_features, remove_photos
from similar_finder._io import file_sha256
from similar_finder.store import FeaturesError, read_store

DRIVER = Path(__file__).with_name("crash_driver.py")


def ids_by_content(library: Library) -> dict[str, int]:
    shas = dict(zip(library.audit["path"], library.audit["sha256"]))
    return {shas[p]: int(i) for p, i in zip(library.paths, library.ids)}


def test_a_crash_at_every_write_step_leaves_the_old_or_the_new_library(tmp_path):
    result = subprocess.run([sys.executable, str(DRIVER), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    for name, outcome in report.items():
        assert outcome["failures"] == [], (name, outcome["failures"][:5])
        # The change has many write steps, and crashes before its commit leave the old state, after it the new.
        assert outcome["steps"] >= 15 and outcome["old"] >= 10 and outcome["new"] >= 1, (name, outcome)
    assert report["extract"]["new"] > 1  # the exports are written after the commit: a crash there keeps the change
    assert "Traceback" not in result.stderr


@pytest.fixture
def library(tmp_path) -> Library:
    make_images(tmp_path / "photos" / "a", 3)
    make_images(tmp_path / "photos" / "b", 3, seed=1)
    return extract_features(tmp_path / "photos", tmp_path / "f.csv", **FAST)


def test_ids_never_move_across_adds_removals_renames_and_restarts(library, tmp_path):
    photos = tmp_path / "photos"
    first = ids_by_content(library)
    assert sorted(first.values()) == list(range(6))
    # An add into a folder that sorts first, by extraction and by the app's path (add_photos).
    make_images(photos / "0first", 1, seed=5)
    grown = extract_features(photos, library.files.csv, **FAST)
    make_images(photos / "0first", 2, seed=6, prefix="up")
    grown = add_photos(grown, ["0first/up0000.jpg", "0first/up0001.jpg"])
    assert grown.stats.embedded == 2 and len(grown) == 9
    # A removal, a rename (same content, new name and folder), a restart (a fresh read).
    (photos / "a" / "img0000.jpg").unlink()
    removed_sha = next(s for s, i in first.items() if library.paths[library.row_of_id[i]] == "a/img0000.jpg")
    (photos / "c").mkdir()
    (photos / "b" / "img0002.jpg").rename(photos / "c" / "moved.jpg")
    changed = extract_features(photos, library.files.csv, **FAST)
    assert changed.stats.embedded == 0  # the rename is known by its content
    reopened = Library(library.files.csv)
    now = ids_by_content(reopened)
    assert {s: i for s, i in now.items() if s in first} == {s: i for s, i in first.items() if s != removed_sha}
    assert reopened.image_id("c/moved.jpg") == first[file_sha256(photos / "c" / "moved.jpg")]
    # New photos got new ids, never one of an earlier photo, removed ones included.
    assert min(i for s, i in now.items() if s not in first) >= 6
    taken = remove_photos(reopened, [reopened.image_id("b/img0000.jpg")])
    assert "b/img0000.jpg" not in taken.paths and len(taken) == len(reopened) - 1
    make_images(photos / "d", 1, seed=9)
    last = extract_features(photos, library.files.csv, **FAST)  # the removed photo's file is still there: back in
    assert set(last.ids.tolist()) - set(now.values()) == {max(now.values()) + 1, max(now.values()) + 2}
    assert last.image_id("b/img0000.jpg") != reopened.image_id("b/img0000.jpg")  # as a new photo, with a new id
    # The catalog names the same photos by the same ids, by construction.
    catalog = last.catalog()
    assert all(catalog.get(int(i))["path"] == p for i, p in zip(last.ids, last.paths))


def test_a_damaged_database_is_rebuilt_from_the_exports(library, caplog):
    before = list(zip(library.ids, library.paths))
    database = library.files.database
    for damage in (lambda b: b[: len(b) // 2], lambda b: b"", lambda b: b"garbage, not SQLite" * 100):
        data = database.read_bytes()
        for suffix in ("-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
        database.write_bytes(damage(data))
        caplog.clear()
        with caplog.at_level(logging.WARNING, "similar_finder"):
            reopened = Library(library.files.csv)
        assert list(zip(reopened.ids, reopened.paths)) == before
        assert np.array_equal(reopened.matrix, library.matrix)
        assert any("rebuilding it from f.csv" in r.getMessage() for r in caplog.records) or not damage(b"x")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_segment_is_refused_in_one_line_and_extract_embeds_it_again(library, tmp_path, damage):
    [segment] = library.files.vectors.iterdir()
    data = bytearray(segment.read_bytes())
    segment.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:10] + bytes([data[10] ^ 1]) + data[11:])
    with pytest.raises(FeaturesError, match=r"f\.vectors/00000001\.f32 is damaged.*similar-finder extract"):
        read_store(library.files.csv)
    query = tmp_path / "photos" / "a" / "img0001.jpg"
    result = subprocess.run([sys.executable, "-m", "similar_finder", "recommend", str(query), "--features-file",
                             str(library.files.csv)], capture_output=True, text=True)
    assert result.returncode == 2 and "is damaged" in result.stderr and "Traceback" not in result.stderr
    again = extract_features(tmp_path / "photos", library.files.csv, **FAST)
    assert again.stats.embedded == 6 and list(again.ids) == list(library.ids)
    assert np.allclose(again.matrix, library.matrix, atol=1e-5)


def test_damaged_exports_are_never_served(library, tmp_path, caplog):
    files = library.files
    text = files.csv.read_text()
    files.csv.write_text(text[: len(text) // 2])  # cut mid-row
    for export in (files.npy, files.audit, files.meta):
        export.write_bytes(b"")
    with caplog.at_level(logging.WARNING, "similar_finder"):
        reopened = Library(files.csv)
    assert reopened.paths == library.paths and np.array_equal(reopened.matrix, library.matrix)
    assert any("f.csv" in r.getMessage() and "read from f.sqlite" in r.getMessage() for r in caplog.records)
    again = extract_features(tmp_path / "photos", files.csv, **FAST)
    assert again.stats.embedded == 0 and len(files.csv.read_text().splitlines()) == 7  # the export written again
    # Without the database, a CSV cut short is refused in one line, never served as a smaller library.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{files.database}{suffix}").unlink(missing_ok=True)
    files.csv.write_text(files.csv.read_text()[:-400])
    with pytest.raises(FeaturesError, match=r"f\.csv (is incomplete from row|holds values that are not numbers)"):
        Library(files.csv)


def test_an_edited_csv_is_taken_in_and_a_bare_one_gets_ids(library, tmp_path):
    lines = library.files.csv.read_text().splitlines()
    library.files.csv.write_text("\n".join(lines[:-1]) + "\n")  # a photo deleted from the CSV by hand
    edited = Library(library.files.csv)
    assert len(edited) == 5 and list(edited.ids) == list(library.ids[:5])
    bare = tmp_path / "bare" / "shared.csv"
    bare.parent.mkdir()
    bare.write_text("\n".join(lines[:4]) + "\n")
    shared = Library(bare)
    assert list(shared.ids) == [0, 1, 2] and shared.config is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_app(csv: Path, port: int) -> subprocess.Popen:
    app = subprocess.Popen([sys.executable, "-m", "similar_finder", "app", "--features-file", str(csv), "--port",
                            str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=2) as response:
                return app if response.status == 200 else app
        except OSError:
            assert app.poll() is None, app.stderr.read().decode()[-2000:]
            time.sleep(0.3)
    raise AssertionError("the app did not start")


def _post_photo(port: int, data: bytes) -> None:
    boundary = "similarfinderboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"new.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/library", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        urllib.request.urlopen(request, timeout=60).read()
    except OSError:
        pass  # the server was killed mid-request: that is the point


def test_kill_9_of_the_app_during_an_add_leaves_the_old_or_the_new_library(library, tmp_path):
    before = list(zip(library.ids.tolist(), library.paths))
    [photo] = make_images(tmp_path / "upload", 1, seed=42)
    outcomes = set()
    for delay in (0.05, 0.4, 1.5):
        port = _free_port()
        app = _start_app(library.files.csv, port)
        sender = threading.Thread(target=_post_photo, args=(port, photo.read_bytes()))
        sender.start()
        time.sleep(delay)
        os.killpg(app.pid, signal.SIGKILL)
        app.wait()
        sender.join(60)
        reopened = Library(library.files.csv)
        now = list(zip(reopened.ids.tolist(), reopened.paths))
        assert now == before or (now[:-1] == before and now[-1][1].startswith("uploads/new-")), now
        outcomes.add("old" if now == before else "new")
        assert not list(tmp_path.glob(".*.tmp")) and not list(library.files.vectors.glob(".*"))
        uploads = library.root / "uploads"  # an upload whose add did not commit is not left to join later
        saved = {p.relative_to(library.root).as_posix() for p in uploads.iterdir()} if uploads.is_dir() else set()
        assert saved <= set(reopened.paths), saved
        if now != before:
            remove_photos(reopened, [now[-1][0]])
        shutil.rmtree(library.root / "uploads", ignore_errors=True)
    app = _start_app(library.files.csv, _free_port())  # and it starts again, whatever the moment of the kill
    os.killpg(app.pid, signal.SIGKILL)
    app.wait()
    assert outcomes  # which moments the kills hit depends on the machine; each left a whole library


def _wait_for(condition, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_the_app_follows_its_folder_through_the_same_commit(library, tmp_path):
    from similar_finder.service import LibraryService

    photos = library.root
    service = LibraryService(library)
    stop = threading.Event()
    service.watch(stop, debounce_ms=100)
    try:
        time.sleep(0.5)  # the watch is set up
        [new] = make_images(photos / "0first", 1, seed=11)
        assert _wait_for(lambda: "0first/img0000.jpg" in service.library.paths)
        new_id = service.library.image_id("0first/img0000.jpg")
        assert new_id == 6 and service.photo(new_id)["path"] == "0first/img0000.jpg"
        moved_id = service.library.image_id("b/img0001.jpg")
        (photos / "b" / "img0001.jpg").rename(photos / "b" / "renamed.jpg")
        assert _wait_for(lambda: "b/renamed.jpg" in service.library.paths)
        assert service.library.image_id("b/renamed.jpg") == moved_id  # a rename keeps the id
        (photos / "a" / "img0002.jpg").unlink()
        assert _wait_for(lambda: "a/img0002.jpg" not in service.library.paths)
        (photos / "notes.txt").write_text("not a photo")  # ignored, like the store's own files
        assert len(Library(library.files.csv)) == 6 and service.similar(new_id).results
    finally:
        stop.set()


def _copy_of(photo: Path) -> bytes:
    """The same picture in other bytes (a new content hash, nearly the same vector)."""
    from io import BytesIO

    from PIL import Image

    out = BytesIO()
    Image.open(photo).convert("RGB").save(out, "JPEG", quality=97)
    return out.getvalue()


def test_an_add_is_answered_at_once_and_an_approach_that_must_refit_says_it_is_stale(library, monkeypatch):
    from similar_finder import service as service_module
    from similar_finder.service import LibraryService

    monkeypatch.setattr(service_module, "refit_after", lambda photos: 10**9)  # updates only: nothing refitted
    service = LibraryService(library)
    old_id = int(library.ids[0])
    assert service.similar(old_id).note is None  # fits the cosine approach on the library as it is
    assert service.similar(old_id, approach="kmeans").note is None
    added = service.add_photo(_copy_of(library.root / library.paths[0]), "copy.jpg")
    # The cosine index took the new photo at once: it is the nearest photo of the one it copies.
    cosine = service._approaches["cosine"]
    assert cosine.library is service.library and cosine.model_changes() == 1 and not service._refitting
    first = service.similar(old_id)
    assert first.note is None and first.results[0]["image_id"] == added["image_id"]
    assert service.similar(added["image_id"]).results[0]["image_id"] == old_id
    removed = service.library.ids[1]
    service._swap(remove_photos(service.library, [int(removed)]))
    assert int(removed) not in [r["image_id"] for r in service.similar(old_id, n=10).results]
    # K-Means is refitted, not updated: until then its answers say which library they come from.
    stale = service.similar(old_id, approach="kmeans")
    assert stale.note is not None and "before its last change" in stale.note
    assert _wait_for(lambda: service._approaches["kmeans"].library is service.library)
    assert service.similar(old_id, approach="kmeans").note is None


@pytest.mark.parametrize("index", ["brute", "ivf"])
def test_an_updated_recommender_answers_as_one_fitted_on_the_changed_library(library, tmp_path, index):
    from similar_finder.recommender import Recommender

    fitted = Recommender(center=False, index=index, gate=np.inf).fit(library)
    make_images(tmp_path / "photos" / "c", 3, seed=41)
    grown = add_photos(library, [f"c/img000{i}.jpg" for i in range(3)])
    changed = remove_photos(grown, [int(grown.ids[2])])
    (tmp_path / "photos" / "a" / "img0000.jpg").write_bytes(_copy_of(tmp_path / "photos" / "b" / "img0000.jpg"))
    from similar_finder.features import update_photos

    changed = update_photos(changed, ["a/img0000.jpg"])  # content replaced in place: same id, new vector
    updated = fitted.updated(grown).updated(changed)  # twice: changes add up on the one fitted index
    refitted = Recommender(center=False, index=index, gate=np.inf).fit(changed)
    assert updated.neighbors_.changes == 3 + 1 + 2  # 3 added, 1 removed, 1 replaced (out and in)
    for rows in (None, [0, len(changed) - 1]):
        d_up, i_up = updated.kneighbors(None, 4, rows=rows)
        d_re, i_re = refitted.kneighbors(None, 4, rows=rows)
        np.testing.assert_array_equal(i_up, i_re)
        np.testing.assert_allclose(d_up, d_re, atol=1e-5)
    queries = changed.matrix[:3] + 0.01
    np.testing.assert_array_equal(updated.kneighbors(queries, 5)[1], refitted.kneighbors(queries, 5)[1])
    answer = updated.recommend(tmp_path / "photos" / "c" / "img0001.jpg", 3, threshold=2.0)
    assert list(answer["image_id"]) == list(refitted.recommend(tmp_path / "photos" / "c" / "img0001.jpg", 3,
                                                               threshold=2.0)["image_id"])


def test_a_touched_csv_is_not_taken_for_an_edit_when_ids_and_paths_differ_in_order(library, tmp_path, caplog):
    make_images(tmp_path / "photos" / "0first", 1, seed=31)
    grown = extract_features(tmp_path / "photos", library.files.csv, **FAST)  # ids no longer in path order
    assert grown.paths != sorted(grown.paths)
    os.utime(library.files.csv)
    with caplog.at_level(logging.INFO, "similar_finder"):
        reopened = Library(library.files.csv)
    assert not any("was edited" in r.getMessage() for r in caplog.records)
    assert reopened.fingerprint == grown.fingerprint and list(reopened.ids) == list(grown.ids)

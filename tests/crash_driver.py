"""Crash a change to a library at every write step, and check what the next open finds.

Run by tests/test_library_db.py in a process of its own (``python tests/crash_driver.py WORKDIR``), which forks
one child per step: the child makes the change and exits hard (``os._exit``) at its N-th write step (a file
renamed or removed, an SQL statement of the change; see ``similar_finder._io.fault_point``), for every N until
it completes. After each crash the store must read as exactly the state before or the state after, leave no
leftover once opened, and the same change run again must complete to the state after. Prints one JSON object.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from similar_finder import _io
from similar_finder.store import AUDIT_COLUMNS, Changes, FeatureFiles, commit, parse_feature_csv, read_store, write_store

CONFIG = {"backbone": "test", "weights": "random", "input_size": 8, "pooling": "avg", "dim": 4}
BASE = {"a/1.jpg": "a1", "b/2.jpg": "b2", "c/3.jpg": "c3", "d/4.jpg": "d4", "e/5.jpg": "e5"}


def sha(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def vector(tag: str) -> np.ndarray:
    return np.random.default_rng(int(sha(tag)[:8], 16)).random(4).astype(np.float32)


def audit_of(photos: dict[str, str], skipped: dict[str, str] | None = None) -> pd.DataFrame:
    rows = [(p, "ok", "", 100, 1, sha(t)) for p, t in photos.items()]
    rows += [(p, "skipped", why, 5, 1, sha(p)) for p, why in (skipped or {}).items()]
    return pd.DataFrame(sorted(rows), columns=AUDIT_COLUMNS)


def sync(folder: Path, photos: dict[str, str], skipped=None) -> None:
    """What ``extract`` commits: the store made to hold exactly ``photos`` (path -> content tag)."""
    audit = audit_of(photos, skipped)
    kept = audit[audit["status"] != "skipped"]
    tags = {sha(t): t for t in photos.values()}
    matrix = np.stack([vector(tags[s]) for s in kept["sha256"]])
    write_store(FeatureFiles(folder / "f.csv"), folder / "photos", audit, matrix, CONFIG)


def extract(folder: Path) -> None:  # a removal, a changed photo, a rename, two new photos (one sorts first), a skip
    photos = {k: v for k, v in BASE.items() if k != "b/2.jpg"}
    photos["c/3.jpg"] = "c3-edited"
    photos["z/renamed.jpg"] = photos.pop("d/4.jpg")
    photos.update({"0first/new.jpg": "n1", "f/new.jpg": "n2"})
    sync(folder, photos, {"f/broken.jpg": "not an image"})


def add(folder: Path) -> None:  # what the app's "Add to library" commits
    put = audit_of({"0first/added.jpg": "added"})
    commit(FeatureFiles(folder / "f.csv"), Changes(put, vector("added")[None], {}, []), root=folder / "photos",
           config=CONFIG)


def remove(folder: Path) -> None:
    commit(FeatureFiles(folder / "f.csv"), Changes(audit_of({}), np.zeros((0, 4), np.float32), {}, ["c/3.jpg"]),
           root=folder / "photos", config=CONFIG)


class TinyModel:
    """Four numbers from a photo's pixels: the embedding of the test CONFIG, in place of a network."""

    name, input_size, dim = "test", 8, 4

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        return pixels.reshape(len(pixels), -1)[:, :4].astype(np.float32)


def upload(folder: Path) -> None:  # the app's "Add to library" itself: the file saved, embedded, committed
    from io import BytesIO

    from PIL import Image

    from similar_finder import Library, features
    from similar_finder.service import LibraryService

    features.model_for = lambda meta: TinyModel()
    (folder / "photos").mkdir(exist_ok=True)
    photo = BytesIO()
    Image.new("RGB", (16, 12), (200, 40, 90)).save(photo, "JPEG")
    LibraryService(Library(folder / "f.csv")).add_photo(photo.getvalue(), "sent.jpg")


def stray_files(folder: Path) -> list[str]:
    """Files in the photos' folder that the library does not hold (an upload whose add did not commit)."""
    held = set(read_store(folder / "f.csv").paths)
    photos = folder / "photos"
    return sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*")
                  if p.is_file() and p.relative_to(photos).as_posix() not in held) if photos.is_dir() else []


OPERATIONS = {"extract": extract, "add": add, "remove": remove, "upload": upload}


def state(folder: Path) -> tuple:
    """What a reader sees: (image_id, path, sha256, vector) of every photo."""
    stored = read_store(folder / "f.csv")
    shas = dict(zip(stored.audit["path"], stored.audit["sha256"]))
    return tuple((int(i), p, shas[p], tuple(np.round(v, 6))) for i, p, v in zip(stored.ids, stored.paths,
                                                                                 stored.matrix))


def leftovers(folder: Path) -> list[str]:
    files = FeatureFiles(folder / "f.csv")
    stored = read_store(files.csv)
    found = [p.name for p in folder.glob(".*.tmp")]
    segments = sorted(p.name for p in files.vectors.iterdir()) if files.vectors.is_dir() else []
    import sqlite3

    with sqlite3.connect(files.database) as db:
        named = sorted(r[0] for r in db.execute("SELECT file FROM segments"))
    if segments != named:
        found.append(f"segments {segments} != committed {named}")
    return found + ([] if len(stored.paths) else ["empty"])


def run(work: Path, name: str) -> dict:
    base = work / f"{name}-base"
    sync(base, BASE)
    before = state(base)
    done = work / f"{name}-done"
    shutil.copytree(base, done)
    OPERATIONS[name](done)
    after = state(done)
    report = {"steps": 0, "old": 0, "new": 0, "failures": []}
    for step in itertools.count(1):
        trial = work / f"{name}-{step}"
        shutil.copytree(base, trial)
        pid = os.fork()
        if pid == 0:  # the child: make the change, dying at its step-th write
            os.environ[_io.CRASH_AT_ENV] = str(step)
            _io._STEPS = itertools.count(1)
            try:
                OPERATIONS[name](trial)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        try:
            seen = state(trial)
            outcome = "old" if seen == before else "new" if seen == after else None
            if outcome is None:
                report["failures"].append(f"step {step}: neither the old nor the new state")
            else:
                report[outcome] += 1
            left = leftovers(trial) + [f"stray {f}" for f in stray_files(trial)]
            if left:
                report["failures"].append(f"step {step}: leftovers after opening: {left}")
            OPERATIONS[name](trial)  # the same change again completes
            if state(trial) != after:
                report["failures"].append(f"step {step}: running it again did not reach the new state")
            if name == "extract":
                paths, matrix = parse_feature_csv(FeatureFiles(trial / "f.csv").csv)
                if sorted(paths) != sorted(p for _, p, _, _ in after):
                    report["failures"].append(f"step {step}: the exported CSV is not the committed state")
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the loop goes on
            report["failures"].append(f"step {step}: {type(exc).__name__}: {exc}")
        shutil.rmtree(trial)
        if code == 0:  # it completed: every step before this one was crashed at
            report["steps"] = step - 1
            break
        if code != _io.CRASH_EXIT:
            report["failures"].append(f"step {step}: the child exited with {code}")
        if step > 500:
            report["failures"].append("more than 500 write steps")
            break
    return report


if __name__ == "__main__":
    work = Path(sys.argv[1])
    print(json.dumps({name: run(work, name) for name in OPERATIONS}))

"""Images → feature store: ``extract_features``, the one entry point that embeds a folder.

``extract_features(images_dir, out_csv=...)`` embeds every photo under a folder
with a pretrained backbone and writes a feature store (see :mod:`.store` for its
files). The work is split the way it flows, each part in its own module:

* :mod:`.incremental` decides what to embed (content hashes, the last run's
  store, an interrupted run's checkpoints) and what is known already;
* an engine (:mod:`.engines`: in this process, or on Ray, :mod:`.ray_engine`)
  turns that list of files into vectors, checkpointing as it goes;
* :mod:`.store` writes the result, atomically, and is the only code that reads it.

One new photo is embedded exactly as a library was by :mod:`.embedding`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import DEFAULT_FEATURES, write_json
from .engines import ENGINES, InProcessRunner
from .errors import MissingError, check_choice, check_positive
from .adapt.model import load_adapter
from .embedding import build_model, model_for
from .images import IMAGE_EXTENSIONS, scan_images
from .incremental import (CheckpointWriter, KnownResults, MemoryWriter, content_hashes, drop_checkpoints,
                          load_previous, mismatch_error, read_partial_config, requested_spec)
from .library import Library
from .ray_engine import RayRunner
from .store import (AUDIT_COLUMNS, STORE_FORMATS, Changes, FeatureFiles, FeaturesError, StoredFeatures, commit,
                    config_of, empty_matrix, plan_changes, read_store, spare_rows, write_store)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractionStats:
    """What one extraction run did."""

    images: int
    embedded: int
    reused: int
    skipped: int
    removed: int
    seconds: float



def extract_features(
    images_dir: str | os.PathLike,
    out_csv: str | os.PathLike = DEFAULT_FEATURES,
    backbone: str | None = None,
    *,
    pooling: str | None = None,
    input_size: int | None = None,
    weights: str | os.PathLike | None = "imagenet",
    batch_size: int = 32,
    workers: int | None = None,
    checkpoint_every: int = 512,
    overwrite: bool = False,
    adapter: str | os.PathLike | None = None,
    progress: bool = True,
    engine: str = "local",
    address: str | None = None,
    num_gpus_per_worker: float = 0,
    actors: int | None = None,
    store_format: str | None = None,
):
    """Embed every image under ``images_dir`` and write the feature store (incrementally).

    ``backbone=None`` keeps the backbone of an existing ``out_csv``, or uses the
    default (ResNet50, falling back to the offline backbone, EfficientNet-Lite2). Asking for a
    different backbone or configuration than ``out_csv`` holds is an error unless
    ``overwrite=True``: features of two models are never mixed in one file.

    ``adapter`` (a file made by ``similar-finder adapt``) writes adapted vectors:
    the backbone's, passed through the trained head. The sidecar records it, and
    adapted and plain vectors are never mixed in one file.

    ``engine="ray"`` embeds on Ray (:mod:`.ray_engine`): a local Ray on this
    machine's cores, or the cluster at ``address``; ``actors`` models at once
    (default: one per ``num_gpus_per_worker`` GPUs, else one per 4 CPUs).
    ``store_format="parquet"`` keeps the vectors as Parquet parts instead of a
    CSV (the default for an ``out_csv`` ending in ``.parquet``; otherwise the
    format the store already has, else CSV).

    Returns the :class:`~similar_finder.library.Library`, opened, with
    ``library.stats`` (an :class:`ExtractionStats`) saying what this run did.
    """
    started = time.perf_counter()
    root = Path(images_dir).expanduser().resolve()
    if not root.is_dir():
        raise MissingError(f"images folder {images_dir} does not exist or is not a folder")
    check_positive("batch_size", batch_size)
    check_choice("engine", engine, ENGINES)
    files = FeatureFiles(Path(out_csv).expanduser().resolve())
    if overwrite:
        drop_checkpoints(files)
    previous = None if overwrite else load_previous(files, root)
    in_progress = read_partial_config(files.partial) or read_partial_config(files.shards)
    if previous is not None and in_progress is not None and in_progress["config"] != previous["config"]:
        # Checkpoints of a run with other settings (say an --overwrite that was interrupted) must never
        # be merged into this store: the store wins, and they are dropped.
        log.warning("discarding checkpoints of an unfinished run with other settings than %s", files.csv.name)
        drop_checkpoints(files)
        in_progress = None
    held_format = previous["stored"].meta.get("store_format", "csv") if previous else None
    if store_format is None:
        store_format = "parquet" if files.csv.suffix == ".parquet" else held_format or "csv"
    check_choice("store format", store_format, STORE_FORMATS)
    adapted_by = None
    if adapter is not None:
        adapted_by = load_adapter(adapter)
    spec = requested_spec(backbone, pooling, input_size, weights, previous or in_progress,
                           adapted_by.record if adapted_by else None)

    scan = scan_images(root)
    if scan.empty:
        raise FeaturesError(f"no images under {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    known = KnownResults()
    if previous is not None:
        known.add_store(previous)
    if in_progress is not None:
        known.add_partial(files.partial, spec)
        known.add_shards(files.shards, int(in_progress["config"]["dim"]), spec)

    shas = content_hashes(scan, root, previous, known.has_any, workers)
    todo = [(path, sha) for path, sha in zip(scan["path"], shas) if sha is None or sha not in known.by_sha]
    reused = len(scan) - len(todo)
    log.info("%d images under %s: %d known, %d to embed", len(scan), root, reused, len(todo))

    if todo:
        model = build_model(spec["backbone"], pooling=spec["pooling"], input_size=spec["input_size"],
                            weights=spec["weights_arg"], adapter=adapted_by)
        config = model.config
        if previous is not None and previous["config"] != config:
            raise mismatch_error(files, previous["config"], config)
        if engine == "ray":
            write_json(files.shards / "config.json", config_of(config))
            runner = RayRunner({**spec, "input_size": model.input_size}, files.shards, dim=int(config["dim"]),
                               adapter=None if adapter is None else str(Path(adapter).resolve()), address=address,
                               num_gpus_per_worker=num_gpus_per_worker, actors=actors, batch_size=batch_size,
                               progress=progress)
            new_shas = runner.run(todo, root, known)
        else:
            runner = InProcessRunner(model, batch_size=batch_size, workers=workers, progress=progress)
            new_shas = runner.run(todo, root, CheckpointWriter(files.partial, config, known, checkpoint_every))
        shas = [new_shas.get(p, s) for p, s in zip(scan["path"], shas)]
    else:  # everything was known: the settings are those of the store or of the interrupted run
        config = (previous or in_progress)["config"]

    audit, matrix = known.table(scan, shas, int(config["dim"]))
    # Only what changed is committed (ids kept by path, and by content across a move); the exports follow.
    stored = write_store(files, root, audit, matrix, config_of(config), store_format,
                         intact=None if previous is None else set(previous["paths"]),
                         held=None if previous is None else previous["stored"])
    drop_checkpoints(files)
    stats = ExtractionStats(
        images=len(scan), embedded=len(todo), reused=reused,
        skipped=int((audit["status"] == "skipped").sum()),
        removed=0 if previous is None else len(set(previous["audit"]["path"]) - set(scan["path"])),
        seconds=round(time.perf_counter() - started, 3),
    )
    log.info("%d vectors in %s (%d embedded, %d reused, %d skipped, %d removed) in %.1f s",
             len(matrix), files.csv, stats.embedded, stats.reused, stats.skipped, stats.removed, stats.seconds)
    library = Library(files.csv, stored=stored)
    library.stats = stats
    return library


def add_photos(library: Library, paths, *, batch_size: int = 32) -> Library:
    """Embed photos already inside ``library``'s folder (paths relative to it) and commit them: the cost is the
    photos', not the library's. Photos that cannot be used are not added (``library.skipped_now`` says why).

    Returns the library as committed (the ``library`` passed in is a snapshot and stays as it was).
    """
    for path in paths:
        file = library.root / path
        if not (file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS):
            raise MissingError(f"{path} is not a photo inside {library.root}; put it there first")
    return update_photos(library, paths, batch_size=batch_size)


def update_photos(library: Library, paths, *, batch_size: int = 32) -> Library:
    """Bring the photos at ``paths`` (relative to the library's folder) in step with the folder, in one commit.

    New or changed photos are embedded (content the library holds already, as after a move, is not), photos
    gone from the folder are removed, and a photo moved or renamed keeps its id. The cost is that of the photos
    named: this is what ``app --watch`` runs for each batch of changes it sees.
    """
    started = time.perf_counter()
    root, files = library.root, library.files
    rows, gone = [], []
    for path in dict.fromkeys(paths):  # the photos named, not a scan of the whole folder
        file = root / path
        if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS:
            stat = file.stat()
            rows.append((path, stat.st_size, stat.st_mtime_ns))
        elif path in library.row_of:
            gone.append(path)
    scan = pd.DataFrame(rows, columns=["path", "size", "mtime_ns"])
    # What the library records of its photos (a bare CSV records no content hash: nothing is known by content).
    recorded = library.audit if library.audit is not None else pd.DataFrame(
        {"path": library.paths, "status": "ok", "detail": "", "size": None, "mtime_ns": None, "sha256": ""})
    recorded = recorded[(recorded["status"] != "skipped") & recorded["path"].isin(library.row_of)]
    shas = content_hashes(scan, root, {"audit": recorded[recorded["path"].isin(set(scan["path"]))]}, True, None)
    known = KnownResults()
    for rec in recorded[recorded["sha256"].isin(set(shas))].itertuples(index=False):
        known.add(rec.sha256, rec.status, rec.detail, library.matrix[library.row_of[rec.path]])
    todo = [(p, s) for p, s in zip(scan["path"], shas) if s not in known.by_sha]
    if todo:
        # Batches padded to a power of two: one photo costs one photo's inference, and few batch shapes are traced.
        size = min(batch_size, 1 << (len(todo) - 1).bit_length())
        new_shas = InProcessRunner(model_for(library.meta), batch_size=size, progress=False).run(
            todo, root, MemoryWriter(known))
        shas = [new_shas.get(p, s) for p, s in zip(scan["path"], shas)]
    audit, matrix = known.table(scan, shas, library.matrix.shape[1])
    held = recorded.loc[recorded["path"].isin(set(scan["path"]) | set(gone)), ["path", "sha256"]]
    changes = plan_changes(held, audit, matrix, same_config=True)
    changes.skipped = None  # the skipped list is the whole folder's: extract keeps it
    updated = library
    if not changes.empty:
        done = commit(files, changes, root=root, config=library.config)
        updated = Library(files.csv, stored=_after(library, changes, done))
    updated.stats = ExtractionStats(images=len(scan), embedded=len(todo), reused=len(scan) - len(todo),
                                    skipped=int((audit["status"] == "skipped").sum()), removed=len(changes.removed),
                                    seconds=round(time.perf_counter() - started, 3))
    updated.skipped_now = {r.path: r.detail for r in audit.itertuples(index=False) if r.status == "skipped"}
    return updated


def _after(library: Library, changes: Changes, done: dict) -> StoredFeatures | None:
    """The committed state after ``changes``, made from the snapshot (None: read it again instead)."""
    put = changes.put
    if any(p in library.row_of for p in put["path"]) or library.audit is None:
        return None  # a photo's content replaced in place: its row moves
    if done["generation"] != library.meta.get("generation", -1) + 1:
        return None  # another writer committed meanwhile: what it changed is read too
    paths, matrix, ids = library.paths, library.matrix, library.ids
    audit = library.audit
    if changes.removed:
        gone = {library.row_of[p] for p in changes.removed if p in library.row_of}
        keep = np.ones(len(paths), bool)
        keep[list(gone)] = False
        paths, matrix, ids = [p for p, k in zip(paths, keep) if k], _without(matrix, keep), ids[keep]
        audit = audit[~audit["path"].isin(set(changes.removed))]
    if changes.moved:
        paths = [changes.moved.get(p, p) for p in paths]
        audit = audit.assign(path=audit["path"].map(lambda p: changes.moved.get(p, p)))
    added = [done["ids"][p] for p in put["path"]]
    meta = {**library.meta, "fingerprint": done["fingerprint"], "generation": done["generation"],
            "rows": len(paths) + len(added)}
    audit = pd.concat([audit, put[AUDIT_COLUMNS]], ignore_index=True)
    return StoredFeatures(paths + put["path"].tolist(), _appended(matrix, changes.vectors) if len(put) else matrix,
                          meta, audit, np.concatenate([ids, np.asarray(added, np.int64)]))


_GROWN: dict[int, int] = {}  # rows used of each buffer grown into, by its address (forgotten with the buffer)
_GROWN_LOCK = threading.Lock()


def _appended(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``matrix`` with ``rows`` after it, written into the free rows after it when it has them (O(rows)).

    ``matrix`` stays as it was: snapshots still answering see their own rows only. A buffer's free rows are taken
    once; a second add to the same older snapshot gets a copy.
    """
    n, k, dim = len(matrix), len(rows), matrix.shape[1]
    owner = _owner(matrix)
    address = matrix.__array_interface__["data"][0]
    starts_owner = owner is not matrix and owner.dtype == matrix.dtype and owner.size % dim == 0 and \
        owner.__array_interface__["data"][0] == address and matrix.flags.c_contiguous
    with _GROWN_LOCK:
        if starts_owner and owner.size // dim >= n + k and _GROWN.get(address, n) == n:
            if address not in _GROWN:
                weakref.finalize(owner, _GROWN.pop, address, None)
            _GROWN[address] = n + k
            buffer = owner.reshape(-1, dim)
            buffer[n:n + k] = rows
            return buffer[:n + k]
    grown = _buffer(n + k, dim)
    grown[:n], grown[n:n + k] = matrix, rows
    return grown


def _owner(array: np.ndarray) -> np.ndarray:
    """The array holding ``array``'s memory (views of views name it as their base)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _buffer(n: int, dim: int) -> np.ndarray:
    """A new matrix of ``n`` rows (to be filled) with free rows after it, for adds to grow into."""
    buffer = empty_matrix(n + spare_rows(n), dim)
    owner = _owner(buffer)
    with _GROWN_LOCK:
        _GROWN[buffer.__array_interface__["data"][0]] = n
        weakref.finalize(owner, _GROWN.pop, buffer.__array_interface__["data"][0], None)
    return buffer[:n]


def _without(matrix: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The rows of ``matrix`` where ``keep``: the runs between removed rows copied into a new buffer (a removal
    moves every row after the first removed one; it copies memory at memory speed, and writes nothing to disk)."""
    out = _buffer(int(keep.sum()), matrix.shape[1])
    edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.view(np.int8), [0]])))
    at = 0
    for start, end in zip(edges[::2], edges[1::2]):
        out[at:at + end - start] = matrix[start:end]
        at += end - start
    return out


def remove_photos(library: Library, image_ids) -> Library:
    """Take photos out of ``library`` by image_id, in one commit (their files are left alone, and their ids are
    never given again). Returns the library as committed."""
    paths = []
    for image_id in image_ids:
        row = library.row_of_id.get(int(image_id))
        if row is None:
            raise MissingError(f"no photo {image_id} in {library.files.csv.name}")
        paths.append(library.paths[row])
    changes = Changes(pd.DataFrame(columns=AUDIT_COLUMNS), np.zeros((0, library.matrix.shape[1]), np.float32), {},
                      paths)
    done = commit(library.files, changes, root=library.root, config=library.config)
    return Library(library.files.csv, stored=_after(library, changes, done))


def load_features(csv: str | os.PathLike = DEFAULT_FEATURES) -> tuple[list[str], np.ndarray, dict]:
    """``(paths, matrix, meta)`` of a feature store; ``paths`` are relative to ``meta["images_root"]``."""
    stored = read_store(csv)
    return stored.paths, stored.matrix, stored.meta

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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
from .store import STORE_FORMATS, Changes, FeatureFiles, FeaturesError, commit, config_of, read_store, write_store

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
    photos', not the library's. Photos that cannot be used are not added; ``library.stats`` says how many.

    Returns the library as committed (the ``library`` passed in is a snapshot and stays as it was).
    """
    started = time.perf_counter()
    root, files = library.root, library.files
    scan = scan_images(root)
    wanted = set(paths)
    scan = scan[scan["path"].isin(wanted)].reset_index(drop=True)
    if len(scan) != len(wanted):
        missing = sorted(wanted - set(scan["path"]))
        raise MissingError(f"{', '.join(missing[:3])} is not a photo inside {root}; put it there first")
    model = model_for(library.meta)
    known = KnownResults()
    shas = content_hashes(scan, root, None, True, None)
    new_shas = InProcessRunner(model, batch_size=batch_size, progress=False).run(
        list(zip(scan["path"], shas)), root, MemoryWriter(known))
    shas = [new_shas.get(p, s) for p, s in zip(scan["path"], shas)]
    audit, matrix = known.table(scan, shas, int(library.config["dim"]))
    usable = audit[audit["status"] != "skipped"].reset_index(drop=True)
    if len(usable):
        commit(files, Changes(usable, matrix, {}, []), root=root, config=library.config)
    added = Library(files.csv) if len(usable) else library
    added.stats = ExtractionStats(images=len(scan), embedded=len(scan), reused=0,
                                  skipped=int((audit["status"] == "skipped").sum()), removed=0,
                                  seconds=round(time.perf_counter() - started, 3))
    added.skipped_now = {r.path: r.detail for r in audit.itertuples(index=False) if r.status == "skipped"}
    return added


def load_features(csv: str | os.PathLike = DEFAULT_FEATURES) -> tuple[list[str], np.ndarray, dict]:
    """``(paths, matrix, meta)`` of a feature store; ``paths`` are relative to ``meta["images_root"]``."""
    stored = read_store(csv)
    return stored.paths, stored.matrix, stored.meta

"""Images → feature store, incrementally: which photos need embedding, and the runner that embeds them.

``extract_features(images_dir, out_csv=...)`` embeds every photo under a folder
with a pretrained backbone and writes a feature store (see :mod:`.store` for its
files). Runs are incremental: a file is known by the SHA-256 of its content (its
size and mtime only decide when to hash it again), so only new or changed photos
are embedded, renamed or moved ones are not, and deleted ones drop out.

The work is split the way it flows: :func:`scan_images` and :class:`KnownResults`
decide what to embed; :class:`InProcessRunner` turns that list of files into
vectors (a reader that decodes ahead in threads → the model in fixed-size
batches → a writer that checkpoints to ``features.partial/``, so an interrupted
run resumes); :func:`.store.write_store` writes the result. Another engine only
has to be another runner.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import DEFAULT_FEATURES, atomic_write, read_json, write_json
from .errors import MissingError, check_positive
from .images import IMAGE_EXTENSIONS, ImageError, is_image_file, load_image
from .store import (AUDIT_COLUMNS, FORMAT_VERSION, FeatureFiles, FeaturesError, config_of, read_store,
                    write_store)

log = logging.getLogger(__name__)


def default_workers() -> int:
    """Threads for decoding and hashing: I/O and PIL release the GIL, so twice the cores."""
    return min(8, 2 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class ExtractionStats:
    """What one extraction run did."""

    images: int
    embedded: int
    reused: int
    skipped: int
    removed: int
    seconds: float


# --- scanning and hashing --------------------------------------------------------------

def scan_images(images_dir: str | os.PathLike) -> pd.DataFrame:
    """List image files under ``images_dir`` recursively: path (relative), size, mtime_ns."""
    root = Path(images_dir)
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not is_image_file(name):
                continue
            full = Path(dirpath) / name
            stat = full.stat()
            rows.append((full.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    frame = pd.DataFrame(rows, columns=["path", "size", "mtime_ns"])
    return frame.sort_values("path", ignore_index=True)


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# --- extraction ------------------------------------------------------------------------

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
):
    """Embed every image under ``images_dir`` and write the feature store (incrementally).

    ``backbone=None`` keeps the backbone of an existing ``out_csv``, or uses the
    default (ResNet50, falling back to EfficientNet-Lite0 offline). Asking for a
    different backbone or configuration than ``out_csv`` holds is an error unless
    ``overwrite=True``: features of two models are never mixed in one file.

    ``adapter`` (a file made by ``similar-finder adapt``) writes adapted vectors:
    the backbone's, passed through the trained head. The sidecar records it, and
    adapted and plain vectors are never mixed in one file.

    Returns the :class:`~similar_finder.library.Library`, opened, with
    ``library.stats`` (an :class:`ExtractionStats`) saying what this run did.
    """
    from .library import Library

    started = time.perf_counter()
    root = Path(images_dir).expanduser().resolve()
    if not root.is_dir():
        raise MissingError(f"images folder {images_dir} does not exist or is not a folder")
    check_positive("batch_size", batch_size)
    files = FeatureFiles(Path(out_csv).expanduser().resolve())
    if overwrite:
        shutil.rmtree(files.partial, ignore_errors=True)
    previous = None if overwrite else _load_previous(files, root)
    in_progress = _read_partial_config(files.partial)
    adapted_by = None
    if adapter is not None:
        from .adapt import load_adapter

        adapted_by = load_adapter(adapter)
    spec = _requested_spec(backbone, pooling, input_size, weights, previous or in_progress,
                           adapted_by.record if adapted_by else None)

    scan = scan_images(root)
    if scan.empty:
        raise FeaturesError(f"no images under {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    known = KnownResults()
    if previous is not None:
        known.add_store(previous)
    if in_progress is not None:
        known.add_partial(files.partial, spec)

    shas = _hashes_for(scan, root, previous, known.has_any, workers)
    todo = [(path, sha) for path, sha in zip(scan["path"], shas) if sha is None or sha not in known.by_sha]
    reused = len(scan) - len(todo)
    log.info("%d images under %s: %d known, %d to embed", len(scan), root, reused, len(todo))

    if todo:
        from .backbones import build_backbone

        model = build_backbone(spec["backbone"], pooling=spec["pooling"], input_size=spec["input_size"],
                               weights=spec["weights_arg"])
        if adapted_by is not None:
            from .adapt import AdaptedBackbone

            model = AdaptedBackbone(model, adapted_by)
        config = model.config
        if previous is not None and previous["config"] != config:
            raise _mismatch_error(files, previous["config"], config)
        runner = InProcessRunner(model, batch_size=batch_size, workers=workers, progress=progress)
        new_shas = runner.run(todo, root, CheckpointWriter(files.partial, config, known, checkpoint_every))
        shas = [new_shas.get(p, s) for p, s in zip(scan["path"], shas)]
    else:  # everything was known: the settings are those of the store or of the interrupted run
        config = (previous or in_progress)["config"]

    audit, matrix = known.table(scan, shas, int(config["dim"]))
    unchanged = (previous is not None and previous["audit"][AUDIT_COLUMNS].astype(str).equals(audit.astype(str)))
    if not unchanged:
        write_store(files, root, audit, matrix, config_of(config))
    shutil.rmtree(files.partial, ignore_errors=True)
    stats = ExtractionStats(
        images=len(scan), embedded=len(todo), reused=reused,
        skipped=int((audit["status"] == "skipped").sum()),
        removed=0 if previous is None else len(set(previous["audit"]["path"]) - set(scan["path"])),
        seconds=round(time.perf_counter() - started, 3),
    )
    log.info("%d vectors in %s (%d embedded, %d reused, %d skipped, %d removed) in %.1f s",
             len(matrix), files.csv, stats.embedded, stats.reused, stats.skipped, stats.removed, stats.seconds)
    library = Library(files.csv, stored=previous["stored"] if unchanged else None)
    library.stats = stats
    library.catalog()  # the photos' facts for browsing, kept in step with the vectors
    return library


def _requested_spec(backbone, pooling, input_size, weights, previous, adapter=None) -> dict:
    """What to embed with; ``previous`` is the existing store, or the interrupted run's config."""
    held = (previous or {}).get("config", {}).get("adapter")
    if previous is not None and (held or {}).get("sha256") != (adapter or {}).get("sha256"):
        if "files" not in previous:  # only checkpoints of an unfinished run: not the user's data
            log.warning("discarding checkpoints of an unfinished run with another adapter")
            return {**_requested_spec(backbone, pooling, input_size, weights, None), "discard_partial": True}
        raise _mismatch_error(previous["files"], {"adapter": held}, {"adapter": adapter})
    if backbone is None and previous is not None:
        cfg = previous["config"]
        return {"backbone": cfg["backbone"], "pooling": cfg["pooling"],
                "input_size": int(cfg["input_size"]), "weights_arg": weights_argument(cfg["weights"])}
    weights_arg = str(weights) if isinstance(weights, os.PathLike) else weights
    spec = {"backbone": backbone, "pooling": pooling, "input_size": None if input_size is None else int(input_size),
            "weights_arg": weights_arg}
    if previous is not None and backbone is not None:
        from .backbones import requested_config

        # Names normalised, ensembles "+"-joined, None filled in with the backbone's native size and pooling.
        wanted = requested_config(backbone, pooling, input_size, weights_arg)
        held = {k: previous["config"].get(k) for k in wanted}
        if held != wanted:
            if "files" not in previous:  # only checkpoints of an unfinished run: not the user's data
                log.warning("discarding checkpoints of an unfinished run with %s", held)
                return {**spec, "discard_partial": True}
            raise _mismatch_error(previous["files"], held, wanted)
    return spec


def weights_argument(source: str) -> str | None:
    """The ``weights=`` argument that rebuilds a backbone whose recorded weights are ``source``."""
    return None if source == "random" else source


def _mismatch_error(files: FeatureFiles, held: dict, wanted: dict) -> FeaturesError:
    return FeaturesError(
        f"{files.csv} holds features made with {held}, not {wanted}. Features of different "
        f"models cannot be mixed: choose another --out file, or pass --overwrite to replace it."
    )


def _load_previous(files: FeatureFiles, root: Path) -> dict | None:
    if not (files.csv.is_file() and files.meta.is_file() and files.audit.is_file()):
        return None
    stored = read_store(files.csv)
    meta = stored.meta
    if meta.get("format") != FORMAT_VERSION or "config" not in meta:
        raise FeaturesError(f"{files.meta} is not a sidecar this version understands; pass --overwrite")
    if Path(meta["images_root"]) != root:
        raise FeaturesError(
            f"{files.csv} holds the features of {meta['images_root']}, not {root}. "
            f"Use another --out file for this folder, or --overwrite to replace it."
        )
    if "thresholds" in meta and not files.thresholds.exists():  # version 0.1 kept them in the sidecar
        write_json(files.thresholds, {key: {"fingerprint": meta["fingerprint"], **calibration}
                                      for key, calibration in meta["thresholds"].items()})
    return {"files": files, "paths": stored.paths, "matrix": stored.matrix, "config": meta["config"],
            "audit": stored.audit, "stored": stored}


def _read_partial_config(folder: Path) -> dict | None:
    try:
        return {"config": read_json(folder / "config.json")}
    except (OSError, ValueError):
        return None


class KnownResults:
    """Results already computed, by content hash: from the last run, from checkpoints, from this run."""

    def __init__(self):
        self.by_sha: dict[str, tuple[str, str, np.ndarray | None]] = {}
        self.has_any = False
        self.chunks = 0
        self.unreadable: dict[str, str] = {}  # path -> reason, for files with no hash to key on

    def add(self, sha, status, detail, vector):
        self.by_sha[sha] = (status, detail, vector)
        self.has_any = True

    def add_store(self, previous):
        rows = dict(zip(previous["paths"], previous["matrix"]))
        for rec in previous["audit"].itertuples(index=False):
            self.add(rec.sha256, rec.status, rec.detail, rows.get(rec.path))

    def add_partial(self, folder: Path, spec: dict):
        if spec.get("discard_partial"):
            shutil.rmtree(folder, ignore_errors=True)
            return
        for chunk in sorted(folder.glob("chunk-*.npz")):
            with np.load(chunk) as data:
                for sha, status, detail, vector in zip(data["sha"], data["status"], data["detail"], data["features"]):
                    self.add(str(sha), str(status), str(detail), None if status == "skipped" else vector)
            self.chunks += 1
        if self.chunks:
            log.info("resuming: %d results from an interrupted run", len(self.by_sha))

    def table(self, scan: pd.DataFrame, shas, dim: int) -> tuple[pd.DataFrame, np.ndarray]:
        """The audit (one row per scanned file) and the matrix (one row per usable file)."""
        audit_rows, vectors = [], []
        for path, size, mtime, sha in zip(scan["path"], scan["size"], scan["mtime_ns"], shas):
            status, detail, vector = self.by_sha.get(sha) or ("skipped", self.unreadable.get(path, "unreadable"), None)
            audit_rows.append((path, status, detail, int(size), int(mtime), sha or ""))
            if status != "skipped":
                vectors.append(vector)
        matrix = np.asarray(np.stack(vectors) if vectors else np.zeros((0, dim)), dtype=np.float32)
        return pd.DataFrame(audit_rows, columns=AUDIT_COLUMNS), matrix


def _hashes_for(scan, root, previous, needed, workers) -> list[str | None]:
    """Content hashes of the scanned files; None where nothing could be reused anyway."""
    old = {}
    if previous is not None:
        old = {r.path: (r.size, r.mtime_ns, r.sha256) for r in previous["audit"].itertuples(index=False)}
    shas, to_hash = [], []
    for i, (path, size, mtime) in enumerate(zip(scan["path"], scan["size"], scan["mtime_ns"])):
        hit = old.get(path)
        if hit is not None and hit[0] == size and hit[1] == mtime:
            shas.append(hit[2])
        else:
            shas.append(None)
            to_hash.append(i)
    if needed and to_hash:
        with ThreadPoolExecutor(workers or default_workers()) as pool:
            digests = pool.map(file_sha256, (root / scan["path"][i] for i in to_hash))
            for i, digest in zip(to_hash, digests):
                shas[i] = digest
    return shas


# --- the in-process runner: reader -> model -> writer ----------------------------------

def _decode(root: Path, path: str, size: int):
    """Read, hash and decode one file; never raises for a bad image."""
    try:
        data = (root / path).read_bytes()
    except OSError as exc:
        return None, None, None, f"unreadable: {exc.strerror or exc}"
    sha = hashlib.sha256(data).hexdigest()
    try:
        pixels, fixes = load_image(data, size)
    except ImageError as exc:
        return sha, None, None, str(exc)
    return sha, pixels, fixes, None


def decoded_stream(root: Path, paths, size: int, pool: ThreadPoolExecutor, lookahead: int):
    """Yield ``(path, sha, pixels, fixes, error)`` in order, decoding ``lookahead`` files ahead."""
    pending: deque = deque()
    paths = iter(paths)
    for path in paths:
        pending.append((path, pool.submit(_decode, root, path, size)))
        if len(pending) >= lookahead:
            break
    while pending:
        path, future = pending.popleft()
        nxt = next(paths, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(_decode, root, nxt, size)))
        yield (path, *future.result())


class CheckpointWriter:
    """Records results in :class:`KnownResults` and saves them in chunks, so a killed run resumes."""

    def __init__(self, folder: Path, config: dict, known: KnownResults, every: int = 512):
        self.folder, self.known, self.every = folder, known, every
        self.dim = int(config["dim"])
        self.records: list[tuple[str, str, str, np.ndarray | None]] = []
        self.index = known.chunks
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "config.json", config_of(config))

    def add(self, sha: str, status: str, detail: str, vector: np.ndarray | None) -> None:
        self.known.add(sha, status, detail, vector)
        self.records.append((sha, status, detail, vector))
        if len(self.records) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.records:
            return
        features = np.stack([v if v is not None else np.zeros(self.dim, np.float32) for *_, v in self.records])
        columns = list(zip(*[r[:3] for r in self.records]))
        with atomic_write(self.folder / f"chunk-{self.index:06d}.npz", "wb") as handle:
            np.savez(handle, sha=np.array(columns[0]), status=np.array(columns[1]),
                     detail=np.array(columns[2]), features=features)
        self.index += 1
        self.records.clear()


class InProcessRunner:
    """Embeds files in this process: threads decode ahead while the model runs fixed-size batches."""

    def __init__(self, model, *, batch_size: int = 32, workers: int | None = None, progress: bool = True):
        self.model, self.batch_size = model, check_positive("batch_size", batch_size)
        self.workers, self.progress = workers or default_workers(), progress

    def run(self, todo: list[tuple[str, str | None]], root: Path, writer: CheckpointWriter) -> dict[str, str]:
        """Embed ``todo`` (path, known hash or None); returns the content hash of every file read."""
        from tqdm import tqdm

        batch: list[tuple[str, np.ndarray, list[str]]] = []
        new_shas: dict[str, str] = {}
        bar = tqdm(total=len(todo), unit="img", desc=f"embedding ({self.model.name})", disable=not self.progress)

        def run_batch():
            pixels = np.stack([b[1] for b in batch])
            if len(batch) < self.batch_size:
                # A fixed batch shape avoids recompiling the model for the last, short batch.
                padding = np.zeros((self.batch_size - len(batch), *pixels.shape[1:]), pixels.dtype)
                pixels = np.concatenate([pixels, padding])
            for (sha, _, fixes), vector in zip(batch, self.model.embed(pixels)[: len(batch)]):
                writer.add(sha, "fixed" if fixes else "ok", "; ".join(fixes), vector)
            bar.update(len(batch))
            batch.clear()

        try:
            with ThreadPoolExecutor(self.workers) as pool:
                stream = decoded_stream(root, [p for p, _ in todo], self.model.input_size, pool, 4 * self.batch_size)
                for path, sha, pixels, fixes, error in stream:
                    if sha is not None:
                        new_shas[path] = sha
                    if error is None:
                        batch.append((sha, pixels, fixes))
                        if len(batch) == self.batch_size:
                            run_batch()
                        continue
                    log.warning("skipped %s: %s", path, error)
                    if sha is None:  # unreadable: no hash to remember it by
                        writer.known.unreadable[path] = error
                    else:
                        writer.add(sha, "skipped", error, None)
                    bar.update(1)
                if batch:
                    run_batch()
        finally:
            # On Ctrl-C or an error, keep what was computed so the next run resumes from it.
            writer.flush()
            bar.close()
        return new_shas


def embed_file(file: str | os.PathLike, meta: dict) -> np.ndarray:
    """Embed one image exactly as the library was embedded (backbone and settings from ``meta``)."""
    from .backbones import build_backbone
    from .store import require_file

    path = require_file(file)
    cfg = meta.get("config")
    if cfg is None:
        raise FeaturesError("the features file has no sidecar, so new images cannot be embedded the same way; "
                            "re-create it with `similar-finder extract`")
    pixels, _ = load_image(path, int(cfg["input_size"]))
    model = build_backbone(cfg["backbone"], pooling=cfg["pooling"], input_size=int(cfg["input_size"]),
                           weights=weights_argument(cfg["weights"]))
    if cfg.get("adapter"):
        from .adapt import AdaptedBackbone, adapter_for

        model = AdaptedBackbone(model, adapter_for(cfg["adapter"]))
    return model.embed(pixels[None])[0]


def load_features(csv: str | os.PathLike = DEFAULT_FEATURES) -> tuple[list[str], np.ndarray, dict]:
    """``(paths, matrix, meta)`` of a feature store; ``paths`` are relative to ``meta["images_root"]``."""
    stored = read_store(csv)
    return stored.paths, stored.matrix, stored.meta

"""Incremental bookkeeping: which photos a run must embed, and what is known already.

A photo is known by the SHA-256 of its content (its size and mtime only decide
when to hash it again), so only new or changed photos are embedded, renamed or
moved ones are not, and deleted ones drop out. :func:`load_previous` opens the store a run updates; :class:`KnownResults`
gathers every result already computed — by the last run, by the checkpoints of
an interrupted one (``features.partial/``, written by :class:`CheckpointWriter`,
or Ray's ``features.shards/``), by this run — and turns them into the audit and
the matrix. Nothing here computes a vector: that is the engines' work
(:mod:`.engines`).
"""
from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import atomic_write, file_sha256, read_json, write_json
from .backbones import requested_config, weights_value
from .store import AUDIT_COLUMNS, FeatureFiles, FeaturesError, config_of, read_store, read_vectors

log = logging.getLogger(__name__)


def default_workers() -> int:
    """Threads for decoding and hashing: I/O and PIL release the GIL, so twice the cores."""
    return min(8, 2 * (os.cpu_count() or 1))


def requested_spec(backbone, pooling, input_size, weights, previous, adapter=None) -> dict:
    """What to embed with; ``previous`` is the existing store, or the interrupted run's config."""
    held = (previous or {}).get("config", {}).get("adapter")
    if previous is not None and (held or {}).get("sha256") != (adapter or {}).get("sha256"):
        if "files" not in previous:  # only checkpoints of an unfinished run: not the user's data
            log.warning("discarding checkpoints of an unfinished run with another adapter")
            return {**requested_spec(backbone, pooling, input_size, weights, None), "discard_partial": True}
        raise mismatch_error(previous["files"], {"adapter": held}, {"adapter": adapter})
    if backbone is None and previous is not None:
        cfg = previous["config"]
        return {"backbone": cfg["backbone"], "pooling": cfg["pooling"],
                "input_size": int(cfg["input_size"]), "weights_arg": weights_value(cfg["weights"])}
    weights_arg = str(weights) if isinstance(weights, os.PathLike) else weights
    spec = {"backbone": backbone, "pooling": pooling, "input_size": None if input_size is None else int(input_size),
            "weights_arg": weights_arg}
    if previous is not None and backbone is not None:
        # Names normalised, ensembles "+"-joined, None filled in with the backbone's native size and pooling.
        wanted = requested_config(backbone, pooling, input_size, weights_arg)
        held = {k: previous["config"].get(k) for k in wanted}
        if held != wanted:
            if "files" not in previous:  # only checkpoints of an unfinished run: not the user's data
                log.warning("discarding checkpoints of an unfinished run with %s", held)
                return {**spec, "discard_partial": True}
            raise mismatch_error(previous["files"], held, wanted)
    return spec


def mismatch_error(files: FeatureFiles, held: dict, wanted: dict) -> FeaturesError:
    return FeaturesError(
        f"{files.csv} holds features made with {held}, not {wanted}. Features of different "
        f"models cannot be mixed: choose another --out file, or pass --overwrite to replace it."
    )


def load_previous(files: FeatureFiles, root: Path) -> dict | None:
    """The committed store a run updates (photos whose vectors were damaged left out, to be embedded again);
    None when there is none, or only a bare CSV, which the run replaces."""
    if not files.exists():
        return None
    stored = read_store(files.csv, damaged="drop")
    meta = stored.meta
    if "config" not in meta:
        return None
    if Path(meta["images_root"]) != root:
        raise FeaturesError(
            f"{files.csv} holds the features of {meta['images_root']}, not {root}. "
            f"Use another --out file for this folder, or --overwrite to replace it."
        )
    return {"files": files, "paths": stored.paths, "matrix": stored.matrix, "config": meta["config"],
            "audit": stored.audit, "stored": stored}


def drop_checkpoints(files: FeatureFiles) -> None:
    """Remove an unfinished run's checkpoints, of either engine."""
    for folder in (files.partial, files.shards):
        shutil.rmtree(folder, ignore_errors=True)


def read_partial_config(folder: Path) -> dict | None:
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

    def add_shards(self, folder: Path, dim: int, spec: dict | None = None):
        """Results from the Parquet shards of a Ray run (this one, or one that was killed), by content hash."""
        if (spec or {}).get("discard_partial"):
            shutil.rmtree(folder, ignore_errors=True)
            return
        before = len(self.by_sha)
        for shard in sorted(folder.glob("shard-*.parquet")):
            try:
                info, vectors = read_vectors([shard], dim, ("sha256", "status", "detail"))
            except FeaturesError as exc:  # a shard cut short: its photos are embedded again
                log.warning("ignoring the unreadable shard %s: %s", shard.name, exc)
                continue
            for sha, status, detail, vector in zip(info["sha256"], info["status"], info["detail"], vectors):
                self.add(sha, status, detail, None if status == "skipped" else vector)
        if len(self.by_sha) > before:
            log.info("%d results from Ray's shards in %s", len(self.by_sha) - before, folder.name)

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


def content_hashes(scan, root, previous, needed, workers) -> list[str | None]:
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


class MemoryWriter:
    """Records results in :class:`KnownResults` only: for a few photos added at once, nothing to resume."""

    def __init__(self, known: KnownResults):
        self.known = known

    def add(self, sha: str, status: str, detail: str, vector: np.ndarray | None) -> None:
        self.known.add(sha, status, detail, vector)

    def flush(self) -> None:
        pass


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

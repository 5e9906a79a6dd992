"""The adapt step on a folder: embed the labelled photos, train, save; and plain-against-adapted scores.

Command line: ``similar-finder adapt LABELLED_DIR``.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._io import DATA_DIR, MODELS_DIR
from ..backbones import build_from_config
from ..features import extract_features
from ..images import load_image
from ..incremental import default_workers
from ..metrics import SCORE_K, retrieval_among
from .model import AdapterError, embed
from .training import fit_adapter, save_head

log = logging.getLogger(__name__)
DEFAULT_ADAPTER = MODELS_DIR / "adapter.keras"


@dataclass
class AdaptResult:
    """What ``adapt`` made and how much it helped on photos it did not train on."""

    path: Path | None
    before: dict  # retrieval scores of the plain features on the validation photos
    after: dict  # the same with the adapter
    epochs: int
    info: dict = field(default_factory=dict)


def trunk_activations(backbone, layer: str, root: Path, paths: list[str], batch_size: int = 32):
    """The activations of ``layer`` for every photo, and for every photo mirrored: ``(activations, flipped)``."""
    out, mirrored = [], []
    with ThreadPoolExecutor(default_workers()) as pool:
        for start in range(0, len(paths), batch_size):
            batch = np.stack(list(pool.map(lambda p: load_image(root / p, backbone.input_size)[0],
                                           paths[start:start + batch_size])))
            out.append(backbone.embed_trunk(batch, layer))
            mirrored.append(backbone.embed_trunk(batch[:, :, ::-1], layer))
    return np.concatenate(out), np.concatenate(mirrored)


def adapt(labelled_dir: str | os.PathLike, out: str | os.PathLike | None = DEFAULT_ADAPTER, *,
          features_csv: str | os.PathLike | None = None, backbone: str | None = None, loss: str = "arcface",
          epochs: int = 60, dim: int = 128, fine_tune_blocks: int = 0, progress: bool = True,
          **extract_kwargs) -> AdaptResult:
    """Train an adapter on a folder with one subfolder per class and save it to ``out``.

    Photos are embedded with ``backbone`` (incrementally, into ``features_csv``,
    default ``data/adapt/<folder>.csv``); :func:`fit_adapter` trains and blends
    the head, and its held-out scores before and after are returned (and logged).
    ``fine_tune_blocks=N`` also fine-tunes the backbone's last N blocks, on the
    photos and their mirror images (slower: every photo is decoded again).
    """
    labelled_dir = Path(labelled_dir)
    if features_csv is None:
        features_csv = DATA_DIR / "adapt" / f"{labelled_dir.resolve().name}.csv"
    library = extract_features(labelled_dir, features_csv, backbone, progress=progress, **extract_kwargs)
    if library.config and library.config.get("adapter"):
        raise AdapterError(f"{features_csv} holds adapted vectors; adapt from plain backbone features")
    labels = library.labels(required=True)
    tuning = {}
    if fine_tune_blocks:
        (tail, activations, flipped), cut = fine_tuning_inputs(library, fine_tune_blocks)
        model, report = fit_adapter(activations, labels, loss=loss, epochs=epochs, dim=dim, tail=tail,
                                    flipped=flipped)
        tuning = {"fine_tune_blocks": int(fine_tune_blocks), "cut": cut}
    else:
        model, report = fit_adapter(library.matrix, labels, loss=loss, epochs=epochs, dim=dim)
    before, after = report["plain"], report["adapted"]
    log.info("held-out precision@5: %.3f plain, %.3f adapted (%s, plain weight %.1f, %d epochs)",
             before["precision@5"], after["precision@5"], report["method"], report["plain_weight"], report["epochs"])
    if report["plain_weight"] >= 1:
        log.warning("no adapter beat the plain features on the held-out photos (too few photos per "
                    "class?); the adapter passes the plain features through")
    info = {"backbone": library.config, "loss": loss, "dim": dim, "classes": sorted(set(labels)),
            "trained_on": str(labelled_dir.resolve()), **tuning, **report}
    path = save_head(model, Path(out), info) if out is not None else None
    return AdaptResult(path, before, after, report["epochs"], info)


def compare_adapted(matrix: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, *,
                    loss: str = "arcface", k: int = SCORE_K, tuning=None) -> tuple[dict, dict]:
    """Fit an adapter on rows ``train``, score retrieval among rows ``test``: ``(plain, adapted)``.

    ``tuning``: ``(tail, activations, flipped)`` to fine-tune the backbone's last blocks too.
    """
    labels = np.asarray(labels)
    inputs = matrix
    if tuning is None:
        model, _ = fit_adapter(matrix[train], labels[train], loss=loss)
    else:
        tail, inputs, flipped = tuning
        model, _ = fit_adapter(inputs[train], labels[train], loss=loss, tail=tail, flipped=flipped[train])
    plain = retrieval_among(matrix[test], labels[test], k=k)
    adapted = retrieval_among(embed(model, inputs[test]), labels[test], k=k)
    return plain, adapted


def fine_tuning_inputs(library, blocks: int):
    """``(tail, activations, flipped)`` of a library's photos for fine-tuning its backbone's last ``blocks``."""
    cfg = library.config
    if not cfg:
        raise AdapterError(f"{library.files.csv} has no sidecar: the backbone to fine-tune is unknown")
    backbone = build_from_config(cfg)
    cut, tail = backbone.tail(blocks)
    return (tail, *trunk_activations(backbone, cut, library.root, library.paths)), cut

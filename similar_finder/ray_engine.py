"""Extraction on Ray: decoding in parallel tasks, the model in an actor pool, results in shards on disk.

``RayRunner(...).run(todo, root, known)`` is the engine behind
``extract_features(..., engine="ray")``. A Ray Data pipeline takes the files a
run must embed (known content hashes never reach it) →

1. **decode** in parallel tasks, exactly as in-process
   (:func:`~similar_finder.engines.decode_file`: EXIF, CMYK, 16-bit, draft
   mode; a bad file becomes a reason, never an exception);
2. **embed** in a pool of actors that each build the Keras model once
   (GPU actors with ``num_gpus_per_worker``; Keras on the JAX backend there);
   each actor writes its batch's results — content hash, status, reason,
   vector — as one Parquet shard under ``<stem>.shards/``, atomically, named
   by the hashes it holds, and hands back only the small per-file record.

Ray retries a task whose worker died, and the retried batch writes the shard
of the same name again, so every photo is there exactly once; the driver
merges the shards by content hash. A killed driver leaves the shards, and the
next run reuses them. Without ``address`` a local Ray is started on this
machine's cores; with one, the run joins that cluster (whose workers must see
the images and the shards folder at the same paths).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from ._quiet import native_stderr_filtered
from .embedding import build_model
from .engines import decode_file, embed_padded
from .errors import SimilarFinderError, check_positive
from .store import write_vectors

log = logging.getLogger(__name__)


# Ray's lines on a healthy local run that say nothing to the user of an extraction.
RAY_NOISE = re.compile(r"Token authentication is enabled|constructor arguments in the object store|"
                       r"Progress bars disabled|Started a local Ray instance|concurrency.. is deprecated")


class RayUnavailableError(SimilarFinderError):
    """Ray is not installed, or the cluster cannot be reached."""


def decode_batch(batch: dict, root: str, size: int) -> dict:
    """A Ray Data task: decode a batch of files (relative paths) into fixed-size pixels."""
    paths = [str(p) for p in batch["path"]]
    shas, pixels, fixes, errors = [], np.zeros((len(paths), size, size, 3), np.uint8), [], []
    for i, path in enumerate(paths):
        sha, image, fixed, error = decode_file(Path(root), path, size)
        shas.append(sha or "")
        if image is not None:
            pixels[i] = image
        fixes.append("; ".join(fixed or []))
        errors.append(error or "")
    return {"path": np.array(paths), "sha256": np.array(shas), "pixels": pixels, "fixes": np.array(fixes),
            "error": np.array(errors)}


class Embedder:
    """A Ray Data actor: builds the backbone once, embeds batches, writes each batch as a shard."""

    def __init__(self, spec: dict, adapter: str | None, shards: str, batch_size: int):
        model = build_model(spec["backbone"], pooling=spec["pooling"], input_size=spec["input_size"],
                            weights=spec["weights_arg"], adapter=adapter)
        self.model, self.shards, self.batch_size = model, Path(shards), batch_size

    def __call__(self, batch: dict) -> dict:
        shas, errors = batch["sha256"].astype(str), batch["error"].astype(str)
        usable = errors == ""
        vectors = np.zeros((len(shas), self.model.dim), np.float32)
        if usable.any():
            vectors[usable] = embed_padded(self.model, batch["pixels"][usable], self.batch_size)
        status = np.where(usable, np.where(batch["fixes"].astype(str) != "", "fixed", "ok"), "skipped")
        detail = np.where(usable, batch["fixes"].astype(str), errors)
        hashed = shas != ""  # an unreadable file has no hash to be remembered by
        if hashed.any():
            name = hashlib.sha256("\n".join(shas[hashed]).encode()).hexdigest()[:24]
            write_vectors(self.shards / f"shard-{name}.parquet",
                          {"sha256": shas[hashed].tolist(), "status": status[hashed].tolist(),
                           "detail": detail[hashed].tolist()}, vectors[hashed])
        return {"path": batch["path"], "sha256": shas, "status": status, "detail": detail}


def import_ray(local: bool = True):
    """The ``ray`` module; ``local``: set up first so that a Ray started here listens on loopback only."""
    if local and "ray" not in sys.modules:
        # Ray avoids loopback on Linux (it serves other machines of a cluster); a Ray of one machine has no
        # other machines to serve: on 127.0.0.1 nothing of it is reachable from, or talks to, the network.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError("engine='ray' needs Ray: pip install 'similar_finder[ray]' "
                                  "(or pip install 'ray[data]')") from exc
    return ray


def start_ray(address: str | None = None, **init_kwargs):
    """Join the Ray cluster at ``address``, or start a local one on this machine's cores (on loopback)."""
    ray = import_ray(local=address is None)
    try:
        with native_stderr_filtered(RAY_NOISE):
            # Workers log as quietly as the driver: their TensorFlow start-up is filtered the same way.
            ray.init(address=address, include_dashboard=False, configure_logging=True,
                     logging_level=logging.WARNING, log_to_driver=False,
                     runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}}, **init_kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailableError(f"cannot start or reach Ray at {address or 'this machine'}: {exc}") from exc
    return ray


class RayRunner:
    """Embeds files on Ray: decode tasks → an actor pool that builds the model once per actor → shards."""

    def __init__(self, spec: dict, shards: Path, *, dim: int, adapter: str | None = None,
                 address: str | None = None, num_gpus_per_worker: float = 0, actors: int | None = None,
                 batch_size: int = 32, progress: bool = True):
        self.spec, self.shards, self.dim, self.adapter = spec, Path(shards), int(dim), adapter
        self.address, self.num_gpus = address, float(num_gpus_per_worker)
        self.actors = None if actors is None else check_positive("actors", actors)
        self.batch_size, self.progress = check_positive("batch_size", batch_size), progress

    def _connect(self):
        ray = import_ray(local=self.address is None)
        if not ray.is_initialized():
            start_ray(self.address)
        return ray

    def _pool_size(self, ray) -> int:
        resources = ray.cluster_resources()
        if self.num_gpus and resources.get("GPU", 0) < self.num_gpus:  # the actors would wait for GPUs for ever
            raise RayUnavailableError(f"--num-gpus-per-worker {self.num_gpus:g}, but the Ray cluster has "
                                      f"{resources.get('GPU', 0):g} GPUs")
        if self.actors is not None:
            return self.actors
        if self.num_gpus:
            return max(1, int(resources.get("GPU", 0) // self.num_gpus))
        # An actor's model uses several cores by itself; the rest decode.
        return max(1, int(resources.get("CPU", 1)) // 4)

    def run(self, todo: list[tuple[str, str | None]], root: Path, known) -> dict[str, str]:
        """Embed ``todo`` into shards, then read them into ``known``; returns each file's content hash."""
        ray = self._connect()
        from ray.data import ActorPoolStrategy, DataContext

        DataContext.get_current().enable_progress_bars = self.progress
        logging.getLogger("ray.data").setLevel(logging.INFO if self.progress else logging.WARNING)
        self.shards.mkdir(parents=True, exist_ok=True)
        paths = [p for p, _ in todo]
        blocks = max(1, min(len(paths) // self.batch_size, 8 * int(ray.cluster_resources().get("CPU", 1))))
        size = self.spec["input_size"]
        actor_options = {"num_gpus": self.num_gpus} if self.num_gpus else {"num_cpus": 1}
        dataset = (ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
                   # Half a CPU a decode task: decoding is light and partly I/O, and a resource request
                   # unlike the actors' keeps it a stage of its own instead of fused into them.
                   .map_batches(decode_batch, fn_kwargs={"root": str(root), "size": size},
                                batch_size=self.batch_size, batch_format="numpy", num_cpus=0.5)
                   .map_batches(Embedder, fn_constructor_kwargs={"spec": self.spec, "adapter": self.adapter,
                                                                 "shards": str(self.shards),
                                                                 "batch_size": self.batch_size},
                                batch_size=self.batch_size, batch_format="numpy",
                                compute=ActorPoolStrategy(size=self._pool_size(ray)), **actor_options))
        new_shas: dict[str, str] = {}
        batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))
        started = time.perf_counter()
        with native_stderr_filtered(RAY_NOISE):  # the actors' start-up: its lines are Ray's, not the user's
            first = next(batches, None)
        self.first_results_after = time.perf_counter() - started  # actors started, models built, first batch
        log.info("first results after %.1f s (actors starting and building the model)", self.first_results_after)
        for batch in itertools.chain([first] if first is not None else [], batches):
            for path, sha, status, detail in zip(batch["path"], batch["sha256"], batch["status"], batch["detail"]):
                path, sha, detail = str(path), str(sha), str(detail)
                if sha:
                    new_shas[path] = sha
                if status == "skipped":
                    log.warning("skipped %s: %s", path, detail)
                    if not sha:
                        known.unreadable[path] = detail
        known.add_shards(self.shards, self.dim)
        lost = [path for path, sha in new_shas.items() if sha not in known.by_sha]
        if lost:  # the workers wrote shards this machine cannot see: never record those photos as unreadable
            raise RayUnavailableError(
                f"{len(lost)} photos (e.g. {lost[0]}) were embedded but their shards are not in {self.shards}: "
                f"with --address, the output folder must be on storage that the workers and this machine share")
        return new_shas

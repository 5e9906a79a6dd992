"""Engines: what turns a list of files into vectors. The in-process one is here; Ray's in :mod:`.ray_engine`.

An engine is a runner with one method, ``run(todo, root, writer)``: embed the
files of ``todo`` (relative path, known hash or None) found under ``root``,
handing every result — a vector, or the reason a file was skipped — to
``writer`` (a :class:`~similar_finder.incremental.CheckpointWriter`), and return
the content hash of every file it read. Engines decode with
:func:`~similar_finder.images.load_image` and embed with a backbone, and write
nothing themselves but checkpoints: the store is written by
:func:`~similar_finder.store.write_store` once the run is complete.
"""
from __future__ import annotations

import hashlib
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import check_positive
from .images import ImageError, load_image
from .incremental import CheckpointWriter, default_workers

log = logging.getLogger(__name__)
ENGINES = ("local", "ray")


def decode_file(root: Path, path: str, size: int):
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
        pending.append((path, pool.submit(decode_file, root, path, size)))
        if len(pending) >= lookahead:
            break
    while pending:
        path, future = pending.popleft()
        nxt = next(paths, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(decode_file, root, nxt, size)))
        yield (path, *future.result())


def embed_padded(model, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """``model.embed`` in batches of exactly ``batch_size``: a fixed shape never recompiles the model."""
    out = []
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start:start + batch_size]
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        out.append(model.embed(chunk)[: min(batch_size, len(pixels) - start)])
    return np.concatenate(out) if out else np.zeros((0, model.dim), np.float32)


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
            vectors = embed_padded(self.model, np.stack([b[1] for b in batch]), self.batch_size)
            for (sha, _, fixes), vector in zip(batch, vectors):
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

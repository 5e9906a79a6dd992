"""Extraction throughput: the whole pipeline next to the bare model, per backbone.

    python bench/extract_bench.py [--images ../shared/data/clothing] [--n 256] [--batch-size 32]

For each backbone it prints the pipeline's images/s (walk, hash, decode in a
thread pool, batch, embed, write CSV) and the bare model's images/s on the same
images already decoded, and their ratio. A ratio near 1 means the model is the
bottleneck and decoding is hidden behind it; well below 1 means decoding or I/O
is. Random weights are used where ImageNet weights cannot be downloaded: the
speed of a network does not depend on its weights.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from similar_finder import build_backbone, extract_features  # noqa: E402
from similar_finder.backbones import WeightsUnavailableError  # noqa: E402
from similar_finder.images import load_image, scan_images  # noqa: E402

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(SHARED / "clothing"))
    parser.add_argument("--n", type=int, default=256, help="images to embed per backbone")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbones", default="efficientnet_lite0,resnet50,vgg19")
    args = parser.parse_args()

    import keras

    scan = scan_images(args.images)
    step = max(1, len(scan) // args.n)
    chosen = scan["path"][::step][: args.n].tolist()
    work = Path(tempfile.mkdtemp(prefix="extract-bench-"))
    for rel in chosen:  # a flat sample folder, so every backbone sees the same files
        os.symlink(Path(args.images).resolve() / rel, work / rel.replace("/", "__"))
    print(f"{len(chosen)} images from {args.images}, batch {args.batch_size}, "
          f"Keras {keras.__version__} on {keras.backend.backend()}, {os.cpu_count()} CPUs")
    print(f"{'backbone':<20}{'weights':<10}{'pipeline img/s':>16}{'model img/s':>14}{'ratio':>8}")
    try:
        for name in args.backbones.split(","):
            try:
                model = build_backbone(name)
            except WeightsUnavailableError:
                model = build_backbone(name, weights=None)
            weights = None if model.weights_source == "random" else "imagenet"
            pixels = np.stack([load_image(work / p.replace("/", "__"), model.input_size)[0] for p in chosen])
            bs = args.batch_size
            batches = [pixels[i:i + bs] for i in range(0, len(pixels) - bs + 1, bs)]
            model.embed(batches[0])  # compile / warm up outside the timing
            t0 = time.perf_counter()
            for batch in batches:
                model.embed(batch)
            model_rate = len(batches) * bs / (time.perf_counter() - t0)

            out = work / "out" / "features.csv"
            t0 = time.perf_counter()
            extract_features(work, out, name, weights=weights, batch_size=bs, progress=False)
            pipeline_rate = len(chosen) / (time.perf_counter() - t0)
            shutil.rmtree(work / "out")
            print(f"{name:<20}{model.weights_source:<10}{pipeline_rate:>16.1f}{model_rate:>14.1f}"
                  f"{pipeline_rate / model_rate:>8.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

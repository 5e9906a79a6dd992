"""Command line: ``python -m similar_finder.cluster [--features data/features.csv]``."""
from __future__ import annotations

import argparse
import sys

from . import _cli
from ._io import DEFAULT_FEATURES
from .clustering import DEFAULT_CLUSTERS, DEFAULT_MODEL, fit_baseline


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m similar_finder.cluster",
        description="Fit the K-Means baseline: k chosen by silhouette score, model saved with joblib.",
    )
    parser.add_argument("--features", default=str(DEFAULT_FEATURES))
    parser.add_argument("--k-min", type=int, default=2)
    parser.add_argument("--k-max", type=int, default=10)
    parser.add_argument("--k", type=int, default=None, help="use this k instead of tuning it")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--clusters", default=str(DEFAULT_CLUSTERS))
    parser.add_argument("--no-normalize", action="store_true", help="cluster raw vectors, not unit vectors")
    args = parser.parse_args(argv)
    model = fit_baseline(args.features, k=args.k, k_range=range(args.k_min, args.k_max + 1),
                         model_path=args.model, clusters_csv=args.clusters, normalize=not args.no_normalize)
    print(f"chosen k = {model.k_}; model saved to {args.model}, clusters to {args.clusters}")


if __name__ == "__main__":
    sys.exit(_cli.run(main))

"""Command line: ``python -m similar_finder.extract IMAGES_DIR [--out data/features.csv]``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import _cli
from ._io import DEFAULT_FEATURES
from .demo import ensure_demo_library
from .features import FeatureFiles, extract_features


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m similar_finder.extract",
        description="Embed every photo under IMAGES_DIR with a pretrained CNN and write a feature CSV. "
                    "Re-running only embeds new or changed photos.",
    )
    parser.add_argument("images_dir", nargs="?", default=None,
                        help="folder of photos, searched recursively (default: the embedded demo library)")
    parser.add_argument("--out", default=str(DEFAULT_FEATURES), help="feature CSV to write (default: %(default)s)")
    _cli.add_backbone_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="decoding threads")
    parser.add_argument("--checkpoint-every", type=int, default=512,
                        help="save progress every N images, so an interrupted run resumes")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing features file made with other settings")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.images_dir is None:
        args.images_dir = ensure_demo_library()
    frame = extract_features(
        args.images_dir, args.out, args.backbone, pooling=args.pooling, input_size=args.input_size,
        weights=None if args.weights == "none" else args.weights, batch_size=args.batch_size,
        workers=args.workers, checkpoint_every=args.checkpoint_every, overwrite=args.overwrite, progress=not args.quiet,
    )
    stats = frame.attrs["stats"]
    if stats["skipped"]:
        print(f"{stats['skipped']} files skipped; reasons in {FeatureFiles(Path(args.out)).skipped}",
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(_cli.run(main))

"""What every command-line entry point shares: logging set-up and friendly errors."""
from __future__ import annotations

import logging
import sys

from . import backbones, clustering, features

# Errors whose message already says what went wrong and what to do: no traceback.
USER_ERRORS = (
    features.FeaturesError,
    backbones.BackboneError,
    clustering.ClusteringError,
    FileNotFoundError,
    ValueError,
)


def run(main, argv=None) -> int:
    """Call ``main(argv)``; turn user errors and Ctrl-C into one line and an exit code."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        main(argv)
    except KeyboardInterrupt:
        print("interrupted: what was finished is saved; run the same command again to resume",
              file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_backbone_arguments(parser) -> None:
    parser.add_argument("--backbone", choices=backbones.BACKBONES, default=None,
                        help="CNN to embed with (default: the one the features file already uses, "
                             "else resnet50, or efficientnet_lite0 when offline)")
    parser.add_argument("--pooling", choices=backbones.POOLINGS, default="avg")
    parser.add_argument("--input-size", type=int, default=224, help="square input side in pixels")
    parser.add_argument("--weights", default="imagenet",
                        help="'imagenet' (downloaded by Keras) or the path of a local weights file")

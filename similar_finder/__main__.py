"""``python -m similar_finder COMMAND``: the same as ``similar-finder COMMAND``."""
from .cli import main

raise SystemExit(main())

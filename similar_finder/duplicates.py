"""``python -m similar_finder.duplicates``: the same as ``similar-finder duplicates`` (see :mod:`similar_finder.cli`)."""
from .cli import main_for

if __name__ == "__main__":
    raise SystemExit(main_for("duplicates"))

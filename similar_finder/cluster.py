"""``python -m similar_finder.cluster``: the same as ``similar-finder cluster`` (see :mod:`similar_finder.cli`)."""
from .cli import main_for

if __name__ == "__main__":
    raise SystemExit(main_for("cluster"))

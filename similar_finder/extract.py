"""``python -m similar_finder.extract``: the same as ``similar-finder extract`` (see :mod:`similar_finder.cli`)."""
from .cli import main_for

if __name__ == "__main__":
    raise SystemExit(main_for("extract"))

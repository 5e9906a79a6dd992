"""``python -m similar_finder.run_all``: the whole pipeline, as the design card names it.

The same as ``similar-finder run-all`` (see :mod:`.cli`); from Python, call
:func:`run_all` (it lives in :mod:`.pipeline`). This module sits on top of
every layer, so that running it never loads a module twice.
"""
from .cli import main_for
from .pipeline import RunSummary, run_all

__all__ = ["RunSummary", "run_all"]

if __name__ == "__main__":
    raise SystemExit(main_for("run-all"))

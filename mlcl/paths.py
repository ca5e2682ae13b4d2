"""The only place where project paths are computed."""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent  # the checkout (meaningful for an editable install)
CONFIGS = PACKAGE / "configs"
NOTEBOOKS = REPO / "notebooks"


def runs_dir() -> Path:
    """Where runs, executed notebooks and the results registry go (MLCL_RUNS overrides)."""
    return Path(os.environ.get("MLCL_RUNS", REPO / "runs"))


def data_dir() -> Path:
    """Default home of datasets (MLCL_DATA overrides)."""
    return Path(os.environ.get("MLCL_DATA", REPO / "data"))


def figures_dir() -> Path:
    """Where the figures notebook writes (MLCL_FIGURES overrides)."""
    return Path(os.environ.get("MLCL_FIGURES", REPO / "figures"))


def cache_dir() -> Path:
    """Caches that only save time (e.g. the data pre-flight's results); MLCL_CACHE
    overrides, else $XDG_CACHE_HOME/mlcl or ~/.cache/mlcl."""
    if os.environ.get("MLCL_CACHE"):
        return Path(os.environ["MLCL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlcl"

"""The core's paths: the checkout, the presets, the runs folder and the cache."""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent  # the checkout (meaningful for an editable install)
CONFIGS = PACKAGE / "configs"


def runs_dir() -> Path:
    """Where runs, executed notebooks and the results registry go (MLCL_RUNS overrides)."""
    return Path(os.environ.get("MLCL_RUNS", REPO / "runs"))


def cache_dir() -> Path:
    """Caches that only save time: MLCL_CACHE, else $XDG_CACHE_HOME/mlcl or ~/.cache/mlcl."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("MLCL_CACHE") or xdg / "mlcl")

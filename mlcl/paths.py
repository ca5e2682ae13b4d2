"""The only place where project paths are computed."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mlcl.config imports this module
    from mlcl.config import Config

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


def demo_dir() -> Path:
    """The runs folder of `make demo` (its cells, registry and executed notebooks)."""
    return runs_dir() / "demo"


def resolve(path: str | Path, output: bool = False) -> Path:
    """``path`` as given when it is absolute or exists from the current folder; otherwise
    taken from the repository root when it exists there. Commands and presets write paths
    relative to the repository root, and a notebook's kernel runs in ``notebooks/``, so
    "runs/demo/..." must mean the same from both. A path found nowhere is returned as
    given (``~`` expanded), so the error that follows names what the user typed; with
    ``output`` (a folder about to be written) it is taken from the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not str(path):
        return p
    return REPO / p if output or (REPO / p).exists() else p


def fix_data_root(cfg: "Config") -> "Config":
    """``cfg`` with a relative data.root that is not found from the current folder taken
    from the repository root (:func:`resolve`; runs launched from the repository root store
    ``data/synthetic``, and a notebook runs in ``notebooks/``). Changes ``cfg`` in place."""
    if cfg.data.root:
        root = resolve(cfg.data.root)
        if root != Path(cfg.data.root).expanduser():
            cfg.data.root = str(root)
    return cfg


def registry_dirs() -> list[Path]:
    """Where a results registry may be, in the order readers look: the study's
    ``<runs>/registry`` (reproduce, the run notebook), then the demo's."""
    return [runs_dir() / "registry", demo_dir() / "registry"]


def figures_for(registry: Path) -> Path:
    """The figures folder that goes with a registry: figures/demo/ for the demo's, so the
    demo never overwrites the study's figures in figures/."""
    demo = (demo_dir() / "registry").resolve()
    return figures_dir() / "demo" if Path(registry).resolve() == demo else figures_dir()

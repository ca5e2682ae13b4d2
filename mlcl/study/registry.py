"""The results registry, ``<runs>/registry/<name>.json`` per run (the keys: :func:`record_run`),
the only input of the figures notebook and mlcl.study.viz; and where the study's files go."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from mlcl.config import RESULT_NEUTRAL, Config, config_changes
from mlcl.files import atomic_write_json
from mlcl.outputs import read_run, resume_changes
from mlcl.paths import CONFIGS, REPO, runs_dir

# what names a grid cell (mlcl.study.grids.Run): the registry's ``run`` record and table rows
CELL_KEYS = ("preset", "split", "method", "variant", "ablation", "seed")
METRIC_COLUMNS = ("best_miou", "last_miou", "best_epoch", "last_epoch", "iterations")
NOTEBOOKS = REPO / "notebooks"


def figures_dir() -> Path:
    """Where the figures notebook writes (MLCL_FIGURES overrides)."""
    return Path(os.environ.get("MLCL_FIGURES", REPO / "figures"))


def resolve(path: str | Path, output: bool = False) -> Path:
    """``path`` as given when absolute or found here, else from the repository root when
    found there or with ``output`` (a notebook's kernel runs in ``notebooks/``)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not str(path):
        return p
    return REPO / p if output or (REPO / p).exists() else p


def fix_data_root(cfg: Config) -> Config:
    """``cfg`` (changed in place) with its data.root :func:`resolve`d."""
    if cfg.data.root:
        root = resolve(cfg.data.root)
        if root != Path(cfg.data.root).expanduser():
            cfg.data.root = str(root)
    return cfg


def demo_dir() -> Path:
    """The runs folder of `make demo`."""
    return runs_dir() / "demo"


def registry_dirs() -> list[Path]:
    """Where a registry may be, in the order readers look: the study's, then the demo's."""
    return [runs_dir() / "registry", demo_dir() / "registry"]


def figures_for(registry: Path) -> Path:
    """The figures folder of a registry: figures/demo/ for the demo's, else figures/."""
    demo = (demo_dir() / "registry").resolve()
    return figures_dir() / "demo" if Path(registry).resolve() == demo else figures_dir()


def registry_dir(root: str | Path | None = None) -> Path:
    """``root``, or the study's registry (where runs are recorded)."""
    return resolve(root) if root else registry_dirs()[0]


def find_registry(root: str | Path | None = None) -> Path:
    """``root``, else the first of :func:`registry_dirs` with an entry, else the study's."""
    found = [d for d in registry_dirs() if any(d.glob("*.json"))]
    return registry_dir(root or (found[0] if found else None))


def environment() -> dict[str, Any]:
    """Python, torch, platform and host, and the GPU when there is one."""
    import torch

    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cuda": cuda, "host": platform.node(),
            **({"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
               if cuda else {})}


def git_dirty() -> bool | None:
    """Whether tracked files have uncommitted changes (None: not a git checkout)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def is_synthetic(config: dict[str, Any]) -> bool:
    """A run on the synthetic shapes data (its numbers are not VOC / Cityscapes results)."""
    return config.get("data", {}).get("dataset") == "synthetic"


def record_run(name: str, metrics: dict[str, Any], config: dict[str, Any],
               root: str | Path | None = None, **extra: Any) -> Path:
    """Write the entry ``<root>/<name>.json`` (``extra``: more top-level keys); its path."""
    iters = metrics.get("iterations") or 0
    train_s = metrics.get("wall_time_s")
    timings = {"train_s": train_s, "iterations": iters,
               "s_per_iter": (train_s / iters) if train_s and iters else None,
               "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               **extra.pop("timings", {})}
    entry = {"name": name, "config": config, "metrics": metrics, "environment": environment(),
             "git_commit": metrics.get("git_commit"), "git_dirty": git_dirty(),
             "wall_time_s": train_s, "timings": timings, "synthetic": is_synthetic(config),
             "output_dir": metrics.get("output_dir") or config.get("output_dir"), **extra}
    return atomic_write_json(registry_dir(root) / f"{name}.json", entry)


def record_output_dir(name: str, output_dir: str | Path, root: str | Path | None = None,
                      **extra: Any) -> Path:
    """Record a finished run from its ``output_dir`` (stored as an absolute path)."""
    run = read_run(Path(output_dir).resolve())
    metrics = {**(run.metrics or {}), "output_dir": str(run.path)}
    return record_run(name, metrics, run.config, root, **extra)


def load_entry(name: str, root: str | Path | None = None) -> dict[str, Any] | None:
    """The entry of run ``name``, or None when it is missing or unreadable."""
    path = registry_dir(root) / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def load_registry(root: str | Path | None = None) -> list[dict[str, Any]]:
    """Every entry of the registry, sorted by name (unreadable files are skipped loudly)."""
    out = []
    for path in sorted(registry_dir(root).glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            print(f"warning: skipping unreadable registry entry {path} ({e})")
    return out


def run_fields(entry: dict[str, Any]) -> dict[str, Any]:
    """CELL_KEYS of an entry: its ``run`` record, else what its config says."""
    run = dict(entry.get("run") or {})
    cfg = entry.get("config") or {}
    metrics = entry.get("metrics") or {}
    method = run.get("method") or cfg.get("method") or metrics.get("method")
    variant = run.get("variant") or (cfg.get("mlcl") or {}).get("variant") or "paper"
    return {"preset": run.get("preset") or default_preset(cfg),
            "split": str(run.get("split") or cfg.get("split") or metrics.get("split") or ""),
            "method": method,
            "variant": variant if method == "mlcl" else "",
            "ablation": run.get("ablation") or "",
            "seed": int(run.get("seed", cfg.get("seed", metrics.get("seed", 0))) or 0)}


def default_preset(config: dict[str, Any]) -> str | None:
    """The preset of a run recorded without a ``run`` record: its dataset's name, or for a
    DINOv2 encoder the dataset's UniMatch V2 preset (``<dataset>_v2``) where there is one."""
    dataset = (config.get("data") or {}).get("dataset")
    v2 = f"{dataset}_v2"
    dinov2 = str((config.get("model") or {}).get("backbone") or "").startswith("dinov2")
    return v2 if dinov2 and (CONFIGS / f"{v2}.yaml").is_file() else dataset


def entry_output_dir(entry: dict[str, Any]) -> Path | None:
    """The run's output folder (the entry's, its metrics' or its config's), resolved."""
    raw = (entry.get("output_dir") or (entry.get("metrics") or {}).get("output_dir")
           or (entry.get("config") or {}).get("output_dir"))
    return resolve(raw) if raw else None


# What the runs of one table differ in by design; any other setting must agree, except
# VARIANT_AXES, which must agree only between the runs of one (method, variant, ablation).
TABLE_AXES = ("method", "seed", "split", "data.labeled_split", "data.unlabeled_split")
VARIANT_AXES = ("mlcl.", "train.mix_partner", "train.lr_lag")


def check_comparable(entries: list[dict[str, Any]]) -> None:
    """A ValueError naming the runs and keys (``B vs A (key: a -> b; ...)``) when a complete
    entry's settings differ from the first of its table (preset, dataset, model.backbone) or
    cell, or an entry was resumed with changes."""
    tables: dict[tuple, list[dict[str, Any]]] = {}
    cells: dict[tuple, list[dict[str, Any]]] = {}
    resumed = []
    for e in entries:
        if changes := resume_changes(e.get("metrics") or {}):
            resumed.append(f"{e.get('name')} ({'; '.join(changes)})")
        if (e.get("metrics") or {}).get("complete"):
            f = run_fields(e)
            cfg = e.get("config") or {}
            table = (f["preset"], (cfg.get("data") or {}).get("dataset"),
                     (cfg.get("model") or {}).get("backbone"))  # a table's column per backbone
            tables.setdefault(table, []).append(e)
            cells.setdefault(table + (f["method"], f["variant"], f["ablation"]), []).append(e)
    problems = ([line for group in tables.values() for line in _differences(group, False)]
                + [line for group in cells.values() for line in _differences(group, True)]
                + resumed)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"the registry mixes runs of different settings: {problems[0]}{more}; "
                         "keep them in separate registries (reproduce --runs DIR) or train "
                         "the old ones again (reproduce --rerun-changed)")


def _differences(group: list[dict[str, Any]], variant_axes: bool) -> list[str]:
    """``"B vs A (changes)"`` per entry B differing from the first, A, in the VARIANT_AXES
    only (``variant_axes``) or in all keys but them."""
    ignore = RESULT_NEUTRAL + TABLE_AXES + (() if variant_axes else VARIANT_AXES)
    out = []
    for e in group[1:]:
        changes = [c for c in config_changes(group[0].get("config") or {},
                                             e.get("config") or {}, ignore)
                   if not variant_axes or c.split(":")[0].startswith(VARIANT_AXES)]
        if changes:
            out.append(f"{e.get('name')} vs {group[0].get('name')} ({'; '.join(changes)})")
    return out


def runs_frame(entries: list[dict[str, Any]]):
    """One row per entry (the columns below), after :func:`check_comparable`."""
    import pandas as pd

    check_comparable(entries)
    rows = []
    for e in entries:
        m = e.get("metrics") or {}
        cfg = e.get("config") or {}
        rows.append({"name": e.get("name"), **run_fields(e),
                     "dataset": (cfg.get("data") or {}).get("dataset") or m.get("dataset"),
                     "backbone": (cfg.get("model") or {}).get("backbone") or "",
                     **{k: m.get(k) for k in METRIC_COLUMNS}, "complete": bool(m.get("complete")),
                     "synthetic": bool(e.get("synthetic", is_synthetic(cfg))),
                     "wall_time_s": e.get("wall_time_s"),
                     "output_dir": str(entry_output_dir(e) or "") or None, "grid": e.get("grid")})
    columns = ["name", *CELL_KEYS, "dataset", "backbone", *METRIC_COLUMNS, "complete", "synthetic",
               "wall_time_s", "output_dir", "grid"]
    df = pd.DataFrame(rows, columns=columns)
    for col in ("best_miou", "last_miou", "wall_time_s"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df.astype({"complete": bool, "synthetic": bool})

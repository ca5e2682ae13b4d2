"""The results registry: one JSON per run (config, git commit, environment, metrics,
timings) under ``runs/registry/``. The figures notebook and mlcl.viz read only this."""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from mlcl import paths
from mlcl.io import atomic_write_json


def registry_dir(root: str | Path | None = None) -> Path:
    return Path(root) if root else paths.runs_dir() / "registry"


def environment() -> dict[str, Any]:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def record_run(name: str, metrics: dict[str, Any], config: dict[str, Any],
               root: str | Path | None = None, **extra: Any) -> Path:
    """Write (atomically) the registry entry ``<root>/<name>.json`` and return its path."""
    entry = {"name": name, "config": config, "metrics": metrics, "environment": environment(),
             "git_commit": metrics.get("git_commit"), "wall_time_s": metrics.get("wall_time_s"),
             "synthetic": config.get("data", {}).get("dataset") == "synthetic", **extra}
    return atomic_write_json(registry_dir(root) / f"{name}.json", entry)


def load_registry(root: str | Path | None = None) -> list[dict[str, Any]]:
    """Every entry of the registry, sorted by name (unreadable files are skipped loudly)."""
    out = []
    for path in sorted(registry_dir(root).glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            print(f"warning: skipping unreadable registry entry {path} ({e})")
    return out

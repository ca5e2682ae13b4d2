"""Batch reproduction: run every cell of a grid (mlcl.grids), skipping runs that are already
complete, going on past a failed run and listing the failures at the end.

Each run trains through the CLI in its own process (``--executor cli``); runs execute ``jobs``
at a time, one OpenMP thread each. Finished runs are recorded in the results registry.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from mlcl import paths
from mlcl.grids import GRIDS, Run, build_grid
from mlcl.registry import record_run


def is_complete(out: Path) -> bool:
    path = out / "metrics.json"
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text()).get("complete"))
    except json.JSONDecodeError:
        return False


def run_cli(run: Run, out: Path, overrides: list[str], log: Path) -> int:
    cmd = [sys.executable, "-m", "mlcl", "train", "--config", run.preset, f"output_dir={out}",
           *run.config_overrides(), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        return subprocess.call(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)


def reproduce(grid: str, *, runs_root: Path | None = None, overrides: list[str] | None = None,
              jobs: int = 1, only: str | None = None) -> dict[str, list[str]]:
    """Run the grid; returns {'done': [...], 'skipped': [...], 'failed': [...]} (run names)."""
    root = Path(runs_root) if runs_root else paths.runs_dir()
    runs = [r for r in build_grid(grid) if not only or only in r.name]
    result: dict[str, list[str]] = {"done": [], "skipped": [], "failed": []}

    def one(run: Run) -> None:
        out = root / "cells" / run.name  # shared by every grid that holds the run
        if is_complete(out):
            result["skipped"].append(run.name)
            return
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        rc = run_cli(run, out, list(overrides or []), out.parent / f"{run.name}.log")
        if rc == 0 and is_complete(out):
            metrics = json.loads((out / "metrics.json").read_text())
            config = yaml.safe_load((out / "config.yaml").read_text())
            record_run(run.name, metrics, config, root / "registry", grid=grid,
                       run={"preset": run.preset, "split": run.split, "method": run.method,
                            "variant": run.variant, "ablation": run.ablation, "seed": run.seed})
            result["done"].append(run.name)
            print(f"  done    {run.name} ({time.time() - started:.0f} s, best mIoU "
                  f"{metrics['best_miou']:.2f})", flush=True)
        else:
            result["failed"].append(run.name)
            print(f"  FAILED  {run.name} (exit {rc}; log {out.parent / (run.name + '.log')})",
                  flush=True)

    print(f"grid {grid}: {len(runs)} runs, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        list(pool.map(one, runs))
    if result["failed"]:
        print("failed runs:\n  " + "\n  ".join(result["failed"]))
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", required=True, choices=GRIDS)
    p.add_argument("--runs", default=None, help="runs folder (default: runs/ or $MLCL_RUNS)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    p.add_argument("--only", default=None, help="only runs whose name contains this")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides for every run, e.g. data.root=DIR")


def main(args) -> int:
    result = reproduce(args.grid, runs_root=args.runs, overrides=args.overrides,
                       jobs=args.jobs, only=args.only)
    return 1 if result["failed"] else 0

"""`make demo`: a short CPU demonstration on the synthetic dataset.

Generates the dataset (once), trains each method briefly as its own process (two at a time,
one thread each: on a 2-core machine that beats one process with two threads), and prints
their mIoU side by side. A short demo, not the study: see the `synthetic-study` grid.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlcl import paths

DEMO_METHODS = ("supervised", "unimatch", "mlcl")
DEMO_OVERRIDES = ["split=1_16", "train.max_iters=600", "train.eval_every=100"]


def ensure_synthetic(root: Path) -> Path:
    """The default synthetic dataset (1000 train / 200 val at 64 px), written once."""
    from mlcl.data.synthetic import make_synthetic

    if not (root / "ImageSets" / "Segmentation" / "val.txt").is_file():
        print(f"writing the synthetic dataset to {root} ...", flush=True)
        make_synthetic(root, num_train=1000, num_val=200, size=64, classes=7, seed=0)
    return root


def train_command(method: str, data_root: Path, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "mlcl", "train", "--config", "synthetic",
            f"data.root={data_root}", f"method={method}", f"output_dir={out}",
            *DEMO_OVERRIDES, *extra]


def run_demo(args) -> int:
    runs = Path(args.out) if args.out else paths.runs_dir() / "demo"
    data_root = ensure_synthetic(paths.data_dir() / "synthetic")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.time()

    def one(method: str) -> tuple[str, int]:
        out = runs / method
        log = runs / f"{method}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            rc = subprocess.call(train_command(method, data_root, out, []), env=env,
                                 stdout=fh, stderr=subprocess.STDOUT)
        print(f"  {method:<10s} finished (exit {rc}, log {log})", flush=True)
        return method, rc

    print(f"training {', '.join(DEMO_METHODS)} for 600 iterations each on 2 processes ...",
          flush=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        codes = dict(pool.map(one, DEMO_METHODS))
    print(f"\nShort demo on SYNTHETIC data (1/16 labels, 600 iterations, one seed; "
          f"{time.time() - started:.0f} s) - not the study, not VOC results:")
    print(f"  {'method':<10s} {'best mIoU':>9s} {'last mIoU':>9s}")
    for method in DEMO_METHODS:
        path = runs / method / "metrics.json"
        if codes[method] != 0 or not path.is_file():
            print(f"  {method:<10s} FAILED (see {runs / (method + '.log')})")
            continue
        m = json.loads(path.read_text())
        print(f"  {method:<10s} {m['best_miou']:9.2f} {m['last_miou']:9.2f}")
    return 0 if all(c == 0 for c in codes.values()) else 1

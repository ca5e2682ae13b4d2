"""`make demo`: a short CPU demonstration on the synthetic dataset, through the notebooks.

Generates the dataset (once), runs the ``demo`` grid (supervised / UniMatch / MLCL at 1/16
labels, 600 iterations, one seed; mlcl.grids) with the run notebook under papermill, two runs
at a time with one thread each, then the figures notebook and, when the time budget allows,
the perturbation and prototype notebooks on the demo's MLCL (and UniMatch) checkpoints. Prints
the three methods' mIoU side by side. A short demo, not the study: see the
``synthetic-study`` grid. Runs go under runs/demo/, figures and tables into figures/demo/;
a second `make demo` trains nothing and only rebuilds the figures.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlcl import grids, paths
from mlcl.registry import load_entry

DEMO_METHODS = ("supervised", "unimatch", "mlcl")
# Validate every epoch (about 117 iterations at 1/16), so the curves have points.
DEMO_OVERRIDES = ["train.eval_every=1"]
BUDGET_S = 600  # the demo's target wall time on 2 cores
INSPECT_NEEDS_S = 100  # the perturbation + prototype notebooks, roughly, on a busy 2-core box


def ensure_synthetic(root: Path) -> Path:
    """The default synthetic dataset (1000 train / 200 val at 64 px), written once."""
    from mlcl.data.synthetic import make_synthetic

    if not (root / "ImageSets" / "Segmentation" / "val.txt").is_file():
        print(f"writing the synthetic dataset to {root} ...", flush=True)
        make_synthetic(root, num_train=1000, num_val=200, size=64, classes=7, seed=0)
    return root


def demo_runs() -> dict[str, grids.Run]:
    """method -> the demo grid's run of that method."""
    return {r.method: r for r in grids.build_grid("demo")}


def run_inspection(runs: Path, figures: Path, cells: dict[str, Path]) -> list[str]:
    """The perturbation notebook on the MLCL checkpoint, then the prototype notebook on the
    UniMatch and MLCL ones; returns the names of the notebooks that failed."""
    from mlcl.reproduce import run_papermill

    nb_dir = runs / "notebooks"
    jobs = [("perturbations", {"checkpoint": str(cells["mlcl"] / "best.pt"),
                               "out_dir": str(figures)})]
    protos = {label: str(cells[m] / "best.pt") for label, m in
              (("UniMatch", "unimatch"), ("MLCL", "mlcl")) if (cells[m] / "best.pt").is_file()}
    jobs.append(("prototypes", {"checkpoints": protos, "out_dir": str(figures)}))
    failed = []
    for name, params in jobs:
        out = nb_dir / f"{name}-demo.ipynb"
        rc = run_papermill(paths.NOTEBOOKS / f"{name}.ipynb", out, params, out.with_suffix(".log"))
        print(f"  {name} notebook {'done' if rc == 0 else 'FAILED'} ({out})", flush=True)
        if rc != 0:
            failed.append(name)
    return failed


def print_summary(runs: Path, seconds: float) -> None:
    print(f"\nShort demo on SYNTHETIC data (1/16 labels, 600 iterations, one seed; "
          f"{seconds:.0f} s) - not the study, not VOC results:")
    print(f"  {'method':<10s} {'best mIoU':>9s} {'last mIoU':>9s}")
    runs_by_method = demo_runs()
    for method in DEMO_METHODS:
        run = runs_by_method[method]
        entry = load_entry(run.name, runs / "registry")
        if entry is None:
            print(f"  {method:<10s} FAILED (see {runs / 'cells' / (run.name + '.log')})")
            continue
        m = entry["metrics"]
        print(f"  {method:<10s} {m['best_miou']:9.2f} {m['last_miou']:9.2f}")


def run_demo(args) -> int:
    from mlcl.reproduce import reproduce, run_figures

    started = time.time()
    runs = (Path(args.out) if getattr(args, "out", None) else paths.runs_dir() / "demo").resolve()
    figures = paths.figures_dir() / "demo"  # the study's figures stay in figures/ itself
    data_root = ensure_synthetic(paths.data_dir() / "synthetic").resolve()
    print(f"training {', '.join(DEMO_METHODS)} (the 'demo' grid) through notebooks/run.ipynb, "
          f"2 at a time, into {runs / 'cells'} ...", flush=True)
    result = reproduce("demo", runs_root=runs, overrides=[f"data.root={data_root}",
                                                          *DEMO_OVERRIDES],
                       jobs=2, figures=False)
    cells = {m: runs / "cells" / r.name for m, r in demo_runs().items()}
    failed = list(result["failed"])
    left = BUDGET_S - (time.time() - started)
    inspect = (cells["mlcl"] / "best.pt").is_file() and left > INSPECT_NEEDS_S
    print(f"figures notebook{' + perturbation and prototype notebooks' if inspect else ''} "
          f"-> {figures} ...", flush=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        fig = pool.submit(run_figures, runs, figures, "figures-demo")
        extra = pool.submit(run_inspection, runs, figures, cells) if inspect else None
        rc, nb = fig.result()
        print(f"  figures notebook {'done' if rc == 0 else 'FAILED'} ({nb})", flush=True)
        if rc != 0:
            failed.append("figures")
        if extra is not None:
            failed += extra.result()
    if not inspect:
        print(f"  (perturbation / prototype notebooks skipped: {max(left, 0):.0f} s of the "
              f"{BUDGET_S} s budget left; run them from JupyterLab: make lab)")
    from mlcl.viz import write_index

    write_index(figures, {"registry": str(runs / "registry")})
    print_summary(runs, time.time() - started)
    print(f"\nFigures and tables (synthetic-data results): {figures}\n"
          f"Executed notebooks: {runs / 'cells'}/*/run.ipynb and {runs / 'notebooks'}/")
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0

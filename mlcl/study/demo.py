"""`make demo` (= ``python -m mlcl demo``): the synthetic data (written once), the ``demo``
grid (the three methods at 1/32 labels, one seed) through notebooks/run.ipynb into runs/demo/,
then the prototypes, perturbations and figures notebooks into figures/demo/."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlcl.paths import REPO
from mlcl.study import grids, progress
from mlcl.study.registry import NOTEBOOKS, demo_dir, figures_dir, load_entry
from mlcl.study.reproduce import FIGURES_NOTEBOOK, raise_if_stopped, reproduce, run_papermill
from mlcl.study.synthetic import make_synthetic

DEMO_METHODS = ("supervised", "unimatch", "mlcl")
SYNTHETIC = {"num_train": 1000, "num_val": 200, "size": 64, "classes": 7, "seed": 0}


def demo_runs() -> dict[str, grids.Run]:
    """method -> the demo grid's run of that method."""
    return {r.method: r for r in grids.build_grid("demo")}


def notebook_jobs(runs: Path, figures: Path, cells: dict[str, Path]) -> list[list[tuple]]:
    """Two chains run side by side of (name, notebook, executed copy, parameters) jobs."""
    nb, out = runs / "notebooks", str(figures)
    best = {m: str(cells[m] / "best.pt") for m in cells}
    return [[("prototypes", NOTEBOOKS / "prototypes.ipynb", nb / "prototypes-demo.ipynb",
              {"checkpoints": {"UniMatch": best["unimatch"], "MLCL": best["mlcl"]},
               "out_dir": out})],
            [("perturbations", NOTEBOOKS / "perturbations.ipynb", nb / "perturbations-demo.ipynb",
              {"checkpoint": best["mlcl"], "out_dir": out}),
             ("figures", FIGURES_NOTEBOOK, nb / "figures-demo.ipynb",
              {"registry_dir": str(runs / "registry"), "figures_dir": out})]]


def run_chain(chain: list[tuple], board: progress.Board) -> list[str]:
    """Execute the notebooks of a chain in order; returns the names of those that failed."""
    failed = []
    for name, notebook, out, params in chain:
        started = time.time()
        rc = run_papermill(notebook, out, params, out.with_suffix(".log"))
        state = "done  " if rc == 0 else "FAILED"
        board.write(f"  {state}  {name} notebook ({time.time() - started:.0f} s) -> {out}"
                    + ("" if rc == 0 else f" (log {out.with_suffix('.log')})"))
        if rc != 0:
            failed.append(name)
    return failed


def schedule_text() -> str:
    """e.g. '400 iterations, validation every epoch' from the demo grid's overrides."""
    ov = dict(o.split("=", 1) for o in demo_runs()["mlcl"].overrides)
    return f"{ov.get('train.max_iters', '?')} iterations, validation every epoch"


def report_lines(runs: Path, figures: Path) -> list[str]:
    """Best and last validation mIoU and training time per method (or its log), where the
    demo's outputs are and what to try next."""
    by_method = demo_runs()
    lines = [f"Short demo on SYNTHETIC data ({by_method['mlcl'].split.replace('_', '/')} labels,"
             f" one seed, {schedule_text()}) - not the study, not VOC results:",
             f"  {'method':<11s} {'best mIoU':>9s} {'last mIoU':>9s} {'train (wall s)':>14s}"]
    for method in DEMO_METHODS:
        run = by_method[method]
        entry = load_entry(run.name, runs / "registry")
        if entry is None:
            lines.append(f"  {method:<11s} FAILED (see {runs / 'cells' / (run.name + '.log')})")
            continue
        m = entry["metrics"]
        lines.append(f"  {method:<11s} {m['best_miou']:9.2f} {m['last_miou']:9.2f} "
                     f"{m.get('wall_time_s') or 0:14.0f}")
    mlcl = runs / "cells" / by_method["mlcl"].name
    return lines + [
        "", "Where everything is:",
        "  runs (best.pt, last.pt, metrics.json, tensorboard/, run.ipynb): "
        f"{runs / 'cells'}/<run>/",
        f"  results registry (one JSON per run):  {runs / 'registry'}",
        f"  executed notebooks:                   {runs / 'notebooks'}",
        f"  figures and tables (synthetic data):  {figures}",
        "", "Next:",
        f"  python -m mlcl evaluate --checkpoint {mlcl / 'best.pt'}",
        f"  .venv/bin/tensorboard --logdir {runs / 'cells'}",
        "  make lab          # copies of the notebooks in runs/lab/notebooks/, these runs "
        "as their defaults",
        "  README.md, 'What next': the synthetic study, real data"]


def run_demo(args) -> int:
    """`python -m mlcl demo [--out DIR]`; returns the exit status (1 if anything failed)."""
    from mlcl.study.viz import write_index

    started = time.time()
    runs = Path(getattr(args, "out", None) or demo_dir()).resolve()
    figures = figures_dir() / "demo"  # the study's figures stay in figures/ itself
    data_root = (Path(os.environ.get("MLCL_DATA", REPO / "data")) / "synthetic").resolve()
    if not (data_root / "ImageSets" / "Segmentation" / "val.txt").is_file():  # written once
        print(f"writing the synthetic dataset to {data_root} ...", flush=True)
        make_synthetic(data_root, **SYNTHETIC)
    board = progress.Board()
    print(f"training {', '.join(DEMO_METHODS)} (grid 'demo': {schedule_text()}) through "
          f"notebooks/run.ipynb, 2 at a time, into {runs / 'cells'} ...", flush=True)
    result = reproduce("demo", runs_root=runs, overrides=[f"data.root={data_root}"], jobs=2,
                       figures=False, board=board)
    raise_if_stopped(result, "the demo")
    failed = list(result["failed"])
    cells = {m: runs / "cells" / r.name for m, r in demo_runs().items()}
    print(f"notebooks: prototypes | perturbations, then figures -> {figures} ...", flush=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for names in pool.map(lambda c: run_chain(c, board), notebook_jobs(runs, figures, cells)):
            failed += names
    write_index(figures, {"registry": str(runs / "registry")})
    print("\n" + "\n".join(report_lines(runs, figures)))
    print(f"\nmake demo took {time.time() - started:.0f} s")
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0

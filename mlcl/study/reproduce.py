"""Batch reproduction: train every cell of a grid (mlcl.study.grids), ``jobs`` at a time with
one OpenMP thread each, then execute notebooks/figures.ipynb on the results registry.

    python -m mlcl reproduce --grid synthetic-study --jobs 2 data.root=data/synthetic

A cell trains into ``<runs>/cells/<Run.name>`` (executor ``papermill``: notebooks/run.ipynb
in its own kernel, kept as ``run.ipynb`` there; ``cli``: ``python -m mlcl train``) and is
recorded as ``<runs>/registry/<Run.name>.json``; a complete cell is skipped. Before anything
trains every cell's configuration must build and equal the one a cell was trained with
(mlcl.outputs.run_changes; ``--rerun-changed`` trains changed cells again). A failed run is
listed with the last error line of its log and, failed before its first checkpoint, leaves no
cell folder. ``num_processes > 1`` trains through ``accelerate launch``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlcl.config import ConfigError, load_config
from mlcl.data.classes import reconcile_classes
from mlcl.data.splits import DataError, check_root
from mlcl.outputs import read_run, run_changes
from mlcl.paths import runs_dir
from mlcl.study import grids, progress
from mlcl.study.grids import GRIDS, Run
from mlcl.study.registry import (CELL_KEYS, NOTEBOOKS, figures_dir, figures_for, find_registry,
                                 fix_data_root, load_entry, record_output_dir, registry_dirs,
                                 resolve)

# mlcl.train (torch, accelerate) is imported inside train_run, the one place that trains in
# this process: reproduce itself only launches runs in subprocesses and reads their files.

EXECUTORS = ("papermill", "cli")
RUN_NOTEBOOK = NOTEBOOKS / "run.ipynb"
FIGURES_NOTEBOOK = NOTEBOOKS / "figures.ipynb"


def thread_env() -> dict[str, str]:
    """The environment of every child: one OpenMP / MKL thread (2-core machines shared by
    several runs slowed down 10-17x with more), and progress bars refreshed at most every
    10 s, so that logs and executed notebooks of long runs stay small."""
    return {"TQDM_MININTERVAL": "10", **os.environ, "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


def is_complete(out: Path) -> bool:
    """Whether ``out/metrics.json`` says the run finished."""
    return read_run(out).complete


def run_record(run: Run) -> dict[str, Any]:
    """The registry's ``run`` field of a grid cell."""
    return {**{k: getattr(run, k) for k in CELL_KEYS}, "overrides": list(run.overrides)}


# --------------------------------------------------------------------------- training
def train_command(preset: str, overrides: list[str], num_processes: int = 1) -> list[str]:
    """``python -m mlcl train`` for the preset and overrides; through ``accelerate launch``
    with ``num_processes`` processes when more than one."""
    train = ["-m", "mlcl", "train", "--config", preset, *overrides]
    if num_processes <= 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *train]


def train_run(preset: str, overrides: list[str], num_processes: int = 1) -> dict[str, Any]:
    """Train (or resume) a run and return its metrics: in this process with
    mlcl.train.fit, or with ``num_processes > 1`` through ``accelerate launch`` in a
    subprocess whose output is streamed here (the run notebook calls this). A relative
    data.root that does not exist from the current folder is taken from the checkout."""
    cfg = load_config(preset, overrides)  # bad keys fail here, before any launch
    root = cfg.data.root
    if fix_data_root(cfg).data.root != root:  # relative to the checkout, not to notebooks/
        overrides = [*overrides, f"data.root={cfg.data.root}"]
    if num_processes <= 1:
        from mlcl.train import fit

        return fit(cfg)
    proc = subprocess.Popen(train_command(preset, overrides, num_processes), env=thread_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(line, end="", flush=True)
    if proc.wait() != 0:
        raise RuntimeError(f"accelerate launch of {num_processes} processes failed "
                           f"(exit {proc.returncode})")
    return read_run(cfg.output_dir).metrics


def run_logged(cmd: list[str], log: Path, poll=None) -> int:
    """Run ``cmd`` with one thread per library, its output into ``log``; ``poll()`` is called
    every second while it runs (the live progress display). Returns its exit status."""
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, env=thread_env(), stdout=fh, stderr=subprocess.STDOUT)
        return progress.wait(proc, poll)


def run_cli(run: Run, out: Path, overrides: list[str], log: Path,
            num_processes: int = 1, poll=None) -> int:
    """Train ``run`` into ``out`` with ``python -m mlcl train`` (output into ``log``); its
    exit status."""
    cmd = train_command(run.preset, [f"output_dir={out}", *run.config_overrides(), *overrides],
                        num_processes)
    return run_logged(cmd, log, poll)


def run_parameters(run: Run, out: Path, registry: Path, overrides: list[str], grid: str | None,
                   num_processes: int = 1, notebook: Path | None = None) -> dict[str, Any]:
    """The run notebook's parameters for one grid cell."""
    return {**run_record(run), "overrides": [*run.overrides, *overrides], "output_dir": str(out),
            "registry_dir": str(registry), "grid": grid or "", "run_name": run.name,
            "num_processes": num_processes, "executed_notebook": str(notebook or "")}


def run_papermill(notebook: Path, output: Path, parameters: dict[str, Any], log: Path,
                  cwd: str | Path | None = None, poll=None) -> int:
    """Execute ``notebook`` with papermill in a fresh kernel (its own process) into
    ``output``; cell outputs go to ``log``; ``poll`` as in :func:`run_logged`. Returns
    papermill's exit status."""
    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(output),
           "-y", json.dumps(parameters), "--kernel", "python3", "--no-progress-bar",
           "--log-output", "--cwd", str(cwd or os.getcwd())]
    return run_logged(cmd, log, poll)


def run_figures(runs_root: Path, figures_dir: Path | None = None, name: str = "figures",
                parameters: dict[str, Any] | None = None) -> tuple[int, Path]:
    """Execute the figures notebook on ``<runs_root>/registry``; returns (status, the
    executed notebook)."""
    out = runs_root / "notebooks" / f"{name}.ipynb"
    params = {"registry_dir": str(runs_root / "registry"),
              "figures_dir": str(figures_dir or figures_dir()), **(parameters or {})}
    rc = run_papermill(FIGURES_NOTEBOOK, out, params, out.with_suffix(".log"))
    return rc, out


def figures_main(args) -> int:
    """``python -m mlcl figures [--registry DIR] [--out DIR]`` (= `make figures`): the
    figures notebook on the registry that exists (mlcl.study.registry.find_registry), saying
    which; a ConfigError when there is no registry with runs."""
    reg = find_registry(args.registry)
    count = len(list(reg.glob("*.json")))
    if count == 0:
        looked = ", ".join(str(p) for p in ([reg] if args.registry else registry_dirs()))
        raise ConfigError(f"no results registry with runs (looked in {looked}): run `make demo` "
                          "or `python -m mlcl reproduce` first, or give --registry DIR")
    out = resolve(args.out, output=True) if args.out else figures_for(reg)
    nb = runs_dir() / "notebooks" / "figures.ipynb"
    print(f"reading the registry {reg} ({count} runs); writing figures and tables into "
          f"{out} ...", flush=True)
    rc = run_papermill(FIGURES_NOTEBOOK, nb, {"registry_dir": str(reg), "figures_dir": str(out)},
                       nb.with_suffix(".log"))
    print(f"{'done' if rc == 0 else 'FAILED'}: executed notebook {nb}"
          + ("" if rc == 0 else f" (log {nb.with_suffix('.log')})"), flush=True)
    return rc


# --------------------------------------------------------------------------- cell checks
def cell_config(run: Run, out: Path, overrides: list[str]):
    """The resolved configuration a cell will train with (as train_run / run_cli build it,
    with the data's classes); a ConfigError / DataError when it cannot be built."""
    cfg = fix_data_root(load_config(run.preset, [f"output_dir={out}", *run.config_overrides(),
                                                 *overrides]))
    if not is_complete(out):  # a complete cell is skipped: its data need not be here
        check_root(cfg.data.root, cfg.data.dataset)
    return reconcile_classes(cfg, log=lambda msg: None)


def stored_changes(out: Path, cfg) -> list[str]:
    """How the configuration stored in ``out/config.yaml`` (a cell trained before, complete
    or not) differs from ``cfg``, less RESULT_NEUTRAL: ``"key: stored -> requested"``; empty
    when the same run. A moved dataset (data.root) is the same run; other data shows in
    data.num_classes / data.class_names, which cell_config reads from the data. A cell
    continued with a changed schedule (its metrics.json ``resumes``) is not the run a fresh
    cell makes either (mlcl.outputs.run_changes, the rule train applies)."""
    stored = read_run(out)
    if stored.config is None:
        return []
    return run_changes(stored.config, cfg.to_dict()) + stored.resume_changes


def check_cells(todo: list[Run], root: Path, overrides: list[str],
                rerun_changed: bool = False) -> list[str]:
    """Before anything trains: every cell's configuration must build, and a cell trained
    before must have been trained with the configuration requested now. Raises one
    ConfigError (a bad key fails once, with its cause; changed cells are listed with the
    keys that changed) unless ``rerun_changed``, which moves each changed cell aside to
    ``<name>.replaced-<time>`` (and drops its registry entry) so it trains again. Returns
    the names of the cells moved aside."""
    errors: dict[str, list[str]] = {}
    changed: dict[str, list[str]] = {}
    for run in todo:
        out = root / "cells" / run.name
        try:
            changes = stored_changes(out, cell_config(run, out, overrides))
        except (ConfigError, DataError) as e:
            errors.setdefault(str(e), []).append(run.name)
            continue
        if changes:
            changed[run.name] = changes
    if errors:
        msg, names = next(iter(errors.items()))
        where = "every cell" if len(names) == len(todo) else f"cell {names[0]}"
        more = f" (and {len(errors) - 1} other error(s))" if len(errors) > 1 else ""
        raise ConfigError(f"{msg} [{where}; nothing was trained]{more}")
    if changed and not rerun_changed:
        name, changes = next(iter(changed.items()))
        more = f" (and {len(changed) - 1} more cell(s))" if len(changed) > 1 else ""
        raise ConfigError(
            f"cell {name} in {root / 'cells'} was trained with other settings "
            f"({'; '.join(changes)}){more}: use another --runs folder, or --rerun-changed "
            "to train the changed cells again (the old ones are kept as <name>.replaced-*)")
    for name in changed:
        move_aside(root, name)
    return list(changed)


def move_aside(root: Path, name: str) -> Path:
    """Rename ``cells/<name>`` to ``cells/<name>.replaced-<time>`` and drop its registry
    entry, so the cell trains anew and no table shows the old run."""
    cell = root / "cells" / name
    target = cell.with_name(f"{name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    cell.rename(target)
    (root / "registry" / f"{name}.json").unlink(missing_ok=True)
    print(f"  moved   {name} (other settings) to {target}", flush=True)
    return target


ERROR_LINE = re.compile(r"^\s*((?:[A-Za-z_][\w.]*(?:Error|Exception|Exit))|error): (.+)$")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def cause_line(log: Path) -> str:
    """The last error line of a run's log (e.g. ``DataError: mask ... has values 9``), or an
    empty string."""
    try:
        lines = ANSI.sub("", log.read_text(errors="replace")).splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        m = ERROR_LINE.match(line)
        if m and not m.group(1).startswith("papermill."):
            return line.strip()
    return ""


def tidy_failed_cell(out: Path, existed: bool, notebook: Path | None) -> Path | None:
    """A run that failed before its first checkpoint in a cell folder made for it leaves no
    folder behind: its executed notebook moves beside the log (returned), the rest goes."""
    if existed or not out.is_dir() or (out / "checkpoints" / "LATEST").exists():
        return notebook
    kept = None
    if notebook is not None and notebook.is_file():
        kept = notebook.replace(out.parent / f"{out.name}.ipynb")
    shutil.rmtree(out, ignore_errors=True)
    return kept


# --------------------------------------------------------------------------- the grid
class GridRunner:
    """What the worker threads of one :func:`reproduce` call share: where runs and the
    registry go, how runs execute, the progress board, and the results so far."""

    def __init__(self, grid: str, root: Path, overrides: list[str], executor: str,
                 num_processes: int, board: progress.Board):
        self.grid, self.root, self.overrides = grid, root, overrides
        self.executor, self.num_processes, self.board = executor, num_processes, board
        self.registry = root / "registry"
        self.result: dict[str, list[str]] = {"done": [], "skipped": [], "failed": [],
                                             "figures": []}
        self.logs: dict[str, Path] = {}
        self.causes: dict[str, str] = {}

    def record(self, run: Run, out: Path, notebook: Path | None) -> None:
        record_output_dir(run.name, out, self.registry, grid=self.grid, run=run_record(run),
                          executor=self.executor, notebook=str(notebook) if notebook else None)

    def execute(self, run: Run, out: Path, log: Path) -> tuple[int, Path | None]:
        """Train ``run`` into ``out`` (its progress on the board); (exit status, the
        executed run notebook or None)."""
        with self.board.track(run.name, out) as tracker:
            if self.executor == "cli":
                return run_cli(run, out, self.overrides, log, self.num_processes,
                               tracker.poll), None
            notebook = out / "run.ipynb"
            params = run_parameters(run, out, self.registry, self.overrides, self.grid,
                                    self.num_processes, notebook)
            return run_papermill(RUN_NOTEBOOK, notebook, params, log, poll=tracker.poll), notebook

    def one(self, run: Run) -> None:
        """Train one cell unless it is complete, record it, and say how it went."""
        out = self.root / "cells" / run.name  # shared by every grid that holds the run
        if is_complete(out):
            if load_entry(run.name, self.registry) is None:  # trained, never recorded
                self.record(run, out, None)
            self.result["skipped"].append(run.name)
            return
        existed = out.exists()
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        log = self.logs[run.name] = out.parent / f"{run.name}.log"
        rc, notebook = self.execute(run, out, log)
        if rc == 0 and is_complete(out):
            if self.executor == "cli" or load_entry(run.name, self.registry) is None:
                self.record(run, out, notebook)
            metrics = read_run(out).metrics
            self.result["done"].append(run.name)
            self.board.write(f"  done    {run.name} ({time.time() - started:.0f} s, best mIoU "
                             f"{metrics['best_miou']:.2f}, last {metrics['last_miou']:.2f})")
        else:
            self.result["failed"].append(run.name)
            notebook = tidy_failed_cell(out, existed, notebook)
            cause = self.causes[run.name] = cause_line(log)
            self.board.write(f"  FAILED  {run.name} (exit {rc}; log {log}"
                             f"{'; notebook ' + str(notebook) if notebook else ''})"
                             f"{': ' + cause if cause else ''}")

    def report(self) -> None:
        """Print the counts and each failed run with its log and cause."""
        r = self.result
        print(f"{len(r['done'])} done, {len(r['skipped'])} skipped (complete), "
              f"{len(r['failed'])} failed", flush=True)
        if r["failed"]:
            print("failed:\n  " + "\n  ".join(
                f"{n}  (log {self.logs[n]})"
                + (f"\n      {self.causes[n]}" if self.causes.get(n) else "")
                if n in self.logs else n for n in r["failed"]), flush=True)


def reproduce(grid: str, *, runs_root: Path | None = None, overrides: list[str] | None = None,
              jobs: int = 1, only: str | None = None, executor: str = "papermill",
              figures: bool = True, figures_dir: Path | None = None, num_processes: int = 1,
              runs: list[Run] | None = None, board: progress.Board | None = None,
              rerun_changed: bool = False, seeds: tuple[int, ...] | None = None
              ) -> dict[str, list[str]]:
    """Run the grid (or the given ``runs``; ``seeds`` replaces their seeds), showing each
    running run's progress on ``board`` (default: a new mlcl.progress.Board on stdout);
    returns {'done', 'skipped', 'failed'} (run names) and 'figures' (the executed figures
    notebook, when it ran and succeeded). Every cell's configuration is checked first
    (:func:`check_cells`): nothing trains when one is bad or when a cell was trained with
    other settings (``rerun_changed``: train those again)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    root = (Path(runs_root) if runs_root else runs_dir()).resolve()
    todo = runs if runs is not None else grids.build_grid(grid)
    if seeds:
        todo = grids.with_seeds(todo, seeds)
    todo = [r for r in todo if not only or only in r.name]
    runner = GridRunner(grid, root, list(overrides or []), executor, num_processes,
                        board or progress.Board())
    result = runner.result
    print(f"grid {grid}: {len(todo)} runs, {jobs} at a time, executor {executor}", flush=True)
    check_cells(todo, root, runner.overrides, rerun_changed)
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        list(pool.map(runner.one, todo))
    order = {r.name: i for i, r in enumerate(todo)}  # report in grid order, whatever finished first
    for key in ("done", "skipped", "failed"):
        result[key].sort(key=lambda n: order.get(n, len(order)))
    if figures:
        rc, nb = run_figures(root, figures_dir, f"figures-{grid}")
        if rc == 0:
            result["figures"].append(str(nb))
            print(f"figures written to {figures_dir or figures_dir()} (notebook {nb})")
        else:
            result["failed"].append("figures")
            cause = cause_line(nb.with_suffix(".log"))
            print(f"  FAILED  figures notebook (exit {rc}; log {nb.with_suffix('.log')})"
                  f"{': ' + cause if cause else ''}")
    runner.report()
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", required=True, choices=GRIDS)
    p.add_argument("--runs", default=None, help="runs folder (default: runs/ or $MLCL_RUNS)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    p.add_argument("--only", default=None, help="only runs whose name contains this")
    p.add_argument("--seeds", type=grids.parse_seeds, default=None,
                   help="the seeds of every cell instead of the grid's own, e.g. 0-4 or 0,3 "
                        "(seed-major; runs done before are skipped)")
    p.add_argument("--executor", choices=EXECUTORS, default="papermill",
                   help="papermill: the run notebook per run (default); cli: mlcl train")
    p.add_argument("--num-processes", type=int, default=1,
                   help="processes (GPUs) per run, through accelerate launch when > 1")
    p.add_argument("--figures", default=None,
                   help="folder for the figures notebook's output (default: figures/)")
    p.add_argument("--no-figures", action="store_true", help="do not run the figures notebook")
    p.add_argument("--rerun-changed", action="store_true",
                   help="train again the cells trained with other settings than requested now "
                        "(the old runs are kept as cells/<name>.replaced-<time>); without it "
                        "such cells stop the grid before anything trains")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides for every run, e.g. data.root=DIR")


def add_figures_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default=None,
                   help="registry folder (default: runs/registry when it has runs, else the "
                        "demo's runs/demo/registry)")
    p.add_argument("--out", default=None,
                   help="figures folder (default: figures/, or figures/demo/ for the demo's)")


def main(args) -> int:
    """``python -m mlcl reproduce``: 1 when a run or the figures failed, else 0."""
    result = reproduce(args.grid, runs_root=args.runs, overrides=args.overrides,
                       jobs=args.jobs, only=args.only, executor=args.executor, seeds=args.seeds,
                       figures=not args.no_figures,
                       figures_dir=Path(args.figures) if args.figures else None,
                       num_processes=args.num_processes, rerun_changed=args.rerun_changed)
    return 1 if result["failed"] else 0

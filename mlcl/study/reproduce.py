"""Batch reproduction: every cell of a grid into ``<runs>/cells/<Run.name>``, ``jobs`` at a
time with one OpenMP thread each, recorded in ``<runs>/registry``, then the figures notebook;
a complete cell is skipped, one trained with other settings stops the grid beforehand."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlcl.config import ConfigError, load_config
from mlcl.data.classes import reconcile_classes
from mlcl.data.splits import DataError, check_root
from mlcl.errors import RunInterrupted
from mlcl.outputs import read_run, run_changes
from mlcl.paths import runs_dir
from mlcl.study import grids, progress, registry
from mlcl.study.grids import GRIDS, Run
from mlcl.study.registry import CELL_KEYS, NOTEBOOKS, find_registry, fix_data_root, load_entry

EXECUTORS = ("papermill", "cli")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RUN_NOTEBOOK = NOTEBOOKS / "run.ipynb"
FIGURES_NOTEBOOK = NOTEBOOKS / "figures.ipynb"


def thread_env() -> dict[str, str]:
    """Children's environment: one OpenMP / MKL thread, tqdm refreshed every 10 s at most."""
    return {"TQDM_MININTERVAL": "10", **os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_record(run: Run) -> dict[str, Any]:
    """The registry's ``run`` field of a grid cell."""
    return {**{k: getattr(run, k) for k in CELL_KEYS}, "overrides": list(run.overrides)}


def train_command(preset: str, overrides: list[str], num_processes: int = 1) -> list[str]:
    """``python -m mlcl train``; through ``accelerate launch`` when ``num_processes`` > 1."""
    train = ["-m", "mlcl", "train", "--config", preset, *overrides]
    if num_processes <= 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *train]


def train_run(preset: str, overrides: list[str], num_processes: int = 1) -> dict[str, Any]:
    """Train (or resume) a run here, or through ``accelerate launch``; its metrics."""
    cfg = load_config(preset, overrides)  # bad keys fail here, before any launch
    root = cfg.data.root
    if fix_data_root(cfg).data.root != root:
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


def run_logged(cmd: list[str], log: Path, poll=None, live: set | None = None) -> int:
    """The exit status of ``cmd``, its output into ``log``, ``poll()`` called meanwhile; the
    process is in ``live`` while it runs."""
    live = set() if live is None else live
    with open(log, "w") as fh:
        print(" ".join(cmd), file=fh, flush=True)
        proc = subprocess.Popen(cmd, env=thread_env(), stdout=fh, stderr=subprocess.STDOUT)
        live.add(proc)
        try:
            return progress.wait(proc, poll)
        finally:
            live.discard(proc)


def stop_signal(rc: int) -> int | None:
    """The stop signal (SIGINT, SIGTERM) that ended a child with exit status ``rc``: 128 +
    the signal (a run stopped at its checkpoint), or minus it (killed by it), else None."""
    sig = rc - 128 if rc > 128 else -rc
    return sig if sig in STOP_SIGNALS else None


def run_parameters(run: Run, out: Path, registry_dir: Path, overrides: list[str],
                   grid: str | None, num_processes: int = 1,
                   notebook: Path | None = None) -> dict[str, Any]:
    """The run notebook's parameters for one grid cell."""
    return {**run_record(run), "overrides": [*run.overrides, *overrides], "output_dir": str(out),
            "registry_dir": str(registry_dir), "grid": grid or "", "run_name": run.name,
            "num_processes": num_processes, "executed_notebook": str(notebook or "")}


def run_papermill(notebook: Path, output: Path, parameters: dict[str, Any], log: Path,
                  poll=None, live: set | None = None) -> int:
    """Execute ``notebook`` into ``output`` with papermill (:func:`run_logged`)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(output),
           "-y", json.dumps(parameters), "--kernel", "python3", "--no-progress-bar",
           "--log-output", "--cwd", os.getcwd()]
    return run_logged(cmd, log, poll, live)


def run_figures(registry_dir: Path, figures: Path, notebook: Path) -> int:
    """The figures notebook on ``registry_dir`` into ``figures``, executed as ``notebook``;
    its exit status, said with where the figures went or the failure's log and cause."""
    log = notebook.with_suffix(".log")
    rc = run_papermill(FIGURES_NOTEBOOK, notebook, {"registry_dir": str(registry_dir),
                                                    "figures_dir": str(figures)}, log)
    cause = "" if rc == 0 else cause_line(log)
    print(f"figures written to {figures} (notebook {notebook})" if rc == 0 else
          f"  FAILED  figures notebook (exit {rc}; log {log}){': ' + cause if cause else ''}",
          flush=True)
    return rc


def figures_main(args) -> int:
    """``python -m mlcl figures``: the figures notebook on :func:`find_registry`'s registry."""
    reg = find_registry(args.registry)
    count = len(list(reg.glob("*.json")))
    if count == 0:
        looked = ", ".join(map(str, [reg] if args.registry else registry.registry_dirs()))
        raise ConfigError(f"no results registry with runs (looked in {looked}): run `make demo` "
                          "or `python -m mlcl reproduce` first, or give --registry DIR")
    out = registry.resolve(args.out, output=True) if args.out else registry.figures_for(reg)
    nb = runs_dir() / "notebooks" / "figures.ipynb"
    print(f"reading the registry {reg} ({count} runs); writing figures and tables into "
          f"{out} ...", flush=True)
    return run_figures(reg, out, nb)


def stored_changes(out: Path, cfg) -> list[str]:
    """``"key: stored -> requested"`` per way the run in ``out`` differs from ``cfg`` (train's
    rule, mlcl.outputs.run_changes) or was resumed with; empty for the same run or none."""
    stored = read_run(out)
    if stored.config is None:
        return []
    return run_changes(stored.config, cfg.to_dict()) + stored.resume_changes


def check_weights(cfg) -> None:
    """A ConfigError when the run's model.pretrained file is missing (e.g. DINOv2-B's for the
    B cells of voc-v2, which train after all the S cells)."""
    from mlcl.model import pretrained_file  # torch: not at import (light commands)

    pretrained_file(cfg.model)


def check_cells(todo: list[Run], root: Path, overrides: list[str],
                rerun_changed: bool = False) -> list[str]:
    """Before anything trains: a ConfigError when a cell's config does not build or a cell
    was trained with other settings, unless ``rerun_changed``: then each changed cell moves to
    ``<name>.replaced-<time>`` (registry entry dropped). The names of the cells moved aside."""
    errors: dict[str, list[str]] = {}
    changed: dict[str, list[str]] = {}
    for run in todo:
        out = root / "cells" / run.name
        try:  # the configuration the cell trains with
            cfg = fix_data_root(load_config(run.preset, [f"output_dir={out}",
                                                         *run.config_overrides(), *overrides]))
            if not read_run(out).complete:  # a complete cell is skipped: its inputs may be gone
                check_root(cfg.data.root, cfg.data.dataset)
                check_weights(cfg)
            changes = stored_changes(out, reconcile_classes(cfg, log=lambda msg: None))
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
        cell = root / "cells" / name
        target = cell.with_name(f"{name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        cell.rename(target)
        (root / "registry" / f"{name}.json").unlink(missing_ok=True)
        print(f"  moved   {name} (other settings) to {target}", flush=True)
    return list(changed)


ERROR_LINE = re.compile(r"^\s*((?:[A-Za-z_][\w.]*(?:Error|Exception|Exit))|error): (.+)$")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def cause_line(log: Path) -> str:
    """The last error line of a run's log (e.g. ``DataError: ...``), or an empty string."""
    try:
        lines = ANSI.sub("", log.read_text(errors="replace")).splitlines()
    except OSError:
        return ""
    found = [line.strip() for line in lines if (m := ERROR_LINE.match(line))
             and not m.group(1).startswith("papermill.")]
    return found[-1] if found else ""


class GridRunner:
    """What the worker threads of one :func:`reproduce` call share."""

    def __init__(self, grid: str, root: Path, overrides: list[str], executor: str,
                 num_processes: int, board: progress.Board):
        self.grid, self.root, self.overrides = grid, root, overrides
        self.executor, self.num_processes, self.board = executor, num_processes, board
        self.registry = root / "registry"
        self.result: dict[str, list[str]] = {"done": [], "skipped": [], "failed": [],
                                             "interrupted": [], "figures": []}
        self.logs: dict[str, Path] = {}
        self.causes: dict[str, str] = {}
        self.live: set[subprocess.Popen] = set()  # the trainings running now
        self.signum: int | None = None  # a stop request: no new run starts

    def request_stop(self, signum: int, _frame=None) -> None:
        """SIGINT / SIGTERM: pass it to every running training (each checkpoints and exits),
        start no other run."""
        self.signum = signum
        for proc in list(self.live):
            proc.send_signal(signum)

    def record(self, run: Run, out: Path, notebook: Path | None) -> None:
        registry.record_output_dir(run.name, out, self.registry, grid=self.grid,
                                   run=run_record(run), executor=self.executor,
                                   notebook=str(notebook) if notebook else None)

    def execute(self, run: Run, out: Path, log: Path) -> tuple[int, Path | None]:
        """Train ``run`` into ``out``: (exit status, the executed run notebook or None)."""
        with self.board.track(run.name, out) as tracker:
            if self.executor == "cli":
                cmd = train_command(run.preset, [f"output_dir={out}", *run.config_overrides(),
                                                 *self.overrides], self.num_processes)
                return run_logged(cmd, log, tracker.poll, self.live), None
            notebook = out / "run.ipynb"
            params = run_parameters(run, out, self.registry, self.overrides, self.grid,
                                    self.num_processes, notebook)
            return (run_papermill(RUN_NOTEBOOK, notebook, params, log, tracker.poll, self.live),
                    notebook)

    def one(self, run: Run) -> None:
        """Train one cell unless it is complete, record it, and say how it went."""
        out = self.root / "cells" / run.name  # shared by every grid that holds the run
        if self.signum is not None:  # stopping: left for the next call
            return
        if read_run(out).complete:
            if load_entry(run.name, self.registry) is None:  # trained, never recorded
                self.record(run, out, None)
            self.result["skipped"].append(run.name)
            return
        existed = out.exists()
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        log = self.logs[run.name] = out.parent / f"{run.name}.log"
        rc, notebook = self.execute(run, out, log)
        if rc == 0 and read_run(out).complete:
            if self.executor == "cli" or load_entry(run.name, self.registry) is None:
                self.record(run, out, notebook)
            metrics = read_run(out).metrics
            self.result["done"].append(run.name)
            self.board.write(f"  done    {run.name} ({time.time() - started:.0f} s, best mIoU "
                             f"{metrics['best_miou']:.2f}, last {metrics['last_miou']:.2f})")
        elif stop_signal(rc) and (out / "checkpoints").is_dir():
            self.signum = self.signum or stop_signal(rc)  # e.g. a Ctrl-C reached it first
            self.result["interrupted"].append(run.name)
            self.board.write(f"  stopped {run.name} at its checkpoint (exit {rc})")
        else:
            self.result["failed"].append(run.name)
            if not existed and out.is_dir() and not (out / "checkpoints" / "LATEST").exists():
                # a new cell failed before its first checkpoint: removed, its notebook beside
                notebook = notebook.replace(out.parent / f"{out.name}.ipynb") \
                    if notebook is not None and notebook.is_file() else None
                shutil.rmtree(out, ignore_errors=True)
            cause = self.causes[run.name] = cause_line(log)
            self.board.write(f"  FAILED  {run.name} (exit {rc}; log {log}"
                             f"{'; notebook ' + str(notebook) if notebook else ''})"
                             f"{': ' + cause if cause else ''}")


def reproduce(grid: str, *, runs_root: Path | None = None, overrides: list[str] | None = None,
              jobs: int = 1, only: str | None = None, executor: str = "papermill",
              figures: bool = True, figures_dir: Path | None = None, num_processes: int = 1,
              runs: list[Run] | None = None, board: progress.Board | None = None,
              rerun_changed: bool = False, seeds: tuple[int, ...] | None = None
              ) -> dict[str, list[str]]:
    """Run the grid (or ``runs``; ``seeds`` replaces theirs) after :func:`check_cells`, the
    progress on ``board``: {'done', 'skipped', 'failed'} run names, 'figures' notebooks."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    root = Path(runs_root or runs_dir()).resolve()
    todo = runs if runs is not None else grids.build_grid(grid)
    if seeds:
        todo = grids.with_seeds(todo, seeds)
    todo = [r for r in todo if not only or only in r.name]
    runner = GridRunner(grid, root, list(overrides or []), executor, num_processes,
                        board or progress.Board())
    result = runner.result
    print(f"grid {grid}: {len(todo)} runs, {jobs} at a time, executor {executor}", flush=True)
    check_cells(todo, root, runner.overrides, rerun_changed)
    main = threading.current_thread() is threading.main_thread()  # signals reach it only
    before = {sig: signal.signal(sig, runner.request_stop) for sig in STOP_SIGNALS if main}
    try:
        with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
            list(pool.map(runner.one, todo))
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if runner.signum is not None:
        result["signal"] = [signal.Signals(runner.signum).name]
        return result
    order = {r.name: i for i, r in enumerate(todo)}  # report in grid order, whatever finished first
    for key in ("done", "skipped", "failed"):
        result[key].sort(key=lambda n: order.get(n, len(order)))
    if figures:
        out = figures_dir or registry.figures_dir()
        nb = root / "notebooks" / f"figures-{grid}.ipynb"
        ok = run_figures(runner.registry, out, nb) == 0
        result["figures" if ok else "failed"].append(str(nb) if ok else "figures")
    print(f"{len(result['done'])} done, {len(result['skipped'])} skipped (complete), "
          f"{len(result['failed'])} failed", flush=True)
    if result["failed"]:  # each with its log and cause
        print("failed:\n  " + "\n  ".join(
            f"{n}  (log {runner.logs[n]})"
            + (f"\n      {runner.causes[n]}" if runner.causes.get(n) else "")
            if n in runner.logs else n for n in result["failed"]), flush=True)
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
    p.add_argument("--figures", help="folder for the figures notebook's output (default: figures/)")
    p.add_argument("--no-figures", action="store_true", help="do not run the figures notebook")
    p.add_argument("--rerun-changed", action="store_true",
                   help="train again the cells trained with other settings (the old runs kept "
                        "as cells/<name>.replaced-<time>); else they stop the grid beforehand")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides for every run, e.g. data.root=DIR")


def add_figures_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default=None,
                   help="registry folder (default: runs/registry when it has runs, else the "
                        "demo's runs/demo/registry)")
    p.add_argument("--out", help="figures folder (default: figures/; the demo's: figures/demo/)")


def main(args) -> int:
    """``python -m mlcl reproduce``: 1 when a run or the figures failed, else 0."""
    result = reproduce(args.grid, runs_root=args.runs, overrides=args.overrides,
                       jobs=args.jobs, only=args.only, executor=args.executor, seeds=args.seeds,
                       figures=not args.no_figures, figures_dir=args.figures and Path(args.figures),
                       num_processes=args.num_processes, rerun_changed=args.rerun_changed)
    raise_if_stopped(result, f"grid {args.grid}")
    return 1 if result["failed"] else 0


def raise_if_stopped(result: dict[str, list[str]], what: str) -> None:
    """RunInterrupted (exit 128 + the signal) when a stop signal ended :func:`reproduce`."""
    if "signal" in result:
        signum = signal.Signals[result["signal"][0]]
        raise RunInterrupted(f"{signum.name}: {what} stopped; {len(result['interrupted'])} "
                             f"run(s) kept a checkpoint, {len(result['done'])} finished: run "
                             "the same command again to resume", signum)

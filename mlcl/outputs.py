"""A run folder (docs/clusters.md): reading and writing its files but checkpoints, the one
rule for "the same run", the checks that output_dir can hold a run."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlcl import paths
from mlcl.config import RESULT_NEUTRAL, ConfigError, config_changes, flatten
from mlcl.errors import error_line
from mlcl.files import atomic_write_json, nearest_existing, place_problem

# what a run writes into output_dir after its config.yaml: its results, then the rest
RESULT_FILES = ("metrics.json", "best.pt", "last.pt")
PROGRESS_FILE = "progress.json"
LOCK_FILE = ".mlcl-train.lock"
RUN_FILES = RESULT_FILES + (PROGRESS_FILE, "checkpoints")
# keys every config.yaml this program writes has (another program's config.yaml lacks them)
RUN_KEYS = {"method", "seed", "split", "output_dir", "data.dataset", "model.backbone"}
# The settings a run may change when it continues, and only upwards: a longer schedule.
GROWABLE = ("train.epochs", "train.max_iters")
STATUSES = ("running", "complete", "failed", "interrupted", "diverged")


@dataclass(frozen=True)
class RunFolder:
    """A run folder's config.yaml and metrics.json (None: absent, or unreadable metrics)."""

    path: Path
    config: dict[str, Any] | None
    metrics: dict[str, Any] | None

    @property
    def complete(self) -> bool:
        return bool((self.metrics or {}).get("complete"))

    @property
    def resume_changes(self) -> list[str]:
        """The settings changed when the run was continued: its result is not a fresh run's."""
        return resume_changes(self.metrics or {})


def read_run(out: str | Path) -> RunFolder:
    """The run folder ``out``; a ConfigError as :func:`saved_config`."""
    return RunFolder(Path(out), saved_config(Path(out)), read_metrics(out))


def saved_config(out: Path) -> dict[str, Any] | None:
    """``out/config.yaml`` as a nested mapping, None if absent; a ConfigError if not a run's."""
    path = Path(out) / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} cannot be read ({error_line(e)}): choose another "
                          "output_dir or delete it") from e
    if not isinstance(saved, dict) or not RUN_KEYS <= set(flatten(saved)):
        raise ConfigError(f"{path} is not a run's configuration (written by another program?): "
                          "choose another output_dir or delete it")
    return saved


def read_metrics(out: str | Path, name: str = "metrics.json") -> dict[str, Any] | None:
    """``out/<name>`` (a JSON mapping), or None when it is missing or unreadable."""
    try:
        data = json.loads((Path(out) / name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_progress(out: str | Path) -> dict[str, Any] | None:
    """``out/progress.json``, or None while there is none (or it cannot be read)."""
    data = read_metrics(out, PROGRESS_FILE)
    return data if data and "iteration" in data else None


def resume_changes(metrics: dict[str, Any]) -> list[str]:
    """``"resumed at iteration N with key: a -> b"`` per change in metrics.json's resumes."""
    return [f"resumed at iteration {r.get('iteration')} with {change}"
            for r in metrics.get("resumes") or [] for change in r.get("changes") or []]


def run_changes(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """The one rule for "is this the same run?" (train, reproduce, the registry): ``"key:
    stored -> requested"`` for each difference (nested or flat mappings) but RESULT_NEUTRAL
    keys and a longer schedule (GROWABLE raised; max_iters 0: no cap). Empty: the same run."""
    changes = config_changes(stored, requested, RESULT_NEUTRAL + GROWABLE)
    a, b = flatten(stored), flatten(requested)
    for key in GROWABLE:
        if key in a and key in b and b[key] != 0 and (a[key] == 0 or b[key] < a[key]):
            changes.append(f"{key}: {a[key]!r} -> {b[key]!r} (a run may only grow longer)")
    return changes


def check_output_place(out: Path) -> None:
    """Refuse an output_dir that is a file, lies under one, or cannot be written."""
    if why := place_problem(out):
        raise ConfigError(f"output_dir {out}: {why}: choose another output_dir (a folder you "
                          "can write to)")


def check_free_space(out: Path, model, optimizer_name: str) -> None:
    """Refuse an output_dir whose disk cannot hold two checkpoints, best.pt, last.pt, logs."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # checkpoints: weights and 1 (SGD) or 2 (AdamW) moments; then the weights files, 64 MiB
    need = 2 * weights * (1 + (2 if optimizer_name == "adamw" else 1)) + 2 * weights + 2**26
    free = shutil.disk_usage(nearest_existing(out)).free
    if free < need:
        raise ConfigError(f"output_dir {out}: {free / 2**20:.0f} MiB free on its disk, a run "
                          f"needs about {need / 2**20:.0f} MiB (checkpoints and weights): "
                          "free space or choose another output_dir")


class OutputLock:
    """Holds output_dir for one run: an exclusive lock on its ``.mlcl-train.lock`` (pid and
    host inside), which the system drops with the process, killed or not. A ConfigError when
    another run holds it. ``release(failed=True)`` also removes what taking it made."""

    def __init__(self, out: Path):
        self.out, self.made_dir = out, not out.exists()
        self.made_file = not (out / LOCK_FILE).exists()
        out.mkdir(parents=True, exist_ok=True)
        self.handle = open(out / LOCK_FILE, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise ConfigError(f"output_dir {out}: another training run writes there ({holder}): "
                              "wait for it to end, or choose another output_dir") from None
        self.handle.truncate(0)
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.handle.flush()

    def release(self, failed: bool = False) -> None:
        self.handle.close()
        if failed and self.made_dir:
            shutil.rmtree(self.out, ignore_errors=True)
        elif failed and self.made_file:
            (self.out / LOCK_FILE).unlink(missing_ok=True)


def remove_fresh_output(out: Path, checkpoints: Path) -> bool:
    """Delete ``out`` (created by this run) unless it holds a checkpoint; whether it did."""
    if checkpoints.is_dir() and any(p.is_dir() for p in checkpoints.iterdir()):
        return False
    shutil.rmtree(out, ignore_errors=True)
    return True


def git_commit() -> str:
    """The checkout's HEAD commit, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_progress(out: str | Path, *, iteration: int, total_iters: int, epoch: int,
                   epochs: int, miou: float | None, best_miou: float | None,
                   elapsed_s: float, status: str = "running") -> Path:
    """Write ``out/progress.json`` (atomically; its keys: these and ``updated``, unix time)."""
    if status not in STATUSES:
        raise ValueError(f"progress status must be one of {', '.join(STATUSES)}, got {status!r}")
    return atomic_write_json(Path(out) / PROGRESS_FILE, {
        "iteration": int(iteration), "total_iters": int(total_iters), "epoch": int(epoch),
        "epochs": int(epochs), "miou": miou, "best_miou": best_miou,
        "elapsed_s": float(elapsed_s), "status": status, "updated": time.time()})


def save_progress(run, status: str) -> None:
    """progress.json of ``run`` (a mlcl.train.Run); main process only."""
    s = run.state
    running = min(s.iteration // run.iters_per_epoch + 1, run.epochs)
    if run.acc.is_main_process:
        write_progress(run.out, iteration=s.iteration, total_iters=run.total_iters,
                       epoch=running if status == "running" else s.epoch, epochs=run.epochs,
                       miou=([None] + [r["miou"] for r in s.history if "miou" in r])[-1],
                       best_miou=s.best_miou if s.best_epoch >= 0 else None,
                       elapsed_s=run.elapsed(), status=status)


def write_metrics(run, status: str, error: str | None = None) -> dict[str, Any]:
    """metrics.json of ``run`` (a mlcl.train.Run) in ``status``; the main process writes it."""
    cfg, s, acc, names = run.cfg, run.state, run.acc, run.names
    evaluated = [r for r in s.history if "miou" in r]
    last = evaluated[-1] if evaluated else {}
    best = max(evaluated, key=lambda r: r["miou"]) if evaluated else {}
    metrics = {
        "method": cfg.method, "variant": cfg.mlcl.variant if cfg.method == "mlcl" else None,
        "dataset": cfg.data.dataset, "split": cfg.split, "seed": cfg.seed, "status": status,
        "complete": status == "complete", "error": error, "best_miou": best.get("miou"),
        "best_epoch": best.get("epoch"), "last_miou": last.get("miou"),
        "last_epoch": last.get("epoch"), "class_names": names,
        "best_iou": dict(zip(names, best.get("iou", []))),
        "last_iou": dict(zip(names, last.get("iou", []))), "epochs": s.history,
        "iterations": s.iteration, "resumes": s.resumes, "wall_time_s": run.elapsed(),
        "num_processes": acc.num_processes, "device": str(acc.device),
        # the commit, or the list of them when resumed parts ran different checkouts
        "git_commit": s.git_commits[0] if len(s.git_commits) == 1 else (s.git_commits or None),
        "output_dir": str(cfg.output_dir),
        **({"bank_spread_across_processes": run.bank_spread} if run.bank is not None else {}),
    }
    students = [r["miou_student"] for r in evaluated if "miou_student" in r]
    if students:  # UniMatch V2: the miou above is the teacher's, the model's (student's) here
        metrics.update(best_miou_student=max(students), last_miou_student=students[-1])
    if acc.is_main_process:
        atomic_write_json(run.out / "metrics.json", metrics)
    return metrics

"""The files a run writes besides its checkpoints, and the checks that output_dir can hold them.

``progress.json`` (rewritten atomically every ``train.log_every`` iterations, after every
validation and at the end; read by progress displays)::

    {"iteration", "total_iters", "epoch", "epochs", "miou" (latest validation or null),
     "best_miou" (or null), "elapsed_s", "status", "updated" (unix time)}

``metrics.json`` (after every epoch and when the run stops): method, dataset, split, seed,
best / last mIoU and per-class IoU, per-epoch history, iterations, the settings changed on
resuming (``resumes``), wall time, git commit (a list when resumed parts ran different
checkouts) and ``status``. Both use one vocabulary: running | complete | failed |
interrupted | diverged.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from mlcl import paths, progress
from mlcl.config import ConfigError
from mlcl.files import atomic_write_json, nearest_existing, place_problem


# --------------------------------------------------------------------------- bad places
def check_output_place(out: Path) -> None:
    """Refuse, before any work, an output_dir that is a file, lies under a file, or cannot
    be written (read-only folder or file system). Writes nothing."""
    why = place_problem(out)
    if why:
        raise ConfigError(f"output_dir {out}: {why}: choose another output_dir (a folder you "
                          "can write to)")


def check_free_space(out: Path, need_bytes: int) -> None:
    """Refuse an output_dir whose disk cannot hold ``need_bytes`` (two checkpoints while one
    is written, best.pt and last.pt)."""
    free = shutil.disk_usage(nearest_existing(out)).free
    if free < need_bytes:
        raise ConfigError(f"output_dir {out}: {free / 2**20:.0f} MiB free on its disk, a run "
                          f"needs about {need_bytes / 2**20:.0f} MiB (checkpoints and weights): "
                          "free space or choose another output_dir")


def run_bytes(model, optimizer_name: str) -> int:
    """What a run keeps on disk at most: two checkpoints (weights + optimiser state: one
    momentum buffer for SGD, two moments for AdamW) while the newer is written, plus best.pt
    and last.pt, plus 64 MiB for logs and metrics."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = 2 if optimizer_name == "adamw" else 1
    return 2 * weights * (1 + moments) + 2 * weights + 64 * 2**20


def remove_fresh_output(out: Path, checkpoints: Path) -> bool:
    """Delete ``out`` (created by this run) when it holds no checkpoint folder yet, so a run
    that failed early leaves nothing behind. Returns whether it was removed."""
    if checkpoints.is_dir() and any(p.is_dir() for p in checkpoints.iterdir()):
        return False
    shutil.rmtree(out, ignore_errors=True)
    return True


# --------------------------------------------------------------------------- progress, metrics
def git_commit() -> str:
    """The checkout's HEAD commit, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def recorded_commit(commits: list[str]) -> str | list[str] | None:
    """metrics.json's ``git_commit``: the commit, or the list of them when the run was
    resumed from another checkout."""
    return commits[0] if len(commits) == 1 else (commits or None)


def save_progress(run, status: str) -> None:
    """progress.json of ``run`` (a mlcl.train.Run) in the format of mlcl.progress; main
    process only."""
    if not run.acc.is_main_process:
        return
    s = run.state
    evaluated = [r["miou"] for r in s.history if "miou" in r]
    epoch = min(s.iteration // run.iters_per_epoch + 1, run.epochs) if status == "running" \
        else s.epoch
    progress.write_progress(run.out, iteration=s.iteration, total_iters=run.total_iters,
                            epoch=epoch, epochs=run.epochs,
                            miou=evaluated[-1] if evaluated else None,
                            best_miou=s.best_miou if s.best_epoch >= 0 else None,
                            elapsed_s=run.elapsed(), status=status)


def build_metrics(run, status: str, error: str | None = None) -> dict[str, Any]:
    """The content of metrics.json for ``run`` (a mlcl.train.Run) in ``status``."""
    cfg, s, acc, names = run.cfg, run.state, run.acc, run.names
    evaluated = [r for r in s.history if "miou" in r]
    last = evaluated[-1] if evaluated else {}
    best = max(evaluated, key=lambda r: r["miou"]) if evaluated else {}
    return {
        "method": cfg.method,
        "variant": cfg.mlcl.variant if cfg.method == "mlcl" else None,
        "dataset": cfg.data.dataset,
        "split": cfg.split,
        "seed": cfg.seed,
        "status": status,
        "complete": status == "complete",
        "error": error,
        "best_miou": best.get("miou"),
        "best_epoch": best.get("epoch"),
        "last_miou": last.get("miou"),
        "last_epoch": last.get("epoch"),
        "class_names": names,
        "best_iou": dict(zip(names, best.get("iou", []))),
        "last_iou": dict(zip(names, last.get("iou", []))),
        "epochs": s.history,
        "iterations": s.iteration,
        "resumes": s.resumes,  # {"iteration", "changes"}: settings changed on resuming
        "wall_time_s": run.elapsed(),
        "num_processes": acc.num_processes,
        "device": str(acc.device),
        "git_commit": recorded_commit(s.git_commits),
        "output_dir": str(cfg.output_dir),
        # MLCL: every process must hold the same bank (largest difference at the last epoch)
        **({"bank_spread_across_processes": run.bank_spread} if run.bank is not None else {}),
    }


def write_metrics(run, status: str, error: str | None = None) -> dict[str, Any]:
    """metrics.json of ``run`` in ``status`` (main process writes; all return it)."""
    metrics = build_metrics(run, status, error)
    if run.acc.is_main_process:
        atomic_write_json(run.out / "metrics.json", metrics)
    return metrics


def read_metrics(out: Path) -> dict[str, Any] | None:
    """``out/metrics.json``, or None when it is missing or unreadable."""
    try:
        return json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None

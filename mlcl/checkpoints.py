"""Checkpoints (accelerate ``save_state`` folders under ``output_dir/checkpoints``, a complete
one at any moment: docs/clusters.md) and the weights files ``best.pt`` / ``last.pt``."""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from mlcl.config import Config, ConfigError, flatten
from mlcl.files import atomic_torch_save, atomic_write_json, atomic_write_text, plain_mode
from mlcl.errors import RunStopped, error_line
from mlcl.outputs import GROWABLE

MANIFEST = "trainer.json"  # the TrainerState and {file: size} of a folder, written last


@dataclass
class TrainerState:
    """What the loop needs to resume besides the accelerate state."""

    epoch: int = 0  # epochs completed (their evaluation, weights and metrics done)
    iteration: int = 0  # optimiser steps completed
    iters_per_epoch: int = 0
    best_miou: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    sum_names: list[str] = field(default_factory=list)  # the epoch's running loss sums,
    sums: list[list[float]] = field(default_factory=list)  # one row per process (float32)
    # the GROWABLE settings in force; {"iteration", "changes"} per resume changing them
    settings: dict[str, Any] = field(default_factory=dict)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    git_commits: list[str] = field(default_factory=list)  # of the run's parts, in order


class CheckpointWriteError(RunStopped):
    """A checkpoint could not be written (a full disk); the previous one is intact."""


def incomplete_because(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint folder, or None when it is."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path.name} has no readable {MANIFEST} (its writing was interrupted)"
    for name, size in files.items():
        found = (path / name).stat().st_size if (path / name).is_file() else "missing"
        if found != size:
            return f"{path.name}/{name} is {found} bytes, the manifest says {size}"
    return None


class Checkpoints:
    """An output_dir's checkpoints (collective), with each process's batch-norm buffers."""

    def __init__(self, out: Path, accelerator, model):
        self.root, self.acc, self.model = Path(out) / "checkpoints", accelerator, model

    def buffers(self, path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
        """(this process's buffers file in ``path``, the model's buffers by name)."""
        net = self.acc.unwrap_model(self.model, keep_torch_compile=False)
        return path / f"buffers_{self.acc.process_index}.pt", dict(net.named_buffers())

    def save(self, state: TrainerState) -> Path:
        """Write ``state``'s checkpoint (unless saved), point LATEST at it, prune; its folder."""
        path = self.root / f"iter-{state.iteration:08d}-epoch-{state.epoch:04d}"  # sortable
        if incomplete_because(path) is None:  # the same point of the run, already saved
            return path
        acc = self.acc
        if acc.is_main_process and path.exists():
            shutil.rmtree(path)  # an interrupted write of this very checkpoint
        acc.wait_for_everyone()
        self.write_on_all(path, lambda: self.write_parts(path))  # also waits for every part
        self.write_on_all(path, lambda: self.write_pointers(path, state)
                          if acc.is_main_process else None)
        if acc.is_main_process:  # delete older folders and interrupted atomic writes
            for p in self.root.iterdir():
                if p.is_dir() and p != path:
                    shutil.rmtree(p, ignore_errors=True)
                elif p.name.startswith(".") and p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)
        acc.wait_for_everyone()
        return path

    def write_parts(self, path: Path) -> None:
        """accelerate's state (and this process's buffers) into ``path``."""
        self.acc.save_state(str(path))
        if self.acc.num_processes > 1:
            file, buffers = self.buffers(path)
            torch.save(buffers, file)

    def write_pointers(self, path: Path, state: TrainerState) -> None:
        """The manifest of the complete folder ``path``, then LATEST naming it; plain modes."""
        for p in path.rglob("*"):
            if p.is_file():
                p.chmod(plain_mode())
        files = {p.name: p.stat().st_size for p in sorted(path.iterdir())}
        atomic_write_json(path / MANIFEST, {**dataclasses.asdict(state), "files": files})
        atomic_write_text(self.root / "LATEST", path.name + "\n")

    def write_on_all(self, path: Path, write) -> None:
        """``write()`` on every process; a failure anywhere: CheckpointWriteError everywhere."""
        error = failure = None
        try:
            write()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own on a full disk
            error, failure = e, error_line(e)
        if self.acc.num_processes > 1:  # everyone stops, not just the process that failed
            failure = next((f for f in gather_object([failure]) if f is not None), None)
        if failure is None:
            return
        if self.acc.is_main_process:
            shutil.rmtree(path, ignore_errors=True)
        raise CheckpointWriteError(
            f"could not write checkpoint {path} ({failure}); the previous checkpoint is intact: "
            "free disk space (or fix the folder) and run the same command again") from error

    def resume_point(self) -> Path | None:
        """LATEST's checkpoint, else the newest complete folder (with a note), else None (a
        fresh run); a ConfigError when folders exist but none is complete."""
        if not self.root.is_dir():
            return None
        pointer = self.root / "LATEST"
        try:
            name = pointer.read_text().strip()
            named = self.root / name
            why = (incomplete_because(named) if name and "/" not in name and named.is_dir()
                   else f"{pointer} names {name[:40]!r}, which is not a checkpoint folder")
        except (OSError, UnicodeDecodeError):
            why = f"{pointer} is missing or unreadable"
        if why is None:
            return named
        complete = [p for p in self.root.iterdir() if p.is_dir() and incomplete_because(p) is None]
        if complete:
            best = max(complete, key=lambda p: p.name)  # zero-padded: newest last
            print(f"note: {why}; resuming from {best}", file=sys.stderr, flush=True)
            return best
        if pointer.exists() or any(p.is_dir() for p in self.root.iterdir()):
            raise ConfigError(f"{self.root} holds no complete checkpoint ({why}): delete "
                              f"{self.root} to start this run over")
        return None

    def load(self, path: Path, iters_per_epoch: int) -> TrainerState:
        """Restore ``path`` (model, optimiser, bank, RNGs, buffers); return its TrainerState."""
        saved = json.loads((path / MANIFEST).read_text())
        known = {f.name for f in dataclasses.fields(TrainerState)}
        state = TrainerState(**{k: v for k, v in saved.items() if k in known})
        if state.iters_per_epoch != iters_per_epoch:
            raise ConfigError(
                f"checkpoint {path} was written with {state.iters_per_epoch} iterations per "
                f"epoch and this run has {iters_per_epoch} (train.batch_size or the number of "
                "processes changed): resume with the run's settings or choose another output_dir")
        try:
            self.acc.load_state(str(path))
            if self.acc.num_processes > 1:
                file, buffers = self.buffers(path)
                kept = torch.load(file, map_location="cpu", weights_only=True)
                for name, buf in buffers.items():
                    buf.copy_(kept[name])
        except Exception as e:  # noqa: BLE001 - any unreadable part: one line, what to delete
            raise ConfigError(f"checkpoint {path} cannot be loaded ({error_line(e)}): delete "
                              f"{path} to resume from an earlier one, or {self.root} to start "
                              "over") from e
        return state


def schedule_settings(cfg: Config) -> dict[str, Any]:
    """The GROWABLE keys of ``cfg`` and their values."""
    return {k: v for k, v in flatten(cfg.to_dict()).items() if k in GROWABLE}


def save_weights(path: Path, model, cfg: Config, names: list[str], epoch: int, miou: float,
                 bank=None) -> None:
    """A self-contained weights file for `mlcl evaluate` / `predict` and the notebooks."""
    atomic_torch_save(path, {"model": model.state_dict(), "config": cfg.to_dict(),
                             "class_names": names, "epoch": epoch, "miou": miou,
                             "bank": bank.state_dict() if bank is not None else None})

"""Run by tests/test_resume.py as two processes (RANK 0/1 over gloo): a failure on one
process only must end both with the same error instead of leaving the other waiting in a
collective. Two parts, each writing what this process raised to OUT/rank<r>-<part>.txt:

    preflight   the data pre-flight of a validation set whose second image (in process 1's
                share) is broken
    checkpoint  a checkpoint whose write fails on process 1 (a full disk)

    python tests/two_process_agree.py DATA_ROOT OUT
"""
from __future__ import annotations

import errno
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from mlcl.checkpoints import Checkpoints, TrainerState
from mlcl.config import load_config
from mlcl.data import ValDataset, preflight


def outcome(out: Path, rank: int, part: str, action) -> None:
    """Run ``action()`` and write '<exception type>: <message>' (or 'ok') for ``part``."""
    try:
        action()
        said = "ok"
    except Exception as e:  # noqa: BLE001 - the test compares what each process raised
        said = f"{type(e).__name__}: {e}"
    (out / f"rank{rank}-{part}.txt").write_text(said)


def main(root: Path, out: Path) -> None:
    acc = Accelerator(cpu=True)
    rank = acc.process_index
    cfg = load_config("synthetic", [f"data.root={root}", "split=1_8"])
    val = {"val": ValDataset(cfg, cfg.split_path("val_split"))}
    outcome(out, rank, "preflight", lambda: preflight.check(cfg, val, acc))

    if rank == 1:
        def full_disk(_path):
            raise OSError(errno.ENOSPC, "No space left on device")
        acc.save_state = full_disk
    ckpt = Checkpoints(out / "run", acc, torch.nn.BatchNorm1d(2))
    outcome(out, rank, "checkpoint", lambda: ckpt.save(TrainerState(iteration=1)))
    # leave together (see two_process_bank.py)
    acc.wait_for_everyone()
    acc.state.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

"""The ``guard`` section: what the divergence guard adds to a training step.

Per step the loop computes the gradient norm and folds the finiteness of the loss terms and
the norm into device tensors (mlcl.stopping.NonFiniteGuard.observe: no host sync); every
``train.log_every`` steps it reads them (``first_failure``: one host sync). Both are timed
here on the real gradients of an MLCL step built as the steps section builds it, against
that step's own time."""
from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from mlcl.bench.steps import MethodRun, make_acc, method_config
from mlcl.bench.timing import Clock
from mlcl.config import TrainConfig
from mlcl.stopping import NonFiniteGuard, gradient_norm

CALLS = 20  # guard calls per timed lap (each is far shorter than a step)


def bench_guard(a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Seconds per step of the guard's per-step work and of its read, the step's own time
    (same clock) and their ratio, alone and with a read every ``log_every`` steps (the
    default train.log_every), for the ``mlcl`` method at the bench settings."""
    run = MethodRun("mlcl", method_config("mlcl", a), make_acc(a), device, a.seed)
    steps, terms = [], None
    for i in range(a.warmup + max(a.repeats // 2, 1)):
        clock = Clock(device)
        clock.mark()
        terms = run.step()
        clock.mark()
        if i >= a.warmup:
            steps.append(lap(clock, a.clock))
    guard = NonFiniteGuard(device)
    observe, read = [], []
    for _ in range(max(a.repeats, 3)):
        clock = Clock(device)
        clock.mark()
        for _ in range(CALLS):
            guard.observe(500, terms, gradient_norm(run.model))
        clock.mark()
        observe.append(lap(clock, a.clock) / CALLS)
        clock = Clock(device)
        clock.mark()
        guard.first_failure(run.acc)
        clock.mark()
        read.append(lap(clock, a.clock))
    step, per_step, per_read = (statistics.median(v) for v in (steps, observe, read))
    every = TrainConfig().log_every  # the loop reads the guard every train.log_every steps
    return {"step_s": step, "observe_s": per_step, "read_s": per_read,
            "fraction_of_step": per_step / step, "log_every": every,
            "fraction_with_reads": (per_step + per_read / every) / step,
            "clock": a.clock, "method": "mlcl"}


def lap(clock: Clock, which: str) -> float:
    """The clock's one lap: CPU time when asked for (CPU only), else wall / CUDA time."""
    if which == "cpu" and clock.cpu_total() is not None:
        return clock.cpu_total()
    return clock.laps()[0]

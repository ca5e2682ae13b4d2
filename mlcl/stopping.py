"""Stopping a run on purpose (docs/clusters.md): stop signals and the divergence guard, read
together in one gather, so that all processes stop at one step."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import torch
from torch import Tensor

# one notice comes twice (scheduler, accelerate launch); a second request comes this much later
REPEAT_AFTER_S = 1.0


class StopSignals:
    """SIGINT/SIGTERM handlers (main thread only), a context manager; on_abort() before aborts."""

    def __init__(self, accelerator, on_abort):
        self.acc, self.on_abort = accelerator, on_abort
        self.signum: int | None = None  # the first stop signal this process received
        self.first_at, self.previous = 0.0, {}
        self.seen_shared = False  # several processes: a request was seen by a shared read

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, _frame) -> None:
        """The signal handler: record the first request; exit at once on a later one."""
        name = signal.Signals(signum).name
        if self.signum is not None:
            if time.monotonic() - self.first_at < REPEAT_AFTER_S:
                return  # the same notice, delivered twice
            print(f"{name} again: stopping at once; the last complete checkpoint stays usable",
                  file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                self.on_abort()
            os._exit(128 + signum)
        self.signum, self.first_at = signum, time.monotonic()
        if self.acc.is_main_process:
            when = ("this step" if self.acc.num_processes == 1 else
                    "up to train.log_every steps, so that every process stops together")
            print(f"{name}: finishing {when}, then writing a checkpoint (send it again to "
                  "stop at once)", file=sys.stderr, flush=True)

    def poll(self) -> bool:
        """Whether to stop here: this process's request, or with several one a shared read saw."""
        return self.signum is not None if self.acc.num_processes == 1 else self.seen_shared


class NonFiniteGuard:
    """The first step with non-finite terms (or gradient norm) and which, as device tensors."""

    def __init__(self, device: torch.device):
        self.names: list[str] | None = None
        self.first_iter = torch.full((), -1, dtype=torch.long, device=device)
        self.first_bad: Tensor | None = None

    def observe(self, iteration: int, terms: dict[str, Tensor], grad_norm: Tensor | None) -> None:
        """terms: the step's 0-d tensors; grad_norm: 0-d (None: not checked)."""
        scalars = {k: v for k, v in terms.items() if torch.is_tensor(v) and v.dim() == 0}
        if grad_norm is not None:
            scalars["grad_norm"] = grad_norm
        if self.names is None:
            self.names = list(scalars)
            self.first_bad = self.first_iter.new_zeros(len(self.names), dtype=torch.bool)
        bad = ~torch.isfinite(torch.stack([scalars[k].detach().float() for k in self.names]))
        first = bad.any() & (self.first_iter < 0)
        self.first_bad = torch.where(first, bad, self.first_bad)
        self.first_iter = torch.where(first, iteration, self.first_iter)

    def read(self, accelerator, stop_requested: bool = False
             ) -> tuple[tuple[int, list[str]] | None, bool]:
        """((iteration, names of the non-finite terms) of the first bad step on any process or
        None, whether any process had ``stop_requested``): one gather, on every process."""
        it = self.first_iter.view(1)
        row = torch.cat([it.new_full((1,), int(stop_requested)), it]
                        + ([self.first_bad.long()] if self.names is not None else []))
        rows = (accelerator.gather(row.unsqueeze(0)) if accelerator.num_processes > 1
                else row.unsqueeze(0)).cpu()
        stop, hit = bool(rows[:, 0].any()), rows[rows[:, 1] >= 0, 1:]
        if self.names is None or len(hit) == 0:
            return None, stop
        first = int(hit[:, 0].min())
        flags = hit[hit[:, 0] == first, 1:].any(0)
        return (first, [n for n, bad in zip(self.names, flags.tolist()) if bad]), stop


def gradient_norm(model) -> Tensor:
    """The 2-norm of all gradients of ``model`` as a 0-d device tensor (no host sync)."""
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    return torch.nn.utils.get_total_norm(grads)

"""Stopping a run on purpose (docs/clusters.md): :class:`StopSignals` (SIGTERM / SIGINT) and
:class:`NonFiniteGuard` (the divergence guard), read together in one gather every
``train.log_every`` steps and at an epoch's end, so that all processes stop at one step."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import torch
from torch import Tensor

# A scheduler and `accelerate launch` deliver one notice twice within milliseconds; only a
# signal this much later is a second request (a second Ctrl-C).
REPEAT_AFTER_S = 1.0


class StopSignals:
    """Context manager: SIGINT / SIGTERM handlers for the loop (main thread only, else signals
    keep their handling); ``on_abort()`` runs before an exit at once."""

    def __init__(self, accelerator, on_abort=None):
        self.acc, self.on_abort = accelerator, on_abort
        self.signum: int | None = None
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
            if self.on_abort is not None:
                with contextlib.suppress(Exception):
                    self.on_abort()
            os._exit(128 + signum)
        self.signum, self.first_at = signum, time.monotonic()
        if self.acc.is_main_process:
            when = ("this step" if self.acc.num_processes == 1 else
                    "up to train.log_every steps, so that every process stops together")
            print(f"{name}: finishing {when}, then writing a checkpoint (send it again to "
                  "stop at once)", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self.signum is not None

    def record_shared_read(self, any_process: bool) -> None:
        """Note whether a shared read (the same on every process) saw a request anywhere."""
        self.seen_shared = self.seen_shared or any_process

    def poll(self) -> bool:
        """Whether to stop here: this process's request, or with several one a shared read saw."""
        return self.requested() if self.acc.num_processes == 1 else self.seen_shared

    def exit_signal(self) -> int:
        """The signal to report (SIGTERM when another process received it)."""
        return self.signum or int(signal.SIGTERM)


class NonFiniteGuard:
    """The first iteration with a non-finite loss term or gradient norm, and which were
    non-finite then, kept as device tensors: :meth:`observe` never synchronises."""

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
            self.first_bad = torch.zeros(len(self.names), dtype=torch.bool,
                                         device=self.first_iter.device)
        bad = ~torch.isfinite(torch.stack([scalars[k].detach().float() for k in self.names]))
        first = bad.any() & (self.first_iter < 0)
        self.first_bad = torch.where(first, bad, self.first_bad)
        self.first_iter = torch.where(first, iteration, self.first_iter)

    def read(self, accelerator, stop_requested: bool = False
             ) -> tuple[tuple[int, list[str]] | None, bool]:
        """((iteration, names of the non-finite terms) of the first bad step on any process or
        None, whether any process had ``stop_requested``): one gather, on every process."""
        device = self.first_iter.device
        row = torch.cat([torch.full((1,), int(stop_requested), device=device),
                         self.first_iter.view(1)]
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

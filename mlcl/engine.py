"""The pieces of a training step, shared by the loop (mlcl.train) and the measuring tool."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

from mlcl.checkpoints import TrainerState
from mlcl.config import Config, ConfigError
from mlcl.methods import STEPS, StepContext
from mlcl.stopping import NonFiniteGuard, gradient_norm


def make_accelerator(cfg: Config, project_dir: Path | None = None) -> Accelerator:
    """The Accelerator of a run; with ``project_dir``, TensorBoard logs in it."""
    cpu = cfg.train.cpu or not torch.cuda.is_available()
    mp = cfg.train.mixed_precision
    if cpu and mp == "fp16":
        raise ConfigError("config key 'train.mixed_precision': fp16 needs a GPU (use bf16 or no)")
    # batch-norm statistics stay per process (SyncBatchNorm on GPU), as in UniMatch; pinned
    # batches (data.pin_memory) are copied without blocking, overlapping the step
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    loading = DataLoaderConfiguration(non_blocking=not cpu and cfg.data.pin_memory)
    tracking = {"log_with": "tensorboard", "project_dir": str(project_dir)} if project_dir else {}
    return Accelerator(cpu=cpu, mixed_precision=mp, kwargs_handlers=[ddp],
                       dataloader_config=loading, **tracking)


def poly_lr(optimizer: torch.optim.Optimizer, it: int, total: int, power: float,
            lag: bool = False) -> None:
    """lr = base_lr * (1 - t/total)^power per parameter group for step ``it``: t = it, or
    with ``lag`` t = max(it - 1, 0), as UniMatch and the release (train.lr_lag)."""
    t = max(it - 1, 0) if lag else it
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * (1 - t / total) ** power


def make_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the model's parameter groups, each with its ``base_lr``."""
    t = cfg.train
    groups = [{**g, "base_lr": g["lr"]} for g in model.param_groups(t.lr, t.lr_multi)]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


def forward_terms(model, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
    """The method's step under autocast: {'loss': total, <named terms>} (mlcl.methods)."""
    with ctx.accelerator.autocast():
        return STEPS[ctx.cfg.method](model, batch, ctx)


def backward_and_step(model, optimizer, terms: dict[str, torch.Tensor], ctx: StepContext,
                      guard: NonFiniteGuard) -> None:
    """Backward of terms['loss'], the guard's look at the terms and gradient norm (none under
    fp16, whose loss scaler skips overflowing steps itself), the optimiser step, the teacher's."""
    optimizer.zero_grad(set_to_none=True)
    ctx.accelerator.backward(terms["loss"])
    norm = None if ctx.cfg.train.mixed_precision == "fp16" else gradient_norm(model)
    guard.observe(ctx.iteration, terms, norm)
    optimizer.step()
    if ctx.teacher is not None:
        ctx.teacher.update(ctx.accelerator.unwrap_model(model), ctx.iteration)


class EpochSums:
    """Running sums of the scalar loss terms over the epoch in progress (this process)."""

    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}

    def add(self, terms: dict[str, Any]) -> None:
        """Add the 0-d tensors of ``terms`` (on the device, no host synchronisation)."""
        for k, v in terms.items():
            if torch.is_tensor(v) and v.dim() == 0:
                self.values[k] = self.values.get(k, 0) + v.detach().float()

    def means(self, acc, steps: int) -> dict[str, float]:
        """Per-term means over ``steps`` and over processes."""
        return {k: float(acc.reduce(v, reduction="mean")) / steps for k, v in self.values.items()}

    def save(self, acc, state: TrainerState) -> None:
        """Every process's sums into ``state`` (exact float32 values; collective)."""
        state.sum_names, state.sums = list(self.values), []
        if self.values:
            rows = torch.stack(list(self.values.values())).unsqueeze(0)
            state.sums = (acc.gather(rows) if acc.num_processes > 1 else rows).tolist()

    def restore(self, acc, state: TrainerState) -> None:
        """This process's sums from ``state`` (as :meth:`save` wrote them), on the device."""
        row = state.sums[acc.process_index] if state.sums else []
        self.values = {k: torch.tensor(v, dtype=torch.float32, device=acc.device)
                       for k, v in zip(state.sum_names, row)}

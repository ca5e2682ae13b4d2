"""The ``steps`` section: a whole training step (forward, backward, optimiser step) of each
method, built as ``train.fit`` builds it and fed synthetic batches shaped like the loaders'."""
from __future__ import annotations

import argparse
import gc
import random
from typing import Any

import torch
from torch import Tensor

from mlcl import augment
from mlcl.bench.timing import Clock, interleaved, lap_stats
from mlcl.config import load_config
from mlcl.engine import backward_and_step, forward_terms, make_accelerator, make_optimizer
from mlcl.methods import StepContext, make_bank
from mlcl.model import build_model
from mlcl.stopping import NonFiniteGuard

BENCH_METHODS = {  # benchmark name -> config overrides
    "supervised": ["method=supervised"],
    "unimatch": ["method=unimatch"],
    "mlcl": ["method=mlcl"],
    "mlcl_released": ["method=mlcl", "mlcl.released_passes=true"],
}


def method_config(name: str, a: argparse.Namespace, backbone: str | None = None,
                  crop: int | None = None, batch: int | None = None):
    return load_config(None, [
        *BENCH_METHODS[name], f"model.backbone={backbone or a.backbone}", f"model.width={a.width}",
        "model.pretrained=false", f"data.crop_size={crop or a.crop}",
        f"data.num_classes={a.classes}", f"train.batch_size={batch or a.batch}",
        f"train.mixed_precision={a.mixed_precision}", f"train.channels_last={a.channels_last}",
        f"train.compile={a.compile}", f"train.cpu={a.device == 'cpu'}", f"seed={a.seed}"])


def synthetic_batch(cfg, device: torch.device, seed: int) -> dict[str, dict[str, Tensor]]:
    """Random tensors shaped like the loaders' batches: x = {'x','y'},
    u = {'w','s1','s2','ignore','box1','box2'}; a padded strip on the last rows is
    ignored, the CutMix boxes come from augment.cutmix_box."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    B, S, K, ig = cfg.train.batch_size, cfg.data.crop_size, cfg.data.num_classes, \
        cfg.data.ignore_index
    pad = max(1, S // 8)
    y = torch.randint(0, K, (B, S, S), generator=g)
    y[:, -pad:] = ig
    ignore = torch.zeros(B, S, S, dtype=torch.long)
    ignore[:, -pad:] = ig
    aug = cfg.data.aug
    boxes = [torch.stack([augment.cutmix_box(S, 1.0, aug.cutmix_area, aug.cutmix_ratio, rng)
                          for _ in range(B)]) for _ in range(2)]
    img = lambda: torch.randn(B, 3, S, S, generator=g)  # noqa: E731
    batch = {"x": {"x": img(), "y": y},
             "u": {"w": img(), "s1": img(), "s2": img(), "ignore": ignore,
                   "box1": boxes[0], "box2": boxes[1]}}
    return {k: {n: t.to(device) for n, t in v.items()} for k, v in batch.items()}


class MethodRun:
    """One method ready to step: model, optimiser, bank, context, batch (as train.fit)."""

    def __init__(self, name: str, cfg, acc, device: torch.device, seed: int):
        torch.manual_seed(seed)
        self.name, self.acc, self.device = name, acc, device
        model = build_model(cfg)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(cfg, model)
        self.bank = make_bank(cfg)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if self.bank is not None:
            self.bank.to(device)
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.guard = NonFiniteGuard(device)
        # mid-schedule, so the SAI weight is non-zero and every branch runs
        self.ctx = StepContext(cfg=cfg, bank=self.bank, accelerator=acc, total_iters=1000,
                               iters_per_epoch=1000, iteration=500)
        self.batch = synthetic_batch(cfg, device, seed)
        self.model.train()

    def step(self, clock: Clock | None = None) -> dict[str, Tensor]:
        """forward (the step function) | backward, divergence guard and optimiser step: the
        functions train.fit runs. Returns the step's terms."""
        if clock:
            clock.mark()
        terms = forward_terms(self.model, self.batch, self.ctx)
        if clock:
            clock.mark()
        backward_and_step(self.model, self.optimizer, terms, self.ctx, self.guard)
        if clock:
            clock.mark()
        return terms

    def timed(self) -> dict[str, float | None]:
        """Seconds: the step (wall), its forward and its backward + optimiser step, and its
        CPU time (None on GPU)."""
        clock = Clock(self.device)
        self.step(clock)
        fwd, bwd = clock.laps()
        return {"wall": fwd + bwd, "forward": fwd, "backward": bwd, "cpu": clock.cpu_total()}


def make_acc(a: argparse.Namespace):
    return make_accelerator(method_config("supervised", a))


def bench_steps(a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    acc = make_acc(a)
    runs = {m: MethodRun(m, method_config(m, a), acc, device, a.seed) for m in a.methods}
    times = interleaved({m: r.timed for m, r in runs.items()},
                        {m: (a.warmup, a.repeats) for m in runs})
    out = {m: lap_stats(laps, a.clock) for m, laps in times.items()}
    del runs
    gc.collect()
    return out


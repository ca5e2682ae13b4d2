"""FLOPs of a training step and of an evaluation, and what a whole schedule costs.

Counts are ``torch.utils.flop_counter.FlopCounterMode``'s: the matrix products and
convolutions, forward and backward (a multiply-add is 2 FLOPs); element-wise operations,
softmax, normalisation and the optimiser are not counted (they are a small share of a
convolutional network's arithmetic). The preset-sized counts run on the ``meta`` device:
shapes only, so counting the real crop and batch of every preset takes seconds and no memory.

Projection of a whole run (docs/real_data.md, section 9, "what a table cell costs")::

    iterations  = epochs * floor(unlabeled images / (batch per GPU * GPUs))
    train FLOPs = iterations * GPUs * FLOPs of one step at the per-GPU batch
    eval FLOPs  = evaluations * val images * FLOPs of one evaluation forward
    GPU-hours   = (train + eval FLOPs) / sustained FLOP/s per GPU / 3600
    wall hours  = GPU-hours / GPUs
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from mlcl.bench.steps import synthetic_batch
from mlcl.config import Config, flatten
from mlcl.evaluate import predict_logits
from mlcl.methods import STEPS, StepContext, make_bank
from mlcl.model import DeepLabV3Plus
from mlcl.prepare.split_lists import STANDARD_POOLS, UNLABELED_POOL, standard_size

META = torch.device("meta")
# The global batch of the presets (docs/real_data.md, section 7): VOC 2 GPUs x 4,
# Cityscapes 4 GPUs x 4.
REFERENCE_GPUS = {"pascal": 2, "cityscapes": 4}
# Default sustained throughput per GPU (TFLOP/s, FLOPs as counted here): what UniMatch's own
# published runs sustained on the same dataset, architecture and crop: its training logs
# (VOC R50 split 183: 80 epochs in 14.3 h on 4 GPUs at batch 2 per GPU; Cityscapes R50 1/4:
# 240 epochs in 26.6 h on 4 GPUs at batch 2) divided into the FLOPs this module counts for
# those schedules. The projection therefore reads "as long as UniMatch's released run took
# per FLOP"; `make gpu-check` measures your GPU's number (`sustained_tflops`).
DEFAULT_TFLOPS = {"pascal": 4.1, "cityscapes": 9.4}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs that FlopCounterMode counts while ``fn()`` runs."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def step_flops(model, batch: dict, ctx: StepContext) -> int:
    """FLOPs of one training step of ``ctx.cfg.method``: the step function (the forward
    passes and losses, exactly as training calls it) and the backward of its total loss."""
    step = STEPS[ctx.cfg.method]

    def run() -> None:
        step(model, batch, ctx)["loss"].backward()

    model.train()
    return count_flops(run)


# keys that cannot change the arithmetic of one step (cells of a preset share their counts)
NOT_IN_A_STEP = ("split", "output_dir", "data.root", "data.labeled_split",
                 "data.unlabeled_split", "data.val_split", "model.pretrained", "train.epochs",
                 "train.max_iters", "train.cpu", "data.num_workers")
_counted: dict[str, int] = {}


def _once(key: Any, count: Callable[[], int]) -> int:
    """``count()``, computed once per ``key`` (JSON-able)."""
    text = json.dumps(key, sort_keys=True, default=str)
    if text not in _counted:
        _counted[text] = count()
    return _counted[text]


def preset_step_flops(cfg: Config, seed: int = 0) -> int:
    """FLOPs of one training step of ``cfg`` at its crop and per-process batch, counted on
    the meta device (model, prototype bank and a loader-shaped batch without data; once per
    distinct step configuration). The step is taken mid-schedule, so every term (SAI
    included) is on."""
    key = {k: v for k, v in flatten(cfg.to_dict()).items() if k not in NOT_IN_A_STEP}
    return _once(["step", seed, key], lambda: _count_step(cfg, seed))


def _count_step(cfg: Config, seed: int) -> int:
    with META:
        model = DeepLabV3Plus(cfg.model, cfg.data.num_classes)
        bank = make_bank(cfg)
    ctx = StepContext(cfg=cfg, bank=bank, accelerator=None, total_iters=1000,
                      iters_per_epoch=1000, iteration=500)
    return step_flops(model, synthetic_batch(cfg, META, seed), ctx)


def eval_flops(cfg: Config, height: int, width: int) -> int:
    """FLOPs of evaluating one (height x width) image in ``cfg.eval.mode`` (whole image,
    centre crop or sliding window), counted on the meta device."""
    key = ["eval", height, width, cfg.data.num_classes, cfg.data.crop_size, asdict(cfg.model),
           asdict(cfg.eval)]
    return _once(key, lambda: _count_eval(cfg, height, width))


def _count_eval(cfg: Config, height: int, width: int) -> int:
    with META:
        model = DeepLabV3Plus(cfg.model, cfg.data.num_classes).eval()
    if cfg.eval.mode == "center_crop":
        side = cfg.eval.crop_size or cfg.data.crop_size
        height, width = min(height, side), min(width, side)
    x = torch.empty(1, 3, height, width, device=META)
    with torch.no_grad():
        return count_flops(lambda: predict_logits(model, x, cfg))


# --------------------------------------------------------------------------- the schedule
@dataclass
class Schedule:
    """The full run of a preset cell: its sizes and step counts."""

    unlabeled: int  # training images per epoch (one epoch = one pass over the unlabeled set)
    val: int
    batch: int  # per GPU
    gpus: int
    epochs: int
    iters_per_epoch: int
    iterations: int
    evaluations: int


def real_sizes(cfg: Config) -> tuple[int, int]:
    """(unlabeled, val) image counts of ``cfg``'s cell on the real dataset, from the standard
    split sizes (mlcl.prepare.split_lists)."""
    dataset = cfg.data.dataset
    pools = STANDARD_POOLS[dataset]
    labeled = standard_size(dataset, cfg.split)
    return pools[UNLABELED_POOL[dataset]] - labeled, pools["val"]


def schedule(cfg: Config, unlabeled: int, val: int, batch: int, gpus: int) -> Schedule:
    """Iterations and evaluations of the whole run at ``batch`` per GPU on ``gpus`` GPUs, as
    ``mlcl.train.fit`` schedules them (evaluation every ``train.eval_every`` epochs and at
    the end)."""
    per_epoch = unlabeled // (batch * gpus)
    epochs = cfg.train.epochs
    every = max(cfg.train.eval_every, 1)
    evaluations = epochs // every + (1 if epochs % every else 0)
    return Schedule(unlabeled, val, batch, gpus, epochs, per_epoch, epochs * per_epoch,
                    evaluations)


def projection(sched: Schedule, step: int, per_image: int, tflops: float) -> dict[str, Any]:
    """Total FLOPs, GPU-hours and wall hours of the run at ``tflops`` (TFLOP/s per GPU)."""
    train = sched.iterations * sched.gpus * step
    evaluation = sched.evaluations * sched.val * per_image
    total = train + evaluation
    gpu_hours = total / (tflops * 1e12) / 3600
    return {**asdict(sched), "step_flops": step, "eval_flops_per_image": per_image,
            "train_flops": train, "eval_flops": evaluation, "total_flops": total,
            "tflops_per_gpu": tflops, "gpu_hours": gpu_hours,
            "wall_hours": gpu_hours / sched.gpus}


def human_flops(n: float) -> str:
    """1.23e15 -> '1.23 PFLOP'."""
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9),
                        ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} FLOP" if n else "0 FLOP"


def default_tflops(dataset: str) -> float:
    return DEFAULT_TFLOPS.get(dataset, min(DEFAULT_TFLOPS.values()))

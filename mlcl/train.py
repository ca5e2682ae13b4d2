"""fit(cfg): the one training loop, for every method, on HuggingFace Accelerate (one CPU
process, one GPU, or many GPUs through `accelerate launch`).

Per iteration the loop hands a batch to ``STEPS[cfg.method]`` (mlcl.methods), which returns
a dict of named loss terms with 'loss' the total; the loop does backward, the optimiser step,
the poly learning rate, logging, evaluation and checkpoints. Nothing else holds state.

``output_dir`` receives:
    config.yaml       the resolved configuration
    metrics.json      method, dataset, split, seed, best/last mIoU, per-class IoU, per-epoch
                      losses, wall time, git commit (rewritten atomically after every epoch)
    checkpoints/      accelerate state of the last epoch (model, optimiser, prototype bank,
                      RNG) + trainer.json; LATEST names the newest complete one
    best.pt, last.pt  model weights + config, for `mlcl evaluate` / `mlcl predict`
    tensorboard/
A second run with the same output_dir resumes from the newest complete checkpoint.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader

from mlcl import paths
from mlcl.config import Config, ConfigError, save_config
from mlcl.data.datasets import build_datasets, class_names
from mlcl.evaluate import evaluate
from mlcl.files import atomic_torch_save, atomic_write_json, atomic_write_text
from mlcl.methods import STEPS, StepContext, make_bank
from mlcl.model import build_model
from mlcl.progress import write_progress


# --------------------------------------------------------------------------- helpers
def make_accelerator(cfg: Config) -> Accelerator:
    cpu = cfg.train.cpu or not torch.cuda.is_available()
    mp = cfg.train.mixed_precision
    if cpu and mp == "fp16":
        raise ConfigError("config key 'train.mixed_precision': fp16 needs a GPU (use bf16 or no)")
    # broadcast_buffers=False: batch-norm statistics stay per process (SyncBatchNorm on GPU
    # handles them), as in UniMatch; several forward passes precede one backward.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    # batches from pinned host memory (data.pin_memory, GPU only) are copied without blocking,
    # so the copy overlaps the step; without pinning, non_blocking would buy nothing
    loading = DataLoaderConfiguration(non_blocking=not cpu and cfg.data.pin_memory)
    return Accelerator(cpu=cpu, mixed_precision=mp, kwargs_handlers=[ddp],
                       dataloader_config=loading)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def poly_lr(optimizer: torch.optim.Optimizer, it: int, total: int, power: float) -> None:
    """lr = base_lr * (1 - it/total)^power, per parameter group."""
    factor = (1 - it / total) ** power
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def make_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    groups = model.param_groups(cfg.train.lr, cfg.train.lr_multi)
    for g in groups:
        g["base_lr"] = g["lr"]
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


def make_loader(dataset, cfg: Config, *, shuffle: bool, seed: int) -> DataLoader:
    gpu = torch.cuda.is_available() and not cfg.train.cpu
    workers = cfg.data.num_workers
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=shuffle, drop_last=True,
                      num_workers=workers, pin_memory=gpu and cfg.data.pin_memory,
                      persistent_workers=workers > 0 and cfg.data.persistent_workers,
                      generator=g)


def cycle(loader: DataLoader) -> Iterator[Any]:
    while True:
        yield from loader


@dataclass
class TrainerState:
    """What the loop needs to resume besides the accelerate state."""

    epoch: int = 0  # epochs completed
    iteration: int = 0
    best_miou: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0


# --------------------------------------------------------------------------- checkpoints
class Checkpoints:
    """accelerate ``save_state`` folders under output_dir/checkpoints; a LATEST file, written
    atomically after the folder is complete, names the one to resume from."""

    def __init__(self, root: Path, accelerator: Accelerator):
        self.root, self.acc = root / "checkpoints", accelerator

    def latest(self) -> Path | None:
        pointer = self.root / "LATEST"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "trainer.json").is_file() else None

    def save(self, state: TrainerState) -> None:
        name = f"epoch-{state.epoch:04d}"
        path = self.root / name
        self.acc.wait_for_everyone()
        self.acc.save_state(str(path))
        if self.acc.is_main_process:
            atomic_write_json(path / "trainer.json", state.__dict__)
            previous = self.latest()
            atomic_write_text(self.root / "LATEST", name + "\n")
            if previous is not None and previous != path:
                shutil.rmtree(previous, ignore_errors=True)
        self.acc.wait_for_everyone()

    def load(self, path: Path) -> TrainerState:
        self.acc.load_state(str(path))
        return TrainerState(**json.loads((path / "trainer.json").read_text()))


# Settings that make a checkpoint belong to a different experiment: resuming across them
# would silently mix two runs.
RUN_IDENTITY = ("method", "seed", "split", "data.dataset", "data.num_classes", "model.backbone",
                "model.width", "mlcl.variant")


def check_resumable(checkpoint: Path, cfg: Config) -> None:
    """Refuse to resume a checkpoint written by a different experiment."""
    from mlcl.config import flatten

    saved_path = checkpoint.parent.parent / "config.yaml"
    if not saved_path.is_file():
        return
    import yaml

    saved = flatten(yaml.safe_load(saved_path.read_text()) or {})
    now = flatten(cfg.to_dict())
    diff = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in RUN_IDENTITY
            if k in saved and saved[k] != now[k]]
    if diff:
        raise ConfigError(f"output_dir {cfg.output_dir} holds a checkpoint of another run "
                          f"({'; '.join(diff)}): choose another output_dir or delete it")


def save_weights(path: Path, model, cfg: Config, names: list[str], epoch: int, miou: float,
                 bank=None) -> None:
    """A self-contained weights file for `mlcl evaluate` / `mlcl predict` (and the prototype
    bank, for the notebooks)."""
    atomic_torch_save(path, {"model": model.state_dict(), "config": cfg.to_dict(),
                             "class_names": names, "epoch": epoch, "miou": miou,
                             "bank": bank.state_dict() if bank is not None else None})


# --------------------------------------------------------------------------- the loop
def fit(cfg: Config) -> dict[str, Any]:
    """Train ``cfg.method`` and return the metrics written to output_dir/metrics.json."""
    acc = make_accelerator(cfg)
    set_seed(cfg.seed, device_specific=True)
    out = Path(cfg.output_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    semi = cfg.method != "supervised"
    sets = build_datasets(cfg, with_unlabeled=bool(cfg.data.unlabeled_split))
    names = class_names(cfg)
    # One epoch = one pass over the unlabeled set (the labeled set is repeated to its length),
    # for every method, so supervised and semi-supervised runs take the same number of steps.
    labeled = make_loader(sets["labeled"], cfg, shuffle=True, seed=cfg.seed)
    loaders = {"x": labeled}
    if semi:
        if "unlabeled" not in sets:
            raise ConfigError(f"config key 'data.unlabeled_split': method={cfg.method} needs "
                              "an unlabeled split")
        loaders["u"] = make_loader(sets["unlabeled"], cfg, shuffle=True, seed=cfg.seed + 1)
        if cfg.train.mix_partner == "loader":
            loaders["mix"] = make_loader(sets["unlabeled"], cfg, shuffle=True, seed=cfg.seed + 2)
    model = build_model(cfg)
    if acc.num_processes > 1 and acc.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    bank = make_bank(cfg)
    model, optimizer = acc.prepare(model, optimizer)
    for key in loaders:
        loaders[key] = acc.prepare(loaders[key])
    # per process: with N processes each prepared loader yields 1/N of the batches
    iters_per_epoch = min(len(v) for v in loaders.values())
    if iters_per_epoch == 0:
        raise ConfigError(f"config key 'train.batch_size': {cfg.train.batch_size} per process "
                          "is larger than the training set's share of a process")
    total_iters = cfg.train.epochs * iters_per_epoch
    if cfg.train.max_iters > 0:
        total_iters = min(total_iters, cfg.train.max_iters)
    epochs = math.ceil(total_iters / iters_per_epoch)
    if bank is not None:
        bank.to(acc.device)
        acc.register_for_checkpointing(bank)
    if cfg.train.compile:
        model = torch.compile(model)

    ckpt = Checkpoints(out, acc)
    state = TrainerState()
    resume_from = ckpt.latest()
    if resume_from is not None:
        check_resumable(resume_from, cfg)
        state = ckpt.load(resume_from)
        acc.print(f"resuming from {resume_from} (epoch {state.epoch}, iteration {state.iteration})")

    if acc.is_main_process:
        save_config(cfg, out / "config.yaml")
    writer = None
    if acc.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    step_fn = STEPS[cfg.method]
    ctx = StepContext(cfg=cfg, bank=bank, accelerator=acc, total_iters=total_iters,
                      iters_per_epoch=iters_per_epoch)
    unwrapped = acc.unwrap_model(model)
    started = time.time() - state.wall_time_s
    metrics: dict[str, Any] = {}

    from tqdm.auto import tqdm

    for epoch in range(state.epoch, epochs):
        model.train()
        for loader in loaders.values():
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
        iters = {k: iter(v) for k, v in loaders.items()}
        n_iters = min(iters_per_epoch, total_iters - state.iteration)
        sums: dict[str, torch.Tensor] = {}
        bar = tqdm(range(n_iters), desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not acc.is_local_main_process, leave=False)
        for _ in bar:
            batch = {k: next(it) for k, it in iters.items()}
            ctx.iteration, ctx.epoch = state.iteration, epoch
            poly_lr(optimizer, state.iteration, total_iters, cfg.train.poly_power)
            with acc.autocast():
                terms = step_fn(model, batch, ctx)
            optimizer.zero_grad(set_to_none=True)
            acc.backward(terms["loss"])
            optimizer.step()
            state.iteration += 1
            for k, v in terms.items():
                if torch.is_tensor(v) and v.dim() == 0:
                    sums[k] = sums.get(k, 0) + v.detach().float()
            if state.iteration % cfg.train.log_every == 0 or state.iteration == total_iters:
                logged = {k: float(v) / (bar.n + 1) for k, v in sums.items()}
                bar.set_postfix(loss=f"{logged.get('loss', float('nan')):.3f}")
                if writer is not None:
                    for k, v in terms.items():
                        if torch.is_tensor(v) and v.dim() == 0:
                            writer.add_scalar(f"train/{k}", float(v.detach()), state.iteration)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], state.iteration)
                    _progress(out, state, total_iters, epochs, started)  # MINIMAL WRITER
        bar.close()
        epoch_terms = {k: float(acc.reduce(v, reduction="mean")) / n_iters for k, v in sums.items()}
        state.epoch = epoch + 1
        record: dict[str, Any] = {"epoch": state.epoch, "iteration": state.iteration, **epoch_terms}
        last = state.epoch == epochs
        if last or state.epoch % cfg.train.eval_every == 0:
            result = evaluate(model, sets["val"], cfg, acc)
            record["miou"] = result["miou"]
            record["iou"] = result["iou"]
            acc.print(f"epoch {state.epoch}/{epochs}: loss {epoch_terms.get('loss', 0):.4f} "
                      f"mIoU {result['miou']:.2f}")
            if result["miou"] > state.best_miou:
                state.best_miou, state.best_epoch = result["miou"], state.epoch
                if acc.is_main_process:
                    save_weights(out / "best.pt", unwrapped, cfg, names, state.epoch,
                                 result["miou"], bank)
            if acc.is_main_process:
                save_weights(out / "last.pt", unwrapped, cfg, names, state.epoch, result["miou"],
                             bank)
        state.history.append(record)
        state.wall_time_s = time.time() - started
        if writer is not None:
            _progress(out, state, total_iters, epochs, started)  # MINIMAL WRITER
            for k, v in record.items():
                if isinstance(v, float):
                    writer.add_scalar(f"epoch/{k}", v, state.epoch)
        ckpt.save(state)
        metrics = build_metrics(cfg, state, names, acc, total_iters)
        if bank is not None:  # every process must hold the same bank; record the spread
            banks = acc.gather(bank.protos.unsqueeze(0))
            metrics["bank_spread_across_processes"] = float((banks - banks[:1]).abs().max())
        if acc.is_main_process:
            atomic_write_json(out / "metrics.json", metrics)
    if not metrics:  # already complete: re-read what the finished run wrote
        metrics = json.loads((out / "metrics.json").read_text())
    if writer is not None:
        _progress(out, state, total_iters, epochs, started, "complete")  # MINIMAL WRITER
        writer.close()
    acc.wait_for_everyone()
    acc.end_training()
    return metrics


# ---- MINIMAL progress.json WRITER (newcomer branch) for the live display of `make demo` /
# `reproduce` (mlcl.progress). The "loop" branch writes the same file from its split of fit:
# when merging, drop this function and the three calls marked MINIMAL WRITER.
def _progress(out: Path, state: TrainerState, total_iters: int, epochs: int, started: float,
              status: str = "running") -> None:
    evaluated = [r["miou"] for r in state.history if "miou" in r]
    write_progress(out, iteration=state.iteration, total_iters=total_iters, epoch=state.epoch,
                   epochs=epochs, miou=evaluated[-1] if evaluated else None,
                   best_miou=state.best_miou if state.best_miou >= 0 else None,
                   elapsed_s=time.time() - started, status=status)


def build_metrics(cfg: Config, state: TrainerState, names: list[str], acc,
                  total_iters: int) -> dict[str, Any]:
    evaluated = [r for r in state.history if "miou" in r]
    last = evaluated[-1] if evaluated else {}
    best = max(evaluated, key=lambda r: r["miou"]) if evaluated else {}
    return {
        "method": cfg.method,
        "variant": cfg.mlcl.variant if cfg.method == "mlcl" else None,
        "dataset": cfg.data.dataset,
        "split": cfg.split,
        "seed": cfg.seed,
        "complete": state.iteration >= total_iters,
        "best_miou": best.get("miou"),
        "best_epoch": best.get("epoch"),
        "last_miou": last.get("miou"),
        "last_epoch": last.get("epoch"),
        "class_names": names,
        "best_iou": dict(zip(names, best.get("iou", []))),
        "last_iou": dict(zip(names, last.get("iou", []))),
        "epochs": state.history,
        "iterations": state.iteration,
        "wall_time_s": state.wall_time_s,
        "num_processes": acc.num_processes,
        "device": str(acc.device),
        "git_commit": git_commit(),
        "output_dir": str(cfg.output_dir),
    }

"""What every measurement runs and reads: a method's real training step, built as training
builds it (``mlcl.train.build_trainables``, ``mlcl.methods.StepContext``) and run with
``mlcl.engine.forward_terms`` / ``backward_and_step`` on loader-shaped synthetic batches; the
clocks and the repeat schedule; the FLOP counter; the peak-memory meter."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from mlcl import augment
from mlcl.config import Config, load_config
from mlcl.engine import backward_and_step, forward_terms, make_accelerator
from mlcl.evaluate import predict_logits
from mlcl.methods import StepContext
from mlcl.model import build_model
from mlcl.stopping import NonFiniteGuard
from mlcl.train import build_trainables

METHODS = {  # measured name -> its config overrides
    "supervised": ["method=supervised"],
    "unimatch": ["method=unimatch"],
    "mlcl": ["method=mlcl"],
    "mlcl_released": ["method=mlcl", "mlcl.released_passes=true"],
}
# the step without --config: the default model (ResNet-50, width 64, 21 classes) at a size
# a CPU steps in seconds, or the VOC preset's crop and batch in bf16 on a GPU
DEVICE_DEFAULTS = {"cpu": ["data.crop_size=129", "train.batch_size=2"],
                   "cuda": ["data.crop_size=321", "train.batch_size=8",
                            "train.mixed_precision=bf16"]}
MiB = 2 ** 20


def step_config(method: str, preset: str | None, device: str, overrides: list[str]) -> Config:
    """``method``'s configuration: the preset (or the device's defaults), the user's
    overrides, the method's; random initial weights; on the CPU when ``device`` is cpu."""
    base = [] if preset else DEVICE_DEFAULTS[device]
    return load_config(preset, [*base, *overrides, *METHODS[method], "model.pretrained=false",
                                f"train.cpu={device == 'cpu'}"])


def synthetic_batch(cfg: Config, device: torch.device, seed: int) -> dict[str, dict]:
    """Random tensors shaped like the loaders' batches: x = {'x','y'},
    u = {'w','s1','s2','ignore','box1','box2'}; a padded strip on the last rows is ignored,
    the CutMix boxes come from augment.cutmix_box."""
    g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    B, S, K = cfg.train.batch_size, cfg.data.crop_size, cfg.data.num_classes
    pad, aug = max(1, S // 8), cfg.data.aug
    y = torch.randint(0, K, (B, S, S), generator=g)
    y[:, -pad:] = cfg.data.ignore_index
    ignore = torch.zeros(B, S, S, dtype=torch.long)
    ignore[:, -pad:] = cfg.data.ignore_index
    boxes = [torch.stack([augment.cutmix_box(S, 1.0, aug.cutmix_area, aug.cutmix_ratio, rng)
                          for _ in range(B)]) for _ in range(2)]
    views = [torch.randn(B, 3, S, S, generator=g) for _ in range(4)]
    batch = {"x": {"x": views[0], "y": y},
             "u": {"w": views[1], "s1": views[2], "s2": views[3], "ignore": ignore,
                   "box1": boxes[0], "box2": boxes[1]}}
    return {k: {n: t.to(device) for n, t in v.items()} for k, v in batch.items()}


class Stepper:
    """One method's training step, ready to run again and again: what ``build_trainables``
    gives (model, optimiser, bank), compiled when train.compile, a StepContext at iteration
    500 of 1000 (so SAI's weight is non-zero and every term runs), one synthetic batch."""

    def __init__(self, cfg: Config, seed: int = 0):
        torch.manual_seed(seed)
        self.cfg, self.acc = cfg, make_accelerator(cfg)
        self.model, self.optimizer, self.bank = build_trainables(cfg, self.acc)
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.ctx = StepContext(cfg=cfg, bank=self.bank, accelerator=self.acc, total_iters=1000,
                               iters_per_epoch=1000, iteration=500)
        self.guard = NonFiniteGuard(self.acc.device)
        self.batch = synthetic_batch(cfg, self.acc.device, seed)
        self.model.train()

    def step(self, clock: Clock | None = None) -> dict[str, Tensor]:
        """forward_terms | backward_and_step (a clock mark before, between and after), as
        the training loop runs them; the step's terms."""
        mark = clock.mark if clock else (lambda: None)
        mark()
        terms = forward_terms(self.model, self.batch, self.ctx)
        mark()
        backward_and_step(self.model, self.optimizer, terms, self.ctx, self.guard)
        mark()
        return terms

    def timed(self) -> dict[str, float | None]:
        """Seconds of one step: wall, forward, backward + optimiser, CPU (None on GPU)."""
        clock = Clock(self.acc.device)
        self.step(clock)
        fwd, bwd = clock.laps()
        return {"wall": fwd + bwd, "forward": fwd, "backward": bwd, "cpu": clock.cpu_total()}


# --------------------------------------------------------------------------- FLOPs
def count_flops(fn: Callable[[], Any], fake: bool = True) -> int:
    """FLOPs that FlopCounterMode counts while ``fn()`` runs: matrix products and
    convolutions, forward and backward, a multiply-add being 2. With ``fake``, every tensor
    the computation makes is a FakeTensor (shapes, no data): real sizes in seconds and no
    memory, the code run unchanged."""
    counter = FlopCounterMode(display=False)
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        with counter:
            fn()
    return int(counter.get_total_flops())


def step_flops(cfg: Config) -> int:
    """FLOPs of one training step of ``cfg`` at its crop and per-process batch: forward_terms
    and the backward of its loss (the optimiser step, element-wise, has none to count and
    reads its step counter on the host, which a FakeTensor cannot give)."""
    run = Stepper(cfg)
    return count_flops(lambda: run.acc.backward(forward_terms(run.model, run.batch,
                                                              run.ctx)["loss"]))


def eval_flops(cfg: Config, height: int, width: int) -> int:
    """FLOPs of evaluating one (height x width) image in ``cfg.eval.mode``."""
    model = build_model(cfg).eval()
    x = torch.empty(1, 3, height, width)
    with torch.no_grad():
        return count_flops(lambda: predict_logits(model, x, cfg))


# --------------------------------------------------------------------------- clocks
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Seconds between marks: CUDA events on GPU, perf_counter on CPU; on CPU also the
    process's CPU time, which other processes competing for the cores disturb less."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []
        self.cpu: list[float] = []

    def mark(self) -> None:
        if self.cuda:
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())
            self.cpu.append(time.process_time())

    def laps(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]

    def cpu_total(self) -> float | None:
        return self.cpu[-1] - self.cpu[0] if self.cpu else None

    def lap(self, clock: str) -> float:
        """The whole span on ``clock``: 'cpu' (CPU only), else wall / CUDA time."""
        return self.cpu_total() if clock == "cpu" and self.cpu else sum(self.laps())


def timed(fn: Callable[[], Any], device: torch.device) -> dict[str, float | None]:
    """Wall and CPU seconds of ``fn()``."""
    clock = Clock(device)
    clock.mark()
    fn()
    clock.mark()
    return {"wall": clock.laps()[0], "cpu": clock.cpu_total()}


def stats(samples: list[float]) -> dict[str, Any]:
    """Median and spread of timings (seconds)."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "q1": q[0], "q3": q[2],
            "n": len(s), "samples": [round(x, 5) for x in samples]}


def lap_stats(laps: list[dict[str, Any]], clock: str) -> dict[str, Any]:
    """Stats of the chosen clock at the top level, of every recorded clock below it."""
    out = {**stats([lap[clock] for lap in laps]), "clock": clock}
    for key in ("wall", "cpu", "forward", "backward"):
        if laps and laps[0].get(key) is not None:
            out[key] = stats([lap[key] for lap in laps])
    return out


def interleaved(jobs: dict[str, Callable[[], Any]], plan: dict[str, tuple[int, int]]
                ) -> dict[str, list[Any]]:
    """Run the jobs in turn, round after round, so that load from other processes falls on
    all of them alike; ``plan[name] = (warmup, repeats)``. A job with fewer runs than the
    longest joins in the last rounds. Each job's results of its runs after its warm-up."""
    out: dict[str, list[Any]] = {k: [] for k in jobs}
    rounds = max(w + n for w, n in plan.values())
    for r in range(rounds):
        for name, job in jobs.items():
            w, n = plan[name]
            if r >= rounds - w - n:
                result = job()
                if r >= rounds - n:
                    out[name].append(result)
    return out


# --------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """This process's peak memory from :meth:`reset` to :meth:`read`: on GPU the tensors'
    (max_memory_allocated, and what the caching allocator reserved); on CPU the resident
    set's (VmHWM, reset through /proc/self/clear_refs; where that cannot be reset,
    getrusage's peak over the process's life)."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def reset(self) -> None:
        gc.collect()  # what came before is not the measured part's
        if self.cuda:
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / MiB
            return
        try:  # freed blocks back to the OS, so the resident set is what is live
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.base_mb = (_status_kib("VmRSS") or 0) / 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.exact = _status_kib("VmHWM") is not None
        except OSError:
            self.exact = False

    def read(self) -> dict[str, Any]:
        if self.cuda:
            sync(self.device)
            return {"peak_mb": torch.cuda.max_memory_allocated(self.device) / MiB,
                    "reserved_mb": torch.cuda.max_memory_reserved(self.device) / MiB,
                    "base_mb": self.base_mb,
                    "what": "GPU: torch.cuda.max_memory_allocated (reserved beside it)"}
        if self.exact:
            kib, what = _status_kib("VmHWM"), "CPU: peak resident set (VmHWM), not GPU memory"
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            kib = rss // 1024 if sys.platform == "darwin" else rss
            what = "CPU: peak resident set over the process's life (getrusage)"
        return {"peak_mb": kib / 1024, "base_mb": self.base_mb, "what": what}

"""What every measurement runs: a method's real training step (built as training builds it)
on loader-shaped synthetic batches; the clock, FLOP counter, memory meter and table."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import random
import resource
import statistics
import sys
import time
import warnings
import weakref
from collections import Counter
from pathlib import Path
from types import MethodType
from typing import Any, Callable, NamedTuple

import torch
from accelerate.utils import convert_outputs_to_fp32
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop
from torch.utils.weak import WeakIdKeyDictionary

from mlcl import augment
from mlcl.config import Config, load_config
from mlcl.engine import backward_and_step, forward_terms, make_accelerator
from mlcl.evaluate import predict_logits
from mlcl.methods import StepContext, make_bank, make_teacher
from mlcl.model import build_model
from mlcl.stopping import NonFiniteGuard
from mlcl.train import build_trainables

METHODS = {  # measured name -> its config overrides
    "supervised": ["method=supervised"],
    "unimatch": ["method=unimatch"],
    "mlcl": ["method=mlcl"],
    "mlcl_mixed": ["method=mlcl", "mlcl.weak_features=mixed"],
    "mlcl_released": ["method=mlcl", "mlcl.released_passes=true"],
    "unimatch_v2": ["method=unimatch_v2"],
    "mlcl_v2": ["method=mlcl", "mlcl.base=unimatch_v2", "mlcl.targets=teacher"],
    "mlcl_v2_mixed": ["method=mlcl", "mlcl.base=unimatch_v2", "mlcl.targets=teacher",
                      "mlcl.weak_features=mixed"],
}
# what a benchmark measures without --methods: on a config whose MLCL sits on UniMatch V2
# (mlcl.base, the *_v2 presets) its family, else UniMatch's
FAMILIES = {"unimatch": ("supervised", "unimatch", "mlcl", "mlcl_mixed", "mlcl_released"),
            "unimatch_v2": ("supervised", "unimatch_v2", "mlcl_v2", "mlcl_v2_mixed")}
# without --config: the default model at a size a CPU steps in seconds, or VOC's on a GPU
DEVICE_DEFAULTS = {"cpu": ["data.crop_size=129", "train.batch_size=2"],
                   "cuda": ["data.crop_size=321", "train.batch_size=8",
                            "train.mixed_precision=bf16"]}
MiB = 2 ** 20


def step_config(method: str, preset: str | None, device: str, overrides: list[str]) -> Config:
    """The preset (or the device's defaults), then the overrides, the method's, random weights
    and ``device``."""
    base = [] if preset else DEVICE_DEFAULTS[device]
    return load_config(preset, [*base, *overrides, *METHODS[method], "model.pretrained=false",
                                f"train.cpu={device == 'cpu'}"])


def synthetic_batch(cfg: Config, device: torch.device, seed: int) -> dict[str, dict]:
    """Random tensors shaped like the loaders' batches: x = {'x','y'}, u = {'w','s1','s2',
    'ignore','box1','box2'}; the last rows are an ignored strip, boxes from augment."""
    g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    B, S, K = cfg.train.batch_size, cfg.data.crop_size, cfg.data.num_classes
    pad, aug = max(1, S // 8), cfg.data.aug
    y = torch.randint(0, K, (B, S, S), generator=g)
    y[:, -pad:] = cfg.data.ignore_index
    ignore = torch.zeros(B, S, S, dtype=torch.long)
    ignore[:, -pad:] = cfg.data.ignore_index
    box1, box2 = (torch.stack([augment.cutmix_box(S, 1.0, aug.cutmix_area, aug.cutmix_ratio, rng)
                               for _ in range(B)]) for _ in range(2))
    w, s1, s2, x = (torch.randn(B, 3, S, S, generator=g) for _ in range(4))
    batch = {"x": {"x": x, "y": y},
             "u": {"w": w, "s1": s1, "s2": s2, "ignore": ignore, "box1": box1, "box2": box2}}
    return {k: {n: t.to(device) for n, t in v.items()} for k, v in batch.items()}


class Stepper:
    """One method's training step, again and again: build_trainables' model (compiled when
    train.compile), optimiser, bank, one synthetic batch; iteration 500 of 1000 (SAI on)."""

    def __init__(self, cfg: Config, seed: int = 0):
        torch.manual_seed(seed)
        self.cfg, self.acc = cfg, make_accelerator(cfg)
        self.model, self.optimizer, self.bank, teacher = build_trainables(cfg, self.acc)
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.ctx = StepContext(cfg=cfg, bank=self.bank, accelerator=self.acc, total_iters=1000,
                               iteration=500, teacher=teacher)
        self.guard = NonFiniteGuard(self.acc.device)
        self.batch = synthetic_batch(cfg, self.acc.device, seed)
        self.model.train()

    def step(self, clock: Clock | None = None) -> dict[str, Tensor]:
        """The step's terms of forward_terms then backward_and_step, ``clock`` marked around."""
        mark = clock.mark if clock else (lambda: None)
        mark()
        terms = forward_terms(self.model, self.batch, self.ctx)
        mark()
        backward_and_step(self.model, self.optimizer, terms, self.ctx, self.guard)
        mark()
        return terms

    def timed(self) -> dict[str, float]:
        """Seconds of one step: the whole, forward, backward + optimiser."""
        clock = Clock(self.acc.device)
        self.step(clock)
        fwd, bwd = clock.laps()
        return {"s": fwd + bwd, "forward": fwd, "backward": bwd}


# FlopCounterMode has no formula for the CPU's flash attention (what scaled_dot_product_attention
# runs on CPU tensors, fake ones included): the CUDA kernels' (the same arguments first)
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                 sdpa_flop.__wrapped__,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                 sdpa_backward_flop.__wrapped__}


def count_flops(fn: Callable[[], Any], fake: bool = True) -> int:
    """FLOPs of matrix products, convolutions and attention while ``fn()`` runs, forward and
    backward (a multiply-add is 2); with ``fake`` on FakeTensors: real sizes, no data."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        with counter:
            fn()
    return int(counter.get_total_flops())


class FakeAccelerator:
    """What a step asks of its Accelerator (autocast, backward, unwrap_model) and how
    ``prepare`` changes the model under mixed precision (fp32 outputs), at any precision in one
    process: accelerate keeps one precision per process."""

    def __init__(self, cfg: Config):
        gpu = not cfg.train.cpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if gpu else "cpu")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            cfg.train.mixed_precision)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.dtype is not None:
            model.forward = MethodType(convert_outputs_to_fp32(type(model).forward), model)
        return model

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


class FakeStep(NamedTuple):
    """:func:`fake_step`'s result."""

    run: Callable[[], dict[str, Tensor]]  # forward_terms, then the loss's backward
    state: list[Tensor]  # what exists before the step: model, teacher, bank, batch
    parameters: list[Tensor]  # the trained ones (what the optimiser keeps state for)


def fake_step(cfg: Config) -> FakeStep:
    """Called inside FakeTensorMode: the step of ``cfg`` at its real sizes, no data, on the
    model prepared as training prepares it, its teacher, bank and a batch. The model is built
    on the meta device first: timm reads numbers while building it, which a FakeTensor cannot
    give. No optimiser: its step reads its counter on the host."""
    acc = FakeAccelerator(cfg)
    with unset_fake_temporarily(), torch.device("meta"):
        net = build_model(cfg)
    model = acc.prepare_model(net.to_empty(device=acc.device).train())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deepcopy reads the fake parameters' data_ptr
        teacher = make_teacher(cfg, model)
    bank, batch = make_bank(cfg), synthetic_batch(cfg, acc.device, 0)
    ctx = StepContext(cfg=cfg, bank=bank, accelerator=acc, total_iters=1000, iteration=500,
                      teacher=teacher)
    state = [*model.state_dict().values(), *(t for v in batch.values() for t in v.values())]
    for extra in (teacher, bank):
        state += [*extra.state_dict().values()] if extra is not None else []

    def run() -> dict[str, Tensor]:
        terms = forward_terms(model, batch, ctx)
        acc.backward(terms["loss"])
        return terms

    return FakeStep(run, state, list(model.parameters()))


def step_flops(cfg: Config) -> int:
    """FLOPs of forward_terms and its loss's backward (:func:`fake_step`). The optimiser step
    has none to count."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        step = fake_step(cfg)
    return count_flops(step.run)


def eval_flops(cfg: Config, height: int, width: int) -> int:
    """FLOPs of evaluating one (height x width) image in ``cfg.eval.mode`` (a FakeTensor
    model): each input shape the model sees (the image, or the sliding windows) counted once,
    times the calls with it."""
    with torch.device("meta"):
        meta = build_model(cfg).eval()
    calls: Counter = Counter()

    def shapes(x: Tensor) -> Tensor:  # what predict_logits feeds the model; logits' shape
        calls[tuple(x.shape)] += 1
        return x.new_zeros(x.shape[0], cfg.data.num_classes, *x.shape[-2:])

    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        model = meta.to_empty(device="cpu")
        predict_logits(shapes, torch.empty(1, 3, height, width), cfg)
        return sum(n * count_flops(lambda: model(torch.empty(shape)), fake=False)
                   for shape, n in calls.items())


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensor storages alive while it is active, each storage once, rounded
    up to the CUDA allocator's 512-byte blocks, and their peak (``now``, ``peak``); what
    existed before is counted by :meth:`add`. Works on FakeTensors (no memory is used)."""

    def __init__(self):
        super().__init__()
        self.seen, self.now, self.peak = WeakIdKeyDictionary(), 0, 0

    def add(self, *tensors: Any) -> None:
        for t in tensors:
            if isinstance(t, Tensor) and t.untyped_storage() not in self.seen:
                storage = t.untyped_storage()
                n = -(-storage.nbytes() // 512) * 512
                self.seen[storage], self.now = n, self.now + n
                weakref.finalize(storage, self._free, n)
        self.peak = max(self.peak, self.now)

    def _free(self, n: int) -> None:
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.add(*tree_flatten(out)[0])
        return out


def step_memory(cfg: Config) -> dict[str, Any]:
    """An estimate (no device needed) of one steady-state training step's peak memory per
    process in bytes: the live tensors of :func:`fake_step` under ``cfg``'s autocast, counted
    by :class:`LiveBytes` (model, teacher, bank, batch, activations saved for the backward,
    gradients), plus AdamW's or SGD's state, allocated at the first step and kept."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        step, live = fake_step(cfg), LiveBytes()
        live.add(*step.state)
        before = live.now
        with live:
            step.run()
    slots = 2 if cfg.train.optimizer == "adamw" else 1  # exp_avg, exp_avg_sq | momentum
    optimizer = slots * sum(p.numel() * p.element_size() for p in step.parameters)
    return {"state_bytes": before, "step_peak_bytes": live.peak, "optimizer_bytes": optimizer,
            "peak_bytes": live.peak + optimizer,
            "parameters": sum(p.numel() for p in step.parameters)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Seconds between marks, on one clock: the process's CPU time on a CPU running one
    thread (other processes on the cores disturb it least), else wall time after a device
    synchronisation."""

    def __init__(self, device: torch.device):
        self.device, self.marks = device, []
        self.cpu = device.type == "cpu" and torch.get_num_threads() == 1

    def mark(self) -> None:
        sync(self.device)
        self.marks.append(time.process_time() if self.cpu else time.perf_counter())

    def laps(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of ``fn()`` on :class:`Clock`."""
    clock = Clock(device)
    clock.mark()
    fn()
    clock.mark()
    return clock.laps()[0]


def stats(samples: list[float]) -> dict[str, Any]:
    """Median, min, max and the samples of timings (seconds)."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples), "samples": [round(x, 5) for x in samples]}


def interleaved(jobs: dict[str, Callable[[], Any]], plan: dict[str, tuple[int, int]]
                ) -> dict[str, list[Any]]:
    """Each job's results after its warm-up, ``plan[name] = (warmup, repeats)``, the jobs run
    in turn round after round (a job with fewer runs joins late) so load falls on all alike."""
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


def _status_kib(field: str) -> int | None:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(ln.split()[1]) for ln in lines if ln.startswith(field + ":")), None)


class PeakMemory:
    """This process's peak memory from :meth:`reset` to :meth:`read`: on GPU
    max_memory_allocated (and reserved); on CPU the resident set's peak (VmHWM, reset through
    /proc/self/clear_refs; where that cannot be reset, getrusage's over the process's life)."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def reset(self) -> None:
        gc.collect()  # what came before is not the measured part's
        sync(self.device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / MiB
            return
        with contextlib.suppress(OSError, AttributeError):  # freed blocks back to the OS
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base_mb = (_status_kib("VmRSS") or 0) / 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.exact = _status_kib("VmHWM") is not None
        except OSError:
            self.exact = False

    def read(self) -> dict[str, Any]:
        sync(self.device)
        if self.cuda:
            return {"peak_mb": torch.cuda.max_memory_allocated(self.device) / MiB,
                    "reserved_mb": torch.cuda.max_memory_reserved(self.device) / MiB,
                    "base_mb": self.base_mb,
                    "what": "GPU: torch.cuda.max_memory_allocated (reserved beside it)"}
        if self.exact:
            kib, what = _status_kib("VmHWM"), "CPU: peak resident set (VmHWM), not GPU memory"
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            kib = rss // 1024 if sys.platform == "darwin" else rss  # macOS: bytes
            what = "CPU: peak resident set over the process's life (getrusage)"
        return {"peak_mb": kib / 1024, "base_mb": self.base_mb, "what": what}


def md_table(rows: list[dict[str, Any]]) -> list[str]:
    """A markdown table of ``rows`` (the first row's keys are the columns): floats to 3
    significant digits, None as '-'."""
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    cols = list(rows[0]) if rows else []
    return [f"| {' | '.join(cols)} |", "|" + "---|" * len(cols),
            *(f"| {' | '.join(cell(r.get(c)) for c in cols)} |" for r in rows)]

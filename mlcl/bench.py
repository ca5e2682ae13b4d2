"""``python -m mlcl bench``: what a training step, the FKA + SAI computation and the data
pipeline cost, measured in one run, on one machine, with the same inputs (docs/performance.md).

    python -m mlcl bench --device cpu --out runs/bench/bench_cpu.json

Sections (``--sections``, default all):

steps     forward + backward + optimiser step of ``supervised``, ``unimatch``, ``mlcl`` (the
          default passes) and ``mlcl_released`` (``mlcl.released_passes=true``), each built
          through load_config / build_model / STEPS / the training loop's Accelerator, fed
          synthetic batches shaped like the loaders' dicts. The methods take turns repeat by
          repeat, so load from other processes falls on all of them alike; median and spread
          of the repeats after the warm-up (CUDA events on GPU).
memory    the peak memory of one steady-state step per method, each in a fresh subprocess
          (CPU: the rise of the resident set over the state after a warm-up step, via the
          kernel's peak-RSS counter; GPU: max_memory_allocated over what was allocated
          before the step), and the VOC estimate (ResNet-50 deep stem, crop 321, 8 + 8).
fka_sai   the MLCL-specific computation alone, given features: the project's vectorised code
          (losses.dt_loss, p2p_and_similarity, methods.sai_losses, PrototypeBank.update)
          against :class:`Released`, a re-creation of the released algorithm (MKSAQW/MCCL,
          ``prote.py`` / ``MLCL.py``), for the prototype branch and for the whole.
pipeline  unlabeled samples (w, s1, s2, ignore, boxes) per second through one loader worker
          (the real UnlabeledDataset + DataLoader in-process) at the training crop, from
          ~500 px JPEGs written by make_synthetic into a temporary folder.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

METHODS = {  # benchmark name -> config overrides
    "supervised": ["method=supervised"],
    "unimatch": ["method=unimatch"],
    "mlcl": ["method=mlcl"],
    "mlcl_released": ["method=mlcl", "mlcl.released_passes=true"],
}
SECTIONS = ("steps", "memory", "fka_sai", "pipeline")
CHILD_TAG = "MLCL_BENCH_MEMORY "
MiB = 2 ** 20
TARGETS = {  # key -> (bound, "max" | "min")
    "ratio_mlcl_over_unimatch": (1.3, "max"),
    "mem_ratio_mlcl_over_unimatch": (1.2, "max"),
    "proto_speedup_over_released": (50.0, "min"),
    "fka_sai_speedup_over_released": (8.0, "min"),
}
VOC = {"backbone": "resnet50_deepstem", "crop": 321, "batch": 8, "gpu_gib": 24}


# --------------------------------------------------------------------------- timing
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
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
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
    """Run the jobs in turn, round after round; ``plan[name] = (warmup, repeats)``. A job
    with fewer runs than the longest joins in the last rounds. Returns each job's results
    of its ``repeats`` runs after its warm-up."""
    out: dict[str, list[Any]] = {k: [] for k in jobs}
    rounds = max(w + n for w, n in plan.values())
    for r in range(rounds):
        for name, job in jobs.items():
            w, n = plan[name]
            first = rounds - w - n
            if r < first:
                continue
            result = job()
            if r >= first + w:
                out[name].append(result)
    return out


# --------------------------------------------------------------------------- step setup
def method_config(name: str, a: argparse.Namespace, backbone: str | None = None,
                  crop: int | None = None, batch: int | None = None):
    from mlcl.config import load_config

    return load_config(None, [
        *METHODS[name], f"model.backbone={backbone or a.backbone}", f"model.width={a.width}",
        "model.pretrained=false", f"data.crop_size={crop or a.crop}",
        f"data.num_classes={a.classes}", f"train.batch_size={batch or a.batch}",
        f"train.mixed_precision={a.mixed_precision}", f"train.channels_last={a.channels_last}",
        f"train.compile={a.compile}", f"train.cpu={a.device == 'cpu'}", f"seed={a.seed}"])


def synthetic_batch(cfg, device: torch.device, seed: int) -> dict[str, dict[str, Tensor]]:
    """Random tensors shaped like the loaders' batches: x = {'x','y'},
    u = {'w','s1','s2','ignore','box1','box2'}; a padded strip on the last rows is
    ignored, the CutMix boxes come from augment.cutmix_box."""
    from mlcl import augment

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
        from mlcl.methods import STEPS, StepContext, make_bank
        from mlcl.model import build_model
        from mlcl.train import make_optimizer

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
        self.step_fn = STEPS[cfg.method]
        # mid-schedule, so the SAI weight is non-zero and every branch runs
        self.ctx = StepContext(cfg=cfg, bank=self.bank, accelerator=acc, total_iters=1000,
                               iters_per_epoch=1000, iteration=500)
        self.batch = synthetic_batch(cfg, device, seed)
        self.model.train()

    def step(self, clock: Clock | None = None) -> None:
        """forward (the step function) | backward + optimiser step, as train.fit runs them."""
        if clock:
            clock.mark()
        with self.acc.autocast():
            terms = self.step_fn(self.model, self.batch, self.ctx)
        if clock:
            clock.mark()
        self.optimizer.zero_grad(set_to_none=True)
        self.acc.backward(terms["loss"])
        self.optimizer.step()
        if clock:
            clock.mark()

    def timed(self) -> dict[str, float | None]:
        """Seconds: the step (wall), its forward and its backward + optimiser step, and its
        CPU time (None on GPU)."""
        clock = Clock(self.device)
        self.step(clock)
        fwd, bwd = clock.laps()
        return {"wall": fwd + bwd, "forward": fwd, "backward": bwd, "cpu": clock.cpu_total()}


def make_acc(a: argparse.Namespace):
    from mlcl.train import make_accelerator

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


# --------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler(threading.Thread):
    """Fallback where VmHWM cannot be reset: the largest RSS seen every ~1 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)


def child_memory(a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """In a fresh process: one warm-up step (optimiser state allocated), then the peak of
    one more step over the memory held before it."""
    name = a.child_memory
    cfg = method_config(name, a)
    run = MethodRun(name, cfg, make_acc(a), device, a.seed)
    run.step()
    gc.collect()
    sync(device)
    params = sum(p.numel() for p in run.model.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run.step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        how = "torch.cuda.max_memory_allocated"
    else:
        _malloc_trim()
        base = _rss_bytes()
        exact = _reset_peak_rss()
        sampler = None if exact else RssSampler()
        if sampler:
            sampler.start()
        run.step()
        if sampler:
            sampler.stop.set()
            sampler.join()
        peak = _status_kib("VmHWM") * 1024 if exact else sampler.peak
        how = "VmHWM after clear_refs" if exact else "RSS sampled every 1 ms"
    return {"method": name, "backbone": cfg.model.backbone, "crop": cfg.data.crop_size,
            "batch": cfg.train.batch_size, "increment_mb": (peak - base) / MiB,
            "peak_abs_mb": peak / MiB, "params": params, "how": how}


def run_child(a: argparse.Namespace, method: str, **over) -> dict[str, Any]:
    args = {"device": a.device, "backbone": a.backbone, "width": a.width, "crop": a.crop,
            "batch": a.batch, "classes": a.classes, "mixed_precision": a.mixed_precision,
            "seed": a.seed, **over}
    cmd = [sys.executable, "-m", "mlcl", "bench", "--child-memory", method]
    for k, v in args.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    cmd += ["--channels-last"] if a.channels_last else []
    env = dict(os.environ)
    if a.device == "cpu":  # large blocks mmapped and unmapped on free: RSS = live memory
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.child_timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            return json.loads(line[len(CHILD_TAG):])
    raise RuntimeError(f"memory subprocess for {method} failed (exit {proc.returncode}):\n"
                       f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def bench_memory(a: argparse.Namespace) -> dict[str, Any]:
    out = {"per_method": {m: run_child(a, m) for m in a.methods}}
    if a.voc_estimate and "mlcl" in a.methods:
        if a.device == "cuda":  # measure the VOC setting itself
            voc = run_child(a, "mlcl", backbone=VOC["backbone"], width=64, crop=VOC["crop"],
                            batch=VOC["batch"], mixed_precision="bf16")
            out["voc"] = {**voc, "measured": True, "gib": voc["peak_abs_mb"] / 1024}
        else:
            voc = run_child(a, "mlcl", backbone=VOC["backbone"], width=64)
            out["voc"] = voc_estimate(voc, a)
    return out


def voc_estimate(m: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    """Scale the measured activation peak linearly in pixels x images to crop 321, batch 8
    per view; add parameters, gradients and SGD momentum (fp32)."""
    scale = (VOC["crop"] ** 2 * VOC["batch"]) / (m["crop"] ** 2 * m["batch"])
    act_fp32 = m["increment_mb"] * scale / 1024
    state = 3 * 4 * m["params"] / 2 ** 30
    total = act_fp32 + state
    return {**m, "measured": False, "pixel_scale": scale,
            "activations_fp32_gib": act_fp32, "weights_grads_momentum_gib": state,
            "gib": total, "mixed_precision_of_measurement": a.mixed_precision,
            "note": ("estimate from the CPU peak of the same step at the bench crop/batch, "
                     "scaled linearly in pixels x images; an fp32 upper bound for a bf16 run "
                     "(bf16 autocast stores most activations in half the bytes); excludes the "
                     "CUDA context and allocator fragmentation (~1-2 GiB)")}


# --------------------------------------------------------------------------- FKA + SAI
class Decoder(nn.Module):
    """The 1x1 classifier alone, with the model's ``decode`` API."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.classifier = nn.Conv2d(channels, classes, 1)

    def decode(self, f: Tensor) -> Tensor:
        return self.classifier(f)


def fka_inputs(B: int, C: int, h: int, K: int, device: torch.device, seed: int
               ) -> SimpleNamespace:
    """What the MLCL part of a step receives: weak / CutMixed-weak / strong features at
    1/4 resolution, the weak logits there, the ignore map, CutMix boxes and the weak and
    mix-source probabilities at the input resolution H = 4 (h - 1) + 1 (81 -> 321). The
    weak pseudo-labels are VOC-like: ~60% background, two object classes per image in
    blobs, about half the pixels above the 0.95 confidence."""
    g = torch.Generator().manual_seed(seed)
    H = 4 * (h - 1) + 1
    cells = torch.rand(B, 1, 6, 6, generator=g)
    objects = torch.randint(1, K, (B, 2, 1, 1), generator=g)
    label = torch.where(cells < 0.6, 0, torch.where(cells < 0.8, objects[:, :1], objects[:, 1:]))
    label = F.interpolate(label.float(), size=(h, h), mode="nearest").long().squeeze(1)
    margin = 2 + 8 * torch.rand(B, 1, h, h, generator=g)
    logits = torch.randn(B, K, h, h, generator=g) + margin * F.one_hot(label, K).permute(
        0, 3, 1, 2)
    ignore = torch.zeros(B, H, H, dtype=torch.long)
    ignore[:, -H // 8:] = 255
    box = torch.zeros(2, B, H, H, dtype=torch.bool)
    box[:, :, H // 4:H // 2, H // 3:2 * H // 3] = True
    feat = lambda: torch.randn(B, C, h, h, generator=g)  # noqa: E731
    f_w = feat()
    prob_w = F.interpolate(logits, size=(H, H), mode="bilinear", align_corners=True).softmax(1)
    x = SimpleNamespace(
        f_w=f_w, f1=f_w + 0.5 * feat(), f2=f_w + 0.5 * feat(), logits=logits, ignore=ignore,
        ignore_mix=ignore.roll(1, 0), box1=box[0], box2=box[1], prob_w=prob_w,
        prob_mix=prob_w.roll(1, 0))
    for k, v in vars(x).items():
        setattr(x, k, v.to(device))
    base = (f_w + 0.5 * feat()).to(device)
    x.f_s1 = base.clone().requires_grad_()
    x.f_s2 = (f_w + 0.5 * feat()).to(device).requires_grad_()
    return x


def vectorised_proto(x, bank, cfg) -> None:
    """L_dt forward + backward and the bank update, as step_mlcl calls them."""
    from mlcl import losses
    from mlcl.methods import downsample_box, weak_at_feature_resolution

    m = cfg.mlcl
    size = tuple(x.f_w.shape[-2:])
    conf, label = weak_at_feature_resolution(x.logits)
    valid_w = losses.resize_ignore(x.ignore, size, bilinear=m.bilinear_ignore)
    valid_s = valid_w & ~downsample_box(x.box1, size)
    dt = losses.dt_loss(x.f_w, conf, label, valid_w, x.f_s1, valid_s, bank.protos,
                        conf_thresh=m.bank_conf, num_anchors=m.num_anchors,
                        num_candidates=m.num_candidates)
    dt.backward()
    bank.update(x.f_w, label, conf, valid_w, early_stop=m.bank_early_stop)


def vectorised_whole(x, bank, decoder, cfg) -> None:
    """p2p + v, L_dt, SAI (L_m, L_n on s1 and s2), backward, bank update (step_mlcl's code
    after the passes)."""
    from mlcl import losses
    from mlcl.methods import downsample_box, sai_losses, weak_at_feature_resolution

    m = cfg.mlcl
    size = tuple(x.f_w.shape[-2:])
    conf, label = weak_at_feature_resolution(x.logits)
    valid_w = losses.resize_ignore(x.ignore, size, bilinear=m.bilinear_ignore)
    valid_s = valid_w & ~downsample_box(x.box1, size)
    p2p1, v1 = losses.p2p_and_similarity(x.f1, x.f_s1)
    p2p2, v2 = losses.p2p_and_similarity(x.f2, x.f_s2)
    dt = losses.dt_loss(x.f_w, conf, label, valid_w, x.f_s1, valid_s, bank.protos,
                        conf_thresh=m.bank_conf, num_anchors=m.num_anchors,
                        num_candidates=m.num_candidates)
    p = SimpleNamespace(prob_mix=x.prob_mix, prob_w=x.prob_w, mix={"ignore": x.ignore_mix},
                        batch_ignore=x.ignore)
    lm, ln = sai_losses(decoder, p, [(x.f_s1, v1, x.box1), (x.f_s2, v2, x.box2)], cfg)
    total = m.alpha * (p2p1 + p2p2) / 2 + m.omega * dt + m.beta * (lm + ln)
    total.backward()
    bank.update(x.f_w, label, conf, valid_w, early_stop=m.bank_early_stop)


class Released:
    """A re-creation of the released FKA / SAI algorithm, for timing only. It measures the
    algorithm, not its quirks: anchors are the true top 16, anchors and candidates pair by
    class, L_dt is the mean over anchors, every class of the bank is updated (the paper
    variant, which tests/test_bench.py checks it agrees with); the ignore map is resized
    bilinearly as released.

    Prototype branch (``prote.py``): for every class present, the rows of the class are
    picked from the (B*h*w, C) feature rows with a boolean mask, sorted by cosine to the
    prototype, and the anchors (16) / candidates (256) are taken one row at a time from the
    re-indexed class features and concatenated; the loss loops over the classes; the bank
    update loops over the classes. SAI (``MLCL.py``): per image a Python loop draws the noise
    and the masking threshold and writes the perturbed map into a zero buffer; each of the
    four perturbed maps is decoded, upsampled and compared separately; targets are CutMixed
    by boolean-mask assignment."""

    def __init__(self, bank: Tensor, kappa: float = 0.15, conf: float = 0.95,
                 anchors: int = 16, candidates: int = 256, momentum: float = 0.99):
        self.bank = bank.clone()  # (K, C)
        self.kappa, self.conf, self.momentum = kappa, conf, momentum
        self.anchors, self.candidates = anchors, candidates

    @staticmethod
    def _rows_and_ignore(f: Tensor, ignore: Tensor) -> tuple[Tensor, Tensor]:
        B, C, h, w = f.shape
        ig = F.interpolate(ignore.unsqueeze(0).float(), size=(h, w), mode="bilinear",
                           align_corners=True).squeeze(0).long()
        return f.permute(0, 2, 3, 1).contiguous().view(B * h * w, C), ig.reshape(-1)

    def _pick(self, rows: Tensor, keep: Tensor, k: int, n: int, most_similar: bool):
        feats = rows[keep]
        if feats.shape[0] == 0:
            return None
        proto = self.bank[k].unsqueeze(0).repeat(feats.shape[0], 1)
        order = torch.sort(F.cosine_similarity(proto, feats, dim=1, eps=1e-6)).indices
        pos = (lambda i: -1 - i) if most_similar else (lambda i: i)
        picked = feats[order][pos(0)].unsqueeze(0)
        for i in range(1, min(n, feats.shape[0])):  # one row at a time, re-indexing the class
            picked = torch.cat((picked, feats[order][pos(i)].unsqueeze(0)), dim=0)
        return picked

    def anchors_of(self, f_w, label, conf, ignore) -> dict[int, Tensor]:
        rows, ig = self._rows_and_ignore(f_w, ignore)
        lab, cf = label.reshape(-1), conf.reshape(-1)
        out = {}
        for k in lab.unique():
            got = self._pick(rows, (lab == k) & (ig != 255) & (cf > self.conf), int(k),
                             self.anchors, most_similar=True)
            if got is not None:
                out[int(k)] = got
        return out

    def candidates_of(self, f_s, label, ignore) -> dict[int, Tensor]:
        rows, ig = self._rows_and_ignore(f_s, ignore)
        lab = label.reshape(-1)
        out = {}
        for k in lab.unique():
            got = self._pick(rows, (lab == k) & (ig != 255), int(k), self.candidates,
                             most_similar=False)
            if got is not None:
                out[int(k)] = got
        return out

    @staticmethod
    def dt_loss(anchors: dict[int, Tensor], cands: dict[int, Tensor]) -> Tensor:
        total, count = 0, 0
        for k, a in anchors.items():
            if k not in cands:
                continue
            cos = F.normalize(a.detach(), dim=1) @ F.normalize(cands[k], dim=1).t()
            total = total + cos.max(dim=1).values.sum()
            count += a.shape[0]
        return 1 - total / count if count else torch.zeros(())

    @torch.no_grad()
    def update(self, f_w, label, conf, ignore) -> None:
        rows, ig = self._rows_and_ignore(f_w, ignore)
        lab, cf = label.reshape(-1), conf.reshape(-1)
        for k in lab.unique():
            feats = rows[(lab == k) & (ig != 255) & (cf > self.conf)]
            if feats.shape[0] == 0:
                continue
            if bool((self.bank[k] == 0).all()):
                self.bank[k] = feats.mean(0)
            else:
                self.bank[k] = self.momentum * self.bank[k] + (1 - self.momentum) * feats.mean(0)

    def dt(self, x, label: Tensor, conf: Tensor) -> Tensor:
        """L_dt of the weak features x.f_w against the strong x.f_s1."""
        return self.dt_loss(self.anchors_of(x.f_w, label, conf, x.ignore),
                            self.candidates_of(x.f_s1, label, x.ignore))

    def proto(self, x) -> None:
        conf, label = x.logits.softmax(1).max(1)
        self.dt(x, label, conf).backward()
        self.update(x.f_w, label, conf, x.ignore)

    def _target(self, box: Tensor, x) -> Tensor:
        t = x.prob_w.clone()
        b = box.unsqueeze(1).repeat(1, t.shape[1], 1, 1)
        t[b] = x.prob_mix[b]
        return t

    def _noise(self, f: Tensor, v: Tensor) -> Tensor:
        out = torch.zeros_like(f)
        for i in range(f.shape[0]):
            a = float((v[i].detach() + 1) * self.kappa)
            eps = torch.empty(f.shape[1:], device=f.device).uniform_(-a, a)
            out[i] = f[i] * eps + f[i]
        return out

    def _mask(self, f: Tensor, v: Tensor) -> Tensor:
        out = torch.zeros_like(f)
        for i in range(f.shape[0]):
            r = 1 - float((v[i].detach() + 1) * self.kappa)
            att = f[i].mean(0, keepdim=True)
            top = att.view(-1).max(0, keepdim=True)[0]
            keep = (att < top * random.uniform(r - 0.1, r + 0.1)).float()
            out[i] = f[i] * keep
        return out

    def whole(self, x, decoder, cfg) -> None:
        m = cfg.mlcl
        size = x.prob_w.shape[-2:]
        p2p, sims = [], []
        for f, fs in ((x.f1, x.f_s1), (x.f2, x.f_s2)):
            p2p.append(1 - F.cosine_similarity(f.detach(), fs, dim=1, eps=1e-6).mean())
            sims.append(F.cosine_similarity(f.detach(), fs, dim=1, eps=1e-6)
                        .reshape(f.shape[0], -1).mean(1))
        conf, label = x.logits.softmax(1).max(1)
        dt = self.dt(x, label, conf)
        sai = 0
        for fs, v, box in ((x.f_s1, sims[0], x.box1), (x.f_s2, sims[1], x.box2)):
            target = self._target(box, x)
            for perturbed in (self._noise(fs, v), self._mask(fs, v)):
                logits = F.interpolate(decoder.decode(perturbed), size=size, mode="bilinear",
                                       align_corners=True)
                sai = sai + F.mse_loss(logits.softmax(1), target) / 2
        total = m.alpha * (p2p[0] + p2p[1]) / 2 + m.omega * dt + m.beta * sai
        total.backward()
        self.update(x.f_w, label, conf, x.ignore)


def bench_fka_sai(a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from mlcl.config import load_config
    from mlcl.prototypes import PrototypeBank

    B, C, h, K = a.fka_batch, a.fka_channels, a.fka_size, a.fka_classes
    cfg = load_config(None, ["method=mlcl", f"data.num_classes={K}",
                             f"model.feature_channels={C}"])
    m = cfg.mlcl
    x = fka_inputs(B, C, h, K, device, a.seed)
    decoder = Decoder(C, K).to(device)
    bank = PrototypeBank(K, C, momentum=m.bank_momentum, conf_thresh=m.bank_conf).to(device)
    torch.manual_seed(a.seed)
    bank.protos.copy_(torch.randn(K, C))  # every class initialised: the steady state
    released = Released(bank.protos, m.kappa, m.bank_conf, m.num_anchors, m.num_candidates,
                        m.bank_momentum)

    def timed(fn):
        def run():
            for t in (x.f_s1, x.f_s2, *decoder.parameters()):
                t.grad = None
            clock = Clock(device)
            clock.mark()
            fn()
            clock.mark()
            return {"wall": clock.laps()[0], "cpu": clock.cpu_total()}
        return run

    jobs = {
        "proto_vectorised": timed(lambda: vectorised_proto(x, bank, cfg)),
        "proto_released": timed(lambda: released.proto(x)),
        "whole_vectorised": timed(lambda: vectorised_whole(x, bank, decoder, cfg)),
        "whole_released": timed(lambda: released.whole(x, decoder, cfg)),
    }
    plan = {k: (a.fka_released_warmup, a.fka_released_repeats) if k.endswith("released")
            else (a.warmup, a.fka_repeats) for k in jobs}
    times = interleaved(jobs, plan)
    return {"settings": {"batch": B, "channels": C, "feature_size": [h, h],
                         "input_size": [4 * (h - 1) + 1] * 2, "classes": K,
                         "repeats": a.fka_repeats, "released_repeats": a.fka_released_repeats,
                         "forward_and_backward": True},
            **{k: lap_stats(v, a.clock) for k, v in times.items()}}


# --------------------------------------------------------------------------- pipeline
def bench_pipeline(a: argparse.Namespace) -> dict[str, Any]:
    from mlcl.config import load_config
    from mlcl.data.datasets import UnlabeledDataset
    from mlcl.data.synthetic import make_synthetic
    from mlcl.train import make_loader

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        with tempfile.TemporaryDirectory(prefix="mlcl-bench-") as tmp:
            t0 = time.perf_counter()
            root = make_synthetic(tmp, num_train=a.pipeline_images, num_val=1,
                                  size=a.pipeline_image_size, classes=a.classes, seed=a.seed)
            written_s = time.perf_counter() - t0
            cfg = load_config(None, [f"data.root={root}", f"data.crop_size={a.pipeline_crop}",
                                     f"data.num_classes={a.classes}", "data.num_workers=0",
                                     "data.unlabeled_split=splits/train.txt",
                                     f"train.batch_size={a.pipeline_batch}", "train.cpu=true"])
            ds = UnlabeledDataset(cfg, cfg.split_path("unlabeled_split"))
            loader = make_loader(ds, cfg, shuffle=True, seed=a.seed)
            random.seed(a.seed)
            it = iter(loader)
            next(it)  # warm-up: first reads, imports
            n, t0 = 0, time.perf_counter()
            for epoch in range(a.pipeline_epochs):
                for batch in (it if epoch == 0 else loader):
                    n += batch["w"].shape[0]
            dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    rate = n / dt if n else float("nan")
    return {"samples_per_s": rate, "samples": n, "seconds": dt, "crop": a.pipeline_crop,
            "batch": a.pipeline_batch, "image_size": [a.pipeline_image_size] * 2,
            "images_written_s": written_s, "min_step_s_one_worker": a.pipeline_batch / rate,
            "what": "one in-process DataLoader (= one worker): JPEG decode, 3 views, ignore map, "
                    "2 CutMix boxes, collate; synthetic JPEGs (quality 95)"}


# --------------------------------------------------------------------------- report
def machine(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or None,
            "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "device": str(device)}
    try:
        info["load_avg"] = os.getloadavg()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    return info


def ratio(num, den):
    return num / den if num is not None and den else None


def summarise(r: dict[str, Any]) -> None:
    """The headline keys and the targets."""
    steps = r.get("step", {})
    r["step_s"] = {m: s["median"] for m, s in steps.items()}  # the chosen clock
    for clock in ("wall", "cpu"):
        r[f"step_{clock}_s"] = {m: s[clock]["median"] for m, s in steps.items() if clock in s}
    for suffix, t in (("", r["step_s"]), ("_wall", r["step_wall_s"]),
                      ("_cpu", r["step_cpu_s"])):
        r[f"ratio_mlcl_over_unimatch{suffix}"] = ratio(t.get("mlcl"), t.get("unimatch"))
        r[f"ratio_mlcl_released_over_unimatch{suffix}"] = ratio(t.get("mlcl_released"),
                                                                t.get("unimatch"))
    mem = r.get("memory", {}).get("per_method", {})
    r["peak_mem_mb"] = {m: v["increment_mb"] for m, v in mem.items()}
    r["mem_ratio_mlcl_over_unimatch"] = ratio(r["peak_mem_mb"].get("mlcl"),
                                              r["peak_mem_mb"].get("unimatch"))
    r["mem_ratio_mlcl_released_over_unimatch"] = ratio(r["peak_mem_mb"].get("mlcl_released"),
                                                       r["peak_mem_mb"].get("unimatch"))
    fk = {k: v for k, v in r.get("fka_sai", {}).items() if k != "settings"}
    for suffix, pick in (("", lambda v: v["median"]), ("_wall", lambda v: v["wall"]["median"]),
                         ("_cpu", lambda v: v["cpu"]["median"] if "cpu" in v else None)):
        med = {k: pick(v) for k, v in fk.items()}
        r[f"proto_speedup_over_released{suffix}"] = ratio(med.get("proto_released"),
                                                          med.get("proto_vectorised"))
        r[f"fka_sai_speedup_over_released{suffix}"] = ratio(med.get("whole_released"),
                                                            med.get("whole_vectorised"))
    r["pipeline_samples_per_s"] = r.get("pipeline", {}).get("samples_per_s")
    targets = {}
    for key, (bound, kind) in TARGETS.items():
        v = r.get(key)
        met = None if v is None else (v <= bound if kind == "max" else v >= bound)
        targets[key] = {"value": v, "target": f"{'<=' if kind == 'max' else '>='} {bound}",
                        "met": met}
    voc = r.get("memory", {}).get("voc")
    if voc:
        targets["voc_mlcl_memory_gib"] = {"value": voc["gib"], "target": f"<= {VOC['gpu_gib']}",
                                          "met": voc["gib"] <= VOC["gpu_gib"],
                                          "measured": voc["measured"]}
    rate, mlcl_step = r["pipeline_samples_per_s"], r["step_s"].get("mlcl")
    if rate and mlcl_step:
        consumed = r["settings"]["batch"] / mlcl_step
        targets["pipeline_vs_step"] = {
            "value": rate, "consumed_per_s_by_this_device_step": consumed,
            "met_on_this_device": rate >= consumed,
            "min_step_s_one_worker_keeps_up_with": r["pipeline"]["min_step_s_one_worker"]}
    r["targets"] = targets


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(r: dict[str, Any]) -> None:
    s = r["settings"]
    print(f"\nmlcl bench on {r['machine'].get('gpu') or r['machine'].get('cpu_model', 'cpu')} "
          f"({r['machine']['device']}, {r['machine']['torch_threads']} threads): "
          f"{s['backbone']} width {s['width']}, crop {s['crop']}, batch {s['batch']} per view, "
          f"precision {s['mixed_precision']}")
    if r.get("step") or r["peak_mem_mb"]:
        print(f"step times: {s['clock']} clock (median, min, max over {s['repeats']} repeats); "
              f"wall: elapsed; peak: memory rise of one step")
        print(f"{'method':<15}{'step s':>8}{'min':>8}{'max':>8}{'x uni':>7}{'wall s':>8}"
              f"{'x uni':>7}{'fwd s':>7}{'bwd s':>7}{'peak MB':>9}{'x uni':>7}")
    uni_t, uni_m = r["step_s"].get("unimatch"), r["peak_mem_mb"].get("unimatch")
    uni_w = r["step_wall_s"].get("unimatch")
    for m in METHODS:
        st, mem = r.get("step", {}).get(m), r["peak_mem_mb"].get(m)
        if st is None and mem is None:
            continue
        st = st or {}
        wall = st.get("wall", {}).get("median")
        print(f"{m:<15}{fmt(st.get('median'), '.3f'):>8}{fmt(st.get('min'), '.3f'):>8}"
              f"{fmt(st.get('max'), '.3f'):>8}{fmt(ratio(st.get('median'), uni_t)):>7}"
              f"{fmt(wall, '.3f'):>8}{fmt(ratio(wall, uni_w)):>7}"
              f"{fmt(st.get('forward', {}).get('median'), '.3f'):>7}"
              f"{fmt(st.get('backward', {}).get('median'), '.3f'):>7}"
              f"{fmt(mem, '.0f'):>9}{fmt(ratio(mem, uni_m)):>7}")
    fk = r.get("fka_sai")
    if fk:
        fs = fk["settings"]
        print(f"FKA+SAI fwd+bwd (B={fs['batch']}, {fs['channels']}x{fs['feature_size'][0]}x"
              f"{fs['feature_size'][1]}, {fs['classes']} classes): prototype branch "
              f"{fk['proto_released']['median']:.3f} s released / "
              f"{fk['proto_vectorised']['median']:.4f} s vectorised = "
              f"{fmt(r['proto_speedup_over_released'], '.0f')}x; whole "
              f"{fk['whole_released']['median']:.3f} / {fk['whole_vectorised']['median']:.3f} s"
              f" = {fmt(r['fka_sai_speedup_over_released'], '.1f')}x "
              f"({fk['whole_vectorised']['clock']} clock; wall: "
              f"{fmt(r['proto_speedup_over_released_wall'], '.0f')}x, "
              f"{fmt(r['fka_sai_speedup_over_released_wall'], '.1f')}x)")
    if r.get("pipeline"):
        p = r["pipeline"]
        print(f"pipeline: {p['samples_per_s']:.1f} unlabeled samples/s per worker at crop "
              f"{p['crop']} (one worker keeps up with steps >= {p['min_step_s_one_worker']:.2f} s"
              f" at batch {p['batch']})")
    voc = r.get("memory", {}).get("voc")
    if voc:
        print(f"VOC MLCL memory ({VOC['backbone']}, crop {VOC['crop']}, {VOC['batch']}+"
              f"{VOC['batch']}): {voc['gib']:.1f} GiB "
              f"{'measured' if voc['measured'] else 'estimated from the CPU peak (fp32)'}")
    for k, t in r["targets"].items():
        if "met" in t:
            print(f"  target {k}: {fmt(t['value'])} {t['target']} -> "
                  f"{'met' if t['met'] else 'MISSED' if t['met'] is False else 'n/a'}")


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlcl bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="JSON file (default runs/bench/bench-DEVICE.json)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)}")
    g = p.add_argument_group("training step (defaults: cpu resnet50/64 crop 129 batch 2; "
                             "cuda resnet50/64 crop 321 batch 8, bf16)")
    g.add_argument("--backbone", default="resnet50")
    g.add_argument("--width", type=int, default=64, help="ResNet stem width")
    g.add_argument("--crop", type=int, default=None)
    g.add_argument("--batch", type=int, default=None, help="images per view (labeled = unlabeled)")
    g.add_argument("--classes", type=int, default=21)
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None)
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--repeats", type=int, default=None, help="default: cpu 5, cuda 20")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    g.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="clock of the headline times and ratios (both are recorded): auto = "
                        "the process's CPU time on a CPU running one thread (other processes "
                        "on the cores then do not count), else wall time (CUDA events on GPU)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("FKA + SAI")
    g.add_argument("--fka-batch", type=int, default=8)
    g.add_argument("--fka-size", type=int, default=81, help="feature map side (81: crop 321)")
    g.add_argument("--fka-channels", type=int, default=256)
    g.add_argument("--fka-classes", type=int, default=21)
    g.add_argument("--fka-repeats", type=int, default=None, help="default: cpu 5, cuda 20")
    g.add_argument("--fka-released-repeats", type=int, default=None,
                   help="repeats of the (slow) released re-creation; default: cpu 3, cuda 5")
    g.add_argument("--fka-released-warmup", type=int, default=1,
                   help="warm-up runs of the released re-creation (its first run pays for "
                        "growing the allocator's pools); default 1")
    g = p.add_argument_group("memory / pipeline")
    g.add_argument("--no-voc-estimate", dest="voc_estimate", action="store_false")
    g.add_argument("--child-timeout", type=int, default=900)
    g.add_argument("--pipeline-crop", type=int, default=321)
    g.add_argument("--pipeline-batch", type=int, default=8)
    g.add_argument("--pipeline-images", type=int, default=48)
    g.add_argument("--pipeline-image-size", type=int, default=500)
    g.add_argument("--pipeline-epochs", type=int, default=2,
                   help="passes over the images (random views each time)")
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    return p


def resolve_args(a: argparse.Namespace) -> argparse.Namespace:
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible")
    gpu = a.device == "cuda"
    defaults = {"crop": 321 if gpu else 129, "batch": 8 if gpu else 2,
                "mixed_precision": "bf16" if gpu else "no", "repeats": 20 if gpu else 5,
                "fka_repeats": 20 if gpu else 5, "fka_released_repeats": 5 if gpu else 3,
                "fka_released_warmup": 1}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if isinstance(a.methods, str):
        a.methods = [m for m in a.methods.split(",") if m]
    if isinstance(a.sections, str):
        a.sections = [s for s in a.sections.split(",") if s]
    bad = [m for m in a.methods if m not in METHODS] + [s for s in a.sections
                                                          if s not in SECTIONS]
    if bad:
        raise SystemExit(f"error: unknown method/section {', '.join(bad)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.clock == "auto":
        a.clock = "cpu" if not gpu and torch.get_num_threads() == 1 else "wall"
    if gpu and a.clock == "cpu":
        raise SystemExit("error: --clock cpu is for --device cpu (GPU steps use CUDA events)")
    return a


def main(argv: list[str] | None = None) -> int:
    from mlcl import paths
    from mlcl.io import atomic_write_json
    from mlcl.train import git_commit

    a = resolve_args(build_parser().parse_args(argv))
    device = torch.device(a.device)
    if a.child_memory:
        print(CHILD_TAG + json.dumps(child_memory(a, device)), flush=True)
        return 0
    started = time.time()
    settings = {k: getattr(a, k) for k in (
        "backbone", "width", "crop", "batch", "classes", "mixed_precision", "channels_last",
        "compile", "warmup", "repeats", "seed", "methods", "sections", "clock")}
    settings["fka_sai"] = {k: getattr(a, k) for k in (
        "fka_batch", "fka_size", "fka_channels", "fka_classes", "fka_repeats",
        "fka_released_repeats", "fka_released_warmup")}
    settings["optimizer"] = "sgd (momentum 0.9)"
    settings["method_overrides"] = {m: METHODS[m] for m in a.methods}
    settings["mlcl_iteration"] = "500 of 1000 (SAI on)"
    r: dict[str, Any] = {"machine": machine(device), "settings": settings,
                         "git_commit": git_commit(),
                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if "steps" in a.sections:
        r["step"] = bench_steps(a, device)
    if "memory" in a.sections:
        r["memory"] = bench_memory(a)
    if "fka_sai" in a.sections:
        r["fka_sai"] = bench_fka_sai(a, device)
    if "pipeline" in a.sections:
        r["pipeline"] = bench_pipeline(a)
    r["bench_wall_s"] = time.time() - started
    r["machine"]["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    summarise(r)
    out = Path(a.out) if a.out else paths.runs_dir() / "bench" / f"bench_{a.device}.json"
    atomic_write_json(out, r)
    print_table(r)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``memory`` section: the peak memory of one steady-state step per method, each in a
fresh subprocess, and the VOC estimate (or measurement, on a GPU)."""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from mlcl.bench.steps import MethodRun, make_acc, method_config
from mlcl.bench.timing import sync

CHILD_TAG = "MLCL_BENCH_MEMORY "
MiB = 2 ** 20
VOC = {"backbone": "resnet50_deepstem", "crop": 321, "batch": 8, "gpu_gib": 24}


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


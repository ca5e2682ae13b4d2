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
fka_sai   the MLCL-specific computation alone, given features: the functions the training
          step calls (methods.prototype_branch, methods.mlcl_losses) against
          :class:`Released`, a re-creation of the released algorithm (MKSAQW/MCCL,
          ``prote.py`` / ``MCCL.py``), for the prototype branch and for the whole.
pipeline  unlabeled samples (w, s1, s2, ignore, boxes) per second through one loader worker
          (the real UnlabeledDataset + DataLoader in-process) at the training crop, from
          ~500 px JPEGs written by make_synthetic into a temporary folder.
guard     the divergence guard's per-step work (gradient norm, finiteness folded into device
          tensors) and its read every train.log_every steps, on the gradients of a real
          mlcl step, against that step's time (mlcl/bench/guard.py).

Modules: timing, steps, memory, fka_sai, pipeline, guard, report; this one holds the CLI.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from mlcl import paths
from mlcl.bench.fka_sai import Decoder, Released, bench_fka_sai, fka_inputs
from mlcl.bench.guard import bench_guard
from mlcl.bench.memory import CHILD_TAG, VOC, bench_memory, child_memory
from mlcl.bench.pipeline import bench_pipeline
from mlcl.bench.report import TARGETS, machine, print_table, summarise
from mlcl.bench.steps import BENCH_METHODS, bench_steps
from mlcl.bench.timing import interleaved
from mlcl.config import CommandLineParser
from mlcl.files import atomic_write_json
from mlcl.outputs import git_commit

__all__ = ["BENCH_METHODS", "SECTIONS", "TARGETS", "VOC", "Decoder", "Released", "fka_inputs",
           "interleaved", "build_parser", "main"]
SECTIONS = ("steps", "memory", "fka_sai", "pipeline", "guard")


def build_parser() -> argparse.ArgumentParser:
    p = CommandLineParser(prog="python -m mlcl bench", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="JSON file (default runs/bench/bench-DEVICE.json)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--methods", default=",".join(BENCH_METHODS),
                   help=f"comma-separated subset of {', '.join(BENCH_METHODS)}")
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
    bad = [m for m in a.methods if m not in BENCH_METHODS] + [s for s in a.sections
                                                          if s not in SECTIONS]
    if bad:
        raise SystemExit(f"error: unknown method/section {', '.join(bad)}")
    stepping = {"steps", "memory"} & set(a.sections)  # the sections that build method steps
    paired = [m for m in a.methods if m != "supervised"] if stepping else []
    if a.batch < 2 and paired:
        raise SystemExit(f"error: --batch {a.batch}: the {'/'.join(paired)} steps pair each "
                         "image with another image of the batch (the CutMix partner); give "
                         "--batch 2 or more, or --methods supervised")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.clock == "auto":
        a.clock = "cpu" if not gpu and torch.get_num_threads() == 1 else "wall"
    if gpu and a.clock == "cpu":
        raise SystemExit("error: --clock cpu is for --device cpu (GPU steps use CUDA events)")
    return a


def main(argv: list[str] | None = None) -> int:
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
    settings["method_overrides"] = {m: BENCH_METHODS[m] for m in a.methods}
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
    if "guard" in a.sections:
        r["guard"] = bench_guard(a, device)
    r["bench_wall_s"] = time.time() - started
    r["machine"]["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    summarise(r)
    out = Path(a.out) if a.out else paths.runs_dir() / "bench" / f"bench_{a.device}.json"
    atomic_write_json(out, r)
    print_table(r)
    if "guard" in r:
        g = r["guard"]
        print(f"divergence guard: {g['observe_s'] * 1e3:.3f} ms per step + {g['read_s'] * 1e3:.3f}"
              f" ms per read = {100 * g['fraction_with_reads']:.2f}% of an mlcl step "
              f"({g['step_s']:.3f} s, {g['clock']} clock) with a read every {g['log_every']} "
              "steps")
    print(f"wrote {out}")
    return 0

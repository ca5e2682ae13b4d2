"""``python -m mlcl measure [WHAT] [options] [key=value ...]``: what training costs, measured
from outside the core on the real step (docs/performance.md).

WHAT is ``bench`` (the default: every section) or a comma-separated list of its sections,
each on the real step fed loader-shaped synthetic batches; JSON in --out (default
runs/bench/bench_DEVICE.json), a table on stdout:

steps     forward + backward + optimiser step of each method (--methods), median of --steps
memory    peak memory of one step per method in a fresh subprocess; MLCL at VOC size
fka_sai   the MLCL part alone on VOC-sized features against the released re-creation
pipeline  unlabeled samples per second through one loader worker at crop 321
guard     the divergence guard's per-step work and its read, against an MLCL step

or one of:

rehearse  every stage of each preset of --config on fabricated full-size data, PASS / FAIL /
          SKIP each, OUT/PRESET/rehearse.json (default OUT runs/rehearse); exit 1 on a FAIL
costs     FLOPs per step and projected cost of every cell of each preset, then each method's
          estimated peak memory per GPU (bf16, or train.mixed_precision=...; no training)
gpu-check  bench in fp32 and bf16, every paper preset rehearsed in bf16, two processes
          with two GPUs: runs/gpu-check/{gpu_check.json,SUMMARY.md}; --device cpu: toy sizes

key=value: configuration overrides of what is measured (bench: on --config's preset or the
device's defaults; rehearse: data.root=DIR / model.pretrained=FILE use a prepared dataset and
a real checkpoint instead of fabricated ones).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mlcl import paths
from mlcl.config import METHOD_NAMES, ConfigError, load_config, preset_splits
from mlcl.errors import CommandLineParser, run_reported
from mlcl.files import atomic_write_json

MODES = ("bench", "rehearse", "costs", "gpu-check")
PRESETS = ("pascal", "pascal_blended", "pascal_blended_r101", "cityscapes", "pascal_v2",
           "cityscapes_v2")


def build_parser() -> argparse.ArgumentParser:
    p = CommandLineParser(prog="python -m mlcl measure", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="bench", help="bench (default), bench sections "
                   "(comma-separated), rehearse, costs or gpu-check")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--config", default=None, help="preset(s), comma-separated (rehearse, costs: "
                   "required; gpu-check: default every paper preset; bench: default none)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available")
    p.add_argument("--methods", default=None, help="comma-separated (default: bench, the "
                   "config's family (UniMatch's or UniMatch V2's); rehearse, costs, gpu-check: "
                   "the preset's rows, supervised, its mlcl.base and mlcl)")
    p.add_argument("--steps", type=int, default=None, help="bench: timed repeats (default "
                   "cpu 5, cuda 20); rehearse, gpu-check: training steps before the "
                   "checkpoint and again after the resume (default 3)")
    p.add_argument("--out", default=None, help="bench: JSON file; rehearse, gpu-check: folder")
    p.add_argument("--gpus", type=int, default=None, help="GPUs of the projected run "
                   "(default: the preset's, VOC 2, Cityscapes 4, DINOv2 presets 4)")
    p.add_argument("--tflops", type=float, default=None, help="sustained TFLOP/s per GPU "
                   "for the projection (default: what UniMatch's, or on DINOv2 UniMatch V2's, "
                   "published runs sustained: docs/real_data.md, section 9)")
    p.add_argument("--dry-run", action="store_true", help="gpu-check: print the parts only")
    return p


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    """Modes, sections, defaults and checks of the parsed command line (ConfigError)."""
    from mlcl.measure.bench import SECTIONS
    from mlcl.measure.harness import METHODS

    if "=" in a.what:  # an override in the place of WHAT
        a.overrides, a.what = [a.what, *a.overrides], "bench"
    a.mode = a.what if a.what in MODES else "bench"
    a.sections = list(SECTIONS) if a.what == "bench" else a.what.split(",")
    if a.mode == "bench" and not set(a.sections) <= set(SECTIONS):
        raise ConfigError(f"{a.what}: not a mode ({', '.join(MODES)}) or a list of bench "
                          f"sections ({', '.join(SECTIONS)})")
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.device == "cuda" and not torch.cuda.is_available() and not a.dry_run:
        raise ConfigError("--device cuda: no CUDA device is visible" + (
            "; --device cpu runs the parts on the CPU at toy sizes" * (a.mode == "gpu-check")))
    valid = METHODS if a.mode == "bench" else METHOD_NAMES
    a.methods = a.methods.split(",") if a.methods else None
    if a.methods is not None and (not a.methods or not set(a.methods) <= set(valid)):
        raise ConfigError(f"--methods {','.join(a.methods)}: valid are {', '.join(valid)}")
    if a.mode in ("rehearse", "costs") and not a.config:
        raise ConfigError(f"{a.mode}: give --config PRESET (a paper preset: "
                          f"{', '.join(PRESETS)})")
    a.config = a.config.split(",") if a.config else (list(PRESETS) if a.mode == "gpu-check"
                                                     else None)
    gpu, default_out = a.device == "cuda", {"bench": f"bench/bench_{a.device}.json",
                                            "rehearse": "rehearse", "gpu-check": "gpu-check"}
    a.steps = a.steps or ((20 if gpu else 5) if a.mode == "bench" else 3)
    if a.steps < 1:
        raise ConfigError(f"--steps {a.steps}: give 1 or more")
    a.out = Path(a.out) if a.out else paths.runs_dir() / default_out.get(a.mode, "")
    return a


def run(a: argparse.Namespace) -> int:
    from mlcl.measure import bench, gpu_check, rehearse
    from mlcl.measure.harness import FAMILIES

    if a.mode == "gpu-check":
        return gpu_check.gpu_check(a)
    if a.mode == "bench":
        if a.config and len(a.config) > 1:
            raise ConfigError("bench: --config takes one preset")
        a.config = a.config[0] if a.config else None
        cfg = load_config(a.config, a.overrides)
        a.methods, a.seed = a.methods or list(FAMILIES[cfg.mlcl.base]), cfg.seed
        r = bench.bench(a)
        atomic_write_json(a.out, r)
        print("\n".join([*bench.summary(r), f"wrote {a.out}"]))
        return 0
    for preset in a.config if a.mode == "costs" else []:
        print("\n".join(rehearse.cost_table(preset, a, preset_splits(preset))))
    reports = [rehearse.rehearse(preset, a) for preset in a.config if a.mode == "rehearse"]
    return 0 if all(r["ok"] for r in reports) else 1


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, 1 when a stage or part failed, 2 bad input (one line), 130 / 143
    interrupted (mlcl.errors)."""
    a = build_parser().parse_intermixed_args(argv)  # key=value before or after the options
    return run_reported(lambda: run(resolve(a)))

"""``python -m mlcl rehearse``: run a paper preset end to end on a small dataset with the real
layout, formats, image sizes and class count (fabricated, or yours with ``--data-root``) and a
backbone checkpoint with the real keys and shapes, before booking GPUs and downloading 14 GB.

    python -m mlcl rehearse --config pascal                      # every method, fabricated data
    python -m mlcl rehearse --config cityscapes split=1_8 --steps 2 --methods mlcl
    python -m mlcl rehearse --config pascal --data-root data/VOC2012 --weights pretrained/resnet50.pth
    python -m mlcl rehearse --config pascal_blended --costs      # cost of every cell, no training

For every method it runs, with the preset's own configuration (only data.root,
model.pretrained, train.max_iters, output_dir and the number of validation images changed;
on a CPU also the batch, to 2 per process, said in the summary): a few training steps, a
checkpoint, a resume, an evaluation in the preset's mode. One PASS / FAIL / SKIP line per
stage, then a summary: seconds per step, peak memory per process, FLOPs per step (counted by
torch.utils.flop_counter.FlopCounterMode), FLOPs of the whole schedule and its projected
GPU-hours at a sustained throughput (``--tflops``; default per dataset: what UniMatch's own
published runs sustained, see mlcl/rehearse/flops.py). Exit status: 0 all PASS, 1 a stage
failed, 2 bad input. Writes OUT/PRESET/rehearse.json. Modules: fabricate, flops, stages, run,
report, gpu_check (``make gpu-check``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mlcl import paths
from mlcl.config import METHOD_NAMES, CommandLineParser, ConfigError, preset_splits
from mlcl.errors import run_reported
from mlcl.rehearse.report import cost_table, summary_lines
from mlcl.rehearse.run import Options, flops_stage, make_plan, rehearse

__all__ = ["Options", "rehearse", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = CommandLineParser(prog="python -m mlcl rehearse", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a paper preset: pascal, pascal_blended, "
                                                   "pascal_blended_r101, cityscapes")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. split=1_8 train.mixed_precision=bf16")
    p.add_argument("--steps", type=int, default=3,
                   help="training steps before the checkpoint; the resume runs as many more "
                        "(default 3: the first step of each run is left out of the step time)")
    p.add_argument("--val-images", type=int, default=2, help="validation images (default 2)")
    p.add_argument("--batch", type=int, default=None,
                   help="per process (default: the preset's on GPU, 2 on CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available")
    p.add_argument("--data-root", default=None,
                   help="use this prepared dataset instead of a fabricated one (its lists "
                        "are cut to the rehearsal's size, in OUT/PRESET/lists)")
    p.add_argument("--weights", default=None,
                   help="use this backbone checkpoint instead of a fabricated one")
    p.add_argument("--methods", default=",".join(METHOD_NAMES),
                   help=f"comma-separated subset of {','.join(METHOD_NAMES)}")
    p.add_argument("--out", default=None, help="folder of the rehearsal (default runs/rehearse)")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs of the projected run (default: the preset's, VOC 2, Cityscapes 4)")
    p.add_argument("--tflops", type=float, default=None,
                   help="sustained TFLOP/s per GPU for the projection (default: VOC 4.1, "
                        "Cityscapes 9.4, what UniMatch's published runs sustained)")
    p.add_argument("--costs", action="store_true",
                   help="only the FLOPs and projected cost of every cell of the preset, as a "
                        "markdown table (no data, no training)")
    return p


def options(a: argparse.Namespace) -> Options:
    methods = tuple(m for m in a.methods.split(",") if m)
    bad = [m for m in methods if m not in METHOD_NAMES]
    if bad or not methods:
        raise ConfigError(f"--methods: {', '.join(bad) or 'none given'} (valid: "
                          f"{', '.join(METHOD_NAMES)})")
    out = Path(a.out) if a.out else paths.runs_dir() / "rehearse"
    return Options(out=out, steps=a.steps, val_images=a.val_images, batch=a.batch,
                   device=a.device, data_root=a.data_root, weights=a.weights, methods=methods,
                   gpus=a.gpus, tflops=a.tflops, overrides=list(a.overrides))


def costs(preset: str, o: Options) -> list[str]:
    """The cost table of every cell of ``preset`` (flops stage only)."""
    rows = []
    for cell in preset_splits(preset):
        plan = make_plan(preset, Options(**{**o.__dict__, "overrides": [*o.overrides,
                                                                          f"split={cell}"]}))
        for m in o.methods:
            rows.append({"cell": cell, "method": m, **flops_stage(plan, m, None, False)[1]})
    return cost_table(rows)


def main(argv: list[str] | None = None) -> int:
    """The command: exit status 0 all PASS, 1 a stage failed, 2 bad input, 130 / 143
    interrupted (mlcl.errors)."""
    a = build_parser().parse_intermixed_args(argv)  # key=value before or after the options
    return run_reported(lambda: run_command(a))


def run_command(a: argparse.Namespace) -> int:
    o = options(a)
    if a.costs:
        print("\n".join(costs(a.config, o)))
        return 0
    report = rehearse(a.config, o)
    print("\n".join(summary_lines(report)))
    print(f"wrote {o.out / a.config / 'rehearse.json'}")
    return 0 if report["ok"] else 1

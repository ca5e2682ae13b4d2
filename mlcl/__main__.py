"""Command line: python -m mlcl COMMAND [options] [key=value ...]

    python -m mlcl synth --out data/synthetic
    python -m mlcl train --config synthetic data.root=data/synthetic method=mlcl
    python -m mlcl evaluate --checkpoint runs/synthetic/1_16/mlcl-paper-s0/best.pt
    python -m mlcl predict --checkpoint runs/synthetic/1_16/mlcl-paper-s0 --images DIR --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from mlcl.errors import CommandLineParser, MlclError, run_reported


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a .pt file, or a run folder (its best.pt)")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def cmd_train(args) -> int:
    from accelerate import PartialState

    from mlcl.config import load_config
    from mlcl.train import fit

    cfg = load_config(args.config, args.overrides)
    metrics = fit(cfg)
    if not PartialState().is_main_process:  # under accelerate launch: one summary per run
        return 0
    print(json.dumps({k: metrics.get(k) for k in
                      ("method", "dataset", "split", "seed", "best_miou", "last_miou",
                       "wall_time_s")}))
    print(f"wrote {os.path.abspath(cfg.output_dir)}/ (best.pt, last.pt, metrics.json, "
          "config.yaml, checkpoints/, tensorboard/)")
    return 0


def is_evaluation(path) -> bool:
    """Whether ``path`` is a result JSON that ``evaluate --out`` wrote (so may be replaced)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"miou", "confusion", "checkpoint"} <= set(data)


def cmd_evaluate(args) -> int:
    from mlcl.data import preflight
    from mlcl.data.datasets import ValDataset
    from mlcl.engine import make_accelerator
    from mlcl.evaluate import evaluate
    from mlcl.files import atomic_write_json
    from mlcl.folders import check_output_file
    from mlcl.study.predict import load_weights

    if args.out:
        check_output_file(args.out, "--out", is_evaluation)
    model, cfg, names = load_weights(args.checkpoint, args.overrides, use_data=True)
    acc = make_accelerator(cfg)
    model = model.to(acc.device)
    val = {"val": ValDataset(cfg, cfg.split_path("val_split"))}
    preflight.check(cfg, val, acc)
    result = evaluate(model, val["val"], cfg, acc)
    if acc.is_main_process:
        print(f"mIoU {result['miou']:.2f} over {result['num_images']} images "
              f"({cfg.eval.mode})")
        for name, iou in zip(names, result["iou"]):
            print(f"  {name:>16s} {iou:6.2f}")
        if args.out:
            atomic_write_json(args.out, {**result, "class_names": names,
                                         "checkpoint": str(args.checkpoint)})
    acc.end_training()
    return 0


def cmd_predict(args) -> int:
    from mlcl.study.predict import load_weights, predict_images

    model, cfg, names = load_weights(args.checkpoint, args.overrides)
    limits = {k: getattr(args, k) for k in ("max_pixels", "tile") if getattr(args, k)}
    result = predict_images(model, cfg, names, args.images, args.out, overlay=args.overlay,
                            recursive=args.recursive, **limits)
    print(f"wrote {len(result.written)} files to {args.out}")
    if result.failed:
        raise MlclError(f"{len(result.failed)} file(s) skipped, the first: {result.failed[0]}",
                        exit_code=1)  # the others were predicted
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="python -m mlcl", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    from mlcl.study import demo, reproduce, synthetic

    p = sub.add_parser("synth", help="write the synthetic dataset")
    synthetic.add_synth_args(p)
    p.set_defaults(func=synthetic.run_synth)

    p = sub.add_parser("train", help="train a method (resumes when output_dir has a checkpoint)")
    p.add_argument("--config", default="synthetic",
                   help="preset name (mlcl/configs/NAME.yaml) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. method=mlcl data.root=DIR split=1_8")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="mIoU of a checkpoint on the validation split")
    _checkpoint_args(p)
    p.add_argument("--out", help="also write the result as JSON here (a new file, or one an "
                   "earlier evaluate wrote)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="palette PNG predictions for a folder of images")
    _checkpoint_args(p)
    p.add_argument("--images", required=True, help="an image, or a folder of images")
    p.add_argument("--recursive", action="store_true", help="also the images of sub-folders")
    p.add_argument("--out", required=True, help="a new (or empty) folder for the predictions: "
                   "<image name>.png, legend.png, legend.txt")
    p.add_argument("--overlay", action="store_true", help="also write image/prediction blends")
    p.add_argument("--max-pixels", type=positive_int,
                   help="larger images are skipped (default 25000000: "
                        "mlcl.study.predict.MAX_PIXELS)")
    p.add_argument("--tile", type=positive_int,
                   help="images above TILE x TILE pixels are predicted in overlapping "
                        "TILE x TILE windows (default mlcl.study.predict.TILE, 1024)")
    p.set_defaults(func=cmd_predict)

    from mlcl.prepare import cli as data_cli

    p = sub.add_parser("data", help="download / prepare / verify real datasets (data --help)",
                       description=data_cli.DESCRIPTION)
    data_cli.add_arguments(p)

    sub.add_parser("measure", help="bench, rehearse, costs, gpu-check (measure --help)")

    p = sub.add_parser("reproduce", help="run a grid of runs (skips complete ones)")
    reproduce.add_arguments(p)
    p.set_defaults(func=reproduce.main)

    p = sub.add_parser("figures", help="figures and tables of the results registry (notebooks/)")
    reproduce.add_figures_arguments(p)
    p.set_defaults(func=reproduce.figures_main)

    p = sub.add_parser("demo", help="the short CPU demo: synthetic data, train, evaluate")
    p.add_argument("--out", help="runs folder (default runs/demo)")
    p.set_defaults(func=demo.run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m mlcl ARGV``: the exit status; an error ends as one line (mlcl.errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["measure"]:  # it parses its whole argument list itself
        from mlcl.measure import main as measure_main

        return run_reported(lambda: measure_main(argv[1:]))
    args = build_parser().parse_args(argv)
    return run_reported(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Backbone checkpoints: torchvision's ImageNet ResNets into the torch hub cache, the official
DINOv2 files at pretrained/dinov2_{small,base,large}.pth (UniMatch V2's names), and a check
(size, sha256, exact load) of UniMatch's deep-stem files at pretrained/resnet{50,101}.pth.

    python data_scripts/fetch_pretrained.py --torchvision resnet50 resnet101
    python data_scripts/fetch_pretrained.py --dinov2 dinov2_s dinov2_b
    python data_scripts/fetch_pretrained.py --check pretrained/resnet50.pth pretrained/resnet101.pth

The same as `python -m mlcl data pretrained ...`; `--help` lists the options. Run-book:
docs/real_data.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout need not be installed

from mlcl.prepare.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pretrained", *sys.argv[1:]]))

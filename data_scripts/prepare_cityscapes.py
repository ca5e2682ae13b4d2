#!/usr/bin/env python3
"""Cityscapes (fine): the two zips from --zips or downloaded with your account, trainId
masks (cityscapesscripts' createTrainIdLabelImgs), UniMatch's split lists, verify.

    CITYSCAPES_USERNAME=me CITYSCAPES_PASSWORD=... python data_scripts/prepare_cityscapes.py
    python data_scripts/prepare_cityscapes.py --zips ~/Downloads   # zips already downloaded

The same as `python -m mlcl data cityscapes ...`; `--help` lists the options. Run-book:
docs/real_data.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout need not be installed

from mlcl.prepare.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["cityscapes", *sys.argv[1:]]))

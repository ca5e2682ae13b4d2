#!/usr/bin/env python3
"""Pascal VOC 2012 + SBD: download (resumable, md5-checked), build the 10,582 augmented
masks, fetch UniMatch's split lists, verify.

    python data_scripts/prepare_voc.py --root data/VOC2012
    python data_scripts/prepare_voc.py --root data/VOC2012 --aug ~/SegmentationClassAug.zip

The same as `python -m mlcl data voc ...`; `--help` lists the options. Run-book:
docs/real_data.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout need not be installed

from mlcl.prepare.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["voc", *sys.argv[1:]]))

#!/usr/bin/env python3
r"""Check a dataset against its split files: counts, files exist, image/mask sizes agree, mask
values in {0..K-1, 255}. Exit status 1 (and each bad file named) on any problem.

    python data_scripts/verify.py --root data/VOC2012 --layout voc
    python data_scripts/verify.py --root data/cityscapes --layout cityscapes \
        --splits splits/cityscapes/1_8/labeled.txt

The same as `python -m mlcl data verify ...`; `--help` lists the options. Run-book:
docs/real_data.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout need not be installed

from mlcl.prepare.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["verify", *sys.argv[1:]]))

#!/usr/bin/env python3
"""The standard split lists (UniMatch's, pinned to a commit, sha256 in PROVENANCE.json), or
seeded NON-STANDARD stand-ins when offline.

    python data_scripts/fetch_splits.py --dataset pascal --root data/VOC2012
    python data_scripts/fetch_splits.py --dataset cityscapes --root data/cityscapes --split-source generate

The same as `python -m mlcl data splits ...`; `--help` lists the options. Run-book:
docs/real_data.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout need not be installed

from mlcl.prepare.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["splits", *sys.argv[1:]]))

"""Shared fixtures: tiny synthetic datasets in the real folder layouts (written once per
session) and a config that points at the VOC-layout one."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlcl.config import load_config
from mlcl.study.synthetic import make_synthetic

SYNTH_SIZE = 32  # pixels; VOC-layout images are 32 x 32, Cityscapes-layout 32 x 64
SYNTH_CLASSES = 7


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory) -> Path:
    """MLCL_CACHE (the data pre-flight's cache) in a temporary folder, for this process and
    the subprocesses the tests start."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["MLCL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A VOC-layout synthetic dataset: 48 train / 8 val images at 32 px, 7 classes, with
    ImageSets/Segmentation/{train,val}.txt, splits/{train,val}.txt and
    splits/{1_32,...,1_2}/{labeled,unlabeled}.txt. Read-only: copy it to modify it."""
    return make_synthetic(tmp_path_factory.mktemp("synth_voc"), num_train=48, num_val=8,
                          size=SYNTH_SIZE, classes=SYNTH_CLASSES, seed=0, layout="voc")


@pytest.fixture(scope="session")
def synth_cityscapes_root(tmp_path_factory) -> Path:
    """A Cityscapes-layout synthetic dataset: 24 train / 6 val images of 32 x 64 px,
    7 classes, with splits/{train,val}.txt and splits/{1_32,...,1_2}/*.txt. Read-only."""
    return make_synthetic(tmp_path_factory.mktemp("synth_cityscapes"), num_train=24,
                          num_val=6, size=SYNTH_SIZE, classes=SYNTH_CLASSES, seed=0,
                          layout="cityscapes")


@pytest.fixture
def synth_cfg(synth_root):
    """A fresh synthetic-preset Config on ``synth_root`` (crop 32, split 1_8: 6 labeled,
    42 unlabeled, 8 val), with no DataLoader workers."""
    return load_config("synthetic", [f"data.root={synth_root}", f"data.crop_size={SYNTH_SIZE}",
                                     "data.num_workers=0", "split=1_8"])

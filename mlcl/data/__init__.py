"""Data: split files, datasets (labeled / unlabeled / val) and the synthetic generator.

    from mlcl.data import build_datasets
    sets = build_datasets(cfg, with_unlabeled=cfg.method != "supervised")
"""
from mlcl.data.classes import check_classes, reconcile_classes
from mlcl.data.datasets import (LabeledDataset, UnlabeledDataset, ValDataset, build_datasets,
                                class_names, load_image, load_mask)
from mlcl.data.splits import DataError, Sample, check_root, read_split
from mlcl.data.synthetic import make_synthetic

__all__ = ["DataError", "Sample", "read_split", "check_root", "LabeledDataset",
           "UnlabeledDataset", "ValDataset", "build_datasets", "class_names", "load_image",
           "load_mask", "make_synthetic", "check_classes", "reconcile_classes"]

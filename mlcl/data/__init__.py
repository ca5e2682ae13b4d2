"""Data: split files, datasets, classes, colours, pre-flight; the names below load on first
use, so that the torch-free modules (splits, classes, palette) do not load torch."""
import importlib

_WHERE = {"class_names": "mlcl.data.classes", "DataError": "mlcl.data.splits",
          "read_split": "mlcl.data.splits", **{name: "mlcl.data.datasets" for name in (
              "LabeledDataset", "UnlabeledDataset", "ValDataset", "build_datasets")}}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'mlcl.data' has no attribute {name!r}")

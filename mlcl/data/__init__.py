"""Data: split files, datasets (labeled / unlabeled / val), class names and colours, the
data pre-flight.

    from mlcl.data import build_datasets
    sets = build_datasets(cfg, with_unlabeled=cfg.method != "supervised")

The names below are imported on first use (as ``mlcl.build_model`` is), so that the modules
without torch (splits, classes, palette) load without it: data preparation, the
grid's checks and the figures use them.
"""
import importlib

_LAZY = {
    "mlcl.data.classes": ("check_classes", "class_names", "default_class_names",
                          "reconcile_classes"),
    "mlcl.data.datasets": ("LabeledDataset", "UnlabeledDataset", "ValDataset", "build_datasets",
                           "load_image", "load_mask"),
    "mlcl.data.splits": ("DataError", "Sample", "check_root", "read_split"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'mlcl.data' has no attribute {name!r}")

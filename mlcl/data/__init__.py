"""Data: split files, datasets (labeled / unlabeled / val), class names and colours, the
data pre-flight. The names below load on first use, so that the torch-free modules
(splits, classes, palette) serve data preparation and the figures without torch."""
import importlib

_LAZY = {"mlcl.data.classes": ("class_names",),
         "mlcl.data.datasets": ("LabeledDataset", "UnlabeledDataset", "ValDataset",
                                "build_datasets"),
         "mlcl.data.splits": ("DataError", "read_split")}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'mlcl.data' has no attribute {name!r}")

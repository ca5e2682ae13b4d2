"""mlcl: semi-supervised semantic segmentation with Multi-Level Consistency Learning.
build_model and fit load (torch) on first use, so the light commands do not."""
import importlib
import os

# Before torch allocates: its CPU tensors of 2 MB and more on transparent huge pages (Linux;
# kept if set). A fresh large tensor otherwise faults in 4 KB pages: a fifth of the prototype
# branch's CPU time (docs/performance.md, "The third pass").
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from mlcl.config import Config, ConfigError, load_config  # noqa: E402

__all__ = ["Config", "ConfigError", "load_config", "build_model", "fit"]
__version__ = "0.1.0"

_LAZY = {"build_model": "mlcl.model", "fit": "mlcl.train"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlcl' has no attribute {name!r}")

"""mlcl: semi-supervised semantic segmentation with Multi-Level Consistency Learning.
build_model and fit load (torch) on first use, so the light commands do not."""
import importlib

from mlcl.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "build_model", "fit"]
__version__ = "0.1.0"

_LAZY = {"build_model": "mlcl.model", "fit": "mlcl.train"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlcl' has no attribute {name!r}")

"""mlcl: semi-supervised semantic segmentation with Multi-Level Consistency Learning.

Public names: Config, ConfigError, load_config, build_model, fit (the last two are imported on
first use, so that the light commands, such as `synth`, `data splits` and `reproduce`, do not
load torch: tests/test_imports.py); evaluation is ``mlcl.evaluate.evaluate``."""
import importlib

from mlcl.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "build_model", "fit"]
__version__ = "0.1.0"

_LAZY = {"build_model": "mlcl.model", "fit": "mlcl.train"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlcl' has no attribute {name!r}")

"""mlcl: semi-supervised semantic segmentation with Multi-Level Consistency Learning."""
from mlcl.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config"]
__version__ = "0.1.0"

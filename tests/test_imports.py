"""The light modules stay light: importing them does not load torch (nor matplotlib / pandas
where they do not draw), which is why a few imports sit inside functions, each with a reason."""
from __future__ import annotations

import subprocess
import sys

import pytest

LIGHT = ["mlcl.config", "mlcl.__main__", "mlcl.errors", "mlcl.study.reproduce", "mlcl.study.demo",
         "mlcl.study.registry", "mlcl.prepare.cli", "mlcl.data.splits", "mlcl.data.classes",
         "mlcl.study.synthetic", "mlcl.data.palette"]


def loaded_by(modules: list[str]) -> list[str]:
    """The heavy libraries a fresh interpreter holds after importing ``modules``."""
    code = (f"import sys, {', '.join(modules)}; print(' '.join(m for m in ('torch', "
            "'matplotlib', 'pandas', 'sklearn', 'papermill') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.split()


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_load_no_heavy_library(module):
    assert loaded_by([module]) == []


def test_the_figures_code_does_not_load_torch():
    assert "torch" not in loaded_by(["mlcl.study.viz"])

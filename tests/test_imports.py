"""The light modules stay light: importing them does not load torch (nor matplotlib / pandas
where they do not draw, nor data preparation's scipy / requests), which is why a few imports
sit inside functions, each with a reason."""
from __future__ import annotations

import subprocess
import sys

import pytest

LIGHT = ["mlcl.config", "mlcl.__main__", "mlcl.errors", "mlcl.study.reproduce", "mlcl.study.demo",
         "mlcl.study.registry", "mlcl.prepare.cli", "mlcl.data.splits", "mlcl.data.classes",
         "mlcl.study.synthetic", "mlcl.data.palette"]


# torch, the study's libraries, data preparation's (extras of pyproject.toml)
HEAVY = ("torch", "matplotlib", "pandas", "sklearn", "papermill", "scipy", "requests")


def loaded_by(modules: list[str], then: str = "") -> list[str]:
    """The heavy libraries a fresh interpreter holds after importing ``modules`` and running
    the statements ``then``."""
    code = (f"import sys, {', '.join(modules)}\n{then}\n"
            f"print('loaded:', *(m for m in {HEAVY} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.split("loaded:")[-1].split()


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_load_no_heavy_library(module):
    assert loaded_by([module]) == []


def test_the_figures_code_does_not_load_torch():
    assert "torch" not in loaded_by(["mlcl.study.viz"])


def test_light_commands_load_no_heavy_library(tmp_path):
    """mlcl/__init__.py's promise: synth, data (but verify and pretrained), reproduce (up to
    its runs) and figures (up to its notebook) run without loading torch."""
    root = tmp_path / "cs"
    commands = [["synth", "--out", str(root), "--layout", "cityscapes", "--num-train", "8",
                 "--num-val", "3", "--size", "16"],
                ["data", "splits", "--dataset", "cityscapes", "--root", str(root), "--split-source",
                 "generate", "--expect", "train=8,val=3", "--force"],
                ["data", "pretrained"],  # nothing to do: an error before any download
                ["reproduce", "--grid", "demo", "--runs", str(tmp_path), "model.nope=1"],
                ["figures", "--registry", str(tmp_path / "none")]]
    then = f"codes = [main(c) for c in {commands}]\nassert codes == [0, 0, 2, 2, 2], codes"
    assert loaded_by(["mlcl.__main__"], f"from mlcl.__main__ import main\n{then}") == []

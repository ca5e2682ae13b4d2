"""The layout the package promises: a small core (what ``import mlcl.train`` loads) that
never loads a tool, and tools in subpackages of their own."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlcl

TOOLS = ("mlcl.study", "mlcl.prepare", "mlcl.measure", "mlcl.__main__")
PACKAGE = Path(mlcl.__file__).parent


def core_modules() -> list[str]:
    """The mlcl modules ``import mlcl.train`` loads, in a fresh interpreter."""
    code = ("import sys, mlcl.train; "
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('mlcl'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent)
    return out.stdout.split()


def test_the_core_loads_no_tool():
    core = core_modules()
    assert "mlcl.train" in core and "mlcl.methods" in core
    tools = [m for m in core if m.startswith(TOOLS)]
    assert tools == [], f"the core (import mlcl.train) loads tool modules: {tools}"


def test_no_core_module_imports_a_tool_even_lazily():
    """A tool imported inside a core function would enter the core at run time."""
    core = {m for m in core_modules() if m != "mlcl"}
    for name in core:
        path = PACKAGE.joinpath(*name.split(".")[1:])
        source = (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text()
        for tool in TOOLS:
            assert f"import {tool}" not in source and f"from {tool}" not in source, (name, tool)

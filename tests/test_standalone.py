"""The repository stands alone: code, docstrings, notebooks, configs and docs point to
docs/method.md, never to the planning notes kept outside the checkout (tests may compare
with them where they exist, so tests/ is not scanned)."""
from __future__ import annotations

import re

from mlcl.paths import REPO

OUTSIDE = re.compile(r"METHOD\.md|PAPER\.md|FEASIBILITY\.md|DESIGN\.md|\.\./shared|/work/shared")
SCANNED = ("mlcl", "docs", "notebooks", "data_scripts", "figures")
SUFFIXES = {".py", ".md", ".ipynb", ".yaml", ".yml", ".txt", ".toml", ".cfg"}


def test_nothing_outside_tests_points_outside_the_repository():
    files = [REPO / "README.md", REPO / "Makefile", REPO / "pyproject.toml"]
    files += [p for d in SCANNED for p in (REPO / d).rglob("*")
              if p.suffix in SUFFIXES and p.is_file() and ".ipynb_checkpoints" not in p.parts]
    assert len(files) > 50  # the scan found the package, docs and notebooks
    found = [f"{p.relative_to(REPO)}: {m.group()}" for p in files if p.is_file()
             for m in [OUTSIDE.search(p.read_text(errors="replace"))] if m]
    assert not found, found

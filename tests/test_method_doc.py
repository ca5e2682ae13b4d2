"""docs/method.md against the code: the published numbers equal mlcl/study/paper.py's (which
tests/test_viz.py compares with the paper's tables), every released switch is documented,
every `docs/method.md, "<section>"` reference in the package names a real section, and
nothing in the repository points outside it."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from mlcl.study import paper
from mlcl.config import RELEASED_QUIRKS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "method.md"
OUTSIDE = re.compile(r"\.\./shared|METHOD\.md|PAPER\.md|FEASIBILITY\.md|item [0-9]")


def _section(text: str, heading: str) -> str:
    """The body of the markdown section ``heading`` (up to the next heading of its level)."""
    level = heading.split(" ")[0]
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1:]
    stop = re.search(rf"^{level} ", rest, flags=re.M)
    return rest[:stop.start()] if stop else rest


def _table(body: str) -> tuple[list[str], dict[str, list[str]]]:
    """The first markdown table of ``body``: (header cells, row label -> cells)."""
    lines = body.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        block.append([c.strip() for c in line.strip().strip("|").split("|")])
    return block[0], {r[0]: r[1:] for r in block[2:]}


# the MLCL paper's tables; UniMatch V2's are in docs/real_data.md (tests/test_v2_data.py)
MLCL_TABLES = [key for key, t in paper.TABLES.items() if "docs/method.md" in t.source]


def _published_tables(text: str) -> dict[str, tuple[list[str], dict[str, list[str]]]]:
    numbers = _section(text, "## Published numbers")
    return {key: _table(_section(numbers, f"### Table {key}")) for key in MLCL_TABLES}


@pytest.mark.parametrize("key", MLCL_TABLES)
def test_published_numbers_in_the_doc_equal_paper_py(key):
    header, rows = _published_tables(DOC.read_text())[key]
    table = paper.TABLES[key]
    assert header[1:] == [c.label for c in table.columns]
    want = {paper.PUBLISHED_LABELS[m]: values for m, values in table.published.items()}
    assert set(rows) == set(want)
    for label, values in want.items():
        assert [float(v) for v in rows[label]] == list(values), label


def test_every_released_switch_is_documented_with_both_defaults():
    _, rows = _table(_section(DOC.read_text(), "## Paper versus release"))
    for quirk in RELEASED_QUIRKS:
        cells = rows[f"`mlcl.{quirk}`"]
        assert cells[:2] == ["false", "true"], quirk
    for key in ("`mlcl.alpha`", "`train.mix_partner`", "`train.lr_lag`",
                "`mlcl.released_passes`"):
        assert key in rows


def test_every_function_the_equation_table_names_exists():
    import importlib

    _, rows = _table(_section(DOC.read_text(), "## Equations and functions"))
    named = [n for cells in rows.values() for n in re.findall(r"`([\w.]+)`", cells[0])]
    assert len(named) >= len(rows) >= 15
    for name in named:
        obj = importlib.import_module("mlcl." + name.split(".")[0])
        for part in name.split(".")[1:]:
            obj = getattr(obj, part)  # AttributeError names what is missing
        assert callable(obj), name


def test_section_references_in_the_package_exist():
    headings = {m.group(1) for m in re.finditer(r"^#+ (.+)$", DOC.read_text(), flags=re.M)}
    cited = set()
    for path in (ROOT / "mlcl").rglob("*.py"):
        text = re.sub(r"\s+", " ", path.read_text())
        cited |= {(path.name, m.group(1)) for m in
                  re.finditer(r'docs/method\.md[,;:]? (?:sections? )?"([^"]+)"', text)}
    assert cited, "no references found: the pattern is out of date"
    missing = [(f, s) for f, s in cited if s not in headings]
    assert not missing, missing


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files", "mlcl", "docs", "notebooks", "README.md",
                              "data_scripts"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    hits = []
    for name in tracked.stdout.split():
        path = ROOT / name
        if path.is_file() and path.suffix in (".py", ".md", ".ipynb", ".yaml", ".txt"):
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if OUTSIDE.search(line):
                    hits.append(f"{name}:{n}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)

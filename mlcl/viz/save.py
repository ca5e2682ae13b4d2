"""Writing figures and tables into ``figures/``: PNG + PDF, CSV + LaTeX, and a JSON sidecar
whose caption names the runs a file came from; ``figures.json`` indexes them all."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

import matplotlib.pyplot as plt
import pandas as pd

from mlcl import paths
from mlcl.files import atomic_write_json
from mlcl.viz.tables import SYNTHETIC_MARK, SYNTHETIC_STAMP


def _caption(caption: str, runs: Iterable[str], synthetic: bool) -> str:
    runs = sorted(set(runs))
    shown = ", ".join(runs[:24]) + (f" and {len(runs) - 24} more" if len(runs) > 24 else "")
    prefix = "SYNTHETIC-DATA RESULTS. " if synthetic else ""
    return f"{prefix}{caption} Produced by notebooks/figures.ipynb (mlcl.viz) from " \
           f"{len(runs)} run(s){': ' + shown if runs else ''}."


def _sidecar(directory: Path, name: str, caption: str, runs, synthetic: bool, files) -> None:
    atomic_write_json(directory / f"{name}.json", {
        "name": name, "caption": caption, "runs": sorted(set(runs)), "synthetic": synthetic,
        "files": [p.name for p in files], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def stamp_synthetic(fig: plt.Figure) -> None:
    """Put the synthetic-data mark on the picture itself (above everything, the saved
    bounding box grows to hold it), so that a PNG shown or pasted anywhere says what it is."""
    if any(t.get_text() == SYNTHETIC_STAMP for t in fig.texts):
        return  # saved twice
    fig.text(0.5, 1.0, SYNTHETIC_STAMP, ha="center", va="bottom", fontsize=8, color="white",
             fontweight="bold", bbox={"facecolor": "#b2182b", "edgecolor": "none", "pad": 3})


def save_figure(fig: plt.Figure, name: str, caption: str, runs: Iterable[str] = (),
                synthetic: bool = False, directory: str | Path | None = None) -> list[Path]:
    """Write ``<name>.png`` and ``<name>.pdf`` (caption in their metadata; a synthetic
    figure also gets the mark on the picture) and ``<name>.json`` (caption, runs) into
    ``directory`` (default: mlcl.paths.figures_dir())."""
    runs = list(runs)
    if synthetic:
        stamp_synthetic(fig)
    d = Path(directory) if directory else paths.figures_dir()
    d.mkdir(parents=True, exist_ok=True)
    text = _caption(caption, runs, synthetic)
    files = [d / f"{name}.png", d / f"{name}.pdf"]
    fig.savefig(files[0], dpi=150, bbox_inches="tight", metadata={"Description": text})
    fig.savefig(files[1], bbox_inches="tight", metadata={"Subject": text, "Title": name})
    _sidecar(d, name, text, runs, synthetic, files)
    return files


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
          "_": r"\_", "{": r"\{", "}": r"\}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX.get(c, c) for c in text)


def save_table(df: pd.DataFrame, name: str, caption: str, runs: Iterable[str] = (),
               synthetic: bool = False, values: pd.DataFrame | None = None,
               directory: str | Path | None = None) -> list[Path]:
    """Write ``<name>.csv``, ``<name>.tex`` (with the caption), ``<name>.json`` and, when
    given, the numbers behind the table as ``<name>_values.csv``."""
    runs = list(runs)
    d = Path(directory) if directory else paths.figures_dir()
    d.mkdir(parents=True, exist_ok=True)
    text = _caption(caption, runs, synthetic)
    files = [d / f"{name}.csv", d / f"{name}.tex"]
    df.to_csv(files[0])
    tex = df.to_latex(caption=_latex_escape(text), label=f"tab:{name}", escape=True,
                      multirow=True) if not df.empty else f"% {text}\n% (empty table)\n"
    files[1].write_text(tex.replace("±", r"$\pm$").replace(SYNTHETIC_MARK, r"\dag{}")
                        .replace("Δ", r"$\Delta$").replace("—", "--"))
    if values is not None:
        files.append(d / f"{name}_values.csv")
        values.to_csv(files[-1], index=False)
    _sidecar(d, name, text, runs, synthetic, files)
    return files


def write_index(directory: str | Path | None = None, extra: dict | None = None) -> Path:
    """``figures.json``: every sidecar (figure or table) in the directory, for the README."""
    d = Path(directory) if directory else paths.figures_dir()
    items = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))
             if p.name != "figures.json"]
    return atomic_write_json(d / "figures.json", {"items": items, **(extra or {})})

"""Figures (``plot_*``) and tables (``*_table``: strings; ``*_values``: numbers) from the
registry or mlcl.study.explore, saved with a JSON sidecar naming the runs (``save_*``).
mIoU in %; "mean ± std (n=k)" over seeds (ddof=1); "†": synthetic data."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from mlcl.data.classes import default_class_names
from mlcl.data.palette import colourise, palette_for
from mlcl.files import atomic_write_json
from mlcl.study import paper
from mlcl.study.registry import check_comparable, figures_dir, run_fields, runs_frame

NOT_RUN = "not run"
SYNTHETIC_MARK = "†"
SYNTHETIC_STAMP = "SYNTHETIC DATA (shapes set): not Pascal VOC / Cityscapes results"
SYNTHETIC_NOTE = ("† run on synthetic data (the synthetic shapes set, short CPU schedules): "
                  "not comparable with the published VOC / Cityscapes numbers.")
# (method, variant) -> label, in table order
METHOD_LABELS = {("supervised", ""): "Supervised", ("unimatch", ""): "UniMatch",
                 ("unimatch_v2", ""): "UniMatch V2", ("mlcl", "paper"): "MLCL (paper variant)",
                 ("mlcl", "released"): "MLCL (released variant)"}
COLOURS = {"Supervised": "#7f7f7f", "UniMatch": "#1f77b4", "UniMatch V2": "#17becf",
           "MLCL (paper variant)": "#d62728", "MLCL (released variant)": "#ff7f0e"}
NOT_PUBLISHED = "not published"
ABLATION_LABELS = {"": "MLCL (all components)", "no_p2p": "without L_p2p",
                   "no_dt": "without L_dt", "no_mask": "without F_mk (SAI masking)",
                   "no_noise": "without F_ne (SAI noise)", "no_sai": "without SAI",
                   "mixed": "F_1, F_2 CutMixed from features (mlcl.weak_features=mixed)"}


def results_kind(entries: list[dict]) -> str:
    """'Short demo' when every synthetic entry is of the ``demo`` grid, else 'Synthetic study'."""
    grids = {e.get("grid") for e in entries if e.get("synthetic")}
    return "Short demo" if grids == {"demo"} else "Synthetic study"


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample std (ddof=1; NaN for one value), n) of the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def _best_last(sel: pd.DataFrame) -> dict[str, float | int]:
    """best_mean, best_std, last_mean, last_std and n (runs) of the rows ``sel``."""
    bm, bs, n = mean_std(sel.best_miou)
    lm, ls, _ = mean_std(sel.last_miou)
    return {"best_mean": bm, "best_std": bs, "last_mean": lm, "last_std": ls, "n": n}


def fmt(mean: float, std: float, n: int, synthetic: bool = False, signed: bool = False) -> str:
    """'mean ± std (n=k)' (no ± for one run); NOT_RUN when n == 0; † when synthetic."""
    if n == 0:
        return NOT_RUN
    text = f"{mean:{'+' if signed else ''}.2f}" + (f" ± {std:.2f}" if n > 1 else "") + f" (n={n})"
    return text + (f" {SYNTHETIC_MARK}" if synthetic else "")


def _complete(entries: list[dict]) -> pd.DataFrame:
    return runs_frame(entries).query("complete")


def paper_table_values(entries: list[dict], key: str) -> pd.DataFrame:
    """Table ``key`` long: per (column, method of the table) the published and our best/last
    numbers (a column naming a backbone takes only runs of that model.backbone)."""
    t = paper.TABLES[key]
    df = _complete(entries)
    rows = []
    for col in t.columns:
        for (method, variant), label in METHOD_LABELS.items():
            if method not in t.methods:
                continue
            sel = df[(df.preset == col.preset) & (df.split == col.split) & (df.method == method)
                     & (df.variant == variant) & (df.ablation == "")
                     & (df.backbone == col.backbone if col.backbone else True)]
            rows.append({"table": key, "column": col.label, "preset": col.preset,
                         "split": col.split, "backbone": col.backbone, "method": method,
                         "variant": variant, "label": label,
                         "published": t.value(method, col.preset, col.split, col.backbone),
                         **_best_last(sel), "synthetic": bool(sel.synthetic.any()),
                         "runs": list(sel.name)})
    return pd.DataFrame(rows)


def paper_table(entries: list[dict], key: str) -> pd.DataFrame:
    """Table ``key`` as the paper lays it out, our best- and last-epoch rows added."""
    t = paper.TABLES[key]
    values = paper_table_values(entries, key)
    cols = [c.label for c in t.columns]
    out: dict[tuple[str, str], list[str]] = {}
    for pkey, plabel in paper.PUBLISHED_LABELS.items():
        if pkey not in t.methods:
            continue
        group = plabel.split(" (")[0]
        out[(group, f"published: {plabel}")] = [f"{v:.2f}" for v in t.published[pkey]] \
            if pkey in t.published else [NOT_PUBLISHED] * len(cols)
        for method, variant in (mv for mv in METHOD_LABELS if mv[0] == pkey):
            v = values[(values.method == method) & (values.variant == variant)]
            v = v.set_index("column").loc[cols]
            tag = "ours" if method != "mlcl" else f"ours, {variant} variant"
            for which in ("best", "last"):
                out[(group, f"{tag}, {which} epoch")] = [
                    fmt(r[f"{which}_mean"], r[f"{which}_std"], r["n"], r["synthetic"])
                    for _, r in v.iterrows()]
    index = pd.MultiIndex.from_tuples(list(out), names=["method", "row"])
    return pd.DataFrame(list(out.values()), index=index, columns=cols)


def paper_table_caption(entries: list[dict], key: str) -> str:
    """The caption saved with :func:`paper_table` ``(entries, key)``."""
    t = paper.TABLES[key]
    return (f"Table {key}: {t.title}. mIoU (%). 'published': {t.source}. 'ours': mean ± std "
            f"over seeds (n = runs) at the best and at the last evaluated epoch, from the "
            f"results registry. '{NOT_RUN}': no complete run in the registry. {SYNTHETIC_NOTE}")


def synthetic_values(entries: list[dict]) -> pd.DataFrame:
    """Synthetic runs (no ablation) per (preset, split, iterations, method, variant): best/last,
    the gain over supervised paired by seed (``gain_*``), MLCL's over UniMatch (``vs_uni_*``)."""
    df = _complete(entries)
    df = df[df.synthetic & (df.ablation == "")]
    rows = []
    for (preset, split, iters), g in df.groupby(["preset", "split", "iterations"], sort=True):
        sup = g[g.method == "supervised"]
        uni = g[g.method == "unimatch"]
        for (method, variant), label in METHOD_LABELS.items():
            sel = g[(g.method == method) & (g.variant == variant)]
            if sel.empty:
                continue
            gain = _paired(sel, sup if method != "supervised" else sup.iloc[:0], "gain")
            vs_uni = _paired(sel, uni if method == "mlcl" else uni.iloc[:0], "vs_uni")
            rows.append({"preset": preset, "split": split, "iterations": int(iters),
                         "method": method, "variant": variant, "label": label,
                         **_best_last(sel), **gain, **vs_uni, "runs": list(sel.name)})
    return pd.DataFrame(rows)


def _paired(sel: pd.DataFrame, ref: pd.DataFrame, prefix: str) -> dict[str, float | int]:
    """Best-epoch ``sel - ref`` paired by seed: ``<prefix>_mean/_std/_n/_positive``."""
    ref_by_seed = ref.set_index("seed").best_miou
    diffs = [b - ref_by_seed[s] for s, b in zip(sel.seed, sel.best_miou)
             if s in ref_by_seed.index]
    m, sd, n = mean_std(diffs)
    return {f"{prefix}_mean": m, f"{prefix}_std": sd, f"{prefix}_n": n,
            f"{prefix}_positive": int(sum(d > 0 for d in diffs))}


def _paired_text(mean: float, std: float, n: int, positive: int, missing: str) -> str:
    return missing if not n else fmt(mean, std, n, signed=True) + f", {positive}/{n} > 0"


def synthetic_table(entries: list[dict]) -> pd.DataFrame:
    """:func:`synthetic_values` as strings, rows (preset, method)."""
    v = synthetic_values(entries)
    if v.empty:
        return pd.DataFrame()
    table: dict[tuple[str, str], dict[tuple[str, str], str]] = {}
    for r in v.itertuples():
        row = table.setdefault((r.preset, r.label), {})
        cell = f"{r.split}, {r.iterations} it."
        row[(cell, "best")] = fmt(r.best_mean, r.best_std, r.n)
        row[(cell, "last")] = fmt(r.last_mean, r.last_std, r.n)
        row[(cell, "gain vs supervised")] = "—" if r.method == "supervised" else _paired_text(
            r.gain_mean, r.gain_std, r.gain_n, r.gain_positive,
            "no supervised run of the same seed and schedule")
        row[(cell, "MLCL vs UniMatch")] = "—" if r.method != "mlcl" else _paired_text(
            r.vs_uni_mean, r.vs_uni_std, r.vs_uni_n, r.vs_uni_positive,
            "no UniMatch run of the same seed and schedule")
    out = pd.DataFrame.from_dict(table, orient="index")
    out.index = pd.MultiIndex.from_tuples(out.index, names=["data", "method"])
    out.columns = pd.MultiIndex.from_tuples(out.columns, names=["split, schedule", ""])
    return out.fillna(NOT_RUN)


def ablation_values(entries: list[dict]) -> pd.DataFrame:
    """MLCL (paper variant) with each component off, per (preset, split, iterations): best/last
    and the paired difference to the full method (``delta_*``); UniMatch as the reference."""
    df = _complete(entries)
    rows = []
    mlcl = df[(df.method == "mlcl") & (df.variant == "paper")]
    for (preset, split, iters), g in mlcl.groupby(["preset", "split", "iterations"]):
        if (g.ablation == "").all():
            continue
        full = g[g.ablation == ""]
        uni = df[(df.method == "unimatch") & (df.preset == preset) & (df.split == split)
                 & (df.iterations == iters) & (df.ablation == "")]
        order = [a for a in ABLATION_LABELS if a in set(g.ablation)]
        order += sorted(set(g.ablation) - set(order))
        groups = [(a, ABLATION_LABELS.get(a, a), g[g.ablation == a]) for a in order]
        groups.append(("unimatch", "UniMatch (reference: neither FKA nor SAI)", uni))
        for abl, label, sel in groups:
            if sel.empty:
                continue
            delta = _paired(sel, full if abl else full.iloc[:0], "delta")
            rows.append({"preset": preset, "split": split, "iterations": int(iters),
                         "ablation": abl, "label": label, **_best_last(sel), **delta,
                         "synthetic": bool(sel.synthetic.any()),
                         "runs": list(sel.name)})
    return pd.DataFrame(rows)


def ablation_table(entries: list[dict]) -> pd.DataFrame:
    """The display table of :func:`ablation_values`, rows (cell, variant)."""
    v = ablation_values(entries)
    if v.empty:
        return pd.DataFrame()
    return pd.DataFrame({
        "best epoch": [fmt(r.best_mean, r.best_std, r.n, r.synthetic) for r in v.itertuples()],
        "last epoch": [fmt(r.last_mean, r.last_std, r.n, r.synthetic) for r in v.itertuples()],
        "Δ best vs all components": [
            "—" if r.ablation == "" else "no full-method run of the same seed"
            if not r.delta_n else fmt(r.delta_mean, r.delta_std, r.delta_n, signed=True)
            for r in v.itertuples()]},
        index=pd.MultiIndex.from_arrays(
            [[f"{r.preset} {r.split}, {r.iterations} it." for r in v.itertuples()], v.label],
            names=["cell", "variant"]))


def qualitative_runs(entries: list[dict], preset: str | None = None, split: str | None = None,
                     seed: int | None = None) -> dict[str, dict]:
    """{'Supervised', 'UniMatch', 'MLCL': entry} with a best.pt of one (preset, split, seed)
    cell, by default the one with the most of them (real data first)."""
    df = _complete(entries)
    df = df[(df.ablation == "") & df.output_dir.notna()]
    df = df[[(Path(d) / "best.pt").is_file() for d in df.output_dir]]
    for col, want in (("preset", preset), ("split", split), ("seed", seed)):
        if want is not None:
            df = df[df[col] == want]
    if df.empty:
        return {}
    slots = ("Supervised", "UniMatch", "MLCL")
    df = df.assign(slot=[METHOD_LABELS.get((m, v), "").split(" (")[0] or None
                         for m, v in zip(df.method, df.variant)])
    df = df[df.slot.isin(slots)]
    score = df.groupby(["preset", "split", "seed"]).agg(k=("slot", "nunique"),
                                                        syn=("synthetic", "any"))
    best = score.assign(syn=score.syn.astype(int)).sort_values(
        ["k", "syn"], ascending=[False, True]).index[0]
    cell = df[(df.preset == best[0]) & (df.split == best[1]) & (df.seed == best[2])]
    by_name = {e["name"]: e for e in entries}
    out = {}
    for s in slots:
        rows = cell[cell.slot == s].sort_values("variant", ascending=True)  # paper < released
        if not rows.empty:
            out[s] = by_name[rows.name.iloc[0]]
    return out


def _caption(caption: str, runs: Iterable[str], synthetic: bool) -> str:
    runs = sorted(set(runs))
    shown = ", ".join(runs[:24]) + (f" and {len(runs) - 24} more" if len(runs) > 24 else "")
    prefix = "SYNTHETIC-DATA RESULTS. " if synthetic else ""
    return f"{prefix}{caption} Produced by notebooks/figures.ipynb (mlcl.study.viz) from " \
           f"{len(runs)} run(s){': ' + shown if runs else ''}."


def _sidecar(directory: Path, name: str, caption: str, runs, synthetic: bool, files) -> None:
    atomic_write_json(directory / f"{name}.json", {
        "name": name, "caption": caption, "runs": sorted(set(runs)), "synthetic": synthetic,
        "files": [p.name for p in files], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _folder(directory: str | Path | None) -> Path:
    d = Path(directory) if directory else figures_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_figure(fig: plt.Figure, name: str, caption: str, runs: Iterable[str] = (),
                synthetic: bool = False, directory: str | Path | None = None) -> list[Path]:
    """``<name>.png``, ``.pdf`` and ``.json`` into ``directory``; synthetic: marked on the PNG."""
    runs = list(runs)
    if synthetic and not any(t.get_text() == SYNTHETIC_STAMP for t in fig.texts):
        fig.text(0.5, 1.0, SYNTHETIC_STAMP, ha="center", va="bottom", fontsize=8, color="white",
                 fontweight="bold", bbox={"facecolor": "#b2182b", "edgecolor": "none", "pad": 3})
    d, text = _folder(directory), _caption(caption, runs, synthetic)
    files = [d / f"{name}.png", d / f"{name}.pdf"]
    fig.savefig(files[0], dpi=150, bbox_inches="tight", metadata={"Description": text})
    fig.savefig(files[1], bbox_inches="tight", metadata={"Subject": text, "Title": name})
    _sidecar(d, name, text, runs, synthetic, files)
    return files


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
          "_": r"\_", "{": r"\{", "}": r"\}"}


def save_table(df: pd.DataFrame, name: str, caption: str, runs: Iterable[str] = (),
               synthetic: bool = False, values: pd.DataFrame | None = None,
               directory: str | Path | None = None) -> list[Path]:
    """``<name>.csv``, ``.tex``, ``.json`` and ``values`` as ``<name>_values.csv``."""
    runs = list(runs)
    d, text = _folder(directory), _caption(caption, runs, synthetic)
    files = [d / f"{name}.csv", d / f"{name}.tex"]
    df.to_csv(files[0])
    latex_text = "".join(_LATEX.get(c, c) for c in text)
    tex = df.to_latex(caption=latex_text, label=f"tab:{name}", escape=True,
                      multirow=True) if not df.empty else f"% {text}\n% (empty table)\n"
    files[1].write_text(tex.replace("±", r"$\pm$").replace(SYNTHETIC_MARK, r"\dag{}")
                        .replace("Δ", r"$\Delta$").replace("—", "--"))
    if values is not None:
        files.append(d / f"{name}_values.csv")
        values.to_csv(files[-1], index=False)
    _sidecar(d, name, text, runs, synthetic, files)
    return files


def write_index(directory: str | Path | None = None, extra: dict | None = None) -> Path:
    """``figures.json``: every sidecar in the directory."""
    d = Path(directory) if directory else figures_dir()
    items = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))
             if p.name != "figures.json"]
    return atomic_write_json(d / "figures.json", {"items": items, **(extra or {})})


LOSS_NOTE = ("training loss: L_x, the cross-entropy on labeled images, the one term every "
             "method has (their total losses add different terms: not comparable); per log "
             "(every train.log_every iterations, TensorBoard), else per epoch (mean)")


def logged_loss(output_dir: str | None) -> tuple[list[int], list[float]]:
    """(iterations, L_x) a run logged to TensorBoard every train.log_every iterations, the
    last value of an iteration logged twice (a resume); empty without its logs."""
    folder = Path(output_dir) / "tensorboard" if output_dir else None
    if folder is None or not folder.is_dir():
        return [], []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    if "train/x" not in logs.Tags()["scalars"]:
        return [], []
    by_it = {e.step: e.value for e in logs.Scalars("train/x")}
    return sorted(by_it), [by_it[i] for i in sorted(by_it)]


def plot_training_curves(entries: list[dict], title: str = "") -> plt.Figure:
    """Validation mIoU and the labeled loss L_x (:data:`LOSS_NOTE`) per iteration, one line
    per run; a note on the loss panel when no run has two points of it."""
    fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(10, 3.6))
    seen, points = set(), []
    for e in sorted(entries, key=lambda e: e.get("name", "")):
        df = runs_frame([e]).iloc[0]
        label = METHOD_LABELS.get((df.method, df.variant), f"{df.method} {df.variant}".strip())
        if df.ablation:
            label += f" [{df.ablation}]"
        ep = (e.get("metrics") or {}).get("epochs") or []
        kw = {"color": COLOURS.get(label), "alpha": 0.8, "label": None if label in seen else label}
        ev = [r for r in ep if "miou" in r]
        ax_m.plot([r["iteration"] for r in ev], [r["miou"] for r in ev], marker="o", ms=3, **kw)
        its, loss = logged_loss(df.output_dir)
        if len(its) < 2:
            its, loss = [r["iteration"] for r in ep if "x" in r], [r["x"] for r in ep if "x" in r]
        ax_l.plot(its, loss, marker="o" if len(its) < 30 else None, ms=3, **kw)
        points.append(len(its))
        seen.add(label)
    ax_m.set(xlabel="iteration", ylabel="validation mIoU (%)", title="validation mIoU")
    ax_l.set(xlabel="iteration", ylabel="L_x (labeled cross-entropy)",
             title="training loss L_x (comparable across methods)", yscale="log")
    if max(points, default=0) < 2:
        ax_l.text(0.5, 0.5, "no L_x recorded" if not any(points) else
                  "one L_x point per run: a curve needs two logs\n(train.log_every) or epochs",
                  ha="center", va="center", fontsize=8, transform=ax_l.transAxes)
    for ax in (ax_m, ax_l):
        ax.grid(alpha=0.3)
    if seen:
        ax_m.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.text(0.5, 0.0, LOSS_NOTE, ha="center", va="top", fontsize=7, wrap=True)
    return fig


def seeds_text(n: pd.Series) -> str:
    """'1 seed' or 'mean ± std over 3 seeds' (or '2-3 seeds')."""
    lo, hi = int(n.min()), int(n.max())
    if hi == 1:
        return "1 seed"
    return f"mean ± std over {lo}{'' if lo == hi else f'-{hi}'} seeds"


def plot_synthetic_study(values: pd.DataFrame, title: str = "") -> plt.Figure:
    """Best-epoch mIoU per split, one bar per method (mean ± std over seeds)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    if values.empty:
        ax.text(0.5, 0.5, "no synthetic runs in the registry", ha="center", transform=ax.transAxes)
        return fig
    many = values.preset.nunique() > 1
    name = lambda r: f"{r.preset + ' ' if many else ''}{r.split}\n{r.iterations} it."  # noqa: E731
    cells = list(dict.fromkeys(name(r) for r in values.itertuples()))
    labels = list(dict.fromkeys(values.label))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        v = values[values.label == label]
        x = [cells.index(name(r)) + (i - (len(labels) - 1) / 2) * width
             for r in v.itertuples()]
        bars = ax.bar(x, v.best_mean, width, label=label, color=COLOURS.get(label))
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        several = (v.n > 1).to_numpy()
        if several.any():
            ax.errorbar(np.asarray(x)[several], v.best_mean[several], yerr=v.best_std[several],
                        fmt="none", ecolor="k", capsize=3, lw=1)
    ax.set_xticks(range(len(cells)), cells)
    head = f"{title}: " if title else ""
    ax.set(ylabel="best-epoch mIoU (%)", ylim=(0, 100),
           title=f"{head}best-epoch validation mIoU ({seeds_text(values.n)})")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _colour(mask: np.ndarray, dataset: str) -> np.ndarray:
    return np.asarray(colourise(mask, dataset).convert("RGB"))


IGNORE_LABEL = "ignore (255): object edges, not scored"


def class_legend(fig: plt.Figure, class_names: list[str], dataset: str, ignore: bool = True,
                 title: str = "class colours") -> None:
    """A legend of the class colours (and the ignore label's) below the panels."""
    colours = palette_for(dataset) / 255.0
    handles = [Patch(facecolor=colours[k], edgecolor="0.4", label=name)
               for k, name in enumerate(class_names)]
    if ignore:
        handles.append(Patch(facecolor=colours[255], edgecolor="0.4", label=IGNORE_LABEL))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=7,
               ncol=min(len(handles), 5), frameon=False, title=title, title_fontsize=7)


def plot_prediction_grid(samples: dict[str, Any], title: str = "") -> plt.Figure:
    """Images, each model's prediction and ground truth (Fig. 6) of explore.predict_val."""
    columns = ["Image", *samples["preds"], "Ground truth"]
    n = len(samples["images"])
    fig, axes = plt.subplots(n, len(columns), figsize=(1.9 * len(columns), 1.9 * n), squeeze=False)
    for i in range(n):
        tiles = [samples["images"][i]]
        tiles += [_colour(p[i], samples["dataset"]) for p in samples["preds"].values()]
        tiles.append(_colour(samples["targets"][i], samples["dataset"]))
        for j, tile in enumerate(tiles):
            axes[i, j].imshow(tile, interpolation="nearest")
            axes[i, j].set(xticks=[], yticks=[])
            if i == 0:
                axes[i, j].set_title(columns[j], fontsize=9)
        axes[i, 0].set_ylabel(str(samples["ids"][i]).split("/")[-1], fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    class_legend(fig, samples["class_names"], samples["dataset"],
                 title="class colours (predictions and ground truth)")
    return fig


ROW_LABEL_SIZE = 10  # the perturbation grid's per-image v, r, a and fraction dropped


def plot_perturbations(views: dict[str, Any], cfg, title: str = "",
                       class_names: list[str] | None = None) -> plt.Figure:
    """Per image: the views, attention A, keep mask, features F_w, F_s, F_mk, F_ne (one PCA
    per image) and predictions p_w, p_m, p_n of :func:`mlcl.study.explore.sai_views`."""
    from mlcl.study.explore import denormalise, pca_rgb

    cols = ["weak u_w", "strong s1", "attention A", "keep (white)", "F_w", "F_s", "F_mk", "F_ne",
            "p_w", "p_m", "p_n"]
    n = views["w"].shape[0]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.45 * len(cols), 1.6 * n), squeeze=False)
    ds = cfg.data.dataset
    for i in range(n):
        feats = pca_rgb([views[k][i] for k in ("f_w", "f_s", "f_mk", "f_ne")])
        tiles = [denormalise(views["w"][i], cfg), denormalise(views["s"][i], cfg),
                 views["attention"][i].numpy(), views["keep"][i].float().numpy(), *feats,
                 *[_colour(views[k][i].argmax(0).numpy(), ds) for k in ("p_w", "p_m", "p_n")]]
        for j, tile in enumerate(tiles):
            ax = axes[i, j]
            cmap = "viridis" if j == 2 else ("gray" if j == 3 else None)
            ax.imshow(tile, cmap=cmap, interpolation="nearest",
                      **({"vmin": 0, "vmax": 1} if j == 3 else {}))
            ax.set(xticks=[], yticks=[])
            if i == 0:
                ax.set_title(cols[j], fontsize=10)
        axes[i, 0].set_ylabel(f"v={views['v'][i]:.2f}\nr={views['mask_ratio'][i]:.2f} "
                              f"a={views['amplitude'][i]:.2f}\ndropped "
                              f"{100 * views['dropped'][i]:.0f}%", fontsize=ROW_LABEL_SIZE)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    names = class_names or cfg.data.class_names or default_class_names(cfg.data.num_classes)
    class_legend(fig, names, ds, ignore=False, title="class colours of p_w, p_m, p_n")
    return fig


def plot_sai_response(views_by_variant: dict[str, dict[str, Any]], kappa: float,
                      title: str = "") -> plt.Figure:
    """SAI's r(v) and a(v) per variant with the batch's images, and the fraction dropped."""
    import torch

    from mlcl import losses, released

    grid = torch.linspace(-1, 1, 201)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    styles = {"paper": ("#d62728", "o"), "released": ("#ff7f0e", "s")}
    for variant, views in views_by_variant.items():
        colour, marker = styles.get(variant, ("k", "x"))
        ratio = released.sai_mask_ratio_twice if variant == "released" else losses.sai_mask_ratio
        axes[0].plot(grid, ratio(grid, kappa), color=colour, label=f"r(v), {variant}")
        axes[0].scatter(views["v"], views["mask_ratio"], color=colour, marker=marker, s=18)
        axes[2].scatter(views["v"], 100 * views["dropped"], color=colour, marker=marker,
                        s=18, label=variant)
        if variant == "paper" or len(views_by_variant) == 1:
            axes[1].plot(grid, losses.sai_amplitude(grid, kappa), color="k",
                         label="a(v), both variants")
            axes[1].scatter(views["v"], views["amplitude"], color="k", s=18)
    axes[0].set(xlabel="similarity v", ylabel="mask threshold centre r",
                title="masking: keep A < t·max A, t ~ U(r±0.1)")
    axes[1].set(xlabel="similarity v", ylabel="noise amplitude a", title="noise: ε ~ U(−a, a)")
    axes[2].set(xlabel="similarity v", ylabel="positions dropped (%)",
                title="mask actually applied")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def sai_table(views_by_variant: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Per image: v, and per variant r, the fraction dropped, a, L_m and L_n."""
    cols = {}
    for variant, v in views_by_variant.items():
        cols["v"] = v["v"].numpy()
        for key, name in (("mask_ratio", "r"), ("dropped", "dropped"), ("amplitude", "a"),
                          ("mse_m", "L_m"), ("mse_n", "L_n")):
            cols[f"{name} ({variant})"] = v[key].float().numpy()
    return pd.DataFrame(cols).rename_axis("image")


def plot_prototypes(sets: list, dataset: str = "synthetic") -> plt.Figure:
    """Per checkpoint (rows): its prototypes (K x C heatmap) and their pairwise cosines."""
    fig, axes = plt.subplots(len(sets), 2, figsize=(10, 2.6 * len(sets)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]})
    for row, fs in zip(axes, sets):
        p = np.nan_to_num(fs.protos)
        top = max(float(np.abs(p).max()), 1e-6)
        signed = bool((p < 0).any())  # features after ReLU are >= 0: a sequential map then
        im = row[0].imshow(p, aspect="auto", cmap="coolwarm" if signed else "viridis",
                           vmin=-top if signed else 0, vmax=top, interpolation="nearest")
        row[0].set_yticks(range(len(fs.class_names)), fs.class_names, fontsize=7)
        row[0].set(xlabel="channel", title=f"{fs.label}: prototypes ({fs.proto_source})")
        fig.colorbar(im, ax=row[0], fraction=0.03)
        unit = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-6)
        cos = unit @ unit.T
        im2 = row[1].imshow(cos, vmin=-1, vmax=1, cmap="coolwarm")
        row[1].set_xticks(range(len(fs.class_names)), fs.class_names, rotation=90, fontsize=6)
        row[1].set_yticks(range(len(fs.class_names)), fs.class_names, fontsize=6)
        row[1].set_title("cosine between prototypes", fontsize=9)
        fig.colorbar(im2, ax=row[1], fraction=0.05)
    fig.tight_layout()
    return fig


def plot_embeddings(panels: list[tuple[str, Any, np.ndarray, np.ndarray]],
                    dataset: str = "synthetic") -> plt.Figure:
    """``panels`` (title, FeatureSet, pixel xy (N, 2), prototype xy (K, 2)) as scatters."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (title, fs, xy, pxy) in zip(axes[0], panels):
        colours = palette_for(dataset) / 255.0
        for k, name in enumerate(fs.class_names):
            sel = fs.labels == k
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=colours[k], alpha=0.5, label=name)
            if np.isfinite(pxy[k]).all():
                ax.scatter(*pxy[k], marker="*", s=260, color=colours[k], edgecolor="k",
                           linewidth=1.2, zorder=5)
        ax.set_title(title, fontsize=9)
        ax.set(xticks=[], yticks=[])
    axes[0, 0].legend(fontsize=6, markerscale=3, loc="best")
    fig.tight_layout()
    return fig


def compactness_table(sets: list) -> pd.DataFrame:
    """Per class and checkpoint, the mean cosine of its features to its prototype and mean."""
    from mlcl.study.explore import compactness

    cols = {}
    for fs in sets:
        cols[(fs.label, f"to prototypes ({fs.proto_source})")] = compactness(
            fs.feats, fs.labels, fs.protos)
        if fs.proto_source != "class means":
            cols[(fs.label, "to class means")] = compactness(fs.feats, fs.labels, fs.class_means)
    df = pd.DataFrame(cols, index=sets[0].class_names)
    df.loc["mean over classes"] = df.mean(axis=0)  # over the classes with a value
    df.columns = pd.MultiIndex.from_tuples(df.columns, names=["checkpoint", "reference"])
    return df


def missing_reason(table: pd.DataFrame, column: tuple[str, str], cls: str) -> str:
    """Why the compactness ``table`` has no value for class ``cls`` in ``column``."""
    checkpoint, reference = column
    means = table.get((checkpoint, "to class means"))
    if "memory bank" in reference and means is not None and np.isfinite(means[cls]):
        return "prototype never initialised"
    return "class not in the pixels sampled"


BANK_NOTE = ("prototype never initialised: no pixel of the class reached the memory bank's "
             "confidence threshold (mlcl.bank_conf) in training, so the bank holds no "
             "prototype for it; the mean over classes leaves it out")


def plot_compactness(table: pd.DataFrame) -> plt.Figure:
    """Grouped bars of the compactness table (classes on x), the legend beside the axes; a
    missing value says why (:func:`missing_reason`) where its bar would be."""
    fig, ax = plt.subplots(figsize=(10, 3.6))
    n = table.shape[1]
    width = 0.8 / n
    reasons = set()
    for i, col in enumerate(table.columns):
        x = np.arange(len(table)) + (i - (n - 1) / 2) * width
        ax.bar(x, table[col], width, label=" / ".join(col), color=f"C{i}")
        for xi, cls in zip(x, table.index):
            if not np.isfinite(table.at[cls, col]):
                reason = missing_reason(table, col, cls)
                reasons.add(reason)
                ax.text(xi, 0.02, reason, rotation=90,
                        transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                        fontsize=7, color=f"C{i}")
    ax.set_xticks(range(len(table)), table.index, rotation=30, fontsize=8)
    ax.set(ylabel="mean cosine to prototype", title="intra-class compactness")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    if "prototype never initialised" in reasons:
        fig.text(0.5, 0.0, BANK_NOTE, ha="center", va="top", fontsize=7, wrap=True)
    return fig


# --------------------------------------------------------------------------- paired seeds
PAIRED_METRICS = {"best": "best epoch", "last": "last epoch", "last3": "mean of the last three"}


def seed_values(entries: list[dict], **cell: str) -> pd.DataFrame:
    """Per seed of the complete runs whose run fields (:func:`registry.run_fields`) match
    ``cell`` (e.g. preset, split, method, variant, ablation): best, last and last3 (the mean of
    the last three evaluations) mIoU, indexed by seed; a ValueError when two runs share one."""
    check_comparable(entries)
    rows: dict[int, dict[str, float]] = {}
    for e in entries:
        f, m = run_fields(e), e.get("metrics") or {}
        if not m.get("complete") or any(f[k] != v for k, v in cell.items()):
            continue
        if f["seed"] in rows:
            raise ValueError(f"two complete runs of seed {f['seed']} match {cell}: name the "
                             "preset, split, method, variant and ablation")
        evals = [x["miou"] for x in m.get("epochs", []) if x.get("miou") is not None]
        rows[f["seed"]] = {"best": m["best_miou"], "last": m["last_miou"],
                           "last3": float(np.mean(evals[-3:])) if evals else np.nan}
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(PAIRED_METRICS),
                                  dtype=float).sort_index()


def paired_summary(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """``a - b`` over the seeds both hold (:func:`seed_values` frames), per metric: mean, sample
    std, n, the 95 % t-interval of the mean difference and the seeds with a > b."""
    from scipy import stats

    d = (a - b).dropna()
    rows = {}
    for metric in PAIRED_METRICS:
        x = d[metric].to_numpy()
        n, mean = len(x), float(x.mean()) if len(x) else np.nan
        sd = float(x.std(ddof=1)) if n > 1 else np.nan
        half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if n > 1 else np.nan
        rows[metric] = {"mean": mean, "std": sd, "n": n, "ci_low": mean - half,
                        "ci_high": mean + half, "positive": int((x > 0).sum())}
    return pd.DataFrame.from_dict(rows, orient="index")


def plot_paired_differences(diffs: dict[str, pd.DataFrame], title: str = "") -> plt.Figure:
    """One panel per metric; per comparison (label -> ``a - b`` per seed) a dot per seed and
    the mean with its 95 % t-interval."""
    from scipy import stats

    fig, axes = plt.subplots(1, len(PAIRED_METRICS), figsize=(4 * len(PAIRED_METRICS), 3.2),
                             sharey=True)
    for ax, (metric, name) in zip(axes, PAIRED_METRICS.items()):
        for i, (label, d) in enumerate(diffs.items()):
            x = d[metric].dropna().to_numpy()
            jitter = np.linspace(-0.12, 0.12, len(x)) if len(x) > 1 else np.zeros(len(x))
            ax.scatter(i + jitter, x, s=18, alpha=0.7, color="#555555", zorder=3)
            if len(x) > 1:
                half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
                ax.errorbar(i + 0.3, x.mean(), yerr=half, fmt="o", color="#d62728", capsize=4)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(diffs)), list(diffs), rotation=15, ha="right", fontsize=8)
        ax.set_title(f"{name} mIoU", fontsize=10)
    axes[0].set_ylabel("paired difference (mIoU points)")
    fig.suptitle(title or "paired by seed: dots = seeds, red = mean and 95 % t-interval",
                 fontsize=10)
    fig.tight_layout()
    return fig

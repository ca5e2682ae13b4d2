"""Tables from the registry: the paper's Tables I-III beside the published numbers, the
synthetic study (mean ± std over seeds, gains paired by seed) and the MLCL ablations;
``*_table`` return display tables of strings, ``*_values`` the numbers behind them."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from mlcl import paper
from mlcl.registry import runs_frame

NOT_RUN = "not run"
NO_PAIR = "no supervised run of the same seed and schedule"
SYNTHETIC_MARK = "†"
SYNTHETIC_STAMP = "SYNTHETIC DATA (shapes set): not Pascal VOC / Cityscapes results"
SYNTHETIC_NOTE = ("† run on synthetic data (the synthetic shapes set, short CPU schedules): "
                  "not comparable with the published VOC / Cityscapes numbers.")
# (method, variant) -> label, in table order
METHOD_LABELS = {("supervised", ""): "Supervised", ("unimatch", ""): "UniMatch",
                 ("mlcl", "paper"): "MLCL (paper variant)",
                 ("mlcl", "released"): "MLCL (released variant)"}
COLOURS = {"Supervised": "#7f7f7f", "UniMatch": "#1f77b4", "MLCL (paper variant)": "#d62728",
           "MLCL (released variant)": "#ff7f0e"}
ABLATION_LABELS = {"": "MLCL (all components)", "no_p2p": "without L_p2p",
                   "no_dt": "without L_dt", "no_mask": "without F_mk (SAI masking)",
                   "no_noise": "without F_ne (SAI noise)", "no_sai": "without SAI"}


def results_kind(entries: list[dict]) -> str:
    """'Short demo' when every synthetic-data entry comes from the ``demo`` grid, else
    'Synthetic study': the figures' titles say which they show."""
    grids = {e.get("grid") for e in entries if e.get("synthetic")}
    return "Short demo" if grids == {"demo"} else "Synthetic study"


def method_label(method: str, variant: str = "") -> str:
    """The table label of a method (and variant, for MLCL)."""
    return METHOD_LABELS.get((method, variant if method == "mlcl" else ""),
                             f"{method} {variant}".strip())


# --------------------------------------------------------------------------- numbers
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
    spec = "+.2f" if signed else ".2f"
    text = f"{mean:{spec}}" + (f" ± {std:.2f}" if n > 1 else "") + f" (n={n})"
    return text + (f" {SYNTHETIC_MARK}" if synthetic else "")


def _complete(entries: list[dict]) -> pd.DataFrame:
    df = runs_frame(entries)
    return df[df["complete"]].copy()


def paper_table_values(entries: list[dict], key: str) -> pd.DataFrame:
    """Long form of Table ``key``: one row per (column, reproduced method) with the published
    number and the reproduced best/last mean, std and n, whether synthetic, and the runs."""
    t = paper.TABLES[key]
    df = _complete(entries)
    rows = []
    for col in t.columns:
        for (method, variant), label in METHOD_LABELS.items():
            sel = df[(df.preset == col.preset) & (df.split == col.split) & (df.method == method)
                     & (df.variant == variant) & (df.ablation == "")]
            rows.append({"table": key, "column": col.label, "preset": col.preset,
                         "split": col.split, "method": method, "variant": variant,
                         "label": label, "published": t.value(method, col.preset, col.split),
                         **_best_last(sel), "synthetic": bool(sel.synthetic.any()),
                         "runs": list(sel.name)})
    return pd.DataFrame(rows)


def paper_table(entries: list[dict], key: str) -> pd.DataFrame:
    """Table ``key`` in the paper's layout (methods as rows, label splits as columns): for
    each method the published row, then our best-epoch and last-epoch rows."""
    t = paper.TABLES[key]
    values = paper_table_values(entries, key)
    cols = [c.label for c in t.columns]
    out: dict[tuple[str, str], list[str]] = {}
    ours = {"supervised": [("supervised", "")], "unimatch": [("unimatch", "")],
            "augseg": [], "mlcl": [("mlcl", "paper"), ("mlcl", "released")]}
    for pkey, plabel in paper.PUBLISHED_LABELS.items():
        if pkey not in t.published:
            continue
        group = plabel.split(" (")[0]
        out[(group, f"published: {plabel}")] = [f"{v:.2f}" for v in t.published[pkey]]
        for method, variant in ours[pkey]:
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
    return (f"Table {key}: {t.title}. mIoU (%). 'published': the paper's single runs "
            f"(docs/method.md). 'ours': mean ± std over seeds (n = runs) at the best and at "
            f"the last evaluated epoch, from the results registry. '{NOT_RUN}': no complete "
            f"run in the registry. {SYNTHETIC_NOTE}")


def synthetic_values(entries: list[dict]) -> pd.DataFrame:
    """Synthetic-data runs (no ablation) per (preset, split, iterations, method, variant):
    best/last mean, std, n, the paired gain over supervised (same split, schedule and
    seed): gain mean, std, number of pairs, pairs with a positive gain; for MLCL rows the
    same against UniMatch (``vs_uni_*``)."""
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
    """Best-epoch differences ``sel - ref`` paired by seed: ``<prefix>_mean/_std/_n`` and
    ``<prefix>_positive`` (how many pairs are > 0)."""
    ref_by_seed = ref.set_index("seed").best_miou
    diffs = [b - ref_by_seed[s] for s, b in zip(sel.seed, sel.best_miou)
             if s in ref_by_seed.index]
    m, sd, n = mean_std(diffs)
    return {f"{prefix}_mean": m, f"{prefix}_std": sd, f"{prefix}_n": n,
            f"{prefix}_positive": int(sum(d > 0 for d in diffs))}


def _paired_text(mean: float, std: float, n: int, positive: int, missing: str) -> str:
    return missing if not n else fmt(mean, std, n, signed=True) + f", {positive}/{n} > 0"


def synthetic_table(entries: list[dict]) -> pd.DataFrame:
    """Method x split table of the synthetic study: best / last mIoU (mean ± std over seeds),
    the paired best-epoch gain over supervised and, for MLCL, its paired difference to
    UniMatch. Rows (preset, method); column groups
    "<split>, <iterations> it." (a split run on two schedules gets two groups)."""
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
            r.gain_mean, r.gain_std, r.gain_n, r.gain_positive, NO_PAIR)
        row[(cell, "MLCL vs UniMatch")] = "—" if r.method != "mlcl" else _paired_text(
            r.vs_uni_mean, r.vs_uni_std, r.vs_uni_n, r.vs_uni_positive,
            "no UniMatch run of the same seed and schedule")
    out = pd.DataFrame.from_dict(table, orient="index")
    out.index = pd.MultiIndex.from_tuples(out.index, names=["data", "method"])
    out.columns = pd.MultiIndex.from_tuples(out.columns, names=["split, schedule", ""])
    return out.fillna(NOT_RUN)


def ablation_values(entries: list[dict]) -> pd.DataFrame:
    """MLCL (paper variant) with each component switched off, per (preset, split,
    iterations) that has ablation runs: best/last mean ± std and the paired best-epoch
    difference to the full method; UniMatch of the same cell as the reference."""
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
    """The display table of :func:`ablation_values`: best / last mIoU and the paired
    difference to the full method, rows (cell, variant)."""
    v = ablation_values(entries)
    if v.empty:
        return pd.DataFrame()
    out = pd.DataFrame({
        "best epoch": [fmt(r.best_mean, r.best_std, r.n, r.synthetic) for r in v.itertuples()],
        "last epoch": [fmt(r.last_mean, r.last_std, r.n, r.synthetic) for r in v.itertuples()],
        "Δ best vs all components": [
            "—" if r.ablation == "" else "no full-method run of the same seed"
            if not r.delta_n else fmt(r.delta_mean, r.delta_std, r.delta_n, signed=True)
            for r in v.itertuples()]},
        index=pd.MultiIndex.from_arrays(
            [[f"{r.preset} {r.split}, {r.iterations} it." for r in v.itertuples()], v.label],
            names=["cell", "variant"]))
    return out


def qualitative_runs(entries: list[dict], preset: str | None = None, split: str | None = None,
                     seed: int | None = None) -> dict[str, dict]:
    """The runs of one (preset, split, seed) cell for a Fig. 6-style grid, as
    {'Supervised': entry, 'UniMatch': entry, 'MLCL': entry} (those present, each with a
    best.pt on disk; MLCL = the paper variant, else the released one). Without a cell given,
    the cell with the most of the three methods, real data before synthetic."""
    df = _complete(entries)
    df = df[(df.ablation == "") & df.output_dir.notna()]
    df = df[[(Path(d) / "best.pt").is_file() for d in df.output_dir]]
    for col, want in (("preset", preset), ("split", split), ("seed", seed)):
        if want is not None:
            df = df[df[col] == want]
    if df.empty:
        return {}
    slot = {("supervised", ""): "Supervised", ("unimatch", ""): "UniMatch",
            ("mlcl", "paper"): "MLCL", ("mlcl", "released"): "MLCL"}
    df = df.assign(slot=[slot.get((m, v)) for m, v in zip(df.method, df.variant)])
    df = df[df.slot.notna()]
    score = df.groupby(["preset", "split", "seed"]).agg(k=("slot", "nunique"),
                                                        syn=("synthetic", "any"))
    best = score.assign(syn=score.syn.astype(int)).sort_values(
        ["k", "syn"], ascending=[False, True]).index[0]
    cell = df[(df.preset == best[0]) & (df.split == best[1]) & (df.seed == best[2])]
    by_name = {e["name"]: e for e in entries}
    out = {}
    for s in ("Supervised", "UniMatch", "MLCL"):
        rows = cell[cell.slot == s].sort_values("variant", ascending=True)  # paper < released
        if not rows.empty:
            out[s] = by_name[rows.name.iloc[0]]
    return out


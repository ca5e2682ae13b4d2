"""Plots: training curves, the synthetic-study bars, the Fig. 6-style prediction grid, the
SAI perturbations and response, prototypes, embeddings and intra-class compactness (the
checkpoint-based ones take what mlcl.explore computed)."""
from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from mlcl.data.palette import colourise, palette_for
from mlcl.registry import runs_frame
from mlcl.viz.tables import COLOURS, method_label

# torch, mlcl.losses and mlcl.explore are imported inside the plots of checkpoint quantities:
# the figures notebook draws from the registry alone and does not load torch.


def plot_training_curves(entries: list[dict], title: str = "") -> plt.Figure:
    """Validation mIoU and training loss against the iteration, one line per run, coloured
    by method."""
    fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(10, 3.6))
    seen = set()
    for e in sorted(entries, key=lambda e: e.get("name", "")):
        df = runs_frame([e]).iloc[0]
        label = method_label(df.method, df.variant)
        if df.ablation:
            label += f" [{df.ablation}]"
        ep = (e.get("metrics") or {}).get("epochs") or []
        colour = COLOURS.get(label)
        kw = {"color": colour, "alpha": 0.8, "label": None if label in seen else label}
        ev = [r for r in ep if "miou" in r]
        ax_m.plot([r["iteration"] for r in ev], [r["miou"] for r in ev], marker="o", ms=3, **kw)
        ax_l.plot([r["iteration"] for r in ep], [r.get("loss", np.nan) for r in ep], **kw)
        seen.add(label)
    ax_m.set(xlabel="iteration", ylabel="validation mIoU (%)", title="validation mIoU")
    ax_l.set(xlabel="iteration", ylabel="training loss (epoch mean)", title="training loss",
             yscale="log")
    for ax in (ax_m, ax_l):
        ax.grid(alpha=0.3)
    if seen:
        ax_m.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def seeds_text(n: pd.Series) -> str:
    """How many seeds stand behind each bar: '1 seed' or 'mean ± std over 3 seeds'."""
    lo, hi = int(n.min()), int(n.max())
    if hi == 1:
        return "1 seed"
    return f"mean ± std over {lo}{'' if lo == hi else f'-{hi}'} seeds"


def plot_synthetic_study(values: pd.DataFrame, title: str = "") -> plt.Figure:
    """Best-epoch mIoU per split, one bar per method, from zero; the mean ± std over seeds
    where a bar has several (no error bar for a single run). The title says how many seeds
    (``title`` comes first, e.g. 'Short demo' or 'Synthetic study')."""
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
    """A legend below the panels: the colour of every class (mlcl.data.palette) and,
    with ``ignore``, the colour of the ignore label in ground-truth masks."""
    colours = _class_colours(dataset, 256)
    handles = [Patch(facecolor=colours[k], edgecolor="0.4", label=name)
               for k, name in enumerate(class_names)]
    if ignore:
        handles.append(Patch(facecolor=colours[255], edgecolor="0.4", label=IGNORE_LABEL))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=7,
               ncol=min(len(handles), 5), frameon=False, title=title, title_fontsize=7)


def plot_prediction_grid(samples: dict[str, Any], title: str = "") -> plt.Figure:
    """Rows: images; columns: image, each model's prediction, ground truth (Fig. 6 layout).
    ``samples`` as returned by mlcl.explore.predict_val."""
    columns = ["Image", *samples["preds"], "Ground truth"]
    n = len(samples["images"])
    fig, axes = plt.subplots(n, len(columns), figsize=(1.9 * len(columns), 1.9 * n),
                             squeeze=False)
    for i in range(n):
        tiles = [samples["images"][i]]
        tiles += [_colour(p[i], samples["dataset"]) for p in samples["preds"].values()]
        tiles.append(_colour(samples["targets"][i], samples["dataset"]))
        for j, tile in enumerate(tiles):
            axes[i, j].imshow(tile, interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(columns[j], fontsize=9)
        axes[i, 0].set_ylabel(str(samples["ids"][i]).split("/")[-1], fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    class_legend(fig, samples["class_names"], samples["dataset"],
                 title="class colours (predictions and ground truth)")
    return fig


def plot_perturbations(views: dict[str, Any], cfg, title: str = "",
                       class_names: list[str] | None = None) -> plt.Figure:
    """Per image (rows): weak and strong views, the attention map A, the SAI keep mask, the
    features F_w, F_s, F_mk, F_ne (one shared channel PCA -> RGB per image) and the
    predictions p_w, p_m, p_n (class colours in the legend; default names: the config's);
    the row label gives v, r, a and the dropped fraction."""
    from mlcl.explore import denormalise, pca_rgb

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
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
        axes[i, 0].set_ylabel(f"v={views['v'][i]:.2f}\nr={views['mask_ratio'][i]:.2f} "
                              f"a={views['amplitude'][i]:.2f}\ndropped "
                              f"{100 * views['dropped'][i]:.0f}%", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    names = class_names or cfg.data.class_names or [f"class_{k}" for k in
                                                    range(cfg.data.num_classes)]
    class_legend(fig, names, ds, ignore=False, title="class colours of p_w, p_m, p_n")
    return fig


def plot_sai_response(views_by_variant: dict[str, dict[str, Any]], kappa: float,
                      title: str = "") -> plt.Figure:
    """How SAI's strength follows the similarity v: the mask-ratio centre r(v) and noise
    amplitude a(v) of each variant (lines, from mlcl.losses) with the batch's images
    (points), and the fraction of positions each variant's mask actually dropped."""
    import torch

    from mlcl import losses

    grid = torch.linspace(-1, 1, 201)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    styles = {"paper": ("#d62728", "o"), "released": ("#ff7f0e", "s")}
    for variant, views in views_by_variant.items():
        colour, marker = styles.get(variant, ("k", "x"))
        double = variant == "released"
        axes[0].plot(grid, losses.sai_mask_ratio(grid, kappa, double), color=colour,
                     label=f"r(v), {variant}")
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
    """Per image: v, and for each variant the mask-ratio centre r, the fraction dropped, the
    noise amplitude a and the per-image SAI MSEs (L_m on F_mk, L_n on F_ne) against p_w."""
    cols = {}
    for variant, v in views_by_variant.items():
        cols["v"] = v["v"].numpy()
        for key, name in (("mask_ratio", "r"), ("dropped", "dropped"), ("amplitude", "a"),
                          ("mse_m", "L_m"), ("mse_n", "L_n")):
            cols[f"{name} ({variant})"] = v[key].float().numpy()
    df = pd.DataFrame(cols)
    df.index.name = "image"
    return df


def _class_colours(dataset: str, k: int) -> np.ndarray:
    return palette_for(dataset)[:k] / 255.0


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
    """Scatter plots of 2-D pixel embeddings coloured by class, prototypes as stars.
    ``panels``: (title, FeatureSet, pixel xy (N, 2), prototype xy (K, 2))."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (title, fs, xy, pxy) in zip(axes[0], panels):
        colours = _class_colours(dataset, len(fs.class_names))
        for k, name in enumerate(fs.class_names):
            sel = fs.labels == k
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=colours[k], alpha=0.5, label=name)
            if np.isfinite(pxy[k]).all():
                ax.scatter(*pxy[k], marker="*", s=260, color=colours[k], edgecolor="k",
                           linewidth=1.2, zorder=5)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].legend(fontsize=6, markerscale=3, loc="best")
    fig.tight_layout()
    return fig


def compactness_table(sets: list) -> pd.DataFrame:
    """Per class (rows, then their mean): mean cosine of the class's pixel features to its
    prototype, for every checkpoint, against its own prototypes (bank, or class means where
    there is no bank) and against the class means (comparable across methods)."""
    from mlcl.explore import compactness

    cols = {}
    for fs in sets:
        cols[(fs.label, f"to prototypes ({fs.proto_source})")] = compactness(
            fs.feats, fs.labels, fs.protos)
        if fs.proto_source != "class means":
            cols[(fs.label, "to class means")] = compactness(fs.feats, fs.labels,
                                                             fs.class_means)
    df = pd.DataFrame(cols, index=sets[0].class_names)
    df.loc["mean over classes"] = df.mean(0)
    df.columns = pd.MultiIndex.from_tuples(df.columns, names=["checkpoint", "reference"])
    return df


def plot_compactness(table: pd.DataFrame) -> plt.Figure:
    """Grouped bars of the compactness table (classes on x)."""
    fig, ax = plt.subplots(figsize=(8, 3.4))
    n = table.shape[1]
    width = 0.8 / n
    for i, col in enumerate(table.columns):
        ax.bar(np.arange(len(table)) + (i - (n - 1) / 2) * width, table[col], width,
               label=" / ".join(col))
    ax.set_xticks(range(len(table)), table.index, rotation=30, fontsize=8)
    ax.set(ylabel="mean cosine to prototype", title="intra-class compactness")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


"""mlcl.study.viz tables and plots, mlcl.study.paper, mlcl.study.registry and
mlcl.study.explore on small inputs.

``fake_entry`` / ``write_registry`` build plausible registry entries (also used by the
notebook tests)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from mlcl import paths
from mlcl.study import explore as mi
from mlcl.study import paper, registry, viz
from mlcl.study.grids import Run

matplotlib.use("Agg")


def fake_entry(preset: str, split: str, method: str, seed: int, best: float,
               last: float | None = None, variant: str = "paper", ablation: str = "",
               dataset: str | None = None, iterations: int = 600, complete: bool = True,
               output_dir: str | None = None) -> dict:
    """A registry entry as the run notebook writes it, with made-up numbers."""
    dataset = dataset or ("synthetic" if preset == "synthetic" else preset.split("_")[0])
    last = best - 0.5 if last is None else last
    run = Run(preset, split, method, seed, variant, ablation)
    epochs = [{"epoch": e, "iteration": e * iterations // 3, "loss": 1.0 / e,
               "miou": best - (3 - e) * 2.0 if e < 3 else last} for e in (1, 2, 3)]
    metrics = {"method": method, "variant": variant if method == "mlcl" else None,
               "dataset": dataset, "split": split, "seed": seed, "complete": complete,
               "best_miou": best, "best_epoch": 2, "last_miou": last, "last_epoch": 3,
               "epochs": epochs, "iterations": iterations, "wall_time_s": 12.0,
               "git_commit": "abc123", "output_dir": output_dir}
    config = {"method": method, "seed": seed, "split": split, "data": {"dataset": dataset},
              "mlcl": {"variant": variant}}
    return {"name": run.name, "metrics": metrics, "config": config, "grid": "test",
            "run": {"preset": preset, "split": split, "method": method, "variant": variant,
                    "ablation": ablation, "seed": seed},
            "synthetic": dataset == "synthetic", "output_dir": output_dir}


def write_registry(root: Path, entries: list[dict]) -> Path:
    for e in entries:
        registry.record_run(e["name"], e["metrics"], e["config"], root, run=e["run"],
                            grid=e["grid"])
    return root


SUP_183 = [50.0, 52.0, 54.0]  # seeds 0-2: mean 52, std 2
SYN = {("supervised", ""): [40.0, 41.0, 42.0], ("unimatch", ""): [43.0, 45.0, 44.0],
       ("mlcl", "paper"): [44.0, 44.0, 47.0]}


def study_entries() -> list[dict]:
    out = [fake_entry("pascal", "183", "supervised", s, b, b - 1) for s, b in enumerate(SUP_183)]
    out.append(fake_entry("pascal", "183", "unimatch", 0, 70.5))
    out.append(fake_entry("pascal", "366", "mlcl", 0, 76.0, complete=False))  # not counted
    out.append(fake_entry("pascal", "732", "mlcl", 0, 30.0, dataset="synthetic"))
    for (m, v), values in SYN.items():
        out += [fake_entry("synthetic", "1_16", m, s, b, variant=v) for s, b in enumerate(values)]
    out += [fake_entry("synthetic", "1_16", "mlcl", s, b, ablation="no_dt")
            for s, b in enumerate([43.0, 44.0, 45.0])]
    return out


# --------------------------------------------------------------------------- paper data
def test_paper_numbers_match_paper_md():
    md = paths.REPO.parent / "shared" / "PAPER.md"
    if not md.is_file():
        pytest.skip("shared/PAPER.md not beside the checkout")
    text = md.read_text()
    rows = {"Supervised": "supervised", "UniMatch": "unimatch", "AugSeg": "augseg",
            "MLCL (paper)": "mlcl"}
    for key, section in zip(("I", "II", "III"), re.split(r"^## Table ", text, flags=re.M)[1:]):
        for line in section.splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            label = cells[0].split(" (CVPR")[0]
            if label in rows:
                assert paper.TABLES[key].published[rows[label]] == \
                    tuple(float(c) for c in cells[1:]), (key, label)
    assert paper.TABLES["III"].value("mlcl", "cityscapes", "1_2") == 79.33


def test_paper_table_mean_std_published_and_marks():
    table = viz.paper_table(study_entries(), "I")
    col = "1/8 (183)"
    assert table.loc[("Supervised", "published: Supervised"), col] == "52.26"
    assert table.loc[("Supervised", "ours, best epoch"), col] == "52.00 ± 2.00 (n=3)"
    assert table.loc[("Supervised", "ours, last epoch"), col] == "51.00 ± 2.00 (n=3)"
    assert table.loc[("UniMatch", "ours, best epoch"), col] == "70.50 (n=1)"
    assert table.loc[("Supervised", "ours, best epoch"), "1/4 (366)"] == viz.NOT_RUN
    # the incomplete run does not count; the synthetic one is marked
    assert table.loc[("MLCL", "ours, paper variant, best epoch"), "1/4 (366)"] == viz.NOT_RUN
    assert table.loc[("MLCL", "ours, paper variant, best epoch"), "1/2 (732)"].endswith("†")
    assert table.loc[("AugSeg", "published: AugSeg (CVPR'23)"), "full (1464)"] == "78.82"
    for key, t in paper.TABLES.items():  # every published number is in its table
        shown = viz.paper_table([], key).to_numpy().ravel().tolist()
        assert all(f"{v:.2f}" in shown for vs in t.published.values() for v in vs)
        # nothing run: its reproduced methods (4 in Tables I-III) x (best, last), every column
        ours = [mv for mv in viz.METHOD_LABELS if mv[0] in t.methods]
        assert len(ours) == (4 if key in ("I", "II", "III") else 3)
        assert shown.count(viz.NOT_RUN) == len(t.columns) * len(ours) * 2
    values = viz.paper_table_values(study_entries(), "I")
    sup = values[(values.method == "supervised") & (values.split == "183")].iloc[0]
    assert (sup.best_mean, sup.best_std, sup.n, sup.published) == (52.0, 2.0, 3, 52.26)


def test_synthetic_table_paired_gain():
    table = viz.synthetic_table(study_entries())
    row = ("synthetic", "UniMatch")
    assert table.loc[row, ("1_16, 600 it.", "best")] == "44.00 ± 1.00 (n=3)"
    assert table.loc[row, ("1_16, 600 it.", "gain vs supervised")] \
        == "+3.00 ± 1.00 (n=3), 3/3 > 0"
    mlcl = table.loc[("synthetic", "MLCL (paper variant)"),
                     ("1_16, 600 it.", "gain vs supervised")]
    gains = np.array(SYN[("mlcl", "paper")]) - np.array(SYN[("supervised", "")])
    assert mlcl == f"+{gains.mean():.2f} ± {gains.std(ddof=1):.2f} (n=3), 3/3 > 0"
    diffs = np.array(SYN[("mlcl", "paper")]) - np.array(SYN[("unimatch", "")])
    col = ("1_16, 600 it.", "MLCL vs UniMatch")
    assert table.loc[("synthetic", "MLCL (paper variant)"), col] == \
        f"{diffs.mean():+.2f} ± {diffs.std(ddof=1):.2f} (n=3), {(diffs > 0).sum()}/3 > 0"
    assert table.loc[row, col] == "—"
    # ablations and real-data runs stay out; a real preset run on synthetic data is in
    assert set(table.index) == {("synthetic", m) for m in
                                ("Supervised", "UniMatch", "MLCL (paper variant)")} | {
        ("pascal", "MLCL (paper variant)")}


def test_ablation_table_delta_against_full_method():
    values = viz.ablation_values(study_entries())
    no_dt = values[values.ablation == "no_dt"].iloc[0]
    full = np.array(SYN[("mlcl", "paper")])
    diffs = np.array([43.0, 44.0, 45.0]) - full
    assert no_dt.delta_mean == pytest.approx(diffs.mean())
    assert no_dt.delta_std == pytest.approx(diffs.std(ddof=1))
    table = viz.ablation_table(study_entries())
    assert "UniMatch (reference: neither FKA nor SAI)" in table.index.get_level_values(1)
    assert table.iloc[0]["Δ best vs all components"] == "—"


# --------------------------------------------------------------------------- files
def test_save_figure_and_table_with_captions(tmp_path):
    entries = study_entries()
    fig = viz.plot_training_curves(entries[:3], title="curves")
    assert len(fig.axes[0].lines) == 3
    files = viz.save_figure(fig, "curves", "Curves.", [e["name"] for e in entries[:3]],
                            synthetic=True, directory=tmp_path)
    assert [f.suffix for f in files] == [".png", ".pdf"] and all(f.stat().st_size for f in files)
    side = json.loads((tmp_path / "curves.json").read_text())
    assert side["caption"].startswith("SYNTHETIC-DATA RESULTS") and side["synthetic"]
    assert entries[0]["name"] in side["caption"] and side["runs"][0] == entries[0]["name"]
    files = viz.save_table(viz.paper_table(entries, "I"), "table_I", "Table I.",
                           ["pascal-183-supervised-s0"], values=viz.paper_table_values(
                               entries, "I"), directory=tmp_path)
    tex = (tmp_path / "table_I.tex").read_text()
    assert r"\caption{" in tex and r"pascal-183-supervised-s0" in tex.replace(r"\_", "_")
    assert r"52.00 $\pm$ 2.00" in tex
    csv = pd.read_csv(tmp_path / "table_I.csv", index_col=[0, 1])
    assert csv.loc[("Supervised", "published: Supervised"), "1/8 (183)"] == "52.26"
    index = json.loads(viz.write_index(tmp_path).read_text())
    assert {i["name"] for i in index["items"]} == {"curves", "table_I"}
    bars = viz.plot_synthetic_study(viz.synthetic_values(entries))
    assert len(bars.axes[0].patches) == 4  # synthetic 1_16 x three methods, pascal 732 x one
    assert [t.get_text() for t in bars.axes[0].get_xticklabels()] == [
        "pascal 732\n600 it.", "synthetic 1_16\n600 it."]


def test_registry_roundtrip_and_frame(tmp_path):
    entries = study_entries()
    write_registry(tmp_path, entries)
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave nothing behind
    loaded = registry.load_registry(tmp_path)
    assert [e["name"] for e in loaded] == sorted(e["name"] for e in entries)
    e = registry.load_entry(entries[0]["name"], tmp_path)
    assert e["environment"]["torch"] == torch.__version__ and e["git_commit"] == "abc123"
    assert e["git_dirty"] in (True, False, None) and e["timings"]["recorded_at"]
    assert e["timings"]["s_per_iter"] == pytest.approx(12.0 / 600)
    bare = {"name": "x", "metrics": {"complete": True, "best_miou": 1.0},
            "config": {"method": "mlcl", "split": "1_8", "seed": 3,
                       "data": {"dataset": "synthetic"}, "mlcl": {"variant": "released"}}}
    row = registry.runs_frame([bare]).iloc[0]  # no run record: fields from the config
    assert (row.preset, row.split, row.method, row.variant, row.seed, row.synthetic) == \
        ("synthetic", "1_8", "mlcl", "released", 3, True)


def test_qualitative_runs_prefers_the_fullest_cell(tmp_path):
    entries = []
    for m, v in (("supervised", ""), ("unimatch", ""), ("mlcl", "paper"), ("mlcl", "released")):
        d = tmp_path / f"{m}{v}"
        d.mkdir()
        (d / "best.pt").write_bytes(b"")
        entries.append(fake_entry("synthetic", "1_8", m, 0, 40.0, variant=v or "paper",
                                  output_dir=str(d)))
    entries.append(fake_entry("synthetic", "1_16", "mlcl", 0, 40.0, output_dir=str(tmp_path)))
    cell = viz.qualitative_runs(entries)
    assert list(cell) == ["Supervised", "UniMatch", "MLCL"]
    assert cell["MLCL"]["name"] == "synthetic-1_8-mlcl-paper-s0"
    assert viz.qualitative_runs(entries, split="1_32") == {}


# --------------------------------------------------------------------------- inspect
@pytest.fixture
def tiny_model(synth_cfg):
    from mlcl.config import set_key
    from mlcl.model import build_model

    set_key(synth_cfg, "model.width", 16)
    torch.manual_seed(0)
    return build_model(synth_cfg).eval(), synth_cfg


def test_sai_views_follow_the_losses(tiny_model):
    model, cfg = tiny_model
    batch = mi.unlabeled_batch(cfg, 4, seed=0)
    again = mi.unlabeled_batch(cfg, 4, seed=0)
    assert torch.equal(batch["s1"], again["s1"])  # the views are reproducible
    k = cfg.mlcl.kappa
    paper_v = mi.sai_views(model, batch, cfg, double_transform=False, seed=1)
    rel = mi.sai_views(model, batch, cfg, double_transform=True, seed=1, cutmix=True)
    v = paper_v["v"]
    assert v.shape == (4,) and bool((v.abs() <= 1 + 1e-5).all())
    assert torch.allclose(paper_v["mask_ratio"], 1 - k * (v + 1))
    assert torch.allclose(paper_v["amplitude"], k * (v + 1))
    assert bool(((rel["mask_ratio"] >= 1 - k * (1 + 2 * k) - 1e-6)
                 & (rel["mask_ratio"] <= 1 - k + 1e-6)).all())
    keep = paper_v["keep"].unsqueeze(1)
    assert bool((paper_v["f_mk"][~keep.expand_as(paper_v["f_mk"])] == 0).all())
    assert torch.allclose(paper_v["dropped"], 1 - paper_v["keep"].float().flatten(1).mean(1))
    assert paper_v["p_m"].shape == (4, cfg.data.num_classes, 32, 32)
    rgb = mi.pca_rgb([paper_v["f_w"][0], paper_v["f_mk"][0]])
    assert rgb[0].shape == (8, 8, 3) and 0 <= rgb[0].min() and rgb[1].max() <= 1
    table = viz.sai_table({"paper": paper_v, "released": rel})
    assert table.shape == (4, 11)
    assert list(table.columns[:3]) == ["v", "r (paper)", "dropped (paper)"]
    fig = viz.plot_perturbations(mi.head(paper_v, 2), cfg)
    assert len(fig.axes) == 2 * 11
    # the row labels (v, r, a, dropped) read at the size of the column titles, not 7 pt
    assert fig.axes[0].yaxis.label.get_size() >= 10 and fig.axes[0].title.get_size() >= 10


def test_compactness_and_embeddings():
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(3, 8))
    labels = np.repeat(np.arange(3), 20)
    feats = protos[labels] * rng.uniform(0.5, 2.0, size=(60, 1))  # same directions
    assert np.allclose(mi.compactness(feats, labels, protos), 1.0)
    means = mi.class_means(feats, labels, 4)
    assert np.isnan(means[3]).all() and np.isnan(mi.compactness(feats, labels, means)[3])
    noisy = feats + rng.normal(scale=3.0, size=feats.shape)
    assert (mi.compactness(noisy, labels, protos) < 0.9).all()
    for method in ("pca", "tsne"):
        xy, pxy = mi.embed_2d(noisy, means, method)
        assert xy.shape == (60, 2) and np.isfinite(pxy[:3]).all() and np.isnan(pxy[3]).all()


# --------------------------------------------------------------------------- self-explaining
def test_study_bars_start_at_zero_and_say_how_many_seeds():
    from matplotlib.container import ErrorbarContainer

    one = [fake_entry("synthetic", "1_16", m, 0, b, variant=v or "paper")
           for (m, v), b in zip(SYN, (55.0, 60.0, 61.0))]
    ax = viz.plot_synthetic_study(viz.synthetic_values(one), "Short demo").axes[0]
    assert ax.get_ylim()[0] == 0 and "Short demo" in ax.get_title()
    assert "1 seed" in ax.get_title()
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]  # n = 1
    assert viz.results_kind([{**e, "grid": "demo"} for e in one]) == "Short demo"
    ax = viz.plot_synthetic_study(viz.synthetic_values(study_entries())).axes[0]
    assert "mean ± std over 1-3 seeds" in ax.get_title() and ax.get_ylim()[0] == 0  # 732: n=1
    assert [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert viz.results_kind(study_entries()) == "Synthetic study"


def test_synthetic_figures_carry_the_mark_on_the_picture(tmp_path):
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    viz.save_figure(fig, "a", "A.", synthetic=True, directory=tmp_path)
    viz.save_figure(fig, "b", "B.", synthetic=True, directory=tmp_path)
    assert [t.get_text() for t in fig.texts] == [viz.SYNTHETIC_STAMP]  # once, even saved twice
    real, _ = plt.subplots()
    viz.save_figure(real, "c", "C.", synthetic=False, directory=tmp_path)
    assert not real.texts


def test_prediction_grid_explains_its_colours():
    from mlcl.study.viz import IGNORE_LABEL

    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:4] = 255
    samples = {"images": [np.zeros((8, 8, 3), np.uint8)], "targets": [mask],
               "preds": {"MLCL": [mask.clip(0, 2)]}, "ids": ["val_000000"],
               "dataset": "synthetic", "class_names": ["background", "disc", "rectangle"]}
    fig = viz.plot_prediction_grid(samples, "t")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["background", "disc", "rectangle", IGNORE_LABEL]


def test_checkpoint_paths_are_taken_from_the_repository_root(tiny_model, tmp_path, monkeypatch):
    """A notebook's kernel runs in notebooks/: 'runs/...' still means the checkout's runs/."""
    from mlcl.checkpoints import save_weights

    model, cfg = tiny_model
    repo, kernel_dir = tmp_path / "repo", tmp_path / "repo" / "notebooks"
    kernel_dir.mkdir(parents=True)
    save_weights(repo / "runs" / "demo" / "best.pt", model, cfg, cfg.data.class_names, 1, 50.0)
    monkeypatch.setattr(registry, "REPO", repo)
    monkeypatch.chdir(kernel_dir)
    ck = mi.load_checkpoint("runs/demo/best.pt", device="cpu")
    assert ck.path == repo / "runs" / "demo" / "best.pt" and ck.miou == 50.0
    with pytest.raises(FileNotFoundError, match="runs/missing/best.pt"):
        mi.load_checkpoint("runs/missing/best.pt")


def test_load_checkpoint_takes_a_run_folder_and_reads_the_file_once(tiny_model, tmp_path,
                                                                     monkeypatch):
    from mlcl.checkpoints import save_weights

    model, cfg = tiny_model
    save_weights(tmp_path / "run" / "best.pt", model, cfg, cfg.data.class_names, 3, 40.0)
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(f) or load(f, *a, **k))
    ck = mi.load_checkpoint(tmp_path / "run", device="cpu")
    assert ck.path == tmp_path / "run" / "best.pt" and (ck.epoch, ck.miou) == (3, 40.0)
    assert reads == [ck.path]


# --------------------------------------------------------------------------- figure defects
def test_compactness_legend_clear_of_the_bars_and_a_missing_prototype_said():
    rng = np.random.default_rng(0)
    names = ["background", "disc", "star"]
    protos = rng.uniform(0.5, 1.0, size=(3, 8))
    labels = np.repeat(np.arange(3), 20)
    feats = protos[labels] * rng.uniform(0.5, 2.0, size=(60, 1))  # cosines near 1: tall bars
    bank = protos.copy()
    bank[2] = np.nan  # the bank never initialised "star"
    means = mi.class_means(feats, labels, 3)
    sets = [mi.FeatureSet("MLCL", "mlcl", feats, labels, bank, "memory bank", means, names),
            mi.FeatureSet("UniMatch", "unimatch", feats, labels, means, "class means", means,
                          names)]
    table = viz.compactness_table(sets)
    assert np.isnan(table.at["star", ("MLCL", "to prototypes (memory bank)")])
    fig = viz.plot_compactness(table)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert not [p for p in ax.patches if legend.overlaps(p.get_window_extent())]
    said = [t for t in ax.texts if t.get_text() == "prototype never initialised"]
    star_x = 2 + (0 - (3 - 1) / 2) * 0.8 / 3  # the first column's bar of the third class
    assert len(said) == 1 and said[0].get_position()[0] == pytest.approx(star_x)
    assert [t.get_text() for t in fig.texts] == [viz.BANK_NOTE]


def curve_entries(epochs_by_method: dict[str, list[dict]], output_dir=None) -> list[dict]:
    out = []
    for method, epochs in epochs_by_method.items():
        e = fake_entry("synthetic", "1_16", method, 0, 50.0, output_dir=output_dir)
        e["metrics"]["epochs"] = epochs
        out.append(e)
    return out


def test_training_curves_plot_the_term_every_method_has():
    """Not the totals (MLCL's adds L_p2p, L_dt and SAI's terms to UniMatch's): L_x."""
    ep = {m: [{"epoch": k, "iteration": 10 * k, "loss": total * k, "x": 1.0 / k, "miou": 40.0}
              for k in (1, 2, 3)] for m, total in (("supervised", 1.0), ("mlcl", 9.0))}
    fig = viz.plot_training_curves(curve_entries(ep))
    ax_l = fig.axes[1]
    assert [list(line.get_ydata()) for line in ax_l.lines] == [[1.0, 0.5, 1 / 3]] * 2
    assert "L_x" in ax_l.get_title() and "L_x" in ax_l.get_ylabel()
    assert viz.LOSS_NOTE in [t.get_text() for t in fig.texts]


def test_a_short_run_shows_a_loss_curve(tmp_path):
    """run.ipynb's defaults: 100 iterations, one epoch record: the per-log L_x of TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    one = {"mlcl": [{"epoch": 1, "iteration": 100, "loss": 3.0, "x": 0.8, "miou": 30.0}]}
    fig = viz.plot_training_curves(curve_entries(one))  # no logs: one point, visible, said
    line = fig.axes[1].lines[0]
    assert list(line.get_xdata()) == [100] and line.get_marker() == "o"
    assert any("one L_x point per run" in t.get_text() for t in fig.axes[1].texts)
    with SummaryWriter(tmp_path / "tensorboard") as writer:
        for it in range(20, 101, 20):
            writer.add_scalar("train/x", 2.0 - it / 100, it)
            writer.add_scalar("train/loss", 5.0, it)
    fig = viz.plot_training_curves(curve_entries(one, str(tmp_path)))
    line = fig.axes[1].lines[0]
    assert list(line.get_xdata()) == [20, 40, 60, 80, 100]
    assert np.allclose(line.get_ydata(), [1.8, 1.6, 1.4, 1.2, 1.0])
    assert not fig.axes[1].texts


def test_paired_seed_summary_against_a_slow_computation():
    """The weak-features study's numbers: per seed best / last / mean of the last three
    evaluations, then the paired differences' mean, std, 95 % t-interval and sign count, here
    against sums written out by hand (t quantile of 3 degrees of freedom: 3.182446)."""
    uni = {0: 60.0, 1: 63.5, 2: 61.0, 3: 64.0}
    mixed = {0: 61.0, 1: 63.0, 2: 62.5, 3: 64.5, 4: 70.0}  # seed 4: no partner, left out
    entries = ([fake_entry("synthetic", "1_16", "unimatch", s, b) for s, b in uni.items()]
               + [fake_entry("synthetic", "1_16", "mlcl", s, b, ablation="mixed")
                  for s, b in mixed.items()]
               + [fake_entry("synthetic", "1_16", "mlcl", 0, 99.0)])  # another cell
    cell = {"preset": "synthetic", "split": "1_16"}
    a = viz.seed_values(entries, **cell, method="mlcl", variant="paper", ablation="mixed")
    b = viz.seed_values(entries, **cell, method="unimatch", ablation="")
    assert list(a.index) == [0, 1, 2, 3, 4] and a.loc[1, "best"] == 63.0
    # fake_entry's evaluations: best - 4, best - 2, last (= best - 0.5)
    assert a.loc[2, "last"] == 62.0 and a.loc[2, "last3"] == (58.5 + 60.5 + 62.0) / 3
    summary = viz.paired_summary(a, b)
    d = [1.0, -0.5, 1.5, 0.5]
    mean = sum(d) / 4
    sd = (sum((x - mean) ** 2 for x in d) / 3) ** 0.5
    half = 3.182446 * sd / 4 ** 0.5
    for metric in ("best", "last", "last3"):  # last and last3 move with best in fake_entry
        row = summary.loc[metric]
        assert row.n == 4 and row.positive == 3
        assert row["mean"] == pytest.approx(mean) and row["std"] == pytest.approx(sd)
        assert (row.ci_low, row.ci_high) == pytest.approx((mean - half, mean + half), abs=1e-5)
    with pytest.raises(ValueError, match="two complete runs of seed 0"):
        viz.seed_values(entries, method="mlcl")  # the forward and the mixed cell
    fig = viz.plot_paired_differences({"mixed - UniMatch": a - b})
    dots = [c for c in fig.axes[0].collections if len(c.get_offsets()) == 4]
    assert len(fig.axes) == 3 and len(dots) == 1

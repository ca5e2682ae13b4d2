"""Every notebook executes through papermill with tiny parameters (smoke tier), and what it
writes has the properties it promises. Notebooks are committed without outputs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch

from mlcl.study import paper, registry
from mlcl.config import load_config
from mlcl.train import fit

from test_viz import fake_entry, write_registry  # noqa: E402  (tests/ is on sys.path)

NOTEBOOKS = ("run", "perturbations", "prototypes", "figures")
TINY = ["data.crop_size=32", "train.batch_size=4", "model.width=16", "data.num_workers=0",
        "train.max_iters=2", "train.epochs=1", "split=1_8"]


def execute(name: str, out: Path, **parameters) -> nbformat.NotebookNode:
    import papermill

    os.environ["OMP_NUM_THREADS"] = "1"  # the kernel inherits it
    out.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(registry.NOTEBOOKS / f"{name}.ipynb"), str(out),
                               parameters=parameters, kernel_name="python3",
                               progress_bar=False, cwd=str(out.parent))
    return nbformat.read(out, as_version=4)


@pytest.fixture(scope="session")
def tiny_runs(synth_root, tmp_path_factory) -> dict[str, Path]:
    """Output dirs of 2-iteration supervised / unimatch / mlcl runs; the MLCL best.pt gets a
    filled prototype bank (2 iterations do not reach the 0.95 confidence it needs)."""
    root = tmp_path_factory.mktemp("tiny_runs")
    out = {}
    for method in ("supervised", "unimatch", "mlcl"):
        out[method] = root / method
        fit(load_config("synthetic", [f"data.root={synth_root}", f"method={method}",
                                      f"output_dir={out[method]}", *TINY]))
    ckpt = torch.load(out["mlcl"] / "best.pt", weights_only=True)
    protos = torch.randn(ckpt["bank"]["protos"].shape, generator=torch.Generator().manual_seed(0))
    protos[-1] = 0  # one class never initialised
    ckpt["bank"]["protos"] = protos
    torch.save(ckpt, out["mlcl"] / "best.pt")
    return out


def test_notebooks_are_committed_clean():
    for name in NOTEBOOKS:
        nb = nbformat.read(registry.NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), name
        assert all(not c.outputs and c.execution_count is None for c in code), name
        assert "json" in code[-1].source.lower(), f"{name}: the last cell writes JSON"


def test_make_lab_opens_copies_and_keeps_them(tmp_path):
    """`make lab` runs JupyterLab on untracked copies: saving a run notebook there (outputs
    and all) leaves notebooks/*.ipynb clean; a copy once made is kept."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("no make on PATH")
    repo, lab = registry.NOTEBOOKS.parent, tmp_path / "lab"
    make = ["make", "-C", str(repo), f"LAB_DIR={lab}"]
    subprocess.run([*make, "lab-copies"], check=True, capture_output=True)
    for name in NOTEBOOKS:
        assert (lab / f"{name}.ipynb").read_bytes() == \
            (registry.NOTEBOOKS / f"{name}.ipynb").read_bytes()
    (lab / "run.ipynb").write_text("edited")
    subprocess.run([*make, "lab-copies"], check=True, capture_output=True)
    assert (lab / "run.ipynb").read_text() == "edited"
    plan = subprocess.run([*make, "-n", "lab"], check=True, capture_output=True, text=True)
    opened = [ln.split()[2] for ln in plan.stdout.splitlines() if " lab " in f"{ln} "
              and ln.split()[0].endswith("jupyter")]
    assert opened == [str(lab)]


def test_run_notebook_trains_evaluates_and_records(synth_root, tmp_path):
    out, reg = tmp_path / "cells" / "r", tmp_path / "registry"
    nb = execute("run", tmp_path / "run.ipynb", preset="synthetic", split="1_8", method="mlcl",
                 variant="released", seed=1, ablation="no_dt", output_dir=str(out),
                 registry_dir=str(reg), grid="tiny", num_predictions=2,
                 overrides=[f"data.root={synth_root}", *TINY])
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    entry = registry.load_entry("synthetic-1_8-mlcl-released-no_dt-s1", reg)
    assert entry["run"] == {"preset": "synthetic", "split": "1_8", "method": "mlcl",
                            "variant": "released", "ablation": "no_dt", "seed": 1,
                            "overrides": ["mlcl.use_dt=false", f"data.root={synth_root}", *TINY]}
    assert entry["config"]["mlcl"]["use_dt"] is False and entry["synthetic"]
    assert entry["config"]["mlcl"]["variant"] == "released" and entry["grid"] == "tiny"
    assert entry["metrics"]["complete"] and entry["metrics"]["iterations"] == 2
    assert entry["evaluation"]["miou"] == pytest.approx(entry["metrics"]["best_miou"])
    assert entry["evaluation"]["num_images"] == 8 and entry["environment"]["torch"]
    summary = json.loads((out / "run_notebook.json").read_text())
    assert summary["best_miou"] == entry["metrics"]["best_miou"]
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # curves and predictions


def test_perturbations_notebook(tiny_runs, tmp_path):
    out = tmp_path / "pert"
    execute("perturbations", tmp_path / "pert.ipynb", checkpoint=str(tiny_runs["mlcl"] / "best.pt"),
            num_images=2, batch_images=4, out_dir=str(out))
    for name in ("perturbations_paper", "perturbations_released", "sai_response"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.pdf").is_file()
    summary = json.loads((out / "perturbations.json").read_text())
    lo, hi = summary["mask_ratio_released"]
    assert 0.805 - 1e-6 <= lo <= hi <= 0.85 + 1e-6  # the double transform squeezes r
    table = pd.read_csv(out / "sai_per_image.csv", index_col=0)
    assert len(table) == 4
    assert (table["r (paper)"] - (1 - 0.15 * (table["v"] + 1))).abs().max() < 1e-3
    caption = json.loads((out / "sai_response.json").read_text())["caption"]
    assert "SYNTHETIC" in caption and "mlcl" in caption


def test_prototypes_notebook(tiny_runs, tmp_path):
    out = tmp_path / "protos"
    execute("prototypes", tmp_path / "protos.ipynb",
            checkpoints={"UniMatch": str(tiny_runs["unimatch"] / "best.pt"),
                         "MLCL": str(tiny_runs["mlcl"] / "best.pt")},
            num_images=4, max_pixels=140, tsne=True, out_dir=str(out))
    summary = json.loads((out / "prototypes.json").read_text())
    assert summary["prototype_source"] == {"UniMatch": "class means", "MLCL": "memory bank"}
    table = pd.read_csv(out / "compactness.csv", header=[0, 1], index_col=0)
    assert ("MLCL", "to class means") in table.columns
    assert ("UniMatch", "to prototypes (class means)") in table.columns
    assert pd.isna(table.loc["cross", ("MLCL", "to prototypes (memory bank)")])  # never set
    assert table.abs().max().max() <= 1.0 + 1e-6
    for name in ("prototypes", "embedding", "compactness_bars"):
        assert (out / f"{name}.png").stat().st_size > 0


def test_figures_notebook_reads_the_registry(tiny_runs, tmp_path):
    entries = [fake_entry("pascal", "183", "supervised", s, b, b - 1)
               for s, b in enumerate([50.0, 52.0, 54.0])]
    entries += [fake_entry("pascal", "183", "mlcl", 0, 74.0, variant="released")]
    for method, variant in (("supervised", ""), ("unimatch", ""), ("mlcl", "paper")):
        gain = 2 * (method != "supervised")
        entries += [fake_entry("synthetic", "1_8", method, s, 40.0 + s + gain,
                               variant=variant or "paper", output_dir=str(tiny_runs[method]))
                    for s in range(2)]
    entries += [fake_entry("synthetic", "1_8", "mlcl", s, 41.0, ablation="no_sai")
                for s in range(2)]
    weak = {("unimatch", ""): [60.0, 63.0, 61.0], ("mlcl", ""): [61.0, 62.0, 62.5],
            ("mlcl", "mixed"): [60.5, 63.5, 62.0]}  # the weak-features grid, seeds 0-2
    entries += [fake_entry("synthetic", "1_16", m, s, b, ablation=a)
                for (m, a), bests in weak.items() for s, b in enumerate(bests)]
    reg = write_registry(tmp_path / "registry", entries)
    figs = tmp_path / "figures"
    execute("figures", tmp_path / "figures.ipynb", registry_dir=str(reg), figures_dir=str(figs),
            num_images=2)
    t1 = pd.read_csv(figs / "table_I.csv", index_col=[0, 1], dtype=str)
    assert t1.loc[("Supervised", "ours, best epoch"), "1/8 (183)"] == "52.00 ± 2.00 (n=3)"
    assert t1.loc[("MLCL", "ours, released variant, best epoch"), "1/8 (183)"] == "74.00 (n=1)"
    assert t1.loc[("MLCL", "ours, paper variant, best epoch"), "1/8 (183)"] == "not run"
    assert t1.loc[("MLCL", "published: MLCL (paper)"), "full (1464)"] == "79.62"
    for key, t in paper.TABLES.items():  # published numbers in every table, nothing else run
        shown = pd.read_csv(figs / f"table_{key}.csv", dtype=str).to_numpy().ravel().tolist()
        assert all(f"{v:.2f}" in shown for vs in t.published.values() for v in vs)
    assert "not run" in pd.read_csv(figs / "table_III.csv", dtype=str).to_numpy()
    study = pd.read_csv(figs / "synthetic_study.csv", header=[0, 1], index_col=[0, 1], dtype=str)
    assert study.loc[("synthetic", "UniMatch"), ("1_8, 600 it.", "gain vs supervised")] \
        == "+2.00 ± 0.00 (n=2), 2/2 > 0"
    assert study.loc[("synthetic", "Supervised"), ("1_8, 600 it.", "best")] \
        == "40.50 ± 0.71 (n=2)"
    ablation = pd.read_csv(figs / "ablation.csv", index_col=[0, 1], dtype=str)
    no_sai = ablation[ablation.index.get_level_values(1) == "without SAI"]
    assert no_sai.iloc[0]["Δ best vs all components"].startswith("-1.50")
    qual = json.loads((figs / "qualitative.json").read_text())
    assert qual["synthetic"] and qual["caption"].startswith("SYNTHETIC-DATA RESULTS")
    assert set(qual["runs"]) == {"synthetic-1_8-supervised-s0", "synthetic-1_8-unimatch-s0",
                                 "synthetic-1_8-mlcl-paper-s0"}
    for name in ("qualitative", "synthetic_study_bars", "curves_synthetic_1_8",
                 "curves_pascal_183"):
        assert (figs / f"{name}.png").stat().st_size > 0 and (figs / f"{name}.pdf").is_file()
    t1_caption = json.loads((figs / "table_I.json").read_text())
    assert set(t1_caption["runs"]) == {e["name"] for e in entries[:4]}
    assert not t1_caption["synthetic"]
    per_seed = pd.read_csv(figs / "weak_features_per_seed.csv", header=[0, 1], index_col=0)
    assert list(per_seed[("MLCL mixed", "best")]) == [60.5, 63.5, 62.0]
    paired = pd.read_csv(figs / "weak_features_per_seed_values.csv", index_col=[0, 1])
    assert paired.loc[("mixed − forward", "best"), "mean"] == pytest.approx(0.5 / 3)
    assert paired.loc[("MLCL mixed − UniMatch", "best"), "positive"] == 3
    assert (figs / "weak_features_paired.png").stat().st_size > 0
    index = json.loads((figs / "figures.json").read_text())
    assert {"table_I", "table_II", "table_III", "qualitative", "ablation"} <= \
        {i["name"] for i in index["items"]}


def test_exploration_notebooks_read_mlcl_on_unimatch_v2(synth_root, tmp_path):
    """perturbations and prototypes on an MLCL-on-UniMatch-V2 checkpoint (DPT on a ViT, the
    EMA teacher's weights and the bank)."""
    run = tmp_path / "v2"
    fit(load_config("synthetic_vit", [f"data.root={synth_root}", "method=mlcl",
                                      f"output_dir={run}", *TINY]))
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["config"]["mlcl"]["base"] == "unimatch_v2"
    ckpt["bank"]["protos"] = torch.randn(ckpt["bank"]["protos"].shape)  # 2 steps fill none
    torch.save(ckpt, run / "best.pt")
    execute("perturbations", tmp_path / "pert.ipynb", checkpoint=str(run / "best.pt"),
            num_images=2, batch_images=4, out_dir=str(tmp_path / "pert"))
    table = pd.read_csv(tmp_path / "pert/sai_per_image.csv", index_col=0)
    assert len(table) == 4
    assert (table["r (paper)"] - (1 - 0.15 * (table["v"] + 1))).abs().max() < 1e-3
    execute("prototypes", tmp_path / "protos.ipynb", checkpoints={"V2": str(run / "best.pt")},
            num_images=4, max_pixels=140, tsne=False, out_dir=str(tmp_path / "protos"))
    summary = json.loads((tmp_path / "protos/prototypes.json").read_text())
    assert summary["prototype_source"] == {"V2": "memory bank"}
    assert (tmp_path / "protos/prototypes.png").stat().st_size > 0

"""The data side of the UniMatch V2 presets (docs/real_data.md, section 12): their split lists
are the ones `data voc` / `data cityscapes` fetch, the official DINOv2 files download
resumably and load strictly, a missing one stops `train` in one line, and UniMatch V2's
published numbers stand beside the registry's runs in the column of their backbone."""
from __future__ import annotations

import io
import json
import math
import re
import time
from pathlib import Path

import pytest
import torch

from fakes import LocalServer, unimatch_lists
from mlcl.__main__ import main
from mlcl.config import load_config, save_config
from mlcl.measure.fabricate import fabricate_dataset
from mlcl.model import build_model, dinov2_url
from mlcl.prepare.pretrained import DEFAULT_PATHS
from mlcl.prepare.split_lists import SPLITS, UNIMATCH_COMMIT, UNIMATCH_REPO, split_files
from mlcl.study import paper, registry, viz
from test_method_doc import ROOT, _section, _table

# preset -> (dataset, its splits, the pools of the small dataset: fine set, extra, val)
V2_PRESETS = {"pascal_v2": ("pascal", ("92", "183", "366", "732", "1464"), (16, 4, 2)),
              "cityscapes_v2": ("cityscapes", ("1_16", "1_8", "1_4", "1_2"), (16, 0, 2))}


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with LocalServer() as srv:
        yield srv


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """``python -m mlcl ARGS`` in this process: (exit status, stderr)."""
    rc = main(list(args))
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------- split lists
@pytest.mark.parametrize("preset", list(V2_PRESETS))
def test_every_v2_cell_reads_the_lists_the_data_step_writes(preset):
    dataset, splits, _ = V2_PRESETS[preset]
    for split in splits:
        cfg = load_config(preset, [f"split={split}"])
        written = {f"splits/{dataset}/{rel}" for rel in split_files(dataset, [split])}
        assert {cfg.data.labeled_split, cfg.data.unlabeled_split, cfg.data.val_split} == written
        assert cfg.data.dataset == dataset and cfg.model.backbone == "dinov2_s"
        assert cfg.model.pretrained == DEFAULT_PATHS["dinov2_s"] == "pretrained/dinov2_small.pth"


def serve_unimatch_lists(srv: LocalServer, root: Path, preset: str) -> str:
    """Serve UniMatch-format lists of the fabricated ``root`` as the pinned commit's; the
    ``--expect`` of the pools."""
    dataset, splits, (fine, extra, val) = V2_PRESETS[preset]
    first = root / "splits" / dataset / splits[0]
    train = [ln for name in ("labeled", "unlabeled")
             for ln in (first / f"{name}.txt").read_text().splitlines()]
    val_lines = (root / "splits" / dataset / "val.txt").read_text().splitlines()
    sizes = {s: math.ceil(fine / SPLITS[dataset][s][1]) for s in splits}
    lists = unimatch_lists("pairs", train[:fine], val_lines, sizes, train[fine:])
    for rel, text in lists.items():
        srv.add(f"/{UNIMATCH_REPO}/{UNIMATCH_COMMIT}/splits/{dataset}/{rel}", text.encode())
    pools = {"train": fine, "val": val} | ({"train_aug": fine + extra} if extra else {})
    return ",".join(f"{k}={v}" for k, v in pools.items())


@pytest.mark.parametrize("preset", list(V2_PRESETS))
def test_v2_preset_trains_on_fetched_lists_until_the_missing_weights(
        preset, server, tmp_path, monkeypatch, capsys):
    """The lists `data splits` fetches verify and pass training's pre-flight; the missing
    DINOv2 file then stops `train` in one line naming the URL and the path, before a step."""
    dataset, splits, (fine, extra, val) = V2_PRESETS[preset]
    root = fabricate_dataset(dataset, tmp_path / "data", labeled=1, unlabeled=fine + extra - 1,
                             val=val, scale=0.1)
    expect = serve_unimatch_lists(server, root, preset)
    (root / "splits" / dataset / "PROVENANCE.json").unlink(missing_ok=True)
    for path in (root / "splits" / dataset).rglob("*.txt"):
        path.unlink()  # the fabricated lists: the fetch must write them
    rc, _ = run_cli(capsys, "data", "splits", "--dataset", dataset, "--root", str(root),
                    "--names", *splits, "--split-base-url", server.url(), "--expect", expect,
                    "--backoff", "0")
    assert rc == 0
    layout = "voc" if dataset == "pascal" else "cityscapes"
    assert run_cli(capsys, "data", "verify", "--root", str(root), "--layout", layout)[0] == 0
    monkeypatch.chdir(tmp_path)  # the preset's relative pretrained/ path: absent here
    out, started = tmp_path / "out", time.monotonic()
    rc, err = run_cli(capsys, "train", "--config", preset, f"split={splits[1]}",
                      f"data.root={root}", f"output_dir={out}", "data.num_workers=0")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: model.pretrained")
    assert dinov2_url("dinov2_s") in lines[0] and "pretrained/dinov2_small.pth" in lines[0]
    assert time.monotonic() - started < 60 and not out.exists()  # before the first step


# --------------------------------------------------------------------------- weights
@pytest.fixture(scope="module")
def dinov2_small_file() -> bytes:
    """A checkpoint with the official DINOv2 ViT-S/14 file's keys and shapes (timm's names,
    plus the masked-modelling token), random values."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    state = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
    state["mask_token"] = torch.randn(1, 384)
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_dinov2_download_resumes_records_and_loads_strictly(
        server, tmp_path, monkeypatch, capsys, dinov2_small_file):
    monkeypatch.chdir(tmp_path)
    url = server.add("/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth", dinov2_small_file)
    server.truncate["/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"] = 1 << 22  # drop at 4 MB
    rc, _ = run_cli(capsys, "data", "pretrained", "--dinov2", "dinov2_s", "--url", url,
                    "--backoff", "0")
    path = tmp_path / DEFAULT_PATHS["dinov2_s"]
    assert rc == 0 and path.read_bytes() == dinov2_small_file
    ranges = [h.get("Range") for _, _, h in server.requests if h.get("Range")]
    assert ranges == [f"bytes={1 << 22}-"]  # the second attempt resumed
    prov = json.loads((path.parent / "PROVENANCE.json").read_text())[path.name]
    assert prov["backbone"] == "dinov2_s" and prov["source"] == dinov2_url("dinov2_s")
    # a second run downloads nothing; the preset's model loads the file into its encoder
    assert run_cli(capsys, "data", "pretrained", "--dinov2", "dinov2_s", "--url", url)[0] == 0
    assert len(server.requests) == 2
    model = build_model(load_config("pascal_v2", ["split=183"]))
    saved = torch.load(path, weights_only=True)
    assert torch.equal(model.backbone.state_dict()["blocks.11.mlp.fc2.weight"],
                       saved["blocks.11.mlp.fc2.weight"])


def test_dinov2_check_refuses_another_models_file_and_names_a_missing_ones_source(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / DEFAULT_PATHS["dinov2_s"]
    path.parent.mkdir()
    torch.save({"cls_token": torch.zeros(1, 1, 384)}, path)
    rc, err = run_cli(capsys, "data", "pretrained", "--check", str(path))  # backbone: from name
    assert rc == 1 and "does not load into dinov2_s" in err and "missing keys" in err
    rc, err = run_cli(capsys, "data", "pretrained", "--check", DEFAULT_PATHS["dinov2_b"])
    assert rc == 1 and "--dinov2 dinov2_b" in err and dinov2_url("dinov2_b") in err
    rc, err = run_cli(capsys, "data", "pretrained", "--dinov2", "dinov2_x")
    assert rc == 1 and "no DINOv2 checkpoint for 'dinov2_x'" in err


# --------------------------------------------------------------------------- published numbers
def test_each_published_table_is_documented_where_its_source_says():
    docs = {key: ROOT / re.search(r"docs/\w+\.md", t.source).group(0)
            for key, t in paper.TABLES.items()}
    assert {k for k, d in docs.items() if d.name == "method.md"} == {"I", "II", "III"}
    v2 = [k for k, d in docs.items() if d.name == "real_data.md"]
    assert v2 == ["V2-VOC", "V2-Cityscapes"]
    text = (ROOT / "docs" / "real_data.md").read_text()
    for key in v2:
        header, rows = _table(_section(text, f"### Table {key}"))
        table = paper.TABLES[key]
        assert header[1:] == [c.label for c in table.columns]
        label = paper.PUBLISHED_LABELS["unimatch_v2"]
        assert set(rows) == {label} and table.unpublished == ("mlcl",)
        assert [float(v) for v in rows[label]] == list(table.published["unimatch_v2"])
    voc = paper.TABLES["V2-VOC"]
    assert voc.value("unimatch_v2", "pascal_v2", "92", "dinov2_s") == 79.0
    assert voc.value("unimatch_v2", "pascal_v2", "92", "dinov2_b") == 86.3
    assert paper.TABLES["V2-Cityscapes"].value("unimatch_v2", "cityscapes_v2", "1_2",
                                               "dinov2_b") == 85.1


def record_preset_run(tmp_path: Path, reg: Path, overrides: list[str], best: float) -> str:
    """A complete run of pascal_v2 at 183 in the preset's own output_dir (under ``tmp_path``),
    recorded as a plain `train` run (no grid cell); its registry name."""
    cfg = load_config("pascal_v2", ["split=183", *overrides])
    out = tmp_path / cfg.output_dir
    save_config(cfg, out / "config.yaml")
    metrics = {"complete": True, "best_miou": best, "last_miou": best - 1, "iterations": 10}
    (out / "metrics.json").write_text(json.dumps(metrics))
    name = out.name
    registry.record_output_dir(name, out, reg)
    return name


def test_a_preset_run_lands_in_the_column_of_its_backbone(tmp_path):
    small, base = tmp_path / "reg_s", tmp_path / "reg_b"
    name = record_preset_run(tmp_path, small, [], 84.0)
    assert name == "dinov2_s-unimatch_v2-s0"  # runs/pascal/183/dinov2_s-unimatch_v2-s0
    record_preset_run(tmp_path, small, ["method=mlcl"], 85.0)
    record_preset_run(tmp_path, base, ["model.backbone=dinov2_b",
                                       "model.pretrained=pretrained/dinov2_base.pth"], 88.0)
    table = viz.paper_table(registry.load_registry(small), "V2-VOC")
    row = ("UniMatch V2", "ours, best epoch")
    assert table.loc[row, "S 1/8 (183)"] == "84.00 (n=1)"
    assert table.loc[row, "B 1/8 (183)"] == viz.NOT_RUN
    assert table.loc[("UniMatch V2", "published: UniMatch V2 (TPAMI'25)"), "S 1/8 (183)"] \
        == "85.50"
    assert table.loc[("MLCL", "ours, paper variant, best epoch"), "S 1/8 (183)"] == "85.00 (n=1)"
    assert set(table.loc[("MLCL", "published: MLCL (paper)")]) == {viz.NOT_PUBLISHED}
    b = viz.paper_table(registry.load_registry(base), "V2-VOC")
    assert (b.loc[row, "B 1/8 (183)"], b.loc[row, "S 1/8 (183)"]) == ("88.00 (n=1)", viz.NOT_RUN)
    # nowhere else: not in Table I (pascal, ResNet-50)
    assert not viz.paper_table_values(registry.load_registry(small), "I").n.any()
    # one registry holds both backbones of a preset, each in its own columns
    both = viz.paper_table(registry.load_registry(small) + registry.load_registry(base), "V2-VOC")
    assert (both.loc[row, "S 1/8 (183)"], both.loc[row, "B 1/8 (183)"]) == ("84.00 (n=1)",
                                                                            "88.00 (n=1)")

"""Every cell of the paper's Tables I-III (docs/method.md, "Published numbers") has a preset
that loads with the released settings (docs/method.md, "Released settings"), and its split
files are the ones the data scripts write. Where the paper's text lies beside the checkout,
its tables are compared with the cells below."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlcl.config import load_config
from mlcl.paths import REPO
from mlcl.prepare.pretrained import DEFAULT_PATHS
from mlcl.prepare.split_lists import split_files, standard_size

# table -> (preset, split, backbone) for each column, in the paper's order
TABLES = {
    "I": [("pascal", s, "resnet50_deepstem") for s in ("183", "366", "732", "1464")],
    "II": [("pascal_blended", s, "resnet50_deepstem") for s in ("1_16", "1_8", "1_4")]
    + [("pascal_blended_r101", s, "resnet101_deepstem") for s in ("1_16", "1_8", "1_4")],
    "III": [("cityscapes", s, "resnet50_deepstem") for s in ("1_16", "1_8", "1_4", "1_2")],
}
ROWS = ("supervised", "unimatch", "mlcl")
CELLS = [cell for cells in TABLES.values() for cell in cells]
# docs/method.md, "Released settings" (Hyper-parameters)
SETTINGS = {
    "pascal": dict(layout="voc", classes=21, crop=321, epochs=80, batch=4, lr=0.001,
                   lr_multi=10.0, loss="ce", tau=0.95, eval="whole"),
    "cityscapes": dict(layout="cityscapes", classes=19, crop=801, epochs=240, batch=4,
                       lr=0.005, lr_multi=1.0, loss="ohem", tau=0.0, eval="sliding"),
}


def paper_md() -> Path | None:
    for p in (REPO.parent / "shared" / "PAPER.md", Path("/work/shared/PAPER.md")):
        if p.is_file():
            return p
    return None


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("preset, split, backbone", CELLS)
def test_every_cell_loads_with_the_released_settings(preset, split, backbone, row):
    cfg = load_config(preset, [f"split={split}", f"method={row}"])
    dataset = "cityscapes" if preset == "cityscapes" else "pascal"
    s = SETTINGS[dataset]
    assert cfg.method == row and cfg.split == split
    assert cfg.data.dataset == dataset and cfg.data.layout == s["layout"]
    assert cfg.data.num_classes == s["classes"] == len(cfg.data.class_names)
    assert cfg.data.crop_size == s["crop"] and cfg.train.epochs == s["epochs"]
    assert cfg.train.batch_size == s["batch"]
    assert cfg.train.lr == pytest.approx(s["lr"]) and cfg.train.lr_multi == s["lr_multi"]
    assert cfg.train.loss == s["loss"] and cfg.train.conf_thresh == s["tau"]
    assert cfg.eval.mode == s["eval"]
    assert (cfg.train.ohem_thresh, cfg.train.ohem_min_kept) == (0.7, 200_000)
    assert cfg.mlcl.omega == 0.01 and cfg.mlcl.beta == 0.01
    assert cfg.model.backbone == backbone
    assert cfg.model.pretrained == DEFAULT_PATHS[backbone.removesuffix("_deepstem")]
    assert cfg.model.aspp_dilations == [6, 12, 18]
    # the split files are the ones `data splits` writes under data.root
    written = {f"splits/{dataset}/{rel}" for rel in split_files(dataset, [split])}
    assert {cfg.data.labeled_split, cfg.data.unlabeled_split, cfg.data.val_split} == written
    assert cfg.split_path("labeled_split") == Path(cfg.data.root) / cfg.data.labeled_split


def test_cells_write_to_their_own_output_dirs():
    dirs = [load_config(p, [f"split={s}"]).output_dir for p, s, _ in CELLS]
    assert len(set(dirs)) == len(dirs), "a run would resume another cell's checkpoint"


def test_blended_presets_do_not_accept_the_original_splits():
    with pytest.raises(Exception, match="split"):
        load_config("pascal_blended", ["split=183"])


def test_the_tables_in_paper_md_are_the_cells_above():
    path = paper_md()
    if path is None:
        pytest.skip("shared/PAPER.md not found beside the checkout")
    text = path.read_text()
    for table, cells in TABLES.items():
        section = re.search(rf"^## Table {table} — .*?$\n(.*?)(?=^## |\Z)", text, re.M | re.S)
        assert section, f"Table {table} not found in {path}"
        header = next(ln for ln in section.group(1).splitlines() if ln.startswith("| method"))
        columns = [c.strip() for c in header.strip("|").split("|")[1:]]
        assert len(columns) == len(cells), (table, columns)
        for col, (preset, split, backbone) in zip(columns, cells):
            frac = re.search(r"(1/\d+|full)", col).group(1)
            want = "1464" if frac == "full" else None
            if preset == "pascal":  # Table I names the splits by their sizes
                assert split == (want or re.search(r"\((\d+)\)", col).group(1)), col
            else:
                assert split == frac.replace("/", "_"), col
                assert ("R101" in col) == backbone.startswith("resnet101"), col
            size = re.search(r"\((\d+)\)", col)
            if size:  # the published labeled count is the size rule's
                dataset = "cityscapes" if preset == "cityscapes" else "pascal"
                assert standard_size(dataset, split) == int(size.group(1)), col

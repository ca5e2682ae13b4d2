"""The synthetic dataset generator (mlcl.study.synthetic)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from mlcl.__main__ import main
from mlcl.data import read_split
from mlcl.study.synthetic import FRACTIONS, class_names, edge_band, make_synthetic


def _tree_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_byte_identical(tmp_path):
    for layout in ("voc", "cityscapes"):
        a = make_synthetic(tmp_path / f"a_{layout}", 10, 3, 24, seed=1, layout=layout)
        b = make_synthetic(tmp_path / f"b_{layout}", 10, 3, 24, seed=1, layout=layout)
        ha, hb = _tree_hashes(a), _tree_hashes(b)
        assert ha == hb and len(ha) > 26
    c = make_synthetic(tmp_path / "c", 10, 3, 24, seed=2)
    hc = _tree_hashes(c)
    assert hc["JPEGImages/train_000000.jpg"] != _tree_hashes(tmp_path / "a_voc")[
        "JPEGImages/train_000000.jpg"]


def test_voc_layout_and_mask_values(synth_root):
    assert (synth_root / "classes.txt").read_text().split() == [
        "background", "disc", "rectangle", "triangle", "ring", "star", "cross"]
    train = (synth_root / "ImageSets/Segmentation/train.txt").read_text().split()
    assert len(train) == 48 and train[0] == "train_000000"
    seen = set()
    ignore = []
    for sid in train[:16]:
        img = Image.open(synth_root / f"JPEGImages/{sid}.jpg")
        mask = Image.open(synth_root / f"SegmentationClass/{sid}.png")
        assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
        assert mask.mode == "P" and mask.size == (32, 32)
        m = np.array(mask)
        seen |= set(np.unique(m).tolist())
        ignore.append((m == 255).mean())
    assert seen <= set(range(7)) | {255} and {0, 255} < seen and len(seen) >= 5
    assert 0.05 < np.mean(ignore) < 0.4  # the ~2 px band along the edges


def test_split_sizes_disjoint_and_nested(synth_root):
    train = read_split(synth_root / "splits/train.txt", synth_root, "voc")
    prev = set()
    for name, d in sorted(FRACTIONS.items(), key=lambda kv: -kv[1]):  # 1_32 first
        lab = read_split(synth_root / f"splits/{name}/labeled.txt", synth_root, "voc")
        unl = read_split(synth_root / f"splits/{name}/unlabeled.txt", synth_root, "voc")
        assert len(lab) == round(48 / d) and len(lab) + len(unl) == 48
        assert set(lab).isdisjoint(unl) and set(lab) | set(unl) == set(train)
        assert prev <= set(lab)  # fewer labels are a subset of more
        prev = set(lab)
    line = (synth_root / "splits/1_8/labeled.txt").read_text().splitlines()[0]
    img, mask = line.split()
    assert img.startswith("JPEGImages/") and mask.startswith("SegmentationClass/")


def test_cityscapes_layout(synth_cityscapes_root):
    root = synth_cityscapes_root
    for split, n in (("train", 24), ("val", 6)):
        images = sorted((root / "leftImg8bit" / split).rglob("*_leftImg8bit.png"))
        assert len(images) == n
        for p in images[:4]:
            city = p.parent.name
            assert p.name.startswith(f"{city}_") and p.name.count("_") == 3
            w, h = Image.open(p).size
            assert (w, h) == (64, 32)
            rel = p.relative_to(root / "leftImg8bit")
            mask = root / "gtFine" / str(rel).replace("_leftImg8bit.png",
                                                       "_gtFine_labelTrainIds.png")
            m = Image.open(mask)
            assert m.mode == "L" and m.size == (64, 32)
            assert set(np.unique(np.array(m)).tolist()) <= set(range(7)) | {255}
    for f in ("splits/train.txt", "splits/val.txt", "splits/1_4/labeled.txt", "classes.txt"):
        assert (root / f).is_file()
    assert len(read_split(root / "splits/1_4/labeled.txt", root, "cityscapes")) == 6


def test_more_classes_cycle_families(tmp_path):
    names = class_names(10)
    assert names[:7] == ["background", "disc", "rectangle", "triangle", "ring", "star", "cross"]
    assert names[7:] == ["disc_2", "rectangle_2", "triangle_2"] and len(set(names)) == 10
    root = make_synthetic(tmp_path / "k10", 12, 2, 24, classes=10)
    vals = set()
    for p in (root / "SegmentationClass").glob("*.png"):
        vals |= set(np.unique(np.array(Image.open(p))).tolist())
    assert vals <= set(range(10)) | {255} and max(vals - {255}) >= 7


def test_edge_band_two_pixels_across():
    inst = np.zeros((8, 8), int)
    inst[:, 4:] = 1
    band = edge_band(inst)
    assert band[:, 3:5].all() and band.sum() == 16


def test_cli_main(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--num-train", "4", "--num-val", "2", "--size",
                 "16", "--classes", "3", "--seed", "5", "--layout", "cityscapes"]) == 0
    assert "wrote 4 train" in capsys.readouterr().out
    assert (out / "classes.txt").read_text().split() == ["background", "disc", "rectangle"]
    assert len(list((out / "gtFine").rglob("*.png"))) == 6


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        make_synthetic(tmp_path, 2, 1, 16, layout="ade")
    with pytest.raises(ValueError, match="background"):
        make_synthetic(tmp_path, 2, 1, 16, classes=1)

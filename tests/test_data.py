"""Split files, datasets and their errors (mlcl.data.splits, mlcl.data.datasets)."""
from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mlcl.config import load_config
from mlcl.data import (DataError, LabeledDataset, UnlabeledDataset, ValDataset, build_datasets,
                       class_names, read_split)
from mlcl.data.classes import data_classes
from mlcl.data.datasets import load_image
from mlcl.data.palette import palette_for, voc_palette


def _mini_root(tmp_path, n=3, size=(24, 20)):
    """A hand-made VOC-layout root with n images a0..; masks hold 0..2 and 255."""
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"a{i}.jpg")
        mask = rng.integers(0, 3, (size[1], size[0])).astype(np.uint8)
        mask[0] = 255
        Image.fromarray(mask).save(root / "SegmentationClass" / f"a{i}.png")
    (root / "ids.txt").write_text("".join(f"a{i}\n" for i in range(n)))
    return root


def _cfg(root, **over):
    items = [f"data.root={root}", "data.num_classes=3", "data.class_names=[]",
             "data.crop_size=16", "split="] + [f"data.{k}={v}" for k, v in over.items()]
    return load_config("synthetic", items)


# --------------------------------------------------------------------------- split files
def test_read_split_voc_ids(synth_root):
    samples = read_split(synth_root / "ImageSets/Segmentation/val.txt", synth_root, "voc")
    assert len(samples) == 8
    s = samples[0]
    assert s.id == "val_000000"
    assert s.image == synth_root / "JPEGImages/val_000000.jpg"
    assert s.mask == synth_root / "SegmentationClass/val_000000.png"


def test_read_split_pairs_match_ids(synth_root):
    pairs = read_split(synth_root / "splits/train.txt", synth_root, "voc")
    ids = read_split(synth_root / "ImageSets/Segmentation/train.txt", synth_root, "voc")
    assert pairs == ids and len(pairs) == 48


def test_read_split_cityscapes_both_formats(synth_cityscapes_root, tmp_path):
    root = synth_cityscapes_root
    pairs = read_split(root / "splits/val.txt", root, "cityscapes")
    assert pairs[0].id == "val/frankfurt/frankfurt_000000_000019"
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("".join(s.id + "\n" for s in pairs))
    assert read_split(ids_file, root, "cityscapes") == pairs
    assert pairs[0].mask.name == "frankfurt_000000_000019_gtFine_labelTrainIds.png"


def test_read_split_comments_blank_lines_and_mixed(tmp_path):
    root = _mini_root(tmp_path)
    split = tmp_path / "mixed.txt"
    split.write_text("# a comment\n\na0\n  JPEGImages/a1.jpg SegmentationClass/a1.png  \n"
                     "a2  # trailing comment\n")
    assert [s.id for s in read_split(split, root, "voc")] == ["a0", "a1", "a2"]


def test_a_line_holding_an_image_path_is_that_image(tmp_path):
    """Format (c): ``JPEGImages/a1.jpg`` alone is that image (not JPEGImages/JPEGImages/...jpg.jpg)
    with its id's mask; in the folder layout ``images/x.png`` pairs with ``masks/x.png``."""
    root = _mini_root(tmp_path)
    split = tmp_path / "paths.txt"
    split.write_text("JPEGImages/a1.jpg\n")
    (s,) = read_split(split, root, "voc")
    assert (s.id, s.image, s.mask) == ("a1", root / "JPEGImages/a1.jpg",
                                       root / "SegmentationClass/a1.png")
    own = tmp_path / "own"
    (own / "images/sub").mkdir(parents=True)
    (own / "masks/sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(own / "images/sub/x.png")
    Image.new("L", (8, 8)).save(own / "masks/sub/x.png")
    split.write_text("images/sub/x.png\n")
    (a,) = read_split(split, own, "folder")
    assert a.id == "sub/x" and a.mask == own / "masks/sub/x.png"
    split.write_text("images/sub/x.png\nsub/x\n")  # no ids in the folder layout
    with pytest.raises(DataError, match=r"paths.txt:2: expected an image path or 'image mask'"):
        read_split(split, own, "folder")


def test_sixteen_bit_grayscale_images_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    rgb = np.asarray(load_image(tmp_path / "g16.png"))
    assert rgb.shape == (16, 16, 3) and (rgb[..., 0] == np.arange(256).reshape(16, 16)).all()


def test_classes_txt_names_and_colours(tmp_path):
    (tmp_path / "classes.txt").write_text("background\ntraffic light 250 170 30\ncar\n")
    assert data_classes(tmp_path)[1] == ["background", "traffic light", "car"]
    pal = palette_for("folder", tmp_path)
    assert pal[1].tolist() == [250, 170, 30] and pal[2].tolist() == voc_palette()[6:9]
    (tmp_path / "classes.txt").write_text("background\ncar 300 0 0\n")
    with pytest.raises(DataError, match=r"classes.txt:2: colour 300 0 0"):
        data_classes(tmp_path)


def test_missing_root_says_how_to_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="python -m mlcl synth") as e:
        read_split(missing / "x.txt", missing, "voc")
    assert str(missing) in str(e.value) and "data.root" in str(e.value)
    cfg = _cfg(missing, labeled_split="a.txt", val_split="b.txt")
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(cfg, with_unlabeled=False)
    with pytest.raises(DataError, match="data.root is empty"):
        build_datasets(_cfg("", labeled_split="a.txt", val_split="b.txt"), False)


def test_missing_image_names_file_line_and_path(tmp_path):
    root = _mini_root(tmp_path)
    split = tmp_path / "split.txt"
    split.write_text("a0\n# ok\nghost\n")
    with pytest.raises(DataError) as e:
        read_split(split, root, "voc")
    msg = str(e.value)
    assert "split.txt:3" in msg and "JPEGImages/ghost.jpg" in msg and "\n" not in msg


def test_missing_mask_required_or_not(tmp_path):
    root = _mini_root(tmp_path)
    (root / "SegmentationClass/a1.png").unlink()
    with pytest.raises(DataError, match=r"ids.txt:2: mask .*a1.png"):
        read_split(root / "ids.txt", root, "voc")
    samples = read_split(root / "ids.txt", root, "voc", require_mask=False)
    assert samples[1].mask is None and samples[0].mask is not None


def test_missing_split_file(tmp_path):
    root = _mini_root(tmp_path)
    with pytest.raises(DataError, match="nope.txt"):
        read_split(root / "nope.txt", root, "voc")


# --------------------------------------------------------------------------- bad files
def test_bad_mask_value_names_mask(tmp_path):
    root = _mini_root(tmp_path)
    Image.fromarray(np.full((20, 24), 7, np.uint8)).save(root / "SegmentationClass/a1.png")
    ds = ValDataset(_cfg(root), root / "ids.txt")
    ds[0]
    with pytest.raises(DataError, match=r"a1.png has values 7") as e:
        ds[1]
    assert "num_classes" in str(e.value)


def test_size_mismatch_names_both(tmp_path):
    root = _mini_root(tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "SegmentationClass/a2.png")
    ds = LabeledDataset(_cfg(root), root / "ids.txt")
    with pytest.raises(DataError, match=r"a2.png is 10x10 but image .*a2.jpg is 24x20"):
        ds[2]


def test_corrupt_image_names_file(tmp_path):
    root = _mini_root(tmp_path)
    (root / "JPEGImages/a0.jpg").write_bytes(b"not a jpeg at all")
    good = (root / "JPEGImages/a1.jpg").read_bytes()
    (root / "JPEGImages/a1.jpg").write_bytes(good[: len(good) // 2])  # truncated
    cfg = _cfg(root)
    for ds in (ValDataset(cfg, root / "ids.txt"), UnlabeledDataset(cfg, root / "ids.txt")):
        with pytest.raises(DataError, match=r"cannot read image .*a0.jpg"):
            ds[0]
        with pytest.raises(DataError, match=r"cannot read image .*a1.jpg"):
            ds[1]


def test_palette_and_grayscale_masks_read_alike(tmp_path):
    root = _mini_root(tmp_path)
    before = ValDataset(_cfg(root), root / "ids.txt")[0]["y"]
    mask = Image.open(root / "SegmentationClass/a0.png")
    assert mask.mode == "L"
    mask.putpalette(voc_palette())  # L -> P with the same indices
    mask.save(root / "SegmentationClass/a0.png")
    assert Image.open(root / "SegmentationClass/a0.png").mode == "P"
    after = ValDataset(_cfg(root), root / "ids.txt")[0]["y"]
    assert torch.equal(before, after) and set(after.unique().tolist()) <= {0, 1, 2, 255}


def test_rgb_mask_is_an_error(tmp_path):
    root = _mini_root(tmp_path)
    Image.new("RGB", (24, 20)).save(root / "SegmentationClass/a0.png")
    with pytest.raises(DataError, match=r"a0.png has mode RGB"):
        ValDataset(_cfg(root), root / "ids.txt")[0]


# --------------------------------------------------------------------------- datasets
def test_build_datasets_shapes_and_lengths(synth_cfg):
    sets = build_datasets(synth_cfg, with_unlabeled=True)
    assert list(sets) == ["labeled", "unlabeled", "val"]
    assert len(sets["unlabeled"]) == 42 and len(sets["labeled"]) == 42 and len(sets["val"]) == 8
    assert len({s.id for s in sets["labeled"].samples}) == 6  # 6 labeled, repeated

    x = sets["labeled"][0]
    assert x["x"].shape == (3, 32, 32) and x["x"].dtype == torch.float32
    assert x["y"].shape == (32, 32) and x["y"].dtype == torch.long
    assert set(x["y"].unique().tolist()) <= set(range(7)) | {255}

    u = sets["unlabeled"][0]
    assert set(u) == {"w", "s1", "s2", "ignore", "box1", "box2", "id"}
    for k in ("w", "s1", "s2"):
        assert u[k].shape == (3, 32, 32) and u[k].dtype == torch.float32
    assert u["ignore"].dtype == torch.long and set(u["ignore"].unique().tolist()) <= {0, 255}
    assert u["box1"].dtype == torch.bool and u["box2"].shape == (32, 32)

    v = sets["val"][0]
    assert v["x"].shape == (3, 32, 32) and v["y"].shape == (32, 32) and v["id"] == "val_000000"

    sup = build_datasets(synth_cfg, with_unlabeled=False)
    assert list(sup) == ["labeled", "val"] and len(sup["labeled"]) == 6


def test_val_is_whole_image_and_cityscapes_wide(synth_cityscapes_root):
    root = synth_cityscapes_root
    cfg = load_config("cityscapes", [f"data.root={root}", "data.num_classes=7",
                                     "data.class_names=[]", "data.val_split=splits/val.txt",
                                     "data.labeled_split=splits/1_8/labeled.txt",
                                     "data.unlabeled_split=splits/1_8/unlabeled.txt",
                                     "data.crop_size=24", "split="])
    sets = build_datasets(cfg, with_unlabeled=True)
    v = sets["val"][0]
    assert v["x"].shape == (3, 32, 64) and v["y"].shape == (32, 64)
    assert sets["labeled"][0]["x"].shape == (3, 24, 24)
    assert sets["unlabeled"][0]["s1"].shape == (3, 24, 24)


def test_unlabeled_masks_need_not_exist(tmp_path):
    root = _mini_root(tmp_path)
    shutil.rmtree(root / "SegmentationClass")
    ds = UnlabeledDataset(_cfg(root), root / "ids.txt")
    assert len(ds) == 3 and ds[0]["w"].shape == (3, 16, 16)


def test_labeled_nsample_repeats_in_order(tmp_path):
    root = _mini_root(tmp_path)
    ds = LabeledDataset(_cfg(root), root / "ids.txt", nsample=7)
    assert [s.id for s in ds.samples] == ["a0", "a1", "a2", "a0", "a1", "a2", "a0"]
    assert len(LabeledDataset(_cfg(root), root / "ids.txt", nsample=2)) == 3  # never shrinks


def test_class_names_sources(tmp_path, synth_cfg):
    assert class_names(synth_cfg)[1] == "disc"  # from the preset
    root = _mini_root(tmp_path)
    assert class_names(_cfg(root)) == ["class_0", "class_1", "class_2"]
    (root / "classes.txt").write_text("bg\ncat\ndog\n")
    assert class_names(_cfg(root)) == ["bg", "cat", "dog"]
    (root / "classes.txt").write_text("bg\ncat\n")
    with pytest.raises(DataError, match="classes.txt"):
        class_names(_cfg(root))


def test_seeded_sample_and_worker_reproducible(synth_cfg):
    ds = build_datasets(synth_cfg, with_unlabeled=True)["unlabeled"]
    random.seed(3)
    a = ds[5]
    random.seed(3)
    b = ds[5]
    assert all(torch.equal(a[k], b[k]) for k in ("w", "s1", "s2", "ignore", "box1", "box2"))

    def first_batch():
        loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=1,
                                             generator=torch.Generator().manual_seed(0))
        return next(iter(loader))

    b1, b2 = first_batch(), first_batch()
    assert b1["id"] == b2["id"] and torch.equal(b1["s1"], b2["s1"])
    assert torch.equal(b1["box2"], b2["box2"])

"""data_scripts/verify.py: OK on a good (synthetic) dataset; names each missing or bad file."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mlcl.study.synthetic import make_synthetic
from mlcl.paths import REPO
from mlcl.prepare import cli
from mlcl.prepare.verify import verify_dataset


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return {layout: make_synthetic(tmp_path_factory.mktemp(layout), num_train=6, num_val=3,
                                   size=16, layout=layout)
            for layout in ("voc", "cityscapes")}


@pytest.mark.parametrize("layout", ["voc", "cityscapes"])
def test_synthetic_dataset_is_ok(synth, layout):
    report = verify_dataset(synth[layout], layout, num_classes=7, log=quiet)
    assert report.ok, "\n".join(report.lines())
    counts = {s.path.relative_to(synth[layout]).as_posix(): s.count for s in report.splits}
    assert counts["splits/train.txt"] == 6 and counts["splits/val.txt"] == 3


def test_script_reports_each_bad_file_and_exits_1(synth, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(synth["voc"], root)
    (root / "SegmentationClass" / "train_000001.png").unlink()  # missing mask
    big = Image.new("L", (20, 16))  # size mismatch (images are 16x16)
    big.save(root / "SegmentationClass" / "train_000002.png")
    bad = np.zeros((16, 16), np.uint8)
    bad[0, 0] = 9  # out of range for K=7 (and not 255)
    Image.fromarray(bad).save(root / "SegmentationClass" / "val_000000.png")
    (root / "JPEGImages" / "train_000003.jpg").unlink()  # missing image

    proc = subprocess.run(
        [sys.executable, str(REPO / "data_scripts" / "verify.py"), "--root", str(root),
         "--layout", "voc", "--num-classes", "7", "--splits", "splits/train.txt",
         "splits/val.txt"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "missing mask" in out and "train_000001.png" in out
    assert "train_000002.png is 20x16 but image" in out
    assert "val_000000.png has values 9: expected 0..6 or 255" in out
    assert "missing image" in out and "train_000003.jpg" in out
    assert out.strip().splitlines()[-1] == "FAILED"
    assert "splits/val.txt: 3 samples, 1 problem(s)" in out


def test_verify_applies_the_loaders_rules(synth, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(synth["voc"], root)
    masks = root / "SegmentationClass"
    Image.fromarray(np.zeros((16, 16), np.float32)).save(masks / "train_000000.tiff")
    (masks / "train_000000.tiff").rename(masks / "train_000000.png")  # 2-D, but mode F
    edge = np.asarray(Image.open(masks / "train_000001.png")).copy()
    edge[edge == 255] = 250  # as in a dataset whose ignore index is 250
    edge[0, 0] = 250
    Image.fromarray(edge).save(masks / "train_000001.png")
    Image.new("L", (20, 16)).save(masks / "train_000002.png")

    def problems(**kw):
        report = verify_dataset(root, "voc", ["splits/train.txt"], 7, log=quiet, **kw)
        return " | ".join(report.splits[0].problems)

    found = problems(ignore_index=250)
    assert "train_000000.png has mode F" in found and "train_000001.png" not in found
    assert "train_000001.png has values 250" in problems()  # data.ignore_index's default: 255
    sizes_only = problems(values=False)
    assert "train_000002.png is 20x16 but image" in sizes_only and "mode F" not in sizes_only
    for mask in masks.glob("*.png"):  # the command line's --ignore-index: 250 borders only
        if mask.name not in ("train_000000.png", "train_000002.png"):
            values = np.asarray(Image.open(mask)).copy()
            values[values == 255] = 250
            Image.fromarray(values).save(mask)
    for broken in ("train_000000.png", "train_000002.png"):
        shutil.copy(masks / "train_000001.png", masks / broken)
    for flags, status in (([], 1), (["--ignore-index", "250"], 0)):
        assert cli.main(["verify", "--root", str(root), "--layout", "voc", "--num-classes", "7",
                         "--splits", "splits/train.txt", *flags]) == status, flags


def test_malformed_lines_and_missing_split_files(synth, tmp_path, capsys):
    root = synth["voc"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a b c\n# comment only\n")
    assert cli.main(["verify", "--root", str(root), "--layout", "voc",
                     "--splits", str(bad), "splits/nope.txt"]) == 1
    out = capsys.readouterr().out
    assert "line 1: expected an id, an image path or 'image mask'" in out
    assert "splits/nope.txt does not exist" in out


def test_unlabeled_splits_need_no_masks_as_in_training(synth, tmp_path, capsys):
    """verify and training agree: an unlabeled split's images need no mask (by its name, or
    listed with --unlabeled); a labeled split's do."""
    root = tmp_path / "voc"
    shutil.copytree(synth["voc"], root)
    (root / "SegmentationClass/train_000000.png").unlink()
    (root / "splits/mine.txt").write_text("train_000000\n")
    shutil.copy(root / "splits/mine.txt", root / "splits/unlabeled_extra.txt")
    report = verify_dataset(root, "voc", ["splits/mine.txt", "splits/unlabeled_extra.txt"], 7,
                            log=quiet)
    assert [len(s.problems) for s in report.splits] == [1, 0]
    assert "missing mask" in report.splits[0].problems[0]
    assert cli.main(["verify", "--root", str(root), "--layout", "voc",
                     "--unlabeled", "splits/mine.txt"]) == 1  # the other lists' train_000000
    out = capsys.readouterr().out
    assert "mine.txt: 1 samples, OK" in out


def test_no_split_files_is_a_failure(tmp_path, capsys):
    assert cli.main(["verify", "--root", str(tmp_path), "--layout", "cityscapes"]) == 1
    assert "no split files" in capsys.readouterr().out


def test_every_data_script_answers_help():
    scripts = sorted((REPO / "data_scripts").glob("*.py"))
    assert {p.name for p in scripts} >= {"prepare_voc.py", "prepare_cityscapes.py",
                                         "fetch_splits.py", "verify.py", "fetch_pretrained.py"}
    for p in scripts:
        proc = subprocess.run([sys.executable, str(p), "--help"], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (p, proc.stderr)

"""Bad input, case by case: each ends in one line naming the culprit and a non-zero exit
status, fails before any training step, and changes no file that existed before. (Bad
config keys, split files and masks read in the main process are also tested in
test_config.py, test_data.py and test_train.py.)"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlcl import files, folders, outputs
from mlcl.__main__ import build_parser, main
from mlcl.study import registry
from mlcl.config import ConfigError, in_range, load_config
from mlcl.data import DataError, ValDataset, preflight
from mlcl.study.synthetic import make_synthetic
from mlcl.files import atomic_write_text
from mlcl.train import fit

TINY = ["model.width=16", "data.crop_size=32", "train.batch_size=4", "data.num_workers=0",
        "train.max_iters=1", "train.epochs=1", "split=1_8"]


def hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (files or folders) by path."""
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*")))
             if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@contextmanager
def unchanged(*roots: Path):
    """Assert that no file under ``roots`` that existed before the block was changed or
    removed by it."""
    before = hashes(*roots)
    yield
    after = hashes(*[r for r in roots if r.exists()])
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"changed or removed: {changed}"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``python -m mlcl ARGS`` in this process: (exit status, stdout, stderr)."""
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse (a message: exit status 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        rc = 1 if isinstance(e.code, str) else e.code or 0
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def data(synth_root, tmp_path) -> Path:
    """A writable copy of the session's synthetic dataset."""
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    return root


@pytest.fixture(scope="module")
def run7(synth_root, tmp_path_factory) -> Path:
    """A one-step run (7 classes) with best.pt."""
    out = tmp_path_factory.mktemp("run7") / "run"
    fit(load_config("synthetic", [f"data.root={synth_root}", f"output_dir={out}", *TINY]))
    return out


@pytest.fixture(scope="module")
def data5(tmp_path_factory) -> Path:
    """Synthetic data with 5 classes (its classes.txt lists 5 names)."""
    return make_synthetic(tmp_path_factory.mktemp("s5"), num_train=16, num_val=4, size=32,
                          classes=5)


@pytest.fixture
def images(tmp_path) -> Path:
    """A folder with a.png and a.jpg (same stem, different pictures) and b.jpg."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(folder / name)
    return folder


def readonly_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into (root ignores permission bits: then /proc/1)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(folder, os.W_OK):
        folder = Path("/proc/1")
        if not folder.is_dir() or os.access(folder, os.W_OK):
            pytest.skip("no unwritable folder available")
    return folder


# --------------------------------------------------------------------------- config values
@pytest.mark.parametrize("override, says", [
    ("train.conf_thresh=1.5", "'train.conf_thresh': 1.5 is out of range; allowed: [0, 1]"),
    ("train.lr=0", "'train.lr': 0.0 is out of range; allowed: > 0"),
    ("train.lr=-0.01", "'train.lr': -0.01 is out of range; allowed: > 0"),
    ("train.epochs=0", "'train.epochs': 0 is out of range; allowed: >= 1"),
    ("train.max_iters=-5", "'train.max_iters': -5 is out of range; allowed: >= 0"),
    ("data.crop_size=0", "'data.crop_size': 0 is out of range; allowed: >= 1"),
    ("mlcl.alpha=-1", "'mlcl.alpha': -1.0 is out of range; allowed: >= 0"),
    ("mlcl.bank_momentum=1.2", "'mlcl.bank_momentum': 1.2 is out of range; allowed: [0, 1]"),
    ("data.aug.scale_range=[2.0,0.5]", "'data.aug.scale_range': [2.0, 0.5] must be [low, high]"),
    ("data.aug.mean=[0.5,0.5]", "'data.aug.mean': [0.5, 0.5] has 2 values, expected 3"),
    ("eval.stride_ratio=1.5", "'eval.stride_ratio': 1.5 is out of range; allowed: (0, 1]"),
    ("data.ignore_index=3", "'data.ignore_index': 3 is a class index"),
    ("seed=-1", "'seed': -1 is out of range"),
])
def test_values_out_of_range_name_key_and_range(synth_root, tmp_path, capsys, override, says):
    out = tmp_path / "run"
    with unchanged(synth_root):
        rc, _, err = run_cli(capsys, "train", "--config", "synthetic",
                             f"data.root={synth_root}", f"output_dir={out}", override)
    assert rc == 2 and says in one_line_error(err)
    assert not out.exists()  # refused before anything was made


def test_every_range_names_a_field():
    cfg = load_config("synthetic")
    sections = [cfg] + [getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                        if dataclasses.is_dataclass(getattr(cfg, f.name))]
    sections.append(cfg.data.aug)
    for section in sections:
        names = {f.name for f in dataclasses.fields(section)}
        assert set(type(section).RANGES) <= names, type(section).__name__
        for spec in type(section).RANGES.values():  # every spec parses
            if not spec.startswith("len "):
                in_range(0.5, spec.removesuffix(" pair"))


@pytest.mark.parametrize("spec, inside, outside", [
    ("> 0", [1e-9, 5], [0, -1]), (">= 1", [1, 2], [0.999]), ("< 1", [0.5], [1]),
    ("[0, 1]", [0, 1, 0.5], [-0.1, 1.1]), ("(0, 1]", [1, 0.1], [0]),
    ("[0, 1)", [0, 0.99], [1]), ("[0, 0.5]", [0.5], [0.51])])
def test_range_specs(spec, inside, outside):
    assert all(in_range(v, spec) for v in inside)
    assert not any(in_range(v, spec) for v in outside)


@pytest.mark.parametrize("args", [
    ("predict", "--tile", "0", "--images", "x", "--checkpoint", "y", "--out", "z"),
    ("measure", "--steps", "two"), ("data", "frobnicate"), ("synth", "--size", "big"),
    ("measure", "--no-such-flag"), ("train", "--no-such-flag")])
def test_a_bad_flag_is_one_line_not_the_usage_block(args, capsys):
    rc, out, err = run_cli(capsys, *args)
    line = one_line_error(err)
    assert rc == 2 and not out and args[1] in line and "(see python -m mlcl" in line


def command_lines(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """Every subcommand of ``parser`` as its words, nested ones included (``data voc``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from command_lines(sub, (*prefix, name))


def test_every_subcommand_reports_an_unknown_flag_in_one_line(capsys):
    commands = list(command_lines(build_parser()))
    assert {("train",), ("data",), ("data", "voc"), ("measure",), ("figures",)} <= set(commands)
    for command in commands:
        rc, out, err = run_cli(capsys, *command, "--no-such-flag")
        assert rc == 2 and not out, (command, out)
        assert "(see python -m mlcl" in one_line_error(err), command


def test_gpu_check_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    rc, _, err = run_cli(capsys, "measure", "gpu-check", "--device", "cpu",
                         "--out", str(tmp_path / "afile" / "x"))
    assert rc == 2 and "afile" in one_line_error(err)
    assert (tmp_path / "afile").read_text() == "mine"


def test_mix_partner_hint_has_its_prefix(capsys):
    rc, _, err = run_cli(capsys, "train", "--config", "synthetic", "method=unimatch",
                         "train.batch_size=1")
    assert rc == 2 and "use train.mix_partner=loader" in one_line_error(err)


# --------------------------------------------------------------------------- data roots
@pytest.mark.parametrize("preset, hint", [
    ("pascal", "python -m mlcl data voc --root"),
    ("cityscapes", "python -m mlcl data cityscapes --root"),
    ("synthetic", "python -m mlcl synth --out")])
def test_missing_root_hint_fits_the_dataset(tmp_path, capsys, preset, hint):
    missing = tmp_path / "nowhere"
    rc, _, err = run_cli(capsys, "train", "--config", preset, f"data.root={missing}",
                         f"output_dir={tmp_path / 'run'}")
    line = one_line_error(err)
    assert rc == 2 and hint in line and str(missing) in line


def test_root_that_is_a_file_says_so(tmp_path, capsys):
    root = tmp_path / "a_file.txt"
    root.write_text("not a dataset")
    rc, _, err = run_cli(capsys, "train", "--config", "synthetic", f"data.root={root}",
                         f"output_dir={tmp_path / 'run'}", *TINY)
    line = one_line_error(err)
    assert rc == 2 and f"data root {root} is a file, not a folder" in line
    assert "synth --out" not in line and root.read_text() == "not a dataset"
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- classes
def test_preset_classes_yield_to_the_data(data5, tmp_path, capsys):
    """synth --classes 5, then the 7-class synthetic preset: a 5-class model, named classes."""
    out = tmp_path / "run"
    with unchanged(data5):
        metrics = fit(load_config("synthetic", [f"data.root={data5}", f"output_dir={out}",
                                                *TINY]))
    assert "5 classes from" in capsys.readouterr().out
    assert metrics["class_names"] == (data5 / "classes.txt").read_text().split()
    state = torch.load(out / "best.pt", weights_only=True)["model"]
    assert state["classifier.weight"].shape[0] == 5


def test_explicit_class_count_against_the_data(data5, tmp_path, capsys):
    out = tmp_path / "run"
    with unchanged(data5):
        rc, _, err = run_cli(capsys, "train", "--config", "synthetic", f"data.root={data5}",
                             f"output_dir={out}", "data.num_classes=7", *TINY)
    line = one_line_error(err)
    assert rc == 2 and "lists 5 classes" in line and "'data.num_classes' is 7" in line
    assert str(data5 / "classes.txt") in line


def test_evaluate_7_class_checkpoint_on_5_class_data(run7, data5, capsys):
    with unchanged(run7, data5):
        rc, _, err = run_cli(capsys, "evaluate", "--checkpoint", str(run7 / "best.pt"),
                             f"data.root={data5}")
    line = one_line_error(err)
    assert rc == 2 and "lists 5" in line and "data.num_classes=7" in line
    assert f"checkpoint {run7 / 'best.pt'} predicts 7" in line


# --------------------------------------------------------------------------- pre-flight
def _train(capsys, root: Path, out: Path, *extra: str) -> tuple[int, str]:
    rc, _, err = run_cli(capsys, "train", "--config", "synthetic", f"data.root={root}",
                         f"output_dir={out}", *TINY, *extra)
    return rc, err


def test_truncated_jpeg_fails_before_the_first_step(data, tmp_path, capsys):
    bad = data / "JPEGImages" / "train_000020.jpg"  # unlabeled at 1_8: a semi-supervised
    bad.write_bytes(bad.read_bytes()[:300])         # run reads it (a supervised one not)
    out = tmp_path / "run"
    with unchanged(data):
        rc, err = _train(capsys, data, out, "method=unimatch")
    line = one_line_error(err)
    assert rc == 2 and "data pre-flight" in line and str(bad) in line
    assert not (out / "checkpoints").exists() and not (out / "metrics.json").exists()


def test_bad_validation_mask_fails_before_the_first_step(data, tmp_path, capsys):
    mask = data / "SegmentationClass" / "val_000003.png"
    arr = np.array(Image.open(mask))
    arr[0, 0] = 9  # not a class of 7, not ignore
    Image.fromarray(arr).save(mask)
    out = tmp_path / "run"
    with unchanged(data):
        rc, err = _train(capsys, data, out)
    line = one_line_error(err)
    assert rc == 2 and f"mask {mask} has values 9" in line
    assert not (out / "checkpoints").exists()


def test_several_bad_files_counted_with_the_verify_command(data, tmp_path, capsys):
    Image.new("L", (10, 10)).save(data / "SegmentationClass" / "val_000001.png")  # size
    (data / "JPEGImages" / "val_000002.jpg").write_bytes(b"not a jpeg")
    with unchanged(data):
        rc, err = _train(capsys, data, tmp_path / "run")
    line = one_line_error(err)
    assert rc == 2 and "2 bad samples" in line and "python -m mlcl data verify" in line
    assert "val_000001.png is 10x10" in line


def test_preflight_cache_spares_a_second_pass(data, monkeypatch, capsys):
    cfg = load_config("synthetic", [f"data.root={data}", *TINY])
    from mlcl.data import build_datasets

    sets = build_datasets(cfg, with_unlabeled=True)
    preflight.check(cfg, sets, log=print)
    assert "checking 56 of 56" in capsys.readouterr().out
    calls = []
    original = preflight.check_item
    monkeypatch.setattr(preflight, "check_item", lambda *a: calls.append(a) or original(*a))
    preflight.check(cfg, sets, log=print)
    assert calls == []  # every sample known good
    image = data / "JPEGImages" / "val_000000.jpg"
    image.write_bytes(image.read_bytes()[:200])  # changed since: checked again, and fails
    with pytest.raises(DataError, match="val_000000.jpg"):
        preflight.check(cfg, sets, log=print)
    assert len(calls) == 1


def test_loader_worker_error_keeps_its_one_line(data):
    (data / "JPEGImages" / "val_000001.jpg").write_bytes(b"broken")
    cfg = load_config("synthetic", [f"data.root={data}"])
    ds = ValDataset(cfg, cfg.split_path("val_split"))
    with pytest.raises(DataError) as in_main:
        ds[1]
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1)
    with pytest.raises(DataError) as in_worker:
        list(loader)
    assert str(in_worker.value) == str(in_main.value)
    assert "\n" not in str(in_worker.value) and "val_000001.jpg" in str(in_worker.value)


def corrupt_keep_stat(p: Path) -> None:
    """Break an image but keep its size and mtime (the pre-flight cache still says good)."""
    st = p.stat()
    p.write_bytes(b"NOT-AN-IMAGE" + p.read_bytes()[12:])
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_worker_error_ends_the_command(run7, data, capsys):
    """The workers ignore SIGTERM (a cluster's notice is the main process's to handle), so
    without mlcl.loaders.stop_loader_workers the interpreter's exit would wait for them
    for ever after the error line."""
    assert run_cli(capsys, "evaluate", "--checkpoint", str(run7), f"data.root={data}")[0] == 0
    corrupt_keep_stat(data / "JPEGImages" / "val_000001.jpg")  # the cached pre-flight passes
    proc = subprocess.run([sys.executable, "-m", "mlcl", "evaluate", "--checkpoint", str(run7),
                           f"data.root={data}", "data.num_workers=2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "val_000001.jpg" in one_line_error(proc.stderr)


def test_data_verify_decodes_every_image(data, capsys):
    bad = data / "JPEGImages" / "train_000005.jpg"
    bad.write_bytes(bad.read_bytes()[:-200])
    with unchanged(data):
        rc, out, _ = run_cli(capsys, "data", "verify", "--root", str(data), "--layout", "voc",
                             "--splits", "splits/train.txt")
    assert rc == 1 and f"cannot read image {bad}" in out and out.strip().endswith("FAILED")


# --------------------------------------------------------------------------- predict
def _predict(capsys, run7: Path, images: Path, out: Path, *extra: str):
    return run_cli(capsys, "predict", "--checkpoint", str(run7), "--images", str(images),
                   "--out", str(out), *extra)


def test_predict_into_its_input_folder_is_refused(run7, images, capsys):
    with unchanged(images):
        rc, _, err = _predict(capsys, run7, images, images)
    line = one_line_error(err)
    assert rc == 2 and f"--out {images} holds the inputs" in line
    assert sorted(p.name for p in images.iterdir()) == ["a.jpg", "a.png", "b.jpg"]


def test_predict_names_never_collide_and_legend(run7, images, tmp_path, capsys):
    out = tmp_path / "pred"
    with unchanged(images):
        rc, stdout, _ = _predict(capsys, run7, images, out, "--overlay")
    assert rc == 0 and "wrote 8 files" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == [".mlcl-written", "a.jpg.overlay.jpg", "a.jpg.png", "a.png.overlay.jpg",
                     "a.png.png", "b.jpg.overlay.jpg", "b.jpg.png", "legend.png", "legend.txt"]
    assert Image.open(out / "a.png.png").mode == "P"
    assert (out / "legend.txt").read_text().splitlines()[1] == "1\tdisc\t128,0,0"
    # the same command again rewrites only its own files
    rc, _, _ = _predict(capsys, run7, images, out)
    assert rc == 0


def test_predict_refuses_a_folder_with_files_it_did_not_write(run7, images, tmp_path, capsys):
    out = tmp_path / "pred"
    out.mkdir()
    (out / "a.jpg.png").write_bytes(b"the user's own file")
    with unchanged(images, out):
        rc, _, err = _predict(capsys, run7, images, out)
    assert rc == 2 and "did not write (e.g. a.jpg.png)" in one_line_error(err)


def test_output_folder_accepts_the_leftover_of_its_own_interrupted_write(tmp_path):
    out = tmp_path / "pred"
    folder = folders.OutputFolder(out)
    for rel in ("a.jpg.png", "sub/b.jpg.png"):
        folder.write(rel, lambda p: p.write_bytes(b"mask"))
    (out / ".a.jpg.png.k3j_2x9q.tmp").write_bytes(b"half")  # a killed atomic write
    (out / "sub" / ".b.jpg.png.x7y8z9ab.tmp").write_bytes(b"half")
    assert folders.OutputFolder(out).listed == {"a.jpg.png", "sub/b.jpg.png"}
    assert folders.temp_target(out / "..x.tmp") == out / "..x.tmp"
    (out / ".c.jpg.png.k3j_2x9q.tmp").write_bytes(b"not ours")  # no write of c was listed
    with pytest.raises(ValueError, match="did not write"):
        folders.OutputFolder(out)


def test_predict_out_is_a_file(run7, images, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with unchanged(images, target):
        rc, _, err = _predict(capsys, run7, images, target)
    assert rc == 2 and f"--out {target} is a file" in one_line_error(err)
    with unchanged(images, target):
        rc, _, err = _predict(capsys, run7, images, target / "sub")
    assert rc == 2 and f"{target} is a file, not a folder" in one_line_error(err)


def test_predict_out_not_writable(run7, images, tmp_path, capsys):
    folder = readonly_folder(tmp_path)
    with unchanged(images):
        rc, _, err = _predict(capsys, run7, images, folder / "pred")
    assert rc == 2 and f"{folder} is not writable" in one_line_error(err)


def test_predict_skips_an_unreadable_image_and_exits_non_zero(run7, images, tmp_path, capsys):
    (images / "c.jpg").write_bytes(b"\xff\xd8 not really")
    out = tmp_path / "pred"
    with unchanged(images):
        rc, _, err = _predict(capsys, run7, images, out)
    assert rc == 1 and err.strip().splitlines()[-1].startswith("error: 1 file(s) skipped")
    assert f"cannot read image {images / 'c.jpg'}" in err
    assert {"a.png.png", "a.jpg.png", "b.jpg.png"} <= {p.name for p in out.iterdir()}


def test_predict_very_large_image_refused_or_tiled(run7, images, tmp_path, capsys):
    big = images / "a.png"
    with unchanged(images, run7):
        rc, _, err = _predict(capsys, run7, big, tmp_path / "refused", "--max-pixels", "500")
        assert rc == 1 and "is 30x24 = 720 pixels, over the limit of 500 (--max-pixels)" in err
        assert not (tmp_path / "refused").exists()  # nothing written: no folder
        rc, _, _ = _predict(capsys, run7, big, tmp_path / "tiled", "--tile", "16")
    assert rc == 0 and Image.open(tmp_path / "tiled" / "a.png.png").size == (30, 24)


def test_predict_file_recursive_and_run_folder(run7, images, tmp_path, capsys):
    (images / "sub").mkdir()
    shutil.copy(images / "b.jpg", images / "sub" / "b.jpg")
    empty = tmp_path / "emptyrun"
    empty.mkdir()
    with unchanged(images, run7):
        rc, _, _ = _predict(capsys, run7, images / "b.jpg", tmp_path / "one")
        assert rc == 0 and (tmp_path / "one" / "b.jpg.png").is_file()
        rc, _, _ = _predict(capsys, run7, images, tmp_path / "all", "--recursive")
        assert rc == 0 and (tmp_path / "all" / "sub" / "b.jpg.png").is_file()
        rc, _, err = _predict(capsys, empty, images, tmp_path / "none")
    assert rc == 2 and f"run folder {empty} has no best.pt" in one_line_error(err)
    assert not (tmp_path / "none").exists()


def test_every_output_place_is_checked_by_one_walk_up(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    folder = readonly_folder(tmp_path)
    assert files.nearest_existing(tmp_path / "new" / "deeper") == tmp_path
    assert files.place_problem(tmp_path / "new" / "deeper") is None
    assert files.place_problem(afile) == f"{afile} is a file, not a folder"
    assert files.place_problem(afile / "run") == f"{afile / 'run'} lies under the file {afile}"
    assert files.place_problem(folder / "a" / "b") == f"{folder} is not writable"
    for place in (afile, afile / "run", folder / "run"):  # output_dir and --out: one reason
        why = files.place_problem(place)
        with pytest.raises(ConfigError, match=re.escape(f"output_dir {place}: ")) as e:
            outputs.check_output_place(place)
        made = re.escape(f"--out {place / 'x'} cannot be made: ")
        with pytest.raises(ValueError, match=made) as v:
            folders.check_creatable(place / "x", "--out")
        assert why in str(e.value) and why in str(v.value)
    assert afile.read_text() == "mine"


# --------------------------------------------------------------------------- evaluate --out
def test_evaluate_out_checked_before_evaluating(run7, tmp_path, capsys):
    mine = tmp_path / "notes.json"
    mine.write_text('{"not": "an evaluation"}')
    with unchanged(mine, run7):
        for out, says in ((tmp_path, "is a folder"), (mine, "was not written by this command"),
                          (mine / "r.json", "is a file, not a folder")):
            rc, stdout, err = run_cli(capsys, "evaluate", "--checkpoint", str(run7 / "best.pt"),
                                      "--out", str(out))
            assert rc == 2 and says in one_line_error(err) and "mIoU" not in stdout
    folder = readonly_folder(tmp_path)
    rc, _, err = run_cli(capsys, "evaluate", "--checkpoint", str(run7), "--out",
                         str(folder / "r.json"))
    assert rc == 2 and "is not writable" in one_line_error(err)
    result = tmp_path / "result.json"  # an evaluation may replace its own result
    for _ in range(2):
        rc, _, _ = run_cli(capsys, "evaluate", "--checkpoint", str(run7), "--out", str(result))
        assert rc == 0 and json.loads(result.read_text())["num_images"] == 8


# --------------------------------------------------------------------------- others
def test_measure_batch_of_one_names_the_key(capsys):
    rc, _, err = run_cli(capsys, "measure", "steps", "--device", "cpu", "train.batch_size=1")
    assert rc == 2 and "train.batch_size=1" in one_line_error(err)
    assert "train.batch_size=2 or more" in err
    assert "mix_partner" not in err  # not a key the user set


def test_registry_refuses_tables_of_mixed_settings():
    def entry(name, method, width):
        return {"name": name, "metrics": {"complete": True, "best_miou": 1.0},
                "run": {"preset": "synthetic", "split": "1_8", "method": method, "seed": 0},
                "config": {"method": method, "seed": 0, "data": {"dataset": "synthetic",
                                                                 "num_workers": 4},
                           "model": {"width": width}}}
    same = [entry("a", "supervised", 16), entry("b", "mlcl", 16)]
    same[1]["config"]["data"]["num_workers"] = 0  # does not change results
    assert len(registry.runs_frame(same)) == 2
    with pytest.raises(ValueError, match=r"b vs a \(model.width: 16 -> 32\)"):
        registry.runs_frame([same[0], entry("b", "mlcl", 32)])


def grid_entries(*grids: str) -> list[dict]:
    """Complete registry entries (resolved configs, no metrics) for the seed-0 runs of the
    ``grids`` as mlcl.study.reproduce records them."""
    from mlcl.study.grids import build_grid

    runs = {r.name: r for g in grids for r in build_grid(g) if r.seed == 0}
    return [{"name": name, "metrics": {"complete": True, "best_miou": 0.5},
             "run": {"preset": r.preset, "split": r.split, "method": r.method,
                     "variant": r.variant, "ablation": r.ablation, "seed": r.seed},
             "config": load_config(r.preset, r.config_overrides()).to_dict()}
            for name, r in runs.items()]


def test_one_registry_holds_the_v2_grids_dinov2_s_and_b_columns():
    """The V2 tables have a DINOv2-S and a DINOv2-B column per split: both backbones' runs
    of a preset share one registry (its table is per backbone) and land in their columns."""
    from mlcl.study import viz

    entries = grid_entries("voc-v2", "cityscapes-v2")
    assert len(entries) == 2 * 2 * (5 + 4)
    assert len(registry.runs_frame(entries)) == len(entries)
    runs = {(r.column, r.method, r.variant): r.runs
            for r in viz.paper_table_values(entries, "V2-VOC").itertuples()}
    assert runs["S 1/8 (183)", "unimatch_v2", ""] == ["pascal_v2-183-unimatch_v2-s0"]
    assert runs["B 1/8 (183)", "unimatch_v2", ""] == ["pascal_v2-183-unimatch_v2-dinov2_b-s0"]
    assert runs["B 1/8 (183)", "mlcl", "paper"] == ["pascal_v2-183-mlcl-paper-dinov2_b-s0"]
    b = next(e for e in entries if e["name"] == "cityscapes_v2-1_4-unimatch_v2-dinov2_b-s0")
    assert b["config"]["model"]["feature_channels"] == 128
    assert b["config"]["model"]["pretrained"] == "pretrained/dinov2_base.pth"
    # within one backbone's table, any other difference is still a mixed setting
    stray = json.loads(json.dumps({**b, "name": "stray"}))
    stray["config"]["train"]["lr"] = 1e-5
    with pytest.raises(ValueError, match=r"stray vs .*\(train.lr: 5e-06 -> 1e-05\)"):
        registry.runs_frame(entries + [stray])


def test_registry_compares_variant_decided_keys_within_a_variant():
    """Paper and released MLCL differ in the keys the variant decides (train.mix_partner,
    train.lr_lag, the quirks), the mix-partner grid's ablations in train.mix_partner: one
    table; the same key changed inside one (method, variant, ablation) is a mixed setting."""
    entries = grid_entries("synthetic-study", "mix-partner")
    assert {e["config"]["train"]["mix_partner"] for e in entries} == {"roll", "same"}
    assert {e["run"]["ablation"] for e in entries} >= {"mix_roll", "mix_same", "no_dt"}
    assert len(registry.runs_frame(entries)) == len(entries)
    paper = next(e for e in entries if e["name"] == "synthetic-1_16-mlcl-paper-s0")
    stray = json.loads(json.dumps({**paper, "name": "stray"}))
    stray["run"]["seed"] = stray["config"]["seed"] = 1
    stray["config"]["train"]["lr_lag"] = True
    with pytest.raises(ValueError, match=r"stray vs .*\(train.lr_lag: False -> True\)"):
        registry.runs_frame(entries + [stray])


def test_result_files_follow_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        path = atomic_write_text(tmp_path / "r.txt", "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o664
        os.umask(0o077)
        assert stat.S_IMODE(atomic_write_text(tmp_path / "s.txt", "x").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_every_file_of_a_run_follows_the_umask(synth_root, tmp_path):
    """Checkpoints included: safetensors writes model.safetensors 0600 whatever the umask."""
    out, old = tmp_path / "run", os.umask(0o027)
    try:
        fit(load_config("synthetic", [f"data.root={synth_root}", f"output_dir={out}",
                                      "method=supervised", *TINY]))
    finally:
        os.umask(old)
    modes = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode))
             for p in out.rglob("*") if p.is_file()}
    assert any(name.endswith("model.safetensors") for name in modes), modes
    assert {name: mode for name, mode in modes.items() if mode != oct(0o640)} == {}



def test_checkpoint_that_is_not_weights(run7, images, tmp_path, capsys):
    with unchanged(run7, images):
        rc, _, err = _predict(capsys, run7 / "config.yaml", images, tmp_path / "pred")
    line = one_line_error(err)
    assert rc == 2 and f"checkpoint {run7 / 'config.yaml'} cannot be read as weights" in line
    assert "weights_only" not in line  # torch's advice to unpickle untrusted files is not ours
    assert not (tmp_path / "pred").exists()


# --------------------------------------------------------------------------- silent wrongs
def test_byte_order_marks_in_split_files_and_classes_txt_are_dropped(data, tmp_path, capsys):
    """Some editors start a UTF-8 file with a byte-order mark: it is not part of an id or
    a class name."""
    labeled = data / "splits" / "1_8" / "labeled.txt"
    labeled.write_bytes(b"\xef\xbb\xbf" + labeled.read_bytes())
    classes = data / "classes.txt"
    classes.write_bytes(b"\xef\xbb\xbf" + classes.read_bytes())
    out = tmp_path / "run"
    rc, err = _train(capsys, data, out, "method=supervised")
    assert rc == 0, err
    names = json.loads((out / "metrics.json").read_text())["class_names"]
    assert names[0] == "background" and not any("\ufeff" in n for n in names)


def test_a_second_train_into_a_running_output_dir_is_refused(synth_root, tmp_path, capsys):
    """The first run holds output_dir's lock; a second one exits 2 naming it; the lock of a
    killed run is gone with its process."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from mlcl.outputs import OutputLock; h = OutputLock(Path(sys.argv[1])); "
         "print('held', flush=True); time.sleep(600)", str(out)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, err = _train(capsys, synth_root, out, "method=supervised")
        line = one_line_error(err)
        assert rc == 2 and f"output_dir {out}: another training run" in line
        assert f"pid {holder.pid}" in line and out.is_dir()  # kept: the other run's folder
    finally:
        holder.kill()
        holder.wait()
    rc, err = _train(capsys, synth_root, out, "method=supervised")
    assert rc == 0, err


def test_a_set_smaller_than_a_batch_names_its_size_and_the_fix(data, tmp_path, capsys):
    (data / "splits" / "1_8" / "labeled.txt").write_text("train_000000\ntrain_000001\n"
                                                         "train_000002\n")
    out = tmp_path / "run"
    rc, err = _train(capsys, data, out, "method=supervised", "data.unlabeled_split=")
    line = one_line_error(err)
    assert rc == 2 and "'train.batch_size': 4 images per process" in line
    assert "the labeled set has 3 over 1 process(es): give train.batch_size=3" in line
    assert not out.exists()  # the folder made for the lock goes with the failed start


# --------------------------------------------------------------------------- one's own data
def own_folder(tmp_path: Path) -> Path:
    from test_own_data import make_own_dataset  # noqa: E402  (tests/ is on sys.path)

    return make_own_dataset(tmp_path / "mine", labeled=12, unlabeled=2)


def test_data_without_classes_txt_is_not_given_the_presets_classes(data, tmp_path, capsys):
    """The folder layout and `synth` data name their classes in classes.txt: without it, no
    run trains as the preset's 7 synthetic classes."""
    (data / "classes.txt").unlink()
    rc, err = _train(capsys, data, tmp_path / "run", "method=supervised")
    line = one_line_error(err)
    assert rc == 2 and f"{data / 'classes.txt'} does not exist" in line and "name r g b" in line
    own = own_folder(tmp_path)
    assert main(["data", "split", "--root", str(own), "--labeled", "4"]) == 0
    (own / "classes.txt").unlink()
    capsys.readouterr()
    rc, _, err = run_cli(capsys, "train", "--config", "folder", f"data.root={own}", "split=4",
                         f"output_dir={tmp_path / 'run'}")
    line = one_line_error(err)
    assert rc == 2 and f"{own / 'classes.txt'} does not exist: the folder layout" in line
    rc, _, err = run_cli(capsys, "data", "verify", "--root", str(own), "--layout", "folder")
    assert rc == 2 and "classes.txt does not exist" in one_line_error(err)
    assert not (tmp_path / "run").exists()


def test_data_split_refusals(tmp_path, capsys):
    own = own_folder(tmp_path)
    mine = own / "splits" / "1_4" / "labeled.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("images/img_000.jpg masks/img_000.png\n")
    with unchanged(own):
        rc, _, err = run_cli(capsys, "data", "split", "--root", str(own), "--labeled", "1/4")
        assert rc == 2 and f"{mine} exists and was not written by" in one_line_error(err)
        for bad in ("0", "1/0", "3/2", "a"):
            rc, _, err = run_cli(capsys, "data", "split", "--root", str(own), "--labeled", bad)
            assert rc == 2 and "--labeled" in one_line_error(err), bad
        rc, _, err = run_cli(capsys, "data", "split", "--root", str(own), "--labeled", "50")
        assert rc == 2 and "--labeled 50: only 10 images with a mask" in one_line_error(err)
        rc, _, err = run_cli(capsys, "data", "split", "--root", str(tmp_path), "--labeled", "2")
        assert rc == 2 and f"{tmp_path / 'images'} does not exist" in one_line_error(err)
    assert not (own / "splits" / "50").exists()


def test_predict_names_every_skipped_file_and_reads_16_bit_grayscale(run7, tmp_path, capsys):
    """A .gif is named, not passed over; a 16-bit grayscale PNG is predicted as its 8-bit
    twin is (not as a white image)."""
    pics = tmp_path / "pics"
    pics.mkdir()
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (32, 32), dtype=np.uint8)
    grey[8:24, 8:24] = 250
    Image.fromarray(grey).save(pics / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(pics / "grey16.png")
    Image.fromarray(grey).save(pics / "clip.gif")
    rc, out, err = _predict(capsys, run7, pics, tmp_path / "pred")
    assert rc == 1 and f"skipped: {pics / 'clip.gif'} is not an image mlcl reads" in err
    assert "error: 1 file(s) skipped" in err
    masks = [np.asarray(Image.open(tmp_path / "pred" / f"{n}.png")) for n in ("grey8.png",
                                                                              "grey16.png")]
    assert (masks[0] == masks[1]).all()
    from mlcl.study.predict import MAX_PIXELS, read_image

    twins = [np.asarray(read_image(pics / n, MAX_PIXELS)) for n in ("grey8.png", "grey16.png")]
    assert (twins[0] == twins[1]).all() and twins[1].min() < 255

"""End-to-end: tiny training runs of every method, evaluate/predict on a checkpoint, the CLI's
one-line errors, evaluation over two CPU processes through `accelerate launch`, and the
learning-rate order of the released variant (resuming: tests/test_resume.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlcl.config import load_config
from mlcl.train import fit

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = ["train.batch_size=4", "train.log_every=2", "model.width=16", "data.num_workers=0"]


def tiny_cfg(root: Path, out: Path, *extra: str):
    return load_config("synthetic", [f"data.root={root}", "data.crop_size=32", "split=1_8",
                                     f"output_dir={out}", *TINY, *extra])


def mlcl_cli(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mlcl", *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mlcl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("method", ["supervised", "unimatch", "mlcl"])
def test_every_method_trains_and_writes_metrics(synth_root, tmp_path, method):
    cfg = tiny_cfg(synth_root, tmp_path / method, f"method={method}", "train.epochs=1",
                   "train.max_iters=3")
    metrics = fit(cfg)
    out = tmp_path / method
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["method"] == method and on_disk["complete"] and on_disk["iterations"] == 3
    assert 0 <= on_disk["best_miou"] <= 100 and on_disk["last_miou"] == metrics["last_miou"]
    assert list(on_disk["best_iou"]) == cfg.data.class_names
    epoch = on_disk["epochs"][0]
    expected = {"supervised": {"x"}, "unimatch": {"x", "s", "fp", "conf_ratio"},
                "mlcl": {"x", "s", "fp", "p2p", "dt", "mask", "noise", "sai_w", "sim_v",
                         "conf_ratio"}}[method]
    assert expected <= set(epoch) and all(np.isfinite(epoch[k]) for k in expected)
    assert (out / "config.yaml").is_file() and (out / "best.pt").is_file()
    assert (out / "checkpoints" / "LATEST").is_file()
    assert any((out / "tensorboard").iterdir())  # accelerate's tracker
    assert on_disk["status"] == "complete"
    progress = json.loads((out / "progress.json").read_text())
    assert progress["status"] == "complete" and progress["iteration"] == progress["total_iters"] == 3
    assert progress["best_miou"] == on_disk["best_miou"] and progress["epochs"] == 1
    if method == "mlcl":  # the prototype bank is part of the checkpoint
        latest = (out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip())
        bank = torch.load(latest / "custom_checkpoint_0.pkl", weights_only=True)
        assert bank["protos"].shape == (cfg.data.num_classes, cfg.model.feature_channels)


def test_released_variant_and_released_passes_run(synth_root, tmp_path):
    cfg = tiny_cfg(synth_root, tmp_path / "rel", "method=mlcl", "mlcl.variant=released",
                   "mlcl.released_passes=true", "train.epochs=1", "train.max_iters=2")
    assert fit(cfg)["complete"]


def test_evaluate_and_predict_cli(synth_root, tmp_path):
    out = tmp_path / "run"
    fit(tiny_cfg(synth_root, out, "train.epochs=1", "train.max_iters=2"))
    ckpt = out / "best.pt"
    res = tmp_path / "eval.json"
    proc = mlcl_cli("evaluate", "--checkpoint", str(ckpt), "--out", str(res))
    result = json.loads(res.read_text())
    assert result["num_images"] == 8 and "mIoU" in proc.stdout
    sliding = mlcl_cli("evaluate", "--checkpoint", str(ckpt), "eval.mode=sliding",
                       "eval.crop_size=16")
    assert "sliding" in sliding.stdout
    pred_dir = tmp_path / "pred"
    mlcl_cli("predict", "--checkpoint", str(ckpt), "--images", str(synth_root / "JPEGImages"),
             "--out", str(pred_dir), "--overlay")
    pngs = sorted(pred_dir.glob("*.jpg.png"))  # <image name>.png, beside legend.png
    assert len(pngs) == len(list((synth_root / "JPEGImages").glob("*.jpg")))
    mask = Image.open(pngs[0])
    assert mask.mode == "P" and np.asarray(mask).max() < 7
    assert list(pred_dir.glob("*.jpg.overlay.jpg"))


def test_cli_bad_input_is_one_line(synth_root, tmp_path):
    missing = mlcl_cli("train", "--config", "synthetic", f"data.root={tmp_path / 'nope'}",
                       check=False)
    assert missing.returncode == 2 and "nope" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    typo = mlcl_cli("train", "--config", "synthetic", "train.lrr=1", check=False)
    assert typo.returncode == 2 and "train.lrr" in typo.stderr
    # a checkpoint whose class count differs from the config
    out = tmp_path / "run"
    fit(tiny_cfg(synth_root, out, "train.epochs=1", "train.max_iters=1"))
    wrong = mlcl_cli("evaluate", "--checkpoint", str(out / "best.pt"), "data.num_classes=5",
                     "data.class_names=[a,b,c,d,e]", check=False)
    assert wrong.returncode == 2 and "best.pt" in wrong.stderr and "num_classes" in wrong.stderr
    offline = subprocess.run(
        [sys.executable, "-m", "mlcl", "train", "--config", "synthetic", f"data.root={synth_root}",
         f"output_dir={tmp_path / 'pre'}", "model.backbone=resnet18", "model.width=64",
         "model.pretrained=true"],
        env={**ENV, "TORCH_HOME": str(tmp_path / "hub"), "MLCL_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=120)
    assert offline.returncode == 2 and "resnet18" in offline.stderr, offline.stderr
    assert "Traceback" not in offline.stderr
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    bad = mlcl_cli("evaluate", "--checkpoint", str(garbage), check=False)
    assert bad.returncode == 2 and "garbage.pt" in bad.stderr


def _launch(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "mlcl", *args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_processes_count_every_val_image_once(synth_root, tmp_path):
    # 7 validation images: a distributed sampler would pad to 8 with a duplicate
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    val = root / "ImageSets" / "Segmentation" / "val.txt"
    val.write_text("".join(val.read_text().splitlines(keepends=True)[:7]))
    out = tmp_path / "run"
    fit(tiny_cfg(root, out, "train.epochs=1", "train.max_iters=1"))
    one = json.loads(mlcl_cli("evaluate", "--checkpoint", str(out / "best.pt"), "--out",
                              str(tmp_path / "one.json")) and (tmp_path / "one.json").read_text())
    _launch("evaluate", "--checkpoint", str(out / "best.pt"), "--out", str(tmp_path / "two.json"))
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["num_images"] == two["num_images"] == 7
    assert one["confusion"] == two["confusion"]


def test_bank_round_trips_through_resume(synth_root, tmp_path, monkeypatch):
    from mlcl.prototypes import PrototypeBank

    out = tmp_path / "run"
    extra = ("method=mlcl", "mlcl.bank_conf=0.0", "train.max_iters=0")
    fit(tiny_cfg(synth_root, out, *extra, "train.epochs=1"))
    latest = out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip()
    saved = torch.load(latest / "custom_checkpoint_0.pkl", weights_only=True)["protos"]
    assert saved.abs().sum() > 0
    seen = []
    original = PrototypeBank.update

    def spy(self, *args, **kwargs):
        seen.append(self.protos.detach().clone())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PrototypeBank, "update", spy)
    fit(tiny_cfg(synth_root, out, *extra, "train.epochs=2"))
    assert torch.equal(seen[0], saved)  # the resumed run starts from the saved bank


def test_preflight_reads_only_the_sets_the_loaders_use(synth_root, tmp_path):
    """A supervised run with data.unlabeled_split set never reads the unlabeled images, so
    their pre-flight is skipped; a semi-supervised run checks them."""
    from mlcl.data.splits import DataError
    from mlcl.engine import make_accelerator
    from mlcl.train import training_data

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    image = (root / "splits" / "1_8" / "unlabeled.txt").read_text().split()[0]
    (root / image).write_bytes(b"not a jpeg")
    cfg = tiny_cfg(root, tmp_path / "run", "method=supervised")
    sets, loaders = training_data(cfg, make_accelerator(cfg))
    assert "unlabeled" in sets and list(loaders) == ["x"]
    cfg = tiny_cfg(root, tmp_path / "run", "method=unimatch")
    with pytest.raises(DataError, match=image):
        training_data(cfg, make_accelerator(cfg))


def test_preflight_leaves_the_classes_to_set_up(synth_root):
    """preflight.check checks against the config's classes and changes nothing; set-up
    reconciles them with the data's classes.txt first."""
    from mlcl.data import build_datasets, preflight

    cfg = tiny_cfg(synth_root, Path("unused"))
    cfg.data.class_names = [f"c{i}" for i in range(cfg.data.num_classes)]  # not the data's
    preflight.check(cfg, build_datasets(cfg, with_unlabeled=False), log=lambda _: None)
    assert cfg.data.class_names == [f"c{i}" for i in range(cfg.data.num_classes)]


def test_the_model_is_built_main_process_first(synth_root, tmp_path, monkeypatch):
    """model.pretrained downloads in build_model: the main process first, the others then
    read its file (never several writers of one .part file)."""
    import contextlib

    import mlcl.train
    from mlcl.engine import make_accelerator

    cfg = tiny_cfg(synth_root, tmp_path / "run")
    acc, inside, built = make_accelerator(cfg), [], []

    @contextlib.contextmanager
    def first():
        inside.append(True)
        yield
        inside.pop()

    monkeypatch.setattr(acc, "main_process_first", first)
    real = mlcl.train.build_model
    monkeypatch.setattr(mlcl.train, "build_model", lambda c: built.append(bool(inside)) or real(c))
    mlcl.train.build_trainables(cfg, acc)
    assert built == [True]


def test_a_compiled_model_saves_weights_without_the_compile_wrapper(synth_root, tmp_path,
                                                                   monkeypatch):
    """train.compile=true: best.pt / last.pt hold the model's own keys (no ``_orig_mod.``),
    so evaluate and predict load them strictly. (Dynamo is switched off: the wrapper is
    there, its compilation is not, which would take minutes on a CPU.)"""
    import torch._dynamo

    from mlcl.study.predict import load_weights

    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    out = tmp_path / "run"
    fit(tiny_cfg(synth_root, out, "train.compile=true", "train.epochs=1", "train.max_iters=1"))
    for name in ("best.pt", "last.pt"):
        keys = torch.load(out / name, weights_only=True)["model"]
        assert keys and not any(k.startswith("_orig_mod.") for k in keys), name
        load_weights(out / name)  # strict


@pytest.mark.parametrize("command", ["data", "measure", "reproduce", "train", "synth"])
def test_every_subcommand_answers_help(command):
    proc = mlcl_cli(command, "--help", check=False, timeout=120)
    assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stderr


def test_released_variant_follows_the_release_unless_told_otherwise():
    def train(*extra):
        return load_config(None, ["method=mlcl", *extra]).train

    released = train("mlcl.variant=released")
    assert released.mix_partner == "same" and released.lr_lag is True
    paper = train()
    assert paper.mix_partner == "roll" and paper.lr_lag is False
    mine = train("mlcl.variant=released", "train.mix_partner=loader", "train.lr_lag=false")
    assert mine.mix_partner == "loader" and mine.lr_lag is False
    other = load_config(None, ["method=unimatch", "mlcl.variant=released"]).train
    assert other.mix_partner == "roll" and other.lr_lag is False  # the variant is MLCL's


def unimatch_order_lrs(base: float, total: int, power: float) -> list[float]:
    """The learning rate of every step when it is set after the optimiser step, written out
    as UniMatch's loop does: step t runs with the lr set after step t - 1."""
    lrs, lr = [], base
    for it in range(total):
        lrs.append(lr)  # the optimiser step of iteration `it` uses the current lr
        lr = base * (1 - it / total) ** power  # then: lr = base * (1 - iters / total) ** 0.9
    return lrs


def test_lr_lag_gives_the_unimatch_order_of_learning_rates():
    from mlcl.engine import poly_lr

    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": 0.01,
                            "base_lr": 0.01}])
    seen = {}
    for lag in (False, True):
        seen[lag] = []
        for it in range(7):
            poly_lr(opt, it, 7, 0.9, lag)
            seen[lag].append(opt.param_groups[0]["lr"])
    assert seen[True] == unimatch_order_lrs(0.01, 7, 0.9)
    assert seen[False] == [0.01 * (1 - t / 7) ** 0.9 for t in range(7)]


@pytest.mark.parametrize("lag", [False, True])
def test_the_loop_steps_with_the_configured_lr_order(synth_root, tmp_path, lag):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    lrs = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        cfg = tiny_cfg(synth_root, tmp_path / "run", "model.width=8", "train.max_iters=4",
                       "train.epochs=1", f"train.lr_lag={str(lag).lower()}")
        fit(cfg)
    finally:
        handle.remove()
    base, power = cfg.train.lr, cfg.train.poly_power
    expected = unimatch_order_lrs(base, 4, power) if lag else \
        [base * (1 - t / 4) ** power for t in range(4)]
    assert lrs == expected

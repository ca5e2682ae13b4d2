"""The measuring tool (``python -m mlcl measure``) on the CPU at tiny sizes: every bench
section runs and writes its keys; the released re-creation it times computes what the
project's code computes; FLOPs counted on fake tensors equal a hand count and the real
step's; the rehearsal's stages pass on a paper preset and fail when they should; gpu-check
runs every part at toy sizes. Not timed: the numbers are docs/performance.md's.

What runs at which size (the rehearsal and gpu-check tests take about 2.5 minutes of CPU):

- **Real sizes, shapes only** (seconds): every paper preset x every method, one training step
  at the preset's crop (321 / 801), per-GPU batch (4) and backbone (deep-stem ResNet-50 / 101,
  width 64) through the real step and its backward on fake tensors, and the evaluation of a
  full image in the preset's mode: the FLOPs and cost of every cell (``measure costs``).
- **Real sizes, computed** (~35 s): pascal with the deep-stem ResNet-50 at width 64 and crop
  321, a fabricated checkpoint with the real keys and shapes, fabricated VOC images of VOC's
  sizes; the supervised method at batch 2, 2 + 2 steps: every stage.
- **Every UniMatch preset, every stage** (~90 s): ``measure gpu-check --device cpu``, i.e. the
  exact commands ``make gpu-check`` runs for them, at toy sizes (width 4, crop 161, 2 + 2 steps; fabricated
  images scaled with the crop, 161 / the preset's: Cityscapes frames of 412 x 206).
- **ADE20K and COCO, every stage**: ``measure rehearse`` of each at the same toy sizes, every
  method (at real size, crop 518 and ResNet-101, a semi-supervised step takes minutes on a
  CPU: their real-size rehearsals are in docs/real_data.md, section 11).
- **UniMatch V2's presets** (DINOv2): tests/test_measure_v2.py.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from mlcl import losses, measure, methods
from mlcl.config import ConfigError, TrainConfig, config_from_dict, load_config, save_config
from mlcl.measure import bench, gpu_check
from mlcl.measure import rehearse as R
from mlcl.measure.fabricate import fabricate_backbone, fabricate_dataset, weights_name
from mlcl.measure.harness import (FAMILIES, Stepper, count_flops, eval_flops, interleaved,
                                  step_flops)
from mlcl.measure.fka_sai import Decoder, Released, fka_inputs
from mlcl.model import build_backbone, upsample
from mlcl.paths import REPO
from mlcl.prepare.split_lists import SPLITS
from mlcl.prepare.verify import verify_dataset
from mlcl.prototypes import PrototypeBank

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PRESETS = ("pascal", "pascal_blended", "pascal_blended_r101", "cityscapes")
TINY_BENCH = ["--device", "cpu", "--steps", "1", "model.backbone=resnet18", "model.width=8",
              "data.crop_size=33", "model.feature_channels=16", "data.num_classes=5"]
TINY = ["model.width=4", "model.feature_channels=8", "model.low_level_channels=4",
        "data.crop_size=161", "data.num_workers=0"]
KEYS = ("step_s", "ratio_mlcl_over_unimatch", "ratio_mlcl_released_over_unimatch",
        "ratio_mlcl_mixed_over_unimatch", "mem_ratio_mlcl_mixed_over_unimatch",
        "fka_sai_over_floor",
        "proto_speedup_over_released", "fka_sai_speedup_over_released",
        "mem_ratio_mlcl_over_unimatch", "pipeline_samples_per_s", "peak_mem_mb")


def quiet(msg: str) -> None:
    pass


def measure_cli(*args: str) -> subprocess.CompletedProcess:
    # a subprocess: accelerate's state is per process, and this is the CLI users run
    proc = subprocess.run([sys.executable, "-m", "mlcl", "measure", *args], env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return proc


def args(*argv: str) -> argparse.Namespace:
    """The resolved command line ``python -m mlcl measure ARGV``."""
    return measure.resolve(measure.build_parser().parse_intermixed_args(list(argv)))


# --------------------------------------------------------------------------- bench
def test_bench_runs_every_section_and_writes_the_keys(tmp_path):
    out = tmp_path / "bench.json"
    proc = measure_cli(*TINY_BENCH, "--out", str(out))
    r = json.loads(out.read_text())
    for key in KEYS:
        assert r.get(key) is not None, key
    assert set(r["step_s"]) == set(r["peak_mem_mb"]) == set(FAMILIES["unimatch"])
    assert all(v > 0 for v in r["step_s"].values())
    assert r["settings"]["clock"] == "cpu"  # one thread on a CPU: the process's CPU time
    assert all(s["n"] == 1 and s["forward"]["median"] + s["backward"]["median"] == pytest.approx(
        s["median"]) for s in r["step"].values())
    assert r["settings"]["crop"] == 33 and r["settings"]["backbone"] == "resnet18"
    assert r["machine"]["device"] == "cpu" and r["machine"]["torch"] == torch.__version__
    assert r["fka_sai"]["settings"]["feature_size"] == [81, 81]
    assert r["fka_sai"]["settings"]["channels"] == 16 and r["fka_sai"]["settings"]["classes"] == 5
    assert r["pipeline"]["crop"] == bench.PIPELINE["crop"] and r["pipeline"]["samples"] > 0
    voc = r["memory"]["voc"]
    assert voc["backbone"] == bench.VOC["backbone"] and not voc["measured"] and voc["gib"] > 0
    assert set(bench.TARGETS) <= set(r["targets"]) and "voc_mlcl_memory_gib" in r["targets"]
    assert "| mlcl_released |" in proc.stdout and "| mlcl_mixed |" in proc.stdout
    assert "wrote" in proc.stdout and "x its floor" in proc.stdout
    # the floor does less than the whole MLCL part
    assert r["fka_sai"]["whole_floor"]["median"] < r["fka_sai"]["whole_vectorised"]["median"]
    every = TrainConfig().log_every  # the guard is read as often as the loop reads it
    assert r["guard"]["log_every"] == every and r["guard"]["fraction_with_reads"] > 0
    assert f"with a read every {every} steps" in proc.stdout


def test_help_is_the_module_docstring_listing_every_section_and_mode_once():
    description = measure.build_parser().description
    assert description == measure.__doc__  # one list, not a second copy that drifts
    entries = re.findall(r"^([\w-]+) {2,}\S", description, flags=re.MULTILINE)
    assert sorted(entries) == sorted([*bench.SECTIONS, *measure.MODES[1:]])


def test_bench_passes_precision_and_channels_last_to_the_step(tmp_path):
    out = tmp_path / "bf16.json"
    measure_cli("steps", *TINY_BENCH, "--methods", "unimatch,mlcl", "--out", str(out),
                "train.mixed_precision=bf16", "train.channels_last=true")
    r = json.loads(out.read_text())
    assert set(r["step_s"]) == {"unimatch", "mlcl"} and r["ratio_mlcl_over_unimatch"] > 0
    assert r["settings"]["mixed_precision"] == "bf16" and r["settings"]["channels_last"]
    assert r["settings"]["sections"] == ["steps"] and not r["peak_mem_mb"]


def test_bad_command_lines_are_one_line_and_exit_2(capsys):
    for argv, words in ((["nosuch"], "not a mode"), (["--methods", "x"], "--methods x"),
                        (["steps", "train.batch_size=1", "--device", "cpu"],
                         "train.batch_size=2 or more"), (["rehearse"], "--config"),
                        (["--steps", "-1"], "--steps -1"), (["--no-such-flag"], "no-such")):
        try:
            code = measure.main(argv)
        except SystemExit as e:  # argparse's bad flag (mlcl.config.CommandLineParser)
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert words in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_released_recreation_computes_the_project_loss_and_bank():
    """The re-created released prototype branch gives the paper variant's L_dt and bank
    update, so the timing compares the same computation (no ignore, no box here: the
    ignore resize and the box exclusion are the only other differences)."""
    case = fka_inputs(2, 16, 9, 5, torch.device("cpu"), seed=1)
    x = case.x
    x.ignore.zero_()
    torch.manual_seed(0)
    protos = torch.randn(5, 16)
    released = Released(protos)
    conf, label = Decoder(16, 5).decode(x.f_w).softmax(1).max(1)
    assert torch.equal(label, case.logits_w.argmax(1))  # the crafted pseudo-labels
    valid = torch.ones_like(label, dtype=torch.bool)
    ours = losses.loss_dt(x.f_w, conf, label, valid, x.f_s1, valid, protos,
                          num_candidates=20)
    released.candidates = 20  # fewer than some classes have, so the selection matters
    theirs = released.dt(x, label, conf)
    assert torch.allclose(ours, theirs, atol=1e-6)
    bank = PrototypeBank(5, 16)
    bank.protos.copy_(protos)
    bank.protos[3] = 0  # a class seen for the first time
    released.bank[3] = 0
    bank.update(x.f_w, label, conf, valid)
    released.update(x.f_w, label, conf, x.ignore)
    assert torch.allclose(bank.protos, released.bank, atol=1e-6)


def test_interleaved_runs_each_job_its_warmup_and_repeats():
    calls = []
    jobs = {k: (lambda k=k: calls.append(k) or len(calls)) for k in ("a", "b")}
    out = interleaved(jobs, {"a": (1, 3), "b": (0, 1)})
    assert calls == ["a", "a", "a", "a", "b"] and len(out["a"]) == 3 and len(out["b"]) == 1


def test_loaders_honour_the_performance_options(synth_cfg):
    from mlcl.data.datasets import build_datasets
    from mlcl.loaders import make_loader

    ds = build_datasets(synth_cfg, with_unlabeled=False)["labeled"]
    synth_cfg.data.num_workers = 2
    loader = make_loader(ds, synth_cfg, shuffle=True, seed=0)
    assert loader.num_workers == 2 and loader.persistent_workers
    assert loader.pin_memory == (torch.cuda.is_available() and not synth_cfg.train.cpu)
    synth_cfg.data.persistent_workers = False
    assert not make_loader(ds, synth_cfg, shuffle=True, seed=0).persistent_workers
    synth_cfg.data.num_workers = 0
    assert not make_loader(ds, synth_cfg, shuffle=True, seed=0).persistent_workers


@pytest.mark.parametrize("given,want", [(None, "1"), ("0", "0")])
def test_importing_mlcl_puts_large_cpu_tensors_on_huge_pages_unless_told(given, want):
    """mlcl sets torch's THP_MEM_ALLOC_ENABLE before torch allocates, keeping a user's value."""
    env = {k: v for k, v in ENV.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env.update({} if given is None else {"THP_MEM_ALLOC_ENABLE": given})
    code = "import mlcl, os, sys; assert 'torch' not in sys.modules; " \
           "print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, want), out.stderr


def test_loss_sai_equals_the_plain_chain():
    """The chunked, recomputing L_m / L_n gives the value and gradient of
    sai_mse(upsample(logits).float().softmax(1), target), also under bf16 autocast."""
    g = torch.Generator().manual_seed(0)
    z0, t = torch.randn(4, 5, 9, 9, generator=g), torch.rand(4, 5, 33, 33, generator=g)
    t = t / t.sum(1, keepdim=True)
    for amp in (False, True):
        results = []
        for f in (lambda z: losses.sai_mse(upsample(z, (33, 33)).float().softmax(1), t),
                  lambda z: losses.loss_sai(z, t),
                  lambda z: losses.loss_sai(z, t, chunk=3)):
            z = z0.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                logits = z.to(torch.bfloat16) if amp else z
                loss = f(logits)
            loss.backward()
            results.append((loss.detach(), z.grad))
        for loss, grad in results[1:]:
            assert torch.allclose(loss, results[0][0], rtol=1e-6, atol=1e-9)
            if amp:  # the plain chain rounds the gradient to bf16 before the upsampling's
                # backward, loss_sai after it (losses.upsample_grad, in fp32): both ~0.3 %
                # from the fp64 gradient
                assert (grad - results[0][1]).norm() < 1e-2 * results[0][1].norm()
            else:
                assert torch.allclose(grad, results[0][1], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("chunk", [1, 3])
def test_loss_sai_is_autograd_through_each_chunk_bit_for_bit(chunk):
    """loss_sai's own gradient (the backward kernels autograd runs) gives exactly what
    autograd through each chunk's upsample, softmax and summed MSE gives: value and gradient.
    At sizes where the upsampling's scale is not a whole number autograd's own kernel runs
    (losses.upsample_grad is None; test_upsample_grad_is_the_upsampling_s_gradient)."""
    g = torch.Generator().manual_seed(1)
    for shape, size in (((4, 5, 9, 9), 32), ((3, 21, 21, 21), 80)):
        z0 = torch.randn(*shape, generator=g)
        t = torch.rand(shape[0], shape[1], size, size, generator=g).softmax(1)
        total, grads = torch.zeros((), dtype=torch.float64), []
        for i in range(0, shape[0], chunk):
            zc = z0[i:i + chunk].clone().requires_grad_()
            p = upsample(zc, (size, size)).float().softmax(1)
            part = F.mse_loss(p, t[i:i + chunk], reduction="sum") / t.numel()
            grads.append(torch.autograd.grad(part, zc)[0])
            total += part.detach().double()
        z = z0.clone().requires_grad_()
        loss = losses.loss_sai(z, t, chunk=chunk)
        loss.backward()
        assert torch.equal(loss.detach(), total.float())
        assert torch.equal(z.grad, torch.cat(grads))


@pytest.mark.parametrize("size,out", [((9, 9), (33, 33)), ((5, 7), (9, 25)), ((21, 21), (81, 81)),
                                      ((4, 6), (4, 16)), ((2, 3), (15, 15))])
def test_upsample_grad_is_the_upsampling_s_gradient(size, out):
    """The tent-stencil gradient of align-corners bilinear upsampling by whole factors equals
    autograd's through F.interpolate, in float64 to rounding; None when a factor is not whole."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 3, *size, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, *out, generator=g, dtype=torch.float64)
    F.interpolate(z, size=out, mode="bilinear", align_corners=True).backward(grad)
    assert torch.allclose(losses.upsample_grad(grad, size), z.grad, rtol=1e-12, atol=1e-12)
    assert losses.upsample_grad(grad.float(), size).dtype == torch.float32
    assert losses.upsample_grad(torch.zeros(1, 1, 10, 33), (3, 9)) is None  # 9 / 2 rows
    assert losses.upsample_grad(torch.zeros(1, 1, 9, 9), (1, 5)) is None  # one row


def test_sai_losses_equal_the_plain_computation():
    """methods.sai_losses (the masked map's logits from decode(F_s), batched per kind, chunked
    MSE) computes what the straightforward version computes: per branch, mask and noise maps
    decoded, upsampled, soft-maxed and compared with the CutMixed target, averaged over the
    branches."""
    case = fka_inputs(3, 16, 9, 5, torch.device("cpu"), seed=2)
    x, box2 = case.x, case.box2.clone()
    box2[0] = False
    dec = Decoder(16, 5)
    branches = [(x.f_s1, losses.per_image_similarity(x.f1, x.f_s1), case.box1),
                (x.f_s2, losses.per_image_similarity(x.f2, x.f_s2), box2)]

    def plain(cfg):
        m, maps, targets = cfg.mlcl, [], []
        for f_s, v, box in branches:
            t = torch.where(box.unsqueeze(1), case.prob_mix, case.prob_w)
            ratio = losses.sai_mask_ratio(v, m.kappa)
            maps.append(losses.sai_mask(f_s, ratio, m.mask_jitter)[0])
            maps.append(losses.sai_noise(f_s, v, m.kappa))
            targets += [t, t]
        prob = upsample(dec.decode(torch.cat(maps)), case.prob_w.shape[-2:]).softmax(1).chunk(4)
        mse = [losses.sai_mse(q, t) for q, t in zip(prob, targets)]
        return (mse[0] + mse[2]) / 2, (mse[1] + mse[3]) / 2

    cfg = load_config(None, ["method=mlcl"])
    target = torch.cat([torch.where(box.unsqueeze(1), case.prob_mix, case.prob_w)
                        for _, _, box in branches])
    ours = lambda cfg: methods.sai_losses(  # noqa: E731
        dec, [(f_s, dec.decode(f_s), v) for f_s, v, _ in branches], target, cfg,
        losses.sai_mask_ratio)
    grads = []
    for f in (plain, ours):
        x.f_s1.grad = x.f_s2.grad = None
        torch.manual_seed(5)
        lm, ln = f(cfg)
        (lm + 2 * ln).backward()
        grads.append((lm.detach(), ln.detach(), x.f_s1.grad.clone(), x.f_s2.grad.clone()))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)

# --------------------------------------------------------------------------- fabricated data
@pytest.fixture(scope="session")
def city_root(tmp_path_factory) -> Path:
    return fabricate_dataset("cityscapes", tmp_path_factory.mktemp("fab") / "cityscapes",
                             labeled=2, unlabeled=2, val=1)


def test_fabricated_voc_has_the_real_formats_and_passes_verify(tmp_path):
    root = fabricate_dataset("pascal", tmp_path / "voc", labeled=2, unlabeled=4, val=2)
    lines = (root / "splits/pascal/183/labeled.txt").read_text().splitlines()
    assert lines == ["JPEGImages/2007_000000.jpg SegmentationClass/2007_000000.png",
                     "JPEGImages/2007_000001.jpg SegmentationClass/2007_000001.png"]
    image = Image.open(root / "JPEGImages/2007_000000.jpg")
    mask = Image.open(root / "SegmentationClass/2007_000000.png")
    assert image.format == "JPEG" and max(image.size) == 500 and mask.size == image.size
    assert mask.mode == "P" and mask.getpalette()[3:6] == [128, 0, 0]  # VOC's colour map
    values = set(np.unique(np.asarray(mask)).tolist())
    assert 255 in values and values - {255} <= set(range(21)) and len(values) > 2
    assert verify_dataset(root, "voc", log=quiet).ok  # every list of every cell
    script = REPO / "data_scripts" / "verify.py"
    ok = subprocess.run([sys.executable, str(script), "--root", str(root), "--layout", "voc"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("OK"), ok.stdout + ok.stderr
    # the verifier does see a bad file in it
    Image.fromarray(np.full((9, 9), 40, np.uint8)).save(root / "SegmentationClass/2007_000000.png")
    assert not verify_dataset(root, "voc", log=quiet).ok
    # a second fabrication with other sizes replaces ours; a folder of someone else is refused
    fabricate_dataset("pascal", root, labeled=2, unlabeled=2, val=1)
    assert len((root / "splits/pascal/val.txt").read_text().splitlines()) == 1
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "x.txt").write_text("not ours")
    with pytest.raises(ConfigError, match="not fabricated by mlcl"):
        fabricate_dataset("pascal", tmp_path / "theirs", labeled=1, unlabeled=1, val=1)


def test_fabricated_cityscapes_has_the_real_formats_and_passes_verify(city_root):
    frame = "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    image = Image.open(city_root / frame)
    mask = Image.open(city_root / frame.replace("leftImg8bit", "gtFine", 1)
                      .replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png"))
    assert image.format == "PNG" and image.size == mask.size == (2048, 1024)
    assert mask.mode == "L" and set(np.unique(np.asarray(mask)).tolist()) - {255} <= set(
        range(19))
    first = (city_root / "splits/cityscapes/1_16/labeled.txt").read_text().splitlines()[0]
    assert first.split() == [frame, frame.replace("leftImg8bit/", "gtFine/", 1).replace(
        "_leftImg8bit.png", "_gtFine_labelTrainIds.png")]
    assert verify_dataset(city_root, "cityscapes", log=quiet).ok


@pytest.mark.parametrize("dataset, first, size, classes", [
    ("ade20k", "images/training/ADE_train_00000001.jpg annotations/training/"
     "ADE_train_00000001.png", (683, 512), 150),
    ("coco", "train2017/000000000001.jpg masks/000000000001.png", (640, 480), 81)])
def test_fabricated_ade20k_and_coco_are_named_as_uniMatchs_lists_and_pass_verify(
        tmp_path, dataset, first, size, classes):
    root = fabricate_dataset(dataset, tmp_path / dataset, labeled=1, unlabeled=1, val=1)
    cell = next(iter(SPLITS[dataset]))
    assert (root / f"splits/{dataset}/{cell}/labeled.txt").read_text().splitlines() == [first]
    image, mask = (Image.open(root / rel) for rel in first.split())
    assert image.format == "JPEG" and image.size == mask.size == size and mask.mode == "L"
    assert set(np.unique(np.asarray(mask)).tolist()) - {255} <= set(range(classes))
    assert verify_dataset(root, "voc", num_classes=classes, log=quiet).ok


@pytest.mark.parametrize("backbone, fc_in", [("resnet50_deepstem", 2048),
                                             ("resnet101_deepstem", 2048)])
def test_fabricated_checkpoint_has_unimatchs_keys_and_shapes(tmp_path, backbone, fc_in):
    path = fabricate_backbone(tmp_path / weights_name(backbone, 64), backbone)
    state = torch.load(path, weights_only=True)
    expected = {k: v.shape for k, v in build_backbone(backbone).state_dict().items()
                if not k.endswith("num_batches_tracked")}
    assert {k: v.shape for k, v in state.items() if not k.startswith("fc.")} == expected
    assert state["fc.weight"].shape == (1000, fc_in) and "conv1.6.weight" in state
    from mlcl.prepare import cli

    assert cli.main(["pretrained", "--check", str(path), "--backbone", backbone]) == 0


# --------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("kernel", [1, 3])
def test_flops_of_a_convolution_on_fake_tensors_equal_the_hand_count(kernel):
    """One conv (C_in 3 -> K, no bias): forward 2*B*H*W*C_in*K*k*k, and the same again for the
    weight's gradient; the image needs no gradient."""
    B, H, W, K = 2, 8, 12, 5
    conv = nn.Conv2d(3, K, kernel, padding=kernel // 2, bias=False)
    x = torch.randn(B, 3, H, W)
    assert count_flops(lambda: conv(x).sum().backward()) == 2 * (2 * B * H * W * 3 * K
                                                                 * kernel * kernel)


def test_step_flops_of_a_tiny_deeplab_equal_the_sum_over_its_convolutions():
    """The harness's supervised step (build_trainables, forward_terms, backward_and_step):
    every convolution's 2*out*C_in/groups*k_h*k_w FLOPs, three times (forward, input and
    weight gradients) except the first, whose input is the image (twice); no matmuls. The
    count of step_flops (model, bank and batch built on fake tensors) equals it."""
    cfg = load_config("synthetic", ["model.backbone=resnet50_deepstem", "model.width=2",
                                    "model.feature_channels=8", "model.low_level_channels=4",
                                    "train.batch_size=2", "data.crop_size=33", "train.cpu=true",
                                    "method=supervised"])
    run, seen = Stepper(cfg), []
    fake = step_flops(cfg)

    def count(m, inp, out):
        per = 2 * out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        seen.append(per * (3 if inp[0].requires_grad else 2))

    for m in run.model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(count)
    real = count_flops(run.step, fake=False)  # the whole step, the optimiser's included
    assert len(seen) == 65 and real == sum(seen) == fake


def test_every_cell_of_every_preset_is_costed_at_real_size(capsys):
    """Counted on fake tensors at the presets' real crop, batch and backbone; then the memory
    per GPU of each method (tests/test_measure_v2.py checks the estimate)."""
    rows = {}
    for preset in PRESETS:
        assert measure.main(["costs", "--config", preset, "--device", "cpu"]) == 0
        table = capsys.readouterr().out.splitlines()
        end = table.index("")
        assert table[0].startswith("| cell | method") and "in bf16 (estimate" in table[end + 1]
        assert table[end + 2].split(" | ")[2:] == ["peak GiB / GPU", "fits 40 GB", "fits 80 GB |"]
        assert [r.split(" | ")[0] for r in table[end + 4:]] == [
            "| supervised", "| unimatch", "| mlcl"]
        rows[preset] = [r.split(" | ") for r in table[2:end]]
    assert [r[0] for r in rows["pascal"]] == ["| 92"] * 3 + ["| 183"] * 3 + ["| 366"] * 3 + [
        "| 732"] * 3 + ["| 1464"] * 3
    assert len(rows["pascal_blended_r101"]) == 18 and len(rows["cityscapes"]) == 12

    def flops(preset, *extra):
        cfg = load_config(preset, [*extra, "model.pretrained=false", "train.cpu=true"])
        return R.counted(cfg, lambda: step_flops(cfg))

    step = {m: flops("pascal", f"method={m}") for m in ("supervised", "unimatch", "mlcl")}
    assert step["supervised"] < step["unimatch"] < step["mlcl"] < 1.3 * step["unimatch"]
    half = flops("pascal", "method=mlcl", "train.batch_size=2")
    assert half == pytest.approx(step["mlcl"] / 2, rel=1e-3)  # a step's FLOPs scale with B
    r101 = flops("pascal_blended_r101", "method=mlcl")
    assert 1.15 < r101 / step["mlcl"] < 1.6  # the deeper backbone (the head is the same)
    # pascal 183 on 2 GPUs x 4: 10,399 unlabeled images -> 1,299 iterations per epoch
    cfg = load_config("pascal", ["method=mlcl", "split=183"])
    s = R.projection(cfg, *R.real_sizes(cfg), gpus=2, step=1, per_image=1, tflops=1.0)
    assert (s["unlabeled"], s["val"], s["iters_per_epoch"], s["iterations"]) == (
        10399, 1449, 1299, 103920)
    # Cityscapes evaluates 2048 x 1024 with 8 windows of 801 (stride 534): 8 whole 801 passes
    city = load_config("cityscapes", ["method=mlcl", "model.pretrained=false"])
    whole = load_config("cityscapes", ["method=mlcl", "eval.mode=whole",
                                       "model.pretrained=false"])
    assert R.image_flops(city) == 8 * eval_flops(whole, 801, 801)


def test_ade20k_and_coco_cells_are_costed_on_their_real_pools(capsys):
    """UniMatch V2's schedules on the real pools: ADE20K 1/64 (316 labeled of 20,210) on 4 GPUs
    x 2, COCO 1/512 (232 of 118,287) on 4 GPUs x 4."""
    for preset, cells in (("ade20k", 6), ("coco", 5)):
        assert measure.main(["costs", "--config", preset, "--device", "cpu"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines.index("") == 2 + 3 * cells and len(lines) == 2 + 3 * cells + 1 + 1 + 2 + 3
    for preset, split, want in (("ade20k", "1_64", (19894, 2000, 2486, 60 * 2486)),
                                ("coco", "1_512", (118055, 5000, 7378, 20 * 7378))):
        cfg = load_config(preset, ["method=mlcl", f"split={split}"])
        s = R.projection(cfg, *R.real_sizes(cfg), gpus=4, step=1, per_image=1, tflops=1.0)
        assert (s["unlabeled"], s["val"], s["iters_per_epoch"], s["iterations"]) == want


# --------------------------------------------------------------------------- the rehearsal
def _stages(report: dict) -> dict[tuple[str, str | None], str]:
    return {(s["name"], s["method"]): s["status"] for s in report["stages"]}


def test_pascal_at_real_size_passes_every_stage(tmp_path, capsys):
    report = R.rehearse("pascal", args("rehearse", "--config", "pascal", "--steps", "2",
                                       "--device", "cpu", "--methods", "supervised",
                                       "--out", str(tmp_path)))
    out = capsys.readouterr().out
    assert report["ok"], out
    assert set(_stages(report).values()) == {R.PASS} and len(report["stages"]) == 7
    for name in ("data", "weights", "flops", "train", "checkpoint", "resume", "evaluate"):
        assert any(ln.startswith("PASS  pascal") and f" {name} " in ln for ln in out.splitlines())
    assert (report["backbone"], report["crop"], report["batch"], report["preset_batch"]) == (
        "resnet50_deepstem", 321, 2, 4)
    n = report["methods"]["supervised"]
    cfg = load_config("pascal", ["method=supervised", "model.pretrained=false", "train.cpu=true"])
    assert n["step_flops"] == R.counted(cfg, lambda: step_flops(cfg))
    assert n["run_step_flops"] == pytest.approx(n["step_flops"] / 2, rel=1e-3)
    assert n["seconds_per_step"] > 0 and n["peak_mb"] > 500 and n["step_samples"] == 2
    assert n["projection"]["iterations"] == 80 * ((10582 - 1464) // 8)  # split 1464, 2 x 4
    assert json.loads((tmp_path / "pascal" / "rehearse.json").read_text())["ok"]
    first = tmp_path / "data" / "pascal" / "JPEGImages" / "2007_000000.jpg"
    assert Image.open(first).size == (500, 375)  # at the preset's crop: VOC's own sizes
    saved = yaml.safe_load((tmp_path / "pascal" / "supervised" / "config.yaml").read_text())
    cfg = config_from_dict(saved)  # what training ran: the preset's own settings
    base = load_config("pascal")
    assert (cfg.train.lr, cfg.train.epochs, cfg.data.crop_size, cfg.eval.mode) == (
        base.train.lr, base.train.epochs, base.data.crop_size, base.eval.mode)


def test_a_weights_file_with_a_wrong_key_fails_the_weights_stage(tmp_path, capsys):
    path = fabricate_backbone(tmp_path / "w.pth", "resnet50_deepstem", width=4)
    state = torch.load(path, weights_only=True)
    state["layer9.weight"] = state.pop("layer2.0.conv1.weight")
    torch.save(state, path)
    code = measure.main(["rehearse", "--config", "pascal", "--out", str(tmp_path / "out"),
                         "--steps", "2", "--methods", "supervised", "--device", "cpu",
                         f"model.pretrained={path}", *TINY])
    out = capsys.readouterr().out
    assert code == 1
    line = next(ln for ln in out.splitlines() if " weights " in ln)
    assert line.startswith(R.FAIL) and "unexpected keys: layer9.weight" in line
    assert "missing keys: layer2.0.conv1.weight" in line
    report = json.loads((tmp_path / "out" / "pascal" / "rehearse.json").read_text())
    status = _stages(report)
    assert status[("data", None)] == status[("flops", "supervised")] == R.PASS
    assert {status[(s, "supervised")] for s in ("train", "checkpoint", "resume",
                                                 "evaluate")} == {R.SKIP}
    assert "1 stage(s) FAILED" in out


def test_a_run_that_starts_over_fails_the_resume_stage(tmp_path, monkeypatch):
    """The resume check counts the steps the loop takes: a run that ignored its checkpoint
    (here: a loop whose resume never loads it) takes 2N steps instead of N."""
    plan = R.make_plan("pascal", args("rehearse", "--config", "pascal", "--steps", "2",
                                      "--device", "cpu", "--out", str(tmp_path), *TINY))
    root = fabricate_dataset("pascal", tmp_path / "data", labeled=2, unlabeled=4, val=2)
    data = {"root": root, "lists": [], "full": (9000, 1449)}
    weights = str(fabricate_backbone(tmp_path / "w.pth", "resnet50_deepstem", width=4))
    book = R.StageBook("pascal", quiet)
    book.run("train", "supervised", lambda: R.fit_stage(
        R.run_config(plan, "supervised", data, weights, 2), plan, 0))
    from mlcl import train
    from mlcl.checkpoints import schedule_settings

    def ignore_checkpoint(run):  # what train.resume does when there is no checkpoint
        run.state.iters_per_epoch = run.iters_per_epoch
        run.state.settings = schedule_settings(run.cfg)

    monkeypatch.setattr(train, "resume", ignore_checkpoint)
    book.run("resume", "supervised", lambda: R.fit_stage(
        R.run_config(plan, "supervised", data, weights, 4), plan, 2))
    assert [s.status for s in book.stages] == [R.PASS, R.FAIL]
    assert "ran 4 steps, expected 2 (4 would mean it started over)" in book.stages[1].detail


@pytest.mark.parametrize("preset", ["ade20k", "coco"])
def test_ade20k_and_coco_rehearse_every_stage_at_toy_size(tmp_path, capsys, preset):
    """Every stage of every method on fabricated ADE20K / COCO at toy width and crop (at real
    size each takes longer than this suite affords on a CPU: docs/real_data.md, section 9)."""
    code = measure.main(["rehearse", "--config", preset, "--out", str(tmp_path), "--steps", "2",
                         "--device", "cpu", *TINY])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / preset / "rehearse.json").read_text())
    assert code == 0 and report["ok"], out
    assert len(report["stages"]) == 2 + 5 * 3 and report["backbone"] == "resnet101_deepstem"
    assert out.strip().splitlines()[-1].startswith("ALL PASS")


def test_given_data_root_is_cut_to_the_rehearsal_and_costed_in_full(tmp_path, capsys):
    """data.root=DIR: the cell's lists are cut to the rehearsal's size in OUT/PRESET/lists;
    the projection counts the full lists."""
    root = fabricate_dataset("pascal", tmp_path / "VOC", labeled=3, unlabeled=9, val=3)
    code = measure.main(["rehearse", "--config", "pascal", "split=183", "--out",
                         str(tmp_path / "out"), "--steps", "2", "--methods", "supervised",
                         "--device", "cpu", f"data.root={root}", *TINY])
    assert code == 0, capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "pascal" / "rehearse.json").read_text())
    lists = tmp_path / "out" / "pascal" / "lists"
    assert len((lists / "unlabeled-unlabeled_split.txt").read_text().splitlines()) == 4
    assert len((lists / "val-val_split.txt").read_text().splitlines()) == 2
    p = report["methods"]["supervised"]["projection"]
    assert (p["unlabeled"], p["val"], p["iters_per_epoch"]) == (9, 3, 1)


def test_rehearsal_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    def run(*argv):
        return measure.main(["rehearse", "--device", "cpu", *argv])

    assert run("--config", "synthetic", "--out", str(tmp_path / "a")) == 2
    assert "paper's presets" in capsys.readouterr().err
    assert run("--config", "pascal", "train.nope=1", "--out", str(tmp_path / "b")) == 2
    assert "train.nope" in capsys.readouterr().err
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.csv").write_text("keep me")
    assert run("--config", "pascal", "--out", str(theirs), "--methods", "supervised") == 2
    err = capsys.readouterr().err
    assert "not made by a rehearsal" in err and len(err.strip().splitlines()) == 1
    assert (theirs / "results.csv").read_text() == "keep me"
    blocked = theirs / "results.csv" / "out"  # an OS error: the file and the reason
    assert run("--config", "pascal", "--out", str(blocked), "--methods", "supervised") == 2
    assert capsys.readouterr().err == f"error: {blocked}: Not a directory\n"


def test_a_stop_signal_ends_the_rehearsal(tmp_path, capsys, monkeypatch):
    """Ctrl-C / SIGTERM (the loop's RunInterrupted) is no stage's FAIL: the rehearsal stops
    with the interruption's line and status; other errors stay the stage's FAIL."""
    from mlcl.errors import RunDiverged, RunInterrupted

    book = R.StageBook("pascal", quiet)
    assert book.run("train", "mlcl", lambda: (_ for _ in ()).throw(RunDiverged("nan"))) is None
    assert book.status("train", "mlcl") == R.FAIL
    line = "interrupted at iteration 2 (checkpoint written); the same command resumes it"

    def interrupted(plan):
        raise RunInterrupted(line, signal.SIGINT)

    later = []
    monkeypatch.setattr(R, "data_stage", interrupted)
    monkeypatch.setattr(R, "weights_stage", lambda plan: later.append(1))
    code = measure.main(["rehearse", "--config", "pascal", "--out", str(tmp_path),
                         "--methods", "supervised", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 130 and captured.err.strip() == line and not later
    assert "FAIL" not in captured.out


# --------------------------------------------------------------------------- gpu-check
@pytest.fixture(scope="session")
def tiny_check(tmp_path_factory) -> tuple[int, Path]:
    """The UniMatch presets' parts (the V2 presets' rehearsals: tests/test_measure_v2.py)."""
    out = tmp_path_factory.mktemp("gpu-check")
    code = measure.main(["gpu-check", "--device", "cpu", "--out", str(out), "--methods",
                         "unimatch,mlcl", "--config", ",".join(PRESETS)])
    return code, out


def test_gpu_check_at_toy_sizes_runs_every_part_and_rehearses_every_preset(tiny_check):
    code, out = tiny_check
    check = json.loads((out / "gpu_check.json").read_text())
    assert code == 0 and check["ok"], [(p["name"], p["status"], p["tail"][-800:])
                                       for p in check["parts"]]
    assert [p["name"] for p in check["parts"]] == [
        "bench_fp32", "bench_bf16", *(f"rehearse_{p}" for p in PRESETS)]
    assert all(p["cpu_s"] > 0 for p in check["parts"])
    for preset in PRESETS:
        r = json.loads((out / "rehearse" / preset / "rehearse.json").read_text())
        assert r["ok"] and len(r["stages"]) == 2 + 2 * 5
        assert {m: n["achieved_tflops"] > 0 for m, n in r["methods"].items()} == {
            "unimatch": True, "mlcl": True}
    assert check["bench"]["bf16"]["step_s"]["mlcl"] > 0
    frame = next((out / "rehearse" / "data" / "cityscapes" / "leftImg8bit").rglob("*.png"))
    assert Image.open(frame).size == (412, 206)  # 2048 x 1024 scaled by the crop, 161 / 801
    voc = check["memory_voc"]
    assert voc["mlcl_over_unimatch"] == pytest.approx(
        voc["peak_mb"]["mlcl"] / voc["peak_mb"]["unimatch"]) and "VmHWM" in voc["what"]
    text = (out / "SUMMARY.md").read_text()
    assert text.startswith("# gpu-check PASSED") and "rehearse cityscapes: ALL PASS" in text


def test_gpu_check_plans_the_gpu_parts_within_12_5_minutes(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert measure.main(["gpu-check", "--device", "cuda", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [ln.split(" (")[0] for ln in lines]
    assert names == ["bench_fp32", "bench_bf16", *(f"rehearse_{p}" for p in PRESETS),
                     "rehearse_pascal_v2", "rehearse_cityscapes_v2", "two_process"]
    assert "--device cuda steps" in lines[0] and "train.mixed_precision=no" in lines[0]
    assert "train.mixed_precision=bf16" in lines[1] and "memory" in lines[1]
    for ln in lines[2:8]:
        assert "--device cuda rehearse" in ln and "train.mixed_precision=bf16" in ln
        assert "batch_size" not in ln  # the preset's own batch
    assert "--methods mlcl" in lines[3]  # pascal_blended; the others: the preset's rows
    assert all("--methods" not in ln for ln in lines[2:8] if ln != lines[3])
    assert "--num_processes 2" in lines[8] and "method=mlcl" in lines[8]
    budgets = [int(ln.split(" (")[1].split(" s)")[0]) for ln in lines]
    assert sum(budgets[:8]) <= gpu_check.BUDGET_S == 750  # one GPU: no two-process part
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert measure.main(["gpu-check", "--device", "cuda"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_gpu_check_two_process_part_trains_in_a_fresh_folder(tmp_path, monkeypatch):
    """A second gpu-check must not resume (or report) the first one's complete run; a folder
    that an earlier check did not leave is kept and the part fails."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    a = args("gpu-check", "--device", "cpu", "--out", str(tmp_path))
    a.processes = 2
    two = gpu_check.plan_parts(a)[-1]
    assert two.name == "two_process" and two.fresh == str(tmp_path / "two_process")
    stale = tmp_path / "two_process"
    save_config(load_config(None, [f"output_dir={stale}"]), stale / "config.yaml")
    (stale / "metrics.json").write_text(json.dumps({"complete": True, "num_processes": 2}))
    ran = tmp_path / "ran"
    two.command = [sys.executable, "-c", f"open({str(ran)!r}, 'w')"]  # trains nothing
    gpu_check.run_part(two, time.monotonic() + 120)
    gpu_check.collect([two], tmp_path)
    assert ran.exists() and not stale.exists() and two.status == "FAIL"
    ran.unlink()
    stale.mkdir()
    (stale / "results.csv").write_text("keep me")
    two.status = "NOT RUN"
    gpu_check.run_part(two, time.monotonic() + 120)
    assert two.status == "FAIL" and "not a run an earlier gpu-check left" in two.tail
    assert (stale / "results.csv").read_text() == "keep me" and not ran.exists()


def test_gpu_check_timeout_stops_the_whole_process_group(tmp_path):
    """A part past its budget is stopped with the workers it started (accelerate launch's
    children), not only the process it ran."""
    pid_file = tmp_path / "worker.pid"
    worker = (f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
              "time.sleep(120)")
    launcher = (f"import subprocess, sys, time, os; subprocess.Popen([sys.executable, '-c', "
                f"{worker!r}])\nwhile not os.path.exists({str(pid_file)!r}): time.sleep(0.05)\n"
                "print('launched', flush=True); time.sleep(120)")
    part = gpu_check.Part("slow", [sys.executable, "-c", launcher], budget_s=8)
    gpu_check.run_part(part, time.monotonic() + 120)
    assert part.status == "TIMEOUT" and "launched" in part.tail
    pid = int(pid_file.read_text())
    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid), "the part's worker outlived its timeout"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("argv", [["measure", "--help"], ["measure", "rehearse", "--help"]])
def test_the_command_answers_help(argv, capsys):
    from mlcl.__main__ import main as cli

    with pytest.raises(SystemExit) as done:
        cli(argv)
    assert done.value.code == 0 and "usage: python -m mlcl measure" in capsys.readouterr().out

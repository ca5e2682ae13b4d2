"""The rehearsal (``mlcl rehearse``) and the GPU acceptance check (``mlcl gpu-check``) on the
CPU: tests that fail when the real path of a paper preset breaks.

What runs at which size, and why (the file takes about 2.5 minutes of CPU):

- **Real sizes, shapes only** (seconds): every paper preset x every method, one training step
  at the preset's crop (321 / 801), per-GPU batch (4) and backbone (deep-stem ResNet-50 / 101,
  width 64) through the real step functions and the backward, on the meta device, and the
  evaluation of a full image in the preset's mode (8 sliding windows over 2048 x 1024 for
  Cityscapes): the FLOPs and cost of every cell (``--costs``). A shape or configuration error
  on the real path fails here.
- **Real sizes, computed** (~35 s): pascal with the deep-stem ResNet-50 at width 64 and crop
  321, a fabricated checkpoint with the real keys and shapes, fabricated VOC images of VOC's
  sizes; the supervised method (the cheapest; a semi-supervised step is 5-6x its cost) at
  batch 2 (the smallest that batch norm and the CutMix partner allow), 2 + 2 steps, one
  validation image: every stage.
- **Every preset, every stage** (~90 s): ``gpu-check --tiny``, i.e. the exact commands
  ``make gpu-check`` runs, on the CPU: UniMatch and MLCL on every preset with the preset's
  backbone topology and key names at width 4, crop 161, 2 + 2 steps, one validation image, on
  fabricated data of the real formats and image sizes (Cityscapes evaluated on the centre
  crop: a full 2048 x 1024 frame costs ~10 s of CPU even through the narrow network).
- The stages can fail: a weights file with a wrong key fails the weights stage (and skips the
  rest), a run that starts over instead of resuming fails the resume stage.
- FLOPs: the counter equals a hand count for a convolution and for a tiny DeepLabV3+.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from mlcl.config import config_from_dict, load_config
from mlcl.methods import StepContext
from mlcl.model import DeepLabV3Plus, build_backbone
from mlcl.paths import REPO
from mlcl.prepare.verify import verify_dataset
from mlcl.rehearse import Options, gpu_check, main, rehearse
from mlcl.rehearse import flops as F
from mlcl.rehearse.fabricate import (FabricateError, fabricate_backbone, fabricate_dataset,
                                     weights_name)
from mlcl.rehearse.run import make_plan, resume_stage, run_config, train_stage
from mlcl.rehearse.stages import FAIL, PASS, SKIP, StageBook

PRESETS = ("pascal", "pascal_blended", "pascal_blended_r101", "cityscapes")
TINY = ["model.width=4", "model.feature_channels=8", "model.low_level_channels=4",
        "data.crop_size=161", "data.num_workers=0"]


def quiet(msg: str) -> None:
    pass


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
    Image.fromarray(np.full((9, 9), 40, np.uint8)).save(root / "SegmentationClass/2007_000003.png")
    assert not verify_dataset(root, "voc", log=quiet).ok
    # a second fabrication with other sizes replaces ours; a folder of someone else is refused
    fabricate_dataset("pascal", root, labeled=2, unlabeled=2, val=1)
    assert len((root / "splits/pascal/val.txt").read_text().splitlines()) == 1
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "x.txt").write_text("not ours")
    with pytest.raises(FabricateError, match="not fabricated by mlcl"):
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
def _supervised_ctx(cfg) -> StepContext:
    return StepContext(cfg=cfg, bank=None, accelerator=None, total_iters=10, iters_per_epoch=10)


@pytest.mark.parametrize("kernel", [1, 3])
def test_supervised_step_flops_of_a_convolution_equal_the_hand_count(kernel):
    """One conv (C_in 3 -> K, no bias): forward 2*B*H*W*C_in*K*k*k, and the same again for the
    weight's gradient; the image needs no gradient."""
    cfg = load_config("synthetic", ["train.batch_size=2"])
    B, H, W, K = 2, 8, 12, cfg.data.num_classes
    conv = nn.Conv2d(3, K, kernel, padding=kernel // 2, bias=False)
    batch = {"x": {"x": torch.randn(B, 3, H, W), "y": torch.randint(0, K, (B, H, W))}}
    assert F.step_flops(conv, batch, _supervised_ctx(cfg)) == 2 * (2 * B * H * W * 3 * K
                                                                  * kernel * kernel)


def test_supervised_step_flops_of_a_tiny_deeplab_equal_the_sum_over_its_convolutions():
    """Every convolution's 2*out*C_in/groups*k_h*k_w FLOPs, three times (forward, input and
    weight gradients) except the first, whose input is the image (twice); no matmuls."""
    cfg = load_config("synthetic", ["model.backbone=resnet50_deepstem", "model.width=2",
                                    "model.feature_channels=8", "model.low_level_channels=4",
                                    "train.batch_size=2"])
    model = DeepLabV3Plus(cfg.model, cfg.data.num_classes)
    seen = []

    def count(m, inp, out):
        per = 2 * out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        seen.append(per * (3 if inp[0].requires_grad else 2))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(count)
    S, K = 33, cfg.data.num_classes
    batch = {"x": {"x": torch.randn(2, 3, S, S), "y": torch.randint(0, K, (2, S, S))}}
    got = F.step_flops(model, batch, _supervised_ctx(cfg))
    assert len(seen) == 65 and got == sum(seen)


def test_every_cell_of_every_preset_is_costed_at_real_size(capsys):
    """Counted on the meta device at the presets' real crop, batch and backbone."""
    rows = {}
    for preset in PRESETS:
        assert main(["--config", preset, "--costs"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].startswith("| cell | method")
        rows[preset] = [r.split(" | ") for r in table[2:]]
    assert [r[0] for r in rows["pascal"]] == ["| 92"] * 3 + ["| 183"] * 3 + ["| 366"] * 3 + [
        "| 732"] * 3 + ["| 1464"] * 3
    assert len(rows["pascal_blended_r101"]) == 18 and len(rows["cityscapes"]) == 12
    cfg = {m: load_config("pascal", [f"method={m}", "split=183"]) for m in
           ("supervised", "unimatch", "mlcl")}
    step = {m: F.preset_step_flops(c) for m, c in cfg.items()}
    assert step["supervised"] < step["unimatch"] < step["mlcl"] < 1.3 * step["unimatch"]
    half = F.preset_step_flops(load_config("pascal", ["method=mlcl", "train.batch_size=2"]))
    assert half == pytest.approx(step["mlcl"] / 2, rel=1e-3)  # a step's FLOPs scale with B
    r101 = F.preset_step_flops(load_config("pascal_blended_r101", ["method=mlcl"]))
    assert 1.15 < r101 / step["mlcl"] < 1.6  # the deeper backbone (the head is the same)
    # pascal 183 on 2 GPUs x 4: 10,399 unlabeled images -> 1,299 iterations per epoch
    s = F.schedule(cfg["mlcl"], *F.real_sizes(cfg["mlcl"]), batch=4, gpus=2)
    assert (s.unlabeled, s.val, s.iters_per_epoch, s.iterations) == (10399, 1449, 1299, 103920)
    # Cityscapes evaluates 2048 x 1024 with 8 windows of 801 (stride 534): 8 whole 801 passes
    city = load_config("cityscapes", ["method=mlcl"])
    whole = load_config("cityscapes", ["method=mlcl", "eval.mode=whole"])
    assert F.eval_flops(city, 1024, 2048) == 8 * F.eval_flops(whole, 801, 801)


# --------------------------------------------------------------------------- the stages
def _stages(report: dict) -> dict[tuple[str, str | None], str]:
    return {(s["name"], s["method"]): s["status"] for s in report["stages"]}


def test_pascal_at_real_size_passes_every_stage(tmp_path, capsys):
    report = rehearse("pascal", Options(out=tmp_path, steps=2, val_images=1, device="cpu",
                                        methods=("supervised",)))
    out = capsys.readouterr().out
    assert report["ok"], out
    assert set(_stages(report).values()) == {PASS} and len(report["stages"]) == 7
    for name in ("data", "weights", "flops", "train", "checkpoint", "resume", "evaluate"):
        assert any(ln.startswith("PASS  pascal") and f" {name} " in ln for ln in out.splitlines())
    assert (report["backbone"], report["crop"], report["batch"], report["preset_batch"]) == (
        "resnet50_deepstem", 321, 2, 4)
    n = report["methods"]["supervised"]
    assert n["step_flops"] == F.preset_step_flops(load_config("pascal",
                                                              ["method=supervised"]))
    assert n["run_step_flops"] == pytest.approx(n["step_flops"] / 2, rel=1e-3)
    assert n["seconds_per_step"] > 0 and n["peak_mb"] > 500 and n["step_samples"] == 2
    assert n["projection"]["iterations"] == 80 * ((10582 - 1464) // 8)  # split 1464, 2 x 4
    assert json.loads((tmp_path / "pascal" / "rehearse.json").read_text())["ok"]
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
    code = main(["--config", "pascal", "--out", str(tmp_path / "out"), "--steps", "2",
                 "--val-images", "1", "--methods", "supervised", "--device", "cpu",
                 "--weights", str(path), *TINY])
    out = capsys.readouterr().out
    assert code == 1
    line = next(ln for ln in out.splitlines() if " weights " in ln)
    assert line.startswith(FAIL) and "unexpected keys: layer9.weight" in line
    assert "missing keys: layer2.0.conv1.weight" in line
    report = json.loads((tmp_path / "out" / "pascal" / "rehearse.json").read_text())
    status = _stages(report)
    assert status[("data", None)] == status[("flops", "supervised")] == PASS
    assert {status[(s, "supervised")] for s in ("train", "checkpoint", "resume",
                                                 "evaluate")} == {SKIP}
    assert "1 stage(s) FAILED" in out


def test_a_run_that_starts_over_fails_the_resume_stage(tmp_path, monkeypatch):
    """The resume check counts the steps the loop takes: a run that ignored its checkpoint
    (here: a loop whose resume never loads it) takes 2N steps instead of N."""
    opts = Options(out=tmp_path, steps=2, val_images=1, device="cpu",
                   methods=("supervised",), overrides=TINY)
    plan = make_plan("pascal", opts)
    root = fabricate_dataset("pascal", tmp_path / "data", labeled=2, unlabeled=4, val=1)
    from mlcl.rehearse.run import Data

    data = Data(root, [], 9000, 1449, fabricated=True)
    weights = fabricate_backbone(tmp_path / "w.pth", "resnet50_deepstem", width=4)
    cfg = run_config(plan, "supervised", data, str(weights), 2)
    book = StageBook("pascal", quiet)
    book.run("train", "supervised", lambda: train_stage(cfg, plan))
    from mlcl import train
    from mlcl.checkpoints import schedule_settings

    def ignore_checkpoint(run):  # what train.resume does when there is no checkpoint
        run.state.iters_per_epoch = run.iters_per_epoch
        run.state.settings = schedule_settings(run.cfg)

    monkeypatch.setattr(train, "resume", ignore_checkpoint)
    book.run("resume", "supervised", lambda: resume_stage(
        run_config(plan, "supervised", data, str(weights), 4), plan, "epoch-0001"))
    assert [s.status for s in book.stages] == [PASS, FAIL]
    assert "ran 4 steps, expected 2 (4 would mean it started over)" in book.stages[1].detail


def test_given_data_root_is_cut_to_the_rehearsal_and_costed_in_full(tmp_path, capsys):
    """--data-root: the cell's lists are cut to the rehearsal's size in OUT/PRESET/lists; the
    projection counts the full lists."""
    root = fabricate_dataset("pascal", tmp_path / "VOC", labeled=3, unlabeled=9, val=3)
    code = main(["--config", "pascal", "split=183", "--out", str(tmp_path / "out"), "--steps",
                 "2", "--val-images", "1", "--methods", "supervised", "--device", "cpu",
                 "--data-root", str(root), *TINY])
    assert code == 0, capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "pascal" / "rehearse.json").read_text())
    lists = tmp_path / "out" / "pascal" / "lists"
    assert len((lists / "unlabeled-unlabeled_split.txt").read_text().splitlines()) == 4
    assert len((lists / "val-val_split.txt").read_text().splitlines()) == 1
    p = report["methods"]["supervised"]["projection"]
    assert (p["unlabeled"], p["val"], p["iters_per_epoch"]) == (9, 3, 1)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--config", "synthetic", "--out", str(tmp_path / "a")]) == 2
    assert "paper's datasets" in capsys.readouterr().err
    assert main(["--config", "pascal", "train.nope=1", "--out", str(tmp_path / "b")]) == 2
    assert "train.nope" in capsys.readouterr().err
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.csv").write_text("keep me")
    assert main(["--config", "pascal", "--out", str(theirs), "--methods", "supervised"]) == 2
    err = capsys.readouterr().err
    assert "not made by `mlcl rehearse`" in err and len(err.strip().splitlines()) == 1
    assert (theirs / "results.csv").read_text() == "keep me"
    blocked = theirs / "results.csv" / "out"  # an OS error: the file and the reason
    assert main(["--config", "pascal", "--out", str(blocked), "--methods", "supervised"]) == 2
    assert capsys.readouterr().err == f"error: {blocked}: Not a directory\n"


def test_a_stop_signal_ends_the_rehearsal(tmp_path, capsys, monkeypatch):
    """Ctrl-C / SIGTERM (the loop's RunInterrupted) is no stage's FAIL: the rehearsal stops
    with the interruption's line and status; other errors stay the stage's FAIL."""
    from mlcl.rehearse import run as rehearse_run
    from mlcl.errors import RunDiverged, RunInterrupted

    book = StageBook("pascal", quiet)
    assert book.run("train", "mlcl", lambda: (_ for _ in ()).throw(RunDiverged("nan"))) is None
    assert book.status("train", "mlcl") == FAIL
    line = "interrupted at iteration 2 (checkpoint written); the same command resumes it"

    def interrupted(plan):
        raise RunInterrupted(line, signal.SIGINT)

    later = []
    monkeypatch.setattr(rehearse_run, "data_stage", interrupted)
    monkeypatch.setattr(rehearse_run, "weights_stage", lambda plan: later.append(1))
    code = main(["--config", "pascal", "--out", str(tmp_path), "--methods", "supervised",
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 130 and captured.err.strip() == line and not later
    assert "FAIL" not in captured.out


# --------------------------------------------------------------------------- gpu-check
@pytest.fixture(scope="session")
def tiny_check(tmp_path_factory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    code = gpu_check.main(["--tiny", "--out", str(out), "--methods", "unimatch,mlcl",
                           "--processes", "0"])
    return code, out


def test_gpu_check_tiny_runs_every_part_and_rehearses_every_preset(tiny_check):
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
    voc = check["memory_voc"]
    assert voc["mlcl_over_unimatch"] == pytest.approx(
        voc["peak_mb"]["mlcl"] / voc["peak_mb"]["unimatch"]) and "VmHWM" in voc["what"]
    text = (out / "SUMMARY.md").read_text()
    assert text.startswith("# gpu-check PASSED") and "rehearse cityscapes: ALL PASS" in text


def test_gpu_check_plans_the_gpu_parts_within_8_minutes(capsys, monkeypatch):
    assert gpu_check.main(["--dry-run", "--processes", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [ln.split(" (")[0] for ln in lines]
    assert names == ["bench_fp32", "bench_bf16", *(f"rehearse_{p}" for p in PRESETS),
                     "two_process"]
    assert "--device cuda --mixed-precision no" in lines[0]
    assert "--mixed-precision bf16" in lines[1] and "memory" in lines[1]
    for ln in lines[2:6]:
        assert "--device cuda" in ln and "train.mixed_precision=bf16" in ln
        assert "--batch" not in ln  # the preset's own batch
    assert "--num_processes 2" in lines[6] and "method=mlcl" in lines[6]
    budgets = [int(ln.split(" (")[1].split(" s)")[0]) for ln in lines]
    assert sum(budgets[:6]) <= gpu_check.BUDGET_S == 480  # one GPU: no two-process part
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        gpu_check.main([])


def test_gpu_check_two_process_part_trains_in_a_fresh_folder(tmp_path):
    """A second gpu-check must not resume (or report) the first one's complete run; a folder
    that an earlier check did not leave is kept and the part fails."""
    a = gpu_check.resolve(gpu_check.build_parser().parse_args(
        ["--dry-run", "--processes", "2", "--out", str(tmp_path)]))
    two = gpu_check.plan_parts(a)[-1]
    assert two.name == "two_process" and two.fresh == str(tmp_path / "two_process")
    stale = tmp_path / "two_process"
    stale.mkdir()
    (stale / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(stale)}))
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
    worker = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
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


@pytest.mark.parametrize("command", ["rehearse", "gpu-check"])
def test_the_subcommands_answer_help(command, capsys):
    from mlcl.__main__ import main as cli

    with pytest.raises(SystemExit) as done:
        cli([command, "--help"])
    assert done.value.code == 0 and "usage: python -m mlcl" in capsys.readouterr().out

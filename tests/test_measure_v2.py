"""The measuring tool on UniMatch V2's presets (DINOv2 + DPT): the fabricated DINOv2
checkpoint has the official file's keys and shapes and loads strictly; attention is counted in
a step's FLOPs; the memory estimate on fake tensors counts what torch's own tracker counts;
every cell and method is costed at the real crop and batch; every stage of both V2 presets
passes at toy size (DINOv2-S at crop 56: about a minute each); the bench reports MLCL-on-V2
against UniMatch V2. Not timed: the numbers are docs/performance.md's and docs/real_data.md's.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from mlcl import measure
from mlcl.config import load_config
from mlcl.measure import rehearse as R
from mlcl.measure.fabricate import backbone_of, fabricate_backbone, weights_name
from mlcl.measure.harness import (FAMILIES, LiveBytes, count_flops, fake_step, step_flops,
                                  step_memory)
from mlcl.model import load_backbone_weights

TOY = ["model.feature_channels=8", "data.crop_size=56", "data.num_workers=0"]
# the official file's names (dinov2_vits14_pretrain.pth): 5 + 14 per block + the final norm
OFFICIAL = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight",
            "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias",
            "blocks.0.ls1.gamma", "blocks.0.mlp.fc1.weight", "blocks.11.ls2.gamma", "norm.bias"}


def real(preset: str, *extra: str):
    return load_config(preset, [*extra, "model.pretrained=false", "train.cpu=true"])


@pytest.mark.parametrize("backbone, dim", [("dinov2_s", 384), ("dinov2_b", 768)])
def test_fabricated_dinov2_checkpoint_has_the_official_keys_and_shapes(tmp_path, backbone,
                                                                       dim):
    path = fabricate_backbone(tmp_path / weights_name(backbone, 64), backbone)
    state = torch.load(path, weights_only=True)
    assert path.name == f"{backbone}.pth" and OFFICIAL <= set(state) and len(state) == 175
    assert state["pos_embed"].shape == (1, 37 * 37 + 1, dim)  # 518 / 14 = 37 patches a side
    assert state["mask_token"].shape == (1, dim) and state["cls_token"].shape == (1, 1, dim)
    assert state["blocks.0.attn.qkv.weight"].shape == (3 * dim, dim)
    load_backbone_weights(backbone_of(backbone), path)  # strict, less mask_token
    del state["blocks.3.ls1.gamma"]
    torch.save(state, path)
    with pytest.raises(Exception, match="missing keys: blocks.3.ls1.gamma"):
        load_backbone_weights(backbone_of(backbone), path)


def test_attention_is_counted_on_the_cpu():
    """scaled_dot_product_attention on CPU tensors runs the CPU flash kernel, which torch's
    counter has no formula for: forward 4*B*h*N^2*d (QK^T and PV), backward (QK^T again and
    four products for the gradients) 2.5 times that, as torch counts the CUDA kernels."""
    B, h, N, d = 2, 3, 50, 16
    q, k, v = (torch.randn(B, h, N, d, requires_grad=True) for _ in range(3))
    forward = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    both = count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    assert forward == 4 * B * h * N * N * d and both == forward + 10 * B * h * N * N * d


def test_live_bytes_counts_each_storage_once_until_it_is_freed():
    live, mib = LiveBytes(), 2 ** 20
    with live:
        a = torch.zeros(256, 1024)
        b = a * 2
        del a, b
        c = torch.ones(256, 1024)
        view = c[:10]  # no new storage
    assert (live.peak, live.now) == (2 * mib, mib) and view.shape == (10, 1024)
    small, kept = LiveBytes(), torch.zeros(3)
    small.add(kept, kept[1:])  # one storage, rounded up to the allocator's 512-byte blocks
    assert small.now == 512


@pytest.mark.parametrize("preset", ["pascal_v2", "pascal"])
def test_memory_estimate_equals_torchs_tracker_where_it_runs(preset):
    """torch's MemTracker follows modules and refuses a module run twice in a step (the
    semi-supervised steps): on the supervised step the two counts agree."""
    cfg = real(preset, "method=supervised", "train.mixed_precision=bf16")
    estimate = step_memory(cfg)
    with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True):
        warnings.simplefilter("ignore")
        step, tracker = fake_step(cfg), MemTracker()
        tracker.track_external(*step.state)
        with tracker:
            step.run()
        peak = sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())
    assert estimate["step_peak_bytes"] == pytest.approx(peak, rel=1e-3)
    assert estimate["optimizer_bytes"] == (2 if preset == "pascal_v2" else 1) * 4 * estimate[
        "parameters"]  # AdamW's two moments, SGD's momentum (fp32)


def test_pascal_v2_is_costed_at_the_real_crop_and_batch(capsys):
    """Crop 518, 4 per GPU on 4 GPUs (cityscapes_v2's costs: its rehearsal's flops stage);
    UniMatch V2's pace: its VOC 183 run with DINOv2-S took 5.67 h on 4 GPUs, which the
    projection gives back."""
    assert measure.main(["costs", "--config", "pascal_v2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("| cell | method") == 1 and "| 183 | unimatch_v2 |" in out
    cells = [ln.split(" | ")[0] for ln in out.splitlines()[2:17]]
    assert cells == [f"| {c}" for c in ("92", "183", "366", "732", "1464") for _ in range(3)]
    assert "dinov2_s, crop 518, batch 4 per GPU on 4 GPUs" in out and "| mlcl | 24.7 M |" in out

    def cfg(method, *extra):
        return real("pascal_v2", f"method={method}", *extra)

    step = {m: R.counted(cfg(m), lambda: step_flops(cfg(m)))  # counted by the costs above
            for m in ("supervised", "unimatch_v2", "mlcl")}
    assert step["supervised"] < step["unimatch_v2"] < step["mlcl"] < 1.3 * step["unimatch_v2"]
    run = cfg("unimatch_v2", "split=183")
    p = R.projection(run, *R.real_sizes(run), 4, step["unimatch_v2"], R.image_flops(run),
                     R.reference_run(run)[1])
    assert (p["iters_per_epoch"], p["evaluations"]) == (649, 2 * 60)  # student and teacher
    assert p["wall_hours"] == pytest.approx(5.67, rel=0.02)
    mem = {m: R.counted(cfg(m, "train.mixed_precision=bf16"), None, "memory")["peak_bytes"]
           for m in ("unimatch_v2", "mlcl")}
    assert 1 < mem["mlcl"] / mem["unimatch_v2"] < 1.3


@pytest.mark.parametrize("preset", ["pascal_v2", "cityscapes_v2"])
def test_v2_presets_rehearse_every_stage_at_toy_size(tmp_path, capsys, preset):
    """Every stage of supervised, UniMatch V2 and MLCL on it (the preset's rows) on DINOv2-S
    with a fabricated official-format checkpoint; the EMA teacher is in the checkpoint the
    resume reads, and the evaluated model is the teacher on both sides."""
    code = measure.main(["rehearse", "--config", preset, "--out", str(tmp_path), "--steps", "2",
                         "--device", "cpu", *TOY])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / preset / "rehearse.json").read_text())
    assert code == 0 and report["ok"], out
    assert list(report["methods"]) == ["supervised", "unimatch_v2", "mlcl"]
    assert len(report["stages"]) == 2 + 5 * 3 and report["backbone"] == "dinov2_s"
    lines = out.splitlines()
    assert any(" weights " in ln and "dinov2_s.pth" in ln for ln in lines)
    for method in ("unimatch_v2", "mlcl"):
        mine = [ln for ln in lines if ln.startswith(f"PASS  {preset}/{method} ")]
        assert any("EMA teacher = last.pt" in ln for ln in mine)
        assert any(" evaluate " in ln and "(the teacher)" in ln for ln in mine)
        assert any("bf16 peak ~" in ln for ln in mine)
    assert out.strip().splitlines()[-1].startswith("ALL PASS")


def test_bench_sets_mlcl_on_v2_against_unimatch_v2(tmp_path):
    out = tmp_path / "bench.json"
    a = measure.resolve(measure.build_parser().parse_intermixed_args([
        "steps", "--config", "pascal_v2", "--device", "cpu", "--steps", "1", "--out", str(out),
        "data.crop_size=28", "train.batch_size=2", "model.feature_channels=8"]))
    assert measure.run(a) == 0
    r = json.loads(out.read_text())
    assert r["settings"]["methods"] == list(FAMILIES["unimatch_v2"])
    assert r["ratio_mlcl_v2_over_unimatch_v2"] > 0
    assert r["ratio_mlcl_v2_mixed_over_unimatch_v2"] > 0
    for key in ("ratio_mlcl_v2_over_unimatch_v2", "mem_ratio_mlcl_v2_over_unimatch_v2"):
        assert r["targets"][key]["target"] == "<= 1.3"

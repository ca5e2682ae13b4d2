"""`python -m mlcl bench` on a tiny setting: every section runs and the JSON has its keys. Not
a timed test: the numbers are not checked (docs/performance.md has them). Also: the released
re-creation the benchmark times computes what the project's vectorised code computes, and
the loaders honour the performance options."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch

from mlcl import bench, losses, methods
from mlcl.config import TrainConfig, load_config
from mlcl.model import upsample
from mlcl.prototypes import PrototypeBank

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = ["--device", "cpu", "--backbone", "resnet18", "--width", "8", "--crop", "33",
        "--batch", "2", "--warmup", "0", "--repeats", "1",
        "--fka-batch", "2", "--fka-size", "9", "--fka-channels", "16", "--fka-classes", "5",
        "--fka-repeats", "1", "--fka-released-repeats", "1",
        "--pipeline-images", "4", "--pipeline-image-size", "64", "--pipeline-crop", "33",
        "--pipeline-batch", "2", "--pipeline-epochs", "1"]
KEYS = ("step_s", "ratio_mlcl_over_unimatch", "ratio_mlcl_released_over_unimatch",
        "proto_speedup_over_released", "fka_sai_speedup_over_released",
        "mem_ratio_mlcl_over_unimatch", "pipeline_samples_per_s", "peak_mem_mb")


def bench_cli(*args: str) -> subprocess.CompletedProcess:
    # a subprocess: accelerate's state is per process, and this is the CLI users run
    proc = subprocess.run([sys.executable, "-m", "mlcl", "bench", *args], env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return proc


def test_bench_runs_every_section_and_writes_the_keys(tmp_path):
    out = tmp_path / "bench.json"
    proc = bench_cli(*TINY, "--out", str(out))
    r = json.loads(out.read_text())
    for key in KEYS:
        assert r.get(key) is not None, key
    methods = set(bench.BENCH_METHODS)
    assert set(r["step_s"]) == methods and set(r["peak_mem_mb"]) == methods
    assert all(v > 0 for v in r["step_s"].values())
    assert all(s["n"] == 1 and "cpu" in s and "wall" in s for s in r["step"].values())
    assert r["settings"]["crop"] == 33 and r["settings"]["backbone"] == "resnet18"
    assert r["settings"]["fka_sai"]["fka_batch"] == 2
    assert r["machine"]["device"] == "cpu" and r["machine"]["torch"] == torch.__version__
    assert r["fka_sai"]["settings"]["feature_size"] == [9, 9]
    assert r["pipeline"]["crop"] == 33 and r["pipeline"]["samples"] > 0
    voc = r["memory"]["voc"]
    assert voc["backbone"] == bench.VOC["backbone"] and not voc["measured"] and voc["gib"] > 0
    assert set(bench.TARGETS) <= set(r["targets"]) and "voc_mlcl_memory_gib" in r["targets"]
    assert "mlcl_released" in proc.stdout and "wrote" in proc.stdout
    every = TrainConfig().log_every  # the guard is read as often as the loop reads it
    assert r["guard"]["log_every"] == every and r["guard"]["fraction_with_reads"] > 0
    assert f"with a read every {every} steps" in proc.stdout


def test_bench_help_is_the_module_docstring_listing_every_section_once():
    description = bench.build_parser().description
    assert description == bench.__doc__  # one section list, not a second copy that drifts
    entries = re.findall(r"^(\w+) {2,}\S", description, flags=re.MULTILINE)
    assert sorted(entries) == sorted(bench.SECTIONS)


def test_bench_passes_precision_and_channels_last_to_the_step(tmp_path):
    out = tmp_path / "bf16.json"
    bench_cli(*TINY, "--sections", "steps", "--methods", "unimatch,mlcl",
              "--mixed-precision", "bf16", "--channels-last", "--out", str(out))
    r = json.loads(out.read_text())
    assert set(r["step_s"]) == {"unimatch", "mlcl"} and r["ratio_mlcl_over_unimatch"] > 0
    assert r["settings"]["mixed_precision"] == "bf16" and r["settings"]["channels_last"]
    assert "peak_mem_mb" in r and not r["peak_mem_mb"]


def test_released_recreation_computes_the_project_loss_and_bank():
    """The re-created released prototype branch gives the paper variant's L_dt and bank
    update, so the timing compares the same computation (no ignore, no box here: the
    ignore resize and the box exclusion are the only other differences)."""
    x = bench.fka_inputs(2, 16, 9, 5, torch.device("cpu"), seed=1)
    x.ignore.zero_()
    torch.manual_seed(0)
    protos = torch.randn(5, 16)
    released = bench.Released(protos)
    conf, label = x.logits_w.softmax(1).max(1)
    valid = torch.ones_like(label, dtype=torch.bool)
    ours = losses.dt_loss(x.f_w, conf, label, valid, x.f_s1, valid, protos,
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
    out = bench.interleaved(jobs, {"a": (1, 3), "b": (0, 1)})
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


def test_sai_upsampled_mse_equals_the_plain_chain():
    """The chunked, recomputing L_m / L_n gives the value and gradient of
    sai_mse(upsample(logits).float().softmax(1), target), also under bf16 autocast."""
    g = torch.Generator().manual_seed(0)
    z0, t = torch.randn(4, 5, 9, 9, generator=g), torch.rand(4, 5, 33, 33, generator=g)
    t = t / t.sum(1, keepdim=True)
    for amp in (False, True):
        results = []
        for f in (lambda z: losses.sai_mse(upsample(z, (33, 33)).float().softmax(1), t),
                  lambda z: losses.sai_upsampled_mse(z, t),
                  lambda z: losses.sai_upsampled_mse(z, t, chunk=3)):
            z = z0.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                logits = z.to(torch.bfloat16) if amp else z
                loss = f(logits)
            loss.backward()
            results.append((loss.detach(), z.grad))
        for loss, grad in results[1:]:
            assert torch.allclose(loss, results[0][0], rtol=1e-6, atol=1e-9)
            assert torch.allclose(grad, results[0][1], rtol=1e-5, atol=1e-9)


def test_sai_losses_equal_the_plain_computation():
    """methods.sai_losses (per-map decode, batched per kind, chunked MSE) computes what the
    straightforward version computes: per branch, mask and noise maps decoded, upsampled,
    soft-maxed and compared with the CutMixed target, averaged over the branches."""
    x = bench.fka_inputs(3, 16, 9, 5, torch.device("cpu"), seed=2)
    x.box2[0] = False
    dec = bench.Decoder(16, 5)
    branches = [(x.f_s1, losses.per_image_similarity(x.f1, x.f_s1), x.box1),
                (x.f_s2, losses.per_image_similarity(x.f2, x.f_s2), x.box2)]

    def plain(cfg):
        m, maps, targets = cfg.mlcl, [], []
        for f_s, v, box in branches:
            t = torch.where(box.unsqueeze(1), x.prob_mix, x.prob_w)
            maps.append(losses.sai_mask(f_s, v, m.kappa, m.mask_jitter, False)[0])
            maps.append(losses.sai_noise(f_s, v, m.kappa))
            targets += [t, t]
        prob = upsample(dec.decode(torch.cat(maps)), x.prob_w.shape[-2:]).softmax(1).chunk(4)
        mse = [losses.sai_mse(q, t) for q, t in zip(prob, targets)]
        return (mse[0] + mse[2]) / 2, (mse[1] + mse[3]) / 2

    cfg = load_config(None, ["method=mlcl"])
    ours = lambda cfg: methods.sai_losses(dec, branches, x.prob_w, x.prob_mix,  # noqa: E731
                                          x.ignore, x.ignore_mix, cfg)
    grads = []
    for f in (plain, ours):
        x.f_s1.grad = x.f_s2.grad = None
        torch.manual_seed(5)
        lm, ln = f(cfg)
        (lm + 2 * ln).backward()
        grads.append((lm.detach(), ln.detach(), x.f_s1.grad.clone(), x.f_s2.grad.clone()))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)

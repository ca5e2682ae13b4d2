"""The benchmark's sections (the package docstring says what each measures), its headline
keys and targets, and the table it prints."""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mlcl.config import Config, ConfigError, TrainConfig, load_config
from mlcl.data.datasets import UnlabeledDataset
from mlcl.loaders import make_loader
from mlcl.measure.fka_sai import Decoder, Released, fka_inputs, project_part, sai_floor
from mlcl.measure.harness import (METHODS, Clock, PeakMemory, Stepper, interleaved, md_table,
                                  stats, step_config, timed)
from mlcl.outputs import git_commit
from mlcl.prototypes import PrototypeBank
from mlcl.stopping import NonFiniteGuard, gradient_norm
from mlcl.study.synthetic import make_synthetic

SECTIONS = ("steps", "memory", "fka_sai", "pipeline", "guard")
VOC = {"backbone": "resnet50_deepstem", "crop": 321, "batch": 8, "gpu_gib": 24}
FKA = {"batch": 8, "size": 81}  # the VOC step's feature maps (crop 321); C, K: the config's
PIPELINE = {"crop": 321, "batch": 8, "images": 48, "image_size": 500, "epochs": 2}
TARGETS = {  # key -> (bound, "max" | "min")
    "ratio_mlcl_over_unimatch": (1.3, "max"),
    "mem_ratio_mlcl_over_unimatch": (1.2, "max"),
    "ratio_mlcl_mixed_over_unimatch": (1.05, "max"),
    "mem_ratio_mlcl_mixed_over_unimatch": (1.05, "max"),
    "proto_speedup_over_released": (100.0, "min"),  # at one thread
    "fka_sai_speedup_over_released": (15.0, "min"),
    "ratio_mlcl_v2_over_unimatch_v2": (1.3, "max"),
    "mem_ratio_mlcl_v2_over_unimatch_v2": (1.3, "max"),
    "ratio_mlcl_v2_mixed_over_unimatch_v2": (1.3, "max"),
    "mem_ratio_mlcl_v2_mixed_over_unimatch_v2": (1.3, "max"),
}
# the step each method's ratios are taken over (supervised: the family's in the run)
BASELINE = {m: "unimatch_v2" if "v2" in m else "unimatch" for m in METHODS if m != "supervised"}
CHILD = "import sys; from mlcl.measure.bench import child_memory; child_memory(sys.argv[1])"
CHILD_TAG, CHILD_TIMEOUT_S, GUARD_CALLS = "MLCL_MEASURE_MEMORY ", 900, 20


def config_of(a: argparse.Namespace, method: str, *extra: str) -> Config:
    return step_config(method, a.config, a.device, [*a.overrides, *extra])


def bench_steps(a: argparse.Namespace) -> dict[str, Any]:
    """Each method's whole step, the methods taking turns repeat by repeat."""
    runs = {m: Stepper(config_of(a, m), a.seed) for m in a.methods}
    laps = interleaved({m: r.timed for m, r in runs.items()}, {m: (1, a.steps) for m in runs})
    return {m: {**stats([t["s"] for t in v]), **{k: stats([t[k] for t in v])
                                                 for k in ("forward", "backward")}}
            for m, v in laps.items()}


def child_memory(spec: str) -> None:
    """In a fresh process (``spec``: JSON of method, preset, device, overrides, seed), after a
    warm-up step: the peak of one more step over the memory held before it, after CHILD_TAG."""
    s = json.loads(spec)
    cfg = step_config(s["method"], s["preset"], s["device"], s["overrides"])
    run = Stepper(cfg, s["seed"])
    run.step()
    meter = PeakMemory(run.acc.device)
    meter.reset()
    run.step()
    m = meter.read()
    print(CHILD_TAG + json.dumps({
        "method": s["method"], "backbone": cfg.model.backbone, "crop": cfg.data.crop_size,
        "batch": cfg.train.batch_size, "increment_mb": m["peak_mb"] - m["base_mb"],
        "peak_abs_mb": m["peak_mb"], "how": m["what"],
        "params": sum(p.numel() for p in run.model.parameters())}), flush=True)


def run_child(a: argparse.Namespace, method: str, *extra: str) -> dict[str, Any]:
    spec = {"method": method, "preset": a.config, "device": a.device, "seed": a.seed,
            "overrides": [*a.overrides, *extra]}
    env = dict(os.environ)
    if a.device == "cpu":  # large blocks mmapped and unmapped on free: RSS = live memory
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=CHILD_TIMEOUT_S)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            return json.loads(line[len(CHILD_TAG):])
    raise RuntimeError(f"memory subprocess for {method} failed (exit {proc.returncode}):\n"
                       f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def bench_memory(a: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of each method's step, and MLCL's at the VOC setting: measured on a GPU,
    on a CPU estimated from the VOC backbone at the bench's crop and batch."""
    out: dict[str, Any] = {"per_method": {m: run_child(a, m) for m in a.methods}}
    if "mlcl" in a.methods:
        voc = [f"model.backbone={VOC['backbone']}", "model.width=64"]
        if a.device == "cuda":
            m = run_child(a, "mlcl", *voc, f"data.crop_size={VOC['crop']}",
                          f"train.batch_size={VOC['batch']}", "train.mixed_precision=bf16")
            out["voc"] = {**m, "measured": True, "gib": m["peak_abs_mb"] / 1024}
        else:
            out["voc"] = voc_estimate(run_child(a, "mlcl", *voc))
    return out


def voc_estimate(m: dict[str, Any]) -> dict[str, Any]:
    """The activation peak scaled linearly in pixels x images to crop 321, batch 8 per view,
    plus parameters, gradients and SGD momentum (fp32)."""
    scale = (VOC["crop"] ** 2 * VOC["batch"]) / (m["crop"] ** 2 * m["batch"])
    act, state = m["increment_mb"] * scale / 1024, 3 * 4 * m["params"] / 2 ** 30
    return {**m, "measured": False, "pixel_scale": scale, "activations_fp32_gib": act,
            "weights_grads_momentum_gib": state, "gib": act + state,
            "note": "fp32 upper bound for a bf16 run; excludes the CUDA context and allocator "
                    "fragmentation (~1-2 GiB)"}


def bench_fka_sai(a: argparse.Namespace) -> dict[str, Any]:
    """The project's MLCL part against the released re-creation, on the same inputs."""
    cfg, device = config_of(a, "mlcl"), torch.device(a.device)
    B, h, C, K, m = (FKA["batch"], FKA["size"], cfg.model.feature_channels,
                     cfg.data.num_classes, cfg.mlcl)
    case, decoder = fka_inputs(B, C, h, K, device, a.seed), Decoder(C, K).to(device)
    bank = PrototypeBank(K, C, momentum=m.bank_momentum, conf_thresh=m.bank_conf).to(device)
    torch.manual_seed(a.seed)
    bank.protos.copy_(torch.randn(K, C))  # every class initialised: the steady state
    released = Released(bank.protos, m.kappa, m.bank_conf, m.num_anchors, m.num_candidates,
                        m.bank_momentum)

    def job(fn):
        def run():
            for t in (case.x.f_s1, case.x.f_s2, case.x.logits_s1, case.x.logits_s2,
                      *decoder.parameters()):
                t.grad = None
            return timed(fn, device)
        return run

    jobs = {"proto_vectorised": job(lambda: project_part(case, bank, cfg, decoder, False)),
            "proto_released": job(lambda: released.proto(case)),
            "whole_vectorised": job(lambda: project_part(case, bank, cfg, decoder, True)),
            "whole_released": job(lambda: released.whole(case, decoder, cfg)),
            "whole_floor": job(sai_floor(case))}
    n_released = min(a.steps, 3)  # the re-creation is slow
    times = interleaved(jobs, {k: (1, n_released if k.endswith("released") else a.steps)
                               for k in jobs})
    return {"settings": {"batch": B, "channels": C, "feature_size": [h, h],
                         "input_size": [4 * (h - 1) + 1] * 2, "classes": K,
                         "repeats": a.steps, "released_repeats": n_released},
            **{k: stats(v) for k, v in times.items()}}


def bench_pipeline(a: argparse.Namespace) -> dict[str, Any]:
    """Unlabeled samples per second through one in-process loader (= one worker) on
    synthetic JPEGs: decode, 3 views, ignore map, 2 CutMix boxes, collate."""
    p, threads = PIPELINE, torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        with tempfile.TemporaryDirectory(prefix="mlcl-measure-") as tmp:
            root = make_synthetic(tmp, num_train=p["images"], num_val=1,
                                  size=p["image_size"], classes=21, seed=a.seed)
            cfg = load_config(None, [f"data.root={root}", f"data.crop_size={p['crop']}",
                                     "data.num_workers=0", "train.cpu=true",
                                     "data.unlabeled_split=splits/train.txt",
                                     f"train.batch_size={p['batch']}"])
            loader = make_loader(UnlabeledDataset(cfg, cfg.split_path("unlabeled_split")), cfg,
                                 shuffle=True, seed=a.seed)
            random.seed(a.seed)
            it = iter(loader)
            next(it)  # warm-up: first reads, imports
            n, t0 = 0, time.perf_counter()
            for epoch in range(p["epochs"]):
                n += sum(b["w"].shape[0] for b in (it if epoch == 0 else loader))
            dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"samples_per_s": n / dt, "samples": n, "seconds": dt, "crop": p["crop"],
            "batch": p["batch"], "min_step_s_one_worker": p["batch"] * dt / n}


def bench_guard(a: argparse.Namespace) -> dict[str, Any]:
    """The divergence guard's per-step work (observe) and its read (one host sync, every
    train.log_every steps) on the gradients of a real MLCL step, against that step."""
    run = Stepper(config_of(a, "mlcl"), a.seed)
    guard, device, terms = NonFiniteGuard(run.acc.device), run.acc.device, run.step()
    step = statistics.median(run.timed()["s"] for _ in range(max(a.steps // 2, 1)))

    def observe():
        for _ in range(GUARD_CALLS):
            guard.observe(500, terms, gradient_norm(run.model))

    per_step = statistics.median(timed(observe, device) / GUARD_CALLS
                                 for _ in range(max(a.steps, 3)))
    per_read = statistics.median(timed(lambda: guard.read(run.acc), device)
                                 for _ in range(max(a.steps, 3)))
    every = TrainConfig().log_every
    return {"step_s": step, "observe_s": per_step, "read_s": per_read,
            "fraction_of_step": per_step / step, "log_every": every,
            "fraction_with_reads": (per_step + per_read / every) / step, "method": "mlcl"}


def machine(device: torch.device) -> dict[str, Any]:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if os.path.isfile("/proc/cpuinfo") \
        else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
               platform.processor() or None)
    return {"platform": platform.platform(), "cpu_model": cpu, "torch": torch.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "load_avg": os.getloadavg(),
            **({"gpu": torch.cuda.get_device_name(device), "gpu_memory_gib": torch.cuda.
                get_device_properties(device).total_memory / 2 ** 30}
               if device.type == "cuda" else {})}


def ratio(num, den):
    return num / den if num is not None and den else None


def headline(r: dict[str, Any]) -> None:
    """The headline keys and the targets, from the sections' results."""
    step, fk, mem = r.get("step", {}), r.get("fka_sai", {}), r.get("memory", {})
    r["step_s"] = {m: s["median"] for m, s in step.items()}
    r["peak_mem_mb"] = {m: v["increment_mb"] for m, v in mem.get("per_method", {}).items()}
    for m in ("mlcl", "mlcl_mixed", "mlcl_released", "mlcl_v2", "mlcl_v2_mixed"):
        base = BASELINE[m]
        r[f"ratio_{m}_over_{base}"] = ratio(r["step_s"].get(m), r["step_s"].get(base))
        r[f"mem_ratio_{m}_over_{base}"] = ratio(r["peak_mem_mb"].get(m),
                                                r["peak_mem_mb"].get(base))
    for part, key in (("proto", "proto"), ("whole", "fka_sai")):
        r[f"{key}_speedup_over_released"] = ratio(*(fk.get(f"{part}_{side}", {}).get("median")
                                                    for side in ("released", "vectorised")))
    r["fka_sai_over_floor"] = ratio(*(fk.get(f"whole_{side}", {}).get("median")
                                      for side in ("vectorised", "floor")))
    r["pipeline_samples_per_s"] = r.get("pipeline", {}).get("samples_per_s")
    r["guard_fraction_with_reads"] = r.get("guard", {}).get("fraction_with_reads")
    r["targets"] = {key: {"value": r[key], "target": f"{'<=' if kind == 'max' else '>='} "
                          f"{bound}", "met": None if r[key] is None else
                          (r[key] <= bound if kind == "max" else r[key] >= bound)}
                    for key, (bound, kind) in TARGETS.items()}
    if mem.get("voc"):
        gib = mem["voc"]["gib"]
        r["targets"]["voc_mlcl_memory_gib"] = {"value": gib, "target": f"<= {VOC['gpu_gib']}",
                                               "met": gib <= VOC["gpu_gib"],
                                               "measured": mem["voc"]["measured"]}
    rate, mlcl_step = r["pipeline_samples_per_s"], r["step_s"].get("mlcl")
    if rate and mlcl_step:  # does one worker feed this device's MLCL step?
        consumed = r["settings"]["batch"] / mlcl_step
        r["targets"]["pipeline_vs_step"] = {"value": rate, "target": f">= {consumed:.3g}",
                                            "met": rate >= consumed}


def summary(r: dict[str, Any]) -> list[str]:
    """The printed table of a benchmark (from its JSON)."""
    s, mach, step, mem = r["settings"], r["machine"], r["step_s"], r["peak_mem_mb"]
    family = "unimatch_v2" if "unimatch_v2" in s["methods"] else "unimatch"
    base = {**BASELINE, "supervised": family}
    rows = [{"method": m, f"step s ({s['clock']})": step.get(m), "baseline": base[m],
             "x baseline": ratio(step.get(m), step.get(base[m])), "peak MB": mem.get(m),
             "memory x baseline": ratio(mem.get(m), mem.get(base[m]))}
            for m in METHODS if m in step or m in mem]
    voc, g = r.get("memory", {}).get("voc"), r.get("guard")
    return [f"\nmlcl measure on {mach.get('gpu') or mach['cpu_model']} ({mach['device']}, "
            f"{mach['torch_threads']} threads): {s['backbone']} width {s['width']}, crop "
            f"{s['crop']}, batch {s['batch']}, {s['mixed_precision']}, median of {s['repeats']}",
            *md_table(rows),
            *([f"VOC MLCL memory: {voc['gib']:.1f} GiB "
               f"{'measured' if voc['measured'] else 'estimated (fp32)'}"] if voc else []),
            *([f"FKA + SAI: {r['fka_sai_over_floor']:.2f} x its floor (one input-resolution "
               "softmax + MSE per perturbed map)"] if r.get("fka_sai_over_floor") else []),
            *([f"divergence guard: {100 * g['fraction_with_reads']:.2f}% of an mlcl step with "
               f"a read every {g['log_every']} steps"] if g else []),
            *(f"{k}: {t['value']:.3g} {t['target']} -> {'met' if t['met'] else 'MISSED'}"
              for k, t in r["targets"].items() if t["value"] is not None)]


def bench(a: argparse.Namespace) -> dict[str, Any]:
    """Every asked section, then the headline keys."""
    paired = [m for m in a.methods if m != "supervised"]
    cfg, started = config_of(a, "supervised"), time.time()
    if {"steps", "memory", "guard"} & set(a.sections) and paired and cfg.train.batch_size < 2:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: the {'/'.join(paired)} "
                          "steps pair each image with another image of the batch (the CutMix "
                          "partner); give train.batch_size=2 or more, or --methods supervised")
    clock = "cpu" if Clock(torch.device(a.device)).cpu else "wall"
    t = cfg.train
    settings = {"config": a.config, "overrides": a.overrides, "backbone": cfg.model.backbone,
                "width": cfg.model.width, "crop": cfg.data.crop_size, "batch": t.batch_size,
                "classes": cfg.data.num_classes, "mixed_precision": t.mixed_precision,
                "channels_last": t.channels_last, "compile": t.compile, "warmup": 1,
                "repeats": a.steps, "seed": a.seed, "methods": a.methods, "sections": a.sections,
                "clock": clock, "optimizer": t.optimizer, "mlcl_iteration": "500 of 1000 (SAI on)"}
    r: dict[str, Any] = {"machine": machine(torch.device(a.device)), "settings": settings,
                         "git_commit": git_commit(),
                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    sections = {"steps": ("step", bench_steps), "memory": ("memory", bench_memory),
                "fka_sai": ("fka_sai", bench_fka_sai), "pipeline": ("pipeline", bench_pipeline),
                "guard": ("guard", bench_guard)}
    for name in a.sections:
        key, fn = sections[name]
        r[key] = fn(a)
    r["bench_wall_s"], r["machine"]["load_avg_end"] = time.time() - started, os.getloadavg()
    headline(r)
    return r

"""The benchmark's sections (``steps``, ``memory``, ``fka_sai``, ``pipeline``, ``guard``: the
package docstring says what each measures), its headline ratios, targets and printed table."""
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

from mlcl.config import ConfigError, TrainConfig, load_config
from mlcl.data.datasets import UnlabeledDataset
from mlcl.study.synthetic import make_synthetic
from mlcl.loaders import make_loader
from mlcl.measure.harness import (METHODS, Clock, PeakMemory, Stepper, interleaved, lap_stats,
                                  step_config, sync, timed)
from mlcl.measure.fka_sai import Decoder, Released, fka_inputs, project_part
from mlcl.outputs import git_commit
from mlcl.prototypes import PrototypeBank
from mlcl.stopping import NonFiniteGuard, gradient_norm

SECTIONS = ("steps", "memory", "fka_sai", "pipeline", "guard")
VOC = {"backbone": "resnet50_deepstem", "crop": 321, "batch": 8, "gpu_gib": 24}
FKA = {"batch": 8, "size": 81}  # the VOC step's feature maps (crop 321); C, K: the config's
PIPELINE = {"crop": 321, "batch": 8, "images": 48, "image_size": 500, "epochs": 2}
TARGETS = {  # key -> (bound, "max" | "min")
    "ratio_mlcl_over_unimatch": (1.3, "max"),
    "mem_ratio_mlcl_over_unimatch": (1.2, "max"),
    "proto_speedup_over_released": (50.0, "min"),
    "fka_sai_speedup_over_released": (8.0, "min"),
}
CHILD = "import sys; from mlcl.measure.bench import child_memory; child_memory(sys.argv[1])"
CHILD_TAG, CHILD_TIMEOUT_S, GUARD_CALLS = "MLCL_MEASURE_MEMORY ", 900, 20


def config_of(a: argparse.Namespace, method: str, *extra: str):
    return step_config(method, a.config, a.device, [*a.overrides, *extra])


def bench_steps(a: argparse.Namespace) -> dict[str, Any]:
    """Each method's whole step, the methods taking turns repeat by repeat."""
    runs = {m: Stepper(config_of(a, m), a.seed) for m in a.methods}
    times = interleaved({m: r.timed for m, r in runs.items()},
                        {m: (1, a.steps) for m in runs})
    return {m: lap_stats(laps, a.clock) for m, laps in times.items()}


def child_memory(spec: str) -> None:
    """In a fresh process (``spec``: JSON of method, preset, device, overrides, seed): one
    warm-up step (optimiser state allocated), then the peak of one more step over the memory
    held before it, printed after CHILD_TAG."""
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
    """Scale the measured activation peak linearly in pixels x images to crop 321, batch 8
    per view; add parameters, gradients and SGD momentum (fp32)."""
    scale = (VOC["crop"] ** 2 * VOC["batch"]) / (m["crop"] ** 2 * m["batch"])
    act, state = m["increment_mb"] * scale / 1024, 3 * 4 * m["params"] / 2 ** 30
    return {**m, "measured": False, "pixel_scale": scale, "activations_fp32_gib": act,
            "weights_grads_momentum_gib": state, "gib": act + state,
            "note": "estimate from the CPU peak of the same step at the bench crop/batch, "
                    "scaled linearly in pixels x images; an fp32 upper bound for a bf16 run; "
                    "excludes the CUDA context and allocator fragmentation (~1-2 GiB)"}


def bench_fka_sai(a: argparse.Namespace) -> dict[str, Any]:
    """The project's MLCL part against the released re-creation, on the same inputs."""
    cfg = config_of(a, "mlcl")
    B, h, C, K, m = FKA["batch"], FKA["size"], cfg.model.feature_channels, \
        cfg.data.num_classes, cfg.mlcl
    device = torch.device(a.device)
    case = fka_inputs(B, C, h, K, device, a.seed)
    decoder = Decoder(C, K).to(device)
    bank = PrototypeBank(K, C, momentum=m.bank_momentum, conf_thresh=m.bank_conf).to(device)
    torch.manual_seed(a.seed)
    bank.protos.copy_(torch.randn(K, C))  # every class initialised: the steady state
    released = Released(bank.protos, m.kappa, m.bank_conf, m.num_anchors, m.num_candidates,
                        m.bank_momentum)

    def job(fn):
        def run():
            for t in (case.x.f_s1, case.x.f_s2, *decoder.parameters()):
                t.grad = None
            return timed(fn, device)
        return run

    jobs = {"proto_vectorised": job(lambda: project_part(case, bank, cfg, decoder, False)),
            "proto_released": job(lambda: released.proto(case)),
            "whole_vectorised": job(lambda: project_part(case, bank, cfg, decoder, True)),
            "whole_released": job(lambda: released.whole(case, decoder, cfg))}
    n_released = min(a.steps, 3)  # the re-creation is slow
    times = interleaved(jobs, {k: (1, n_released if k.endswith("released") else a.steps)
                               for k in jobs})
    return {"settings": {"batch": B, "channels": C, "feature_size": [h, h],
                         "input_size": [4 * (h - 1) + 1] * 2, "classes": K,
                         "repeats": a.steps, "released_repeats": n_released},
            **{k: lap_stats(v, a.clock) for k, v in times.items()}}


def bench_pipeline(a: argparse.Namespace) -> dict[str, Any]:
    """Unlabeled samples per second through one in-process loader (= one worker)."""
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
    rate = n / dt
    return {"samples_per_s": rate, "samples": n, "seconds": dt, "crop": p["crop"],
            "batch": p["batch"], "image_size": [p["image_size"]] * 2,
            "min_step_s_one_worker": p["batch"] / rate,
            "what": "one in-process DataLoader (= one worker): JPEG decode, 3 views, ignore map, "
                    "2 CutMix boxes, collate; synthetic JPEGs (quality 95)"}


def bench_guard(a: argparse.Namespace) -> dict[str, Any]:
    """The divergence guard's per-step work (gradient norm and finiteness folded into device
    tensors) and its read (one host sync, every train.log_every steps), on the gradients of
    a real MLCL step, against that step's time on the same clock."""
    run, steps, observe, read = Stepper(config_of(a, "mlcl"), a.seed), [], [], []
    device = run.acc.device
    for i in range(1 + max(a.steps // 2, 1)):
        clock = Clock(device)
        clock.mark()
        terms = run.step()
        clock.mark()
        steps.append(clock.lap(a.clock))
    guard = NonFiniteGuard(device)
    for _ in range(max(a.steps, 3)):
        clock = Clock(device)
        clock.mark()
        for _ in range(GUARD_CALLS):
            guard.observe(500, terms, gradient_norm(run.model))
        sync(device)
        clock.mark()
        observe.append(clock.lap(a.clock) / GUARD_CALLS)
        clock = Clock(device)
        clock.mark()
        guard.read(run.acc)
        clock.mark()
        read.append(clock.lap(a.clock))
    step, per_step, per_read = (statistics.median(v) for v in (steps[1:], observe, read))
    every = TrainConfig().log_every
    return {"step_s": step, "observe_s": per_step, "read_s": per_read,
            "fraction_of_step": per_step / step, "log_every": every,
            "fraction_with_reads": (per_step + per_read / every) / step,
            "clock": a.clock, "method": "mlcl"}


def check_paired_batch(a: argparse.Namespace) -> None:
    """The semi-supervised steps pair each image with another of its batch (CutMix)."""
    paired = [m for m in a.methods if m != "supervised"]
    cfg = config_of(a, "supervised")
    if {"steps", "memory", "guard"} & set(a.sections) and paired and cfg.train.batch_size < 2:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: the {'/'.join(paired)} "
                          "steps pair each image with another image of the batch (the CutMix "
                          "partner); give train.batch_size=2 or more, or --methods supervised")


# --------------------------------------------------------------------------- report
def machine(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or None,
            "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "device": str(device),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}
    cpuinfo = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in (cpuinfo.read_text().splitlines()
             if cpuinfo.is_file() else []) if ln.startswith("model name")]
    info["cpu_model"] = names[0] if names else None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    return info


def ratio(num, den):
    return num / den if num is not None and den else None


def summarise(r: dict[str, Any]) -> None:
    """The headline keys (each ratio on the chosen clock, and _wall / _cpu) and targets."""
    steps = r.get("step", {})
    r["step_s"] = {m: s["median"] for m, s in steps.items()}
    for clock in ("wall", "cpu"):
        r[f"step_{clock}_s"] = {m: s[clock]["median"] for m, s in steps.items() if clock in s}
    for suffix, t in (("", r["step_s"]), ("_wall", r["step_wall_s"]), ("_cpu", r["step_cpu_s"])):
        for m in ("mlcl", "mlcl_released"):
            r[f"ratio_{m}_over_unimatch{suffix}"] = ratio(t.get(m), t.get("unimatch"))
    mem = r["peak_mem_mb"] = {m: v["increment_mb"] for m, v in
                              r.get("memory", {}).get("per_method", {}).items()}
    for m in ("mlcl", "mlcl_released"):
        r[f"mem_ratio_{m}_over_unimatch"] = ratio(mem.get(m), mem.get("unimatch"))
    fk = {k: v for k, v in r.get("fka_sai", {}).items() if k != "settings"}
    for suffix, pick in (("", lambda v: v["median"]), ("_wall", lambda v: v["wall"]["median"]),
                         ("_cpu", lambda v: v["cpu"]["median"] if "cpu" in v else None)):
        med = {k: pick(v) for k, v in fk.items()}
        for part, key in (("proto", "proto"), ("whole", "fka_sai")):
            r[f"{key}_speedup_over_released{suffix}"] = ratio(med.get(f"{part}_released"),
                                                              med.get(f"{part}_vectorised"))
    r["pipeline_samples_per_s"] = r.get("pipeline", {}).get("samples_per_s")
    r["targets"] = {key: {"value": r.get(key), "target": f"{'<=' if kind == 'max' else '>='} "
                          f"{bound}", "met": None if r.get(key) is None else
                          (r[key] <= bound if kind == "max" else r[key] >= bound)}
                    for key, (bound, kind) in TARGETS.items()}
    voc = r.get("memory", {}).get("voc")
    if voc:
        r["targets"]["voc_mlcl_memory_gib"] = {
            "value": voc["gib"], "target": f"<= {VOC['gpu_gib']}",
            "met": voc["gib"] <= VOC["gpu_gib"], "measured": voc["measured"]}
    rate, mlcl_step = r["pipeline_samples_per_s"], r["step_s"].get("mlcl")
    if rate and mlcl_step:
        consumed = r["settings"]["batch"] / mlcl_step
        r["targets"]["pipeline_vs_step"] = {
            "value": rate, "consumed_per_s_by_this_device_step": consumed,
            "met_on_this_device": rate >= consumed,
            "min_step_s_one_worker_keeps_up_with": r["pipeline"]["min_step_s_one_worker"]}


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def fka_line(r: dict[str, Any]) -> list[str]:
    """The FKA + SAI line of the printed summary (none without that section)."""
    if not r.get("fka_sai"):
        return []
    fk, fs = r["fka_sai"], r["fka_sai"]["settings"]
    return [f"FKA+SAI fwd+bwd (B={fs['batch']}, {fs['channels']}x{fs['feature_size'][0]}x"
            f"{fs['feature_size'][1]}, {fs['classes']} classes): prototype branch "
            f"{fk['proto_released']['median']:.3f} s released / "
            f"{fk['proto_vectorised']['median']:.4f} s ours = "
            f"{fmt(r['proto_speedup_over_released'], '.0f')}x; whole "
            f"{fk['whole_released']['median']:.3f} / {fk['whole_vectorised']['median']:.3f} s = "
            f"{fmt(r['fka_sai_speedup_over_released'], '.1f')}x (wall: "
            f"{fmt(r['proto_speedup_over_released_wall'], '.0f')}x, "
            f"{fmt(r['fka_sai_speedup_over_released_wall'], '.1f')}x)"]


def table(r: dict[str, Any]) -> list[str]:
    """The printed summary of a benchmark."""
    s, mach = r["settings"], r["machine"]
    lines = [f"\nmlcl measure on {mach.get('gpu') or mach.get('cpu_model') or 'cpu'} "
             f"({mach['device']}, {mach['torch_threads']} threads): {s['backbone']} width "
             f"{s['width']}, crop {s['crop']}, batch {s['batch']} per view, precision "
             f"{s['mixed_precision']}; step times: {s['clock']} clock, median of {s['repeats']}"]
    lines.append(f"{'method':<15}{'step s':>8}{'min':>8}{'max':>8}{'x uni':>7}{'wall s':>8}"
                 f"{'x uni':>7}{'fwd s':>7}{'bwd s':>7}{'peak MB':>9}{'x uni':>7}")
    uni = [r["step_s"].get("unimatch"), r["step_wall_s"].get("unimatch"),
           r["peak_mem_mb"].get("unimatch")]
    for m in METHODS:
        st, mem = r.get("step", {}).get(m) or {}, r["peak_mem_mb"].get(m)
        wall = st.get("wall", {}).get("median")
        if st or mem is not None:
            lines.append(
                f"{m:<15}{fmt(st.get('median'), '.3f'):>8}{fmt(st.get('min'), '.3f'):>8}"
                f"{fmt(st.get('max'), '.3f'):>8}{fmt(ratio(st.get('median'), uni[0])):>7}"
                f"{fmt(wall, '.3f'):>8}{fmt(ratio(wall, uni[1])):>7}"
                f"{fmt(st.get('forward', {}).get('median'), '.3f'):>7}"
                f"{fmt(st.get('backward', {}).get('median'), '.3f'):>7}"
                f"{fmt(mem, '.0f'):>9}{fmt(ratio(mem, uni[2])):>7}")
    lines += fka_line(r)
    if r.get("pipeline"):
        p = r["pipeline"]
        lines.append(f"pipeline: {p['samples_per_s']:.1f} unlabeled samples/s per worker at "
                     f"crop {p['crop']} (one worker keeps up with steps >= "
                     f"{p['min_step_s_one_worker']:.2f} s at batch {p['batch']})")
    voc = r.get("memory", {}).get("voc")
    if voc:
        lines.append(f"VOC MLCL memory ({VOC['backbone']}, crop {VOC['crop']}, {VOC['batch']}+"
                     f"{VOC['batch']}): {voc['gib']:.1f} GiB " + (
                         "measured" if voc["measured"] else "estimated from the CPU peak (fp32)"))
    g = r.get("guard")
    if g:
        lines.append(f"divergence guard: {g['observe_s'] * 1e3:.3f} ms per step + "
                     f"{g['read_s'] * 1e3:.3f} ms per read = "
                     f"{100 * g['fraction_with_reads']:.2f}% of an mlcl step ({g['step_s']:.3f} "
                     f"s, {g['clock']} clock) with a read every {g['log_every']} steps")
    return lines + [f"  target {k}: {fmt(t['value'])} {t['target']} -> "
              f"{'met' if t['met'] else 'MISSED' if t['met'] is False else 'n/a'}"
                    for k, t in r["targets"].items() if "met" in t]


def bench(a: argparse.Namespace) -> dict[str, Any]:
    """Every asked section, then the headline keys."""
    check_paired_batch(a)
    cfg, started = config_of(a, "supervised"), time.time()
    settings = {"config": a.config, "overrides": a.overrides, "backbone": cfg.model.backbone,
                "width": cfg.model.width, "crop": cfg.data.crop_size,
                "batch": cfg.train.batch_size, "classes": cfg.data.num_classes,
                "mixed_precision": cfg.train.mixed_precision,
                "channels_last": cfg.train.channels_last, "compile": cfg.train.compile,
                "warmup": 1, "repeats": a.steps, "seed": a.seed, "methods": a.methods,
                "sections": a.sections, "clock": a.clock, "optimizer": cfg.train.optimizer,
                "method_overrides": {m: METHODS[m] for m in a.methods},
                "mlcl_iteration": "500 of 1000 (SAI on)"}
    r: dict[str, Any] = {"machine": machine(torch.device(a.device)), "settings": settings,
                         "git_commit": git_commit(),
                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    sections = {"steps": ("step", bench_steps), "memory": ("memory", bench_memory),
                "fka_sai": ("fka_sai", bench_fka_sai), "pipeline": ("pipeline", bench_pipeline),
                "guard": ("guard", bench_guard)}
    for name in a.sections:
        key, fn = sections[name]
        r[key] = fn(a)
    r["bench_wall_s"] = time.time() - started
    r["machine"]["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    summarise(r)
    return r

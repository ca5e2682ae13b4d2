"""The benchmark's report: machine facts, headline ratios, targets, the printed table."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from mlcl.bench.memory import VOC
from mlcl.bench.steps import BENCH_METHODS

TARGETS = {  # key -> (bound, "max" | "min")
    "ratio_mlcl_over_unimatch": (1.3, "max"),
    "mem_ratio_mlcl_over_unimatch": (1.2, "max"),
    "proto_speedup_over_released": (50.0, "min"),
    "fka_sai_speedup_over_released": (8.0, "min"),
}


def machine(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or None,
            "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "device": str(device)}
    try:
        info["load_avg"] = os.getloadavg()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    return info


def ratio(num, den):
    return num / den if num is not None and den else None


def summarise(r: dict[str, Any]) -> None:
    """The headline keys and the targets."""
    steps = r.get("step", {})
    r["step_s"] = {m: s["median"] for m, s in steps.items()}  # the chosen clock
    for clock in ("wall", "cpu"):
        r[f"step_{clock}_s"] = {m: s[clock]["median"] for m, s in steps.items() if clock in s}
    for suffix, t in (("", r["step_s"]), ("_wall", r["step_wall_s"]),
                      ("_cpu", r["step_cpu_s"])):
        r[f"ratio_mlcl_over_unimatch{suffix}"] = ratio(t.get("mlcl"), t.get("unimatch"))
        r[f"ratio_mlcl_released_over_unimatch{suffix}"] = ratio(t.get("mlcl_released"),
                                                                t.get("unimatch"))
    mem = r.get("memory", {}).get("per_method", {})
    r["peak_mem_mb"] = {m: v["increment_mb"] for m, v in mem.items()}
    r["mem_ratio_mlcl_over_unimatch"] = ratio(r["peak_mem_mb"].get("mlcl"),
                                              r["peak_mem_mb"].get("unimatch"))
    r["mem_ratio_mlcl_released_over_unimatch"] = ratio(r["peak_mem_mb"].get("mlcl_released"),
                                                       r["peak_mem_mb"].get("unimatch"))
    fk = {k: v for k, v in r.get("fka_sai", {}).items() if k != "settings"}
    for suffix, pick in (("", lambda v: v["median"]), ("_wall", lambda v: v["wall"]["median"]),
                         ("_cpu", lambda v: v["cpu"]["median"] if "cpu" in v else None)):
        med = {k: pick(v) for k, v in fk.items()}
        r[f"proto_speedup_over_released{suffix}"] = ratio(med.get("proto_released"),
                                                          med.get("proto_vectorised"))
        r[f"fka_sai_speedup_over_released{suffix}"] = ratio(med.get("whole_released"),
                                                            med.get("whole_vectorised"))
    r["pipeline_samples_per_s"] = r.get("pipeline", {}).get("samples_per_s")
    targets = {}
    for key, (bound, kind) in TARGETS.items():
        v = r.get(key)
        met = None if v is None else (v <= bound if kind == "max" else v >= bound)
        targets[key] = {"value": v, "target": f"{'<=' if kind == 'max' else '>='} {bound}",
                        "met": met}
    voc = r.get("memory", {}).get("voc")
    if voc:
        targets["voc_mlcl_memory_gib"] = {"value": voc["gib"], "target": f"<= {VOC['gpu_gib']}",
                                          "met": voc["gib"] <= VOC["gpu_gib"],
                                          "measured": voc["measured"]}
    rate, mlcl_step = r["pipeline_samples_per_s"], r["step_s"].get("mlcl")
    if rate and mlcl_step:
        consumed = r["settings"]["batch"] / mlcl_step
        targets["pipeline_vs_step"] = {
            "value": rate, "consumed_per_s_by_this_device_step": consumed,
            "met_on_this_device": rate >= consumed,
            "min_step_s_one_worker_keeps_up_with": r["pipeline"]["min_step_s_one_worker"]}
    r["targets"] = targets


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(r: dict[str, Any]) -> None:
    s = r["settings"]
    print(f"\nmlcl bench on {r['machine'].get('gpu') or r['machine'].get('cpu_model', 'cpu')} "
          f"({r['machine']['device']}, {r['machine']['torch_threads']} threads): "
          f"{s['backbone']} width {s['width']}, crop {s['crop']}, batch {s['batch']} per view, "
          f"precision {s['mixed_precision']}")
    if r.get("step") or r["peak_mem_mb"]:
        print(f"step times: {s['clock']} clock (median, min, max over {s['repeats']} repeats); "
              f"wall: elapsed; peak: memory rise of one step")
        print(f"{'method':<15}{'step s':>8}{'min':>8}{'max':>8}{'x uni':>7}{'wall s':>8}"
              f"{'x uni':>7}{'fwd s':>7}{'bwd s':>7}{'peak MB':>9}{'x uni':>7}")
    uni_t, uni_m = r["step_s"].get("unimatch"), r["peak_mem_mb"].get("unimatch")
    uni_w = r["step_wall_s"].get("unimatch")
    for m in BENCH_METHODS:
        st, mem = r.get("step", {}).get(m), r["peak_mem_mb"].get(m)
        if st is None and mem is None:
            continue
        st = st or {}
        wall = st.get("wall", {}).get("median")
        print(f"{m:<15}{fmt(st.get('median'), '.3f'):>8}{fmt(st.get('min'), '.3f'):>8}"
              f"{fmt(st.get('max'), '.3f'):>8}{fmt(ratio(st.get('median'), uni_t)):>7}"
              f"{fmt(wall, '.3f'):>8}{fmt(ratio(wall, uni_w)):>7}"
              f"{fmt(st.get('forward', {}).get('median'), '.3f'):>7}"
              f"{fmt(st.get('backward', {}).get('median'), '.3f'):>7}"
              f"{fmt(mem, '.0f'):>9}{fmt(ratio(mem, uni_m)):>7}")
    fk = r.get("fka_sai")
    if fk:
        fs = fk["settings"]
        print(f"FKA+SAI fwd+bwd (B={fs['batch']}, {fs['channels']}x{fs['feature_size'][0]}x"
              f"{fs['feature_size'][1]}, {fs['classes']} classes): prototype branch "
              f"{fk['proto_released']['median']:.3f} s released / "
              f"{fk['proto_vectorised']['median']:.4f} s vectorised = "
              f"{fmt(r['proto_speedup_over_released'], '.0f')}x; whole "
              f"{fk['whole_released']['median']:.3f} / {fk['whole_vectorised']['median']:.3f} s"
              f" = {fmt(r['fka_sai_speedup_over_released'], '.1f')}x "
              f"({fk['whole_vectorised']['clock']} clock; wall: "
              f"{fmt(r['proto_speedup_over_released_wall'], '.0f')}x, "
              f"{fmt(r['fka_sai_speedup_over_released_wall'], '.1f')}x)")
    if r.get("pipeline"):
        p = r["pipeline"]
        print(f"pipeline: {p['samples_per_s']:.1f} unlabeled samples/s per worker at crop "
              f"{p['crop']} (one worker keeps up with steps >= {p['min_step_s_one_worker']:.2f} s"
              f" at batch {p['batch']})")
    voc = r.get("memory", {}).get("voc")
    if voc:
        print(f"VOC MLCL memory ({VOC['backbone']}, crop {VOC['crop']}, {VOC['batch']}+"
              f"{VOC['batch']}): {voc['gib']:.1f} GiB "
              f"{'measured' if voc['measured'] else 'estimated from the CPU peak (fp32)'}")
    for k, t in r["targets"].items():
        if "met" in t:
            print(f"  target {k}: {fmt(t['value'])} {t['target']} -> "
                  f"{'met' if t['met'] else 'MISSED' if t['met'] is False else 'n/a'}")


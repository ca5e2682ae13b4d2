"""The rehearsal's report: one JSON-able dict per preset, the summary printed after the stage
lines, and the run-book table of what each cell of a preset costs."""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any

from mlcl.rehearse.flops import human_flops
from mlcl.rehearse.stages import FAIL, PASS, StageBook


def _method_numbers(book: StageBook, method: str) -> dict[str, Any]:
    """Step time, memory and FLOPs of ``method`` from its stages' data."""
    got = {s.name: s.data for s in book.stages if s.method == method and s.status == PASS}
    fits = [got[n] for n in ("train", "resume") if n in got]
    steps = [t for f in fits for t in f["intervals"]]
    cpu = [t for f in fits for t in f["cpu_intervals"]]
    mems = [f["memory"] for f in fits]
    out: dict[str, Any] = {
        "stages": {s.name: s.status for s in book.stages if s.method == method},
        "seconds_per_step": statistics.median(steps) if steps else None,
        "cpu_seconds_per_step": statistics.median(cpu) if cpu else None,
        "step_samples": len(steps),
        "peak_mb": max(m["peak_mb"] for m in mems) if mems else None,
        "reserved_mb": max((m.get("reserved_mb", 0) for m in mems), default=None),
        "memory_what": mems[0]["what"] if mems else None,
    }
    if "flops" in got:
        f = got["flops"]
        out.update(step_flops=f["step_flops"], run_step_flops=f["run_step_flops"],
                   projection=f["projection"])
        if out["seconds_per_step"]:
            out["achieved_tflops"] = f["run_step_flops"] / out["seconds_per_step"] / 1e12
    return out


def build_report(plan, book: StageBook) -> dict[str, Any]:
    """Everything the rehearsal of ``plan`` found, JSON-able."""
    cfg, o = plan.base, plan.opts
    return {
        "preset": plan.preset, "split": cfg.split, "dataset": cfg.data.dataset,
        "device": plan.device.type, "batch": plan.batch, "preset_batch": cfg.train.batch_size,
        "mixed_precision": cfg.train.mixed_precision, "eval_mode": cfg.eval.mode,
        "crop": cfg.data.crop_size, "backbone": cfg.model.backbone, "steps": o.steps,
        "val_images": o.val_images, "overrides": list(o.overrides), "notes": plan.notes,
        "data_root": o.data_root, "weights": o.weights, "ok": book.ok,
        "methods": {m: _method_numbers(book, m) for m in o.methods},
        "stages": [dataclasses.asdict(s) for s in book.stages],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def summary_lines(r: dict[str, Any]) -> list[str]:
    """The human summary of one report."""
    head = (f"summary: {r['preset']} split {r['split']}, {r['device']}, batch {r['batch']} per "
            f"process (preset {r['preset_batch']}), precision {r['mixed_precision']}, "
            f"{r['eval_mode']} evaluation")
    lines = [head, *[f"  note: {n}" for n in r["notes"]]]
    lines.append(f"  {'method':<11s}{'stages':>8s}{'s/step':>9s}{'CPU s':>8s}{'peak MB':>9s}"
                 f"{'FLOPs/step':>13s}{'TFLOP/s':>9s}{'full run':>12s}{'GPU-h':>9s}"
                 f"{'wall h':>8s}")
    for m, n in r["methods"].items():
        p = n.get("projection") or {}
        passed = sum(v == PASS for v in n["stages"].values())
        lines.append(
            f"  {m:<11s}{passed:>4d}/{len(n['stages']):<3d}{_fmt(n['seconds_per_step'], '9.2f')}"
            f"{_fmt(n['cpu_seconds_per_step'], '8.2f')}{_fmt(n['peak_mb'], '9.0f')}"
            f"{human_flops(n['step_flops']) if 'step_flops' in n else '-':>13s}"
            f"{_fmt(n.get('achieved_tflops'), '9.3g')}"
            f"{human_flops(p['total_flops']) if p else '-':>12s}"
            f"{_fmt(p.get('gpu_hours'), '9.0f')}{_fmt(p.get('wall_hours'), '8.1f')}")
    lines += _legend(r)
    failed = [s for s in r["stages"] if s["status"] == FAIL]
    lines.append(f"  {'ALL PASS' if r['ok'] else f'{len(failed)} stage(s) FAILED'}")
    return lines


def _legend(r: dict[str, Any]) -> list[str]:
    p = next((n["projection"] for n in r["methods"].values() if n.get("projection")), None)
    mem = next((n["memory_what"] for n in r["methods"].values() if n.get("memory_what")), "")
    out = [f"  s/step: median full iteration (loading included) at batch {r['batch']}, wall "
           f"clock; CPU s: the main process's CPU time per step; peak: {mem}",
           f"  FLOPs/step: FlopCounterMode (matmuls + convolutions, forward + backward) at "
           f"the preset's batch {r['preset_batch']} per GPU; TFLOP/s: achieved in this run"]
    if p:
        out.append(f"  full run: {p['epochs']} epochs x {p['iters_per_epoch']} iterations x "
                   f"{p['gpus']} GPUs + {p['evaluations']} evaluations x {p['val']} images; "
                   f"GPU-h at {p['tflops_per_gpu']:g} TFLOP/s per GPU (--tflops), wall h on "
                   f"{p['gpus']} GPUs (--gpus)")
    return out


def cost_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table (one row per cell and method) of what a run costs: ``rows`` hold
    'cell', 'method' and a flops-stage projection."""
    out = ["| cell | method | FLOPs / step / GPU | iterations | full run | GPU-hours | "
           "wall hours |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["projection"]
        out.append(f"| {r['cell']} | {r['method']} | {human_flops(p['step_flops'])} | "
                   f"{p['iterations']:,} ({p['epochs']} × {p['iters_per_epoch']:,}) | "
                   f"{human_flops(p['total_flops'])} | {p['gpu_hours']:,.0f} | "
                   f"{p['wall_hours']:,.1f} on {p['gpus']} |")
    return out

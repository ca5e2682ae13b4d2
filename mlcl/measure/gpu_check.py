"""``make gpu-check``: a CUDA machine's acceptance check within BUDGET_S, each part a
subprocess under its own budget (docs/performance.md); ``--device cpu``: toy sizes."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from mlcl.config import ConfigError
from mlcl.files import atomic_write_json, atomic_write_text
from mlcl.outputs import saved_config
from mlcl.measure import bench
from mlcl.measure.fabricate import weights_name
from mlcl.measure.harness import md_table
from mlcl.study.reproduce import thread_env, train_command

BUDGET_S = 750
PART_BUDGET_S = {"bench_fp32": 45, "bench_bf16": 110, "rehearse_pascal": 80,
                 "rehearse_pascal_blended": 45, "rehearse_pascal_blended_r101": 75,
                 "rehearse_cityscapes": 100, "rehearse_pascal_v2": 120,
                 "rehearse_cityscapes_v2": 150, "two_process": 90}
# pascal_blended runs pascal's model, crop and schedule on other split lists: MLCL alone there;
# elsewhere the rehearsal's own (the preset's rows: supervised, its mlcl.base, mlcl)
PRESET_METHODS = {"pascal_blended": "mlcl"}
BENCH = {"bench_fp32": ("steps", "no"), "bench_bf16": ("steps,memory,fka_sai,pipeline", "bf16")}
TINY_BENCH = ["model.backbone=resnet18", "model.width=4", "data.crop_size=33"]
TINY_MODEL = ["model.width=4", "model.feature_channels=8", "model.low_level_channels=4",
              "data.crop_size=161", "data.num_workers=0"]
TINY_PART_S = 600  # per part at toy sizes (a CPU shared with other work)


@dataclass
class Part:
    name: str
    command: list[str]
    budget_s: int
    status: str = "NOT RUN"  # PASS | FAIL | TIMEOUT | SKIP
    seconds: float = 0.0
    cpu_s: float = 0.0  # CPU time of the part's processes (user + system)
    returncode: Optional[int] = None
    tail: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    fresh: str = ""  # the part's own output folder, removed before it runs (not a resume)


def plan_parts(a: argparse.Namespace) -> list[Part]:
    """The parts in order: bench in fp32 and bf16, every preset's rehearsal, two processes."""
    tiny, out = a.device == "cpu", a.out
    measure = [sys.executable, "-m", "mlcl", "measure", "--device", a.device]
    parts = [Part(name, [*measure, sections if not tiny else "steps", "--steps", "1" if tiny
                         else "10", f"train.mixed_precision={precision}", "--out",
                         str(out / f"{name}.json"), *(TINY_BENCH if tiny else []),
                         *(["--methods", "supervised,mlcl"] if tiny else [])],
                  PART_BUDGET_S[name]) for name, (sections, precision) in BENCH.items()]
    precision = f"train.mixed_precision={'no' if tiny else 'bf16'}"
    for preset in a.config:
        methods = ",".join(a.methods or []) or PRESET_METHODS.get(preset)
        parts.append(Part(f"rehearse_{preset}", [
            *measure, "rehearse", "--config", preset, "--steps", str(2 if tiny else a.steps),
            *(["--methods", methods] if methods else []), "--out", str(out / "rehearse"),
            precision, *(TINY_MODEL if tiny else [])],
            PART_BUDGET_S.get(f"rehearse_{preset}", 90)))
    if a.processes > 1 and "pascal" in a.config:
        weights = out / "rehearse" / "pretrained" / weights_name("resnet50_deepstem",
                                                                 4 if tiny else 64)
        over = [f"data.root={out / 'rehearse' / 'data' / 'pascal'}", "method=mlcl",
                f"model.pretrained={weights}", "train.max_iters=2",
                f"output_dir={out / 'two_process'}", precision,
                *([*TINY_MODEL, "train.batch_size=2"] if tiny else [])]
        parts.append(Part("two_process", train_command("pascal", over, num_processes=2),
                          PART_BUDGET_S["two_process"], fresh=str(out / "two_process")))
    for p in parts if tiny else []:
        p.budget_s = TINY_PART_S
    return parts


def run_part(part: Part, deadline: float) -> None:
    """Run ``part`` within its budget and before ``deadline``, in ``part.fresh`` emptied first
    (only of a run an earlier check left there)."""
    left, fresh = deadline - time.monotonic(), Path(part.fresh) if part.fresh else None
    if left < 5:
        part.status, part.tail = "SKIP", "no time left in the check's budget"
        return
    if fresh and fresh.exists():
        if not _left_by_a_check(fresh):
            part.status, part.tail = "FAIL", (f"{fresh} exists and is not a run an earlier "
                                              "gpu-check left there; remove it or choose "
                                              "another --out")
            return
        shutil.rmtree(fresh)
    t0, cpu0 = time.monotonic(), _children_cpu()
    part.returncode, part.tail = run_group(part.command, min(part.budget_s, left))
    part.status = ("TIMEOUT" if part.returncode is None
                   else "PASS" if part.returncode == 0 else "FAIL")
    part.seconds, part.cpu_s = time.monotonic() - t0, _children_cpu() - cpu0


def _left_by_a_check(folder: Path) -> bool:
    """Whether ``folder`` is empty or a run whose config.yaml names it as its output_dir."""
    try:
        saved = saved_config(folder) or {}
    except ConfigError:
        return False
    return not any(folder.iterdir()) or Path(str(saved.get("output_dir"))).resolve() == \
        folder.resolve()


def run_group(command: list[str], timeout: float) -> tuple[Optional[int], str]:
    """Run ``command`` in a process group of its own: (return code, None past ``timeout``
    seconds; the last 3000 characters of its output). On a timeout or an interruption the
    whole group (accelerate launch's workers too) gets SIGTERM, then SIGKILL after 5 s."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", env=thread_env(),
                            start_new_session=True)
    try:
        out = proc.communicate(timeout=timeout)[0]
        return proc.returncode, out[-3000:]
    except BaseException as e:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):  # the group has already left
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
        if not isinstance(e, subprocess.TimeoutExpired):
            raise
        return None, (proc.communicate()[0] or "")[-3000:]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _read_json(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    return {}


def collect(parts: list[Part], out: Path) -> dict[str, Any]:
    """Headline numbers from the parts' JSON files (bench, rehearsals, two processes)."""
    found: dict[str, Any] = {"bench": {}, "rehearsals": {}, "sustained_tflops": {}}
    for p in parts:
        kind, _, key = p.name.partition("_")
        if kind == "bench":
            b = _read_json(out / f"{p.name}.json")
            p.result = found["bench"][key] = {k: b.get(k) for k in (
                "step_s", "ratio_mlcl_over_unimatch", "peak_mem_mb", "targets",
                "mem_ratio_mlcl_over_unimatch", "fka_sai_speedup_over_released",
                "pipeline_samples_per_s")}
        elif kind == "rehearse":
            r = _read_json(out / "rehearse" / key / "rehearse.json")
            p.result = found["rehearsals"][key] = {
                "ok": r.get("ok"), "methods": r.get("methods", {}),
                "failed": [f"{s['method'] or key} {s['name']}: {s['detail']}"
                           for s in r.get("stages", []) if s["status"] == "FAIL"]}
            if p.status == "PASS" and not r:
                p.status, p.tail = "FAIL", "no rehearse.json was written\n" + p.tail
            found["sustained_tflops"][key] = {m: n.get("achieved_tflops")
                                              for m, n in p.result["methods"].items()}
        else:  # two_process
            m = _read_json(out / "two_process" / "metrics.json")
            p.result = {k: m.get(k) for k in ("complete", "num_processes", "iterations",
                                              "bank_spread_across_processes")}
            if p.status == "PASS" and p.result.get("num_processes") != 2:
                p.status = "FAIL"
    found["memory_voc"] = memory_pair(found, "pascal", "unimatch")
    found["memory_voc_v2"] = memory_pair(found, "pascal_v2", "unimatch_v2")
    return found


def memory_pair(found: dict[str, Any], preset: str, base: str) -> dict[str, Any]:
    """MLCL's and its baseline's peak memory per process in the rehearsal of ``preset``."""
    methods = found["rehearsals"].get(preset, {}).get("methods", {})
    peak = {m: methods.get(m, {}).get("peak_mb") for m in (base, "mlcl")}
    what = next((n["memory_what"] for n in methods.values() if n.get("memory_what")), None)
    return {"peak_mb": peak, "what": what, f"mlcl_over_{base}": peak["mlcl"] / peak[base]
            if peak["mlcl"] and peak[base] else None}


def summary(check: dict[str, Any]) -> list[str]:
    """SUMMARY.md, from gpu_check.json: the parts, then the headline numbers."""
    m = check["machine"]
    per = [{"part": p["name"], "status": p["status"], "seconds": round(p["seconds"]),
            "CPU seconds": round(p["cpu_s"]), "budget": p["budget_s"], **{
                k: p["result"].get(k) for k in ("ratio_mlcl_over_unimatch",
                                                "mem_ratio_mlcl_over_unimatch")}}
           for p in check["parts"]]
    return [f"# gpu-check {'PASSED' if check['ok'] else 'FAILED'}", "",
            f"{m.get('gpu') or 'CPU (toy sizes)'} x {m['gpus']}, torch {m['torch']}, "
            f"{check['seconds']:.0f} s of {check['budget_s']} s", "", *md_table(per), "",
            *(f"rehearse {k}: {'ALL PASS' if r.get('ok') else 'FAILED'}; TFLOP/s "
              f"{check['sustained_tflops'][k]}" for k, r in check["rehearsals"].items()),
            *(f"- FAIL {f}" for r in check["rehearsals"].values() for f in r.get("failed", [])),
            *(f"{name} peak memory per process (MB): {v['peak_mb']}, MLCL / {base} "
              f"{v[f'mlcl_over_{base}']} ({v['what']})" for name, v, base in (
                  ("VOC preset", check["memory_voc"], "unimatch"),
                  ("VOC V2 preset", check["memory_voc_v2"], "unimatch_v2")))]


def gpu_check(a: argparse.Namespace) -> int:
    """Every part within the budget, then gpu_check.json and SUMMARY.md; 0 when all passed."""
    a.processes = 2 if torch.cuda.device_count() >= 2 else 0
    parts = plan_parts(a)
    if a.dry_run:
        print("\n".join(f"{p.name} ({p.budget_s} s): {' '.join(p.command)}" for p in parts))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    t0, budget = time.monotonic(), BUDGET_S if a.device == "cuda" else 4 * TINY_PART_S
    try:
        for p in parts:
            run_part(p, t0 + budget)
            print(f"{p.status:<7s} {p.name} ({p.seconds:.0f} s of {p.budget_s})", flush=True)
    except KeyboardInterrupt:
        print(f"gpu-check interrupted: its parts so far are in their folders under {a.out}; "
              "no gpu_check.json was written", file=sys.stderr)
        return 130
    machine = {**bench.machine(torch.device(a.device)), "gpus": torch.cuda.device_count(),
               "cuda": torch.version.cuda}
    check = {"ok": all(p.status == "PASS" for p in parts), "tiny": a.device == "cpu",
             "seconds": time.monotonic() - t0, "budget_s": budget, "machine": machine,
             "parts": [asdict(p) for p in parts], **collect(parts, a.out),
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(a.out / "gpu_check.json", check)
    text = "\n".join(summary(check)) + "\n"
    atomic_write_text(a.out / "SUMMARY.md", text)
    print(text + f"wrote {a.out / 'gpu_check.json'} and {a.out / 'SUMMARY.md'}")
    return 0 if check["ok"] else 1

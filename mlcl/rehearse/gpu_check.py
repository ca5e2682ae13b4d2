"""``make gpu-check`` (``python -m mlcl gpu-check``): the acceptance check of a CUDA machine,
in one command, within 8 minutes on one current data-centre GPU.

Parts, each a subprocess with its own time budget (seconds; a part past its budget is stopped
with every process it started and marked TIMEOUT, and the whole check never runs past
``--budget-s``):

    bench_fp32       45   python -m mlcl bench --device cuda, fp32: training steps
    bench_bf16      110   the same in bf16, with peak memory, FKA/SAI and the data pipeline
    rehearse_PRESET 45-100 python -m mlcl rehearse --config PRESET --device cuda at the preset's
                          batch, train.mixed_precision=bf16, every method (MLCL alone on
                          pascal_blended); pascal, pascal_blended, pascal_blended_r101, cityscapes
    two_process      90   with two or more GPUs: accelerate launch, 2 processes, MLCL on the
                          pascal preset's fabricated data, in OUT/two_process emptied first
                          (skipped on one GPU)

then, from the rehearsals: MLCL's peak GPU memory against UniMatch's at the VOC preset, and
the sustained TFLOP/s of each method (FLOPs per step / seconds per step), the number to pass
to ``mlcl rehearse --tflops`` for projections. Writes OUT/gpu_check.json and OUT/SUMMARY.md
(default OUT: runs/gpu-check); exit status 0 when every part passed.

``--tiny`` runs every part on the CPU at toy sizes (narrow backbone, crop 161, 2 steps, one
validation image): a wiring check of the commands and of this report, which the test suite
runs; ``--dry-run`` prints the parts and their commands without running them.
"""
from __future__ import annotations

import argparse
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
import yaml

from mlcl import paths
from mlcl.config import METHOD_NAMES, CommandLineParser
from mlcl.errors import run_reported
from mlcl.files import atomic_write_json, atomic_write_text
from mlcl.rehearse.fabricate import weights_name
from mlcl.study.reproduce import thread_env, train_command

PRESETS = ("pascal", "pascal_blended", "pascal_blended_r101", "cityscapes")
BUDGET_S = 480
PART_BUDGET_S = {"bench_fp32": 45, "bench_bf16": 110, "rehearse_pascal": 80,
                 "rehearse_pascal_blended": 45, "rehearse_pascal_blended_r101": 75,
                 "rehearse_cityscapes": 100, "two_process": 90}
# pascal_blended runs pascal's model, crop and schedule on other split lists: MLCL alone there
# leaves the time to the presets whose arithmetic differs
PRESET_METHODS = {"pascal_blended": ("mlcl",)}
BENCH = {  # real mode: few repeats, the slow released FKA re-creation once
    "bench_fp32": ["--mixed-precision", "no", "--sections", "steps", "--repeats", "10"],
    "bench_bf16": ["--mixed-precision", "bf16", "--sections", "steps,memory,fka_sai,pipeline",
                   "--repeats", "10", "--fka-repeats", "10", "--fka-released-repeats", "1"],
}
TINY_BENCH = ["--backbone", "resnet18", "--width", "4", "--crop", "33", "--batch", "2",
              "--warmup", "0", "--repeats", "1", "--sections", "steps",
              "--methods", "supervised,mlcl"]
TINY_MODEL = ["model.width=4", "model.feature_channels=8", "model.low_level_channels=4",
              "data.crop_size=161", "data.num_workers=0"]
# a full 2048x1024 frame through even a narrow network takes ~10 s of CPU per evaluation:
# tiny mode evaluates Cityscapes on the centre crop (the sliding path is counted on the meta
# device at full size by the rehearsal's flops stage and exercised for real on the GPU)
TINY_EVAL = {"cityscapes": ["eval.mode=center_crop"]}
TINY_BUDGET_S = 600  # per part, in tiny mode (a CPU shared with other work)


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


def _py(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlcl", *args]


def plan_parts(a: argparse.Namespace) -> list[Part]:
    """The parts in order, with their commands (bench, rehearsals, two processes)."""
    device, out = ("cpu" if a.tiny else "cuda"), Path(a.out)
    parts = []
    for name, opts in BENCH.items():
        extra = TINY_BENCH + opts[:2] if a.tiny else opts
        parts.append(Part(name, _py("bench", "--device", device, *extra, "--out",
                                    str(out / f"{name}.json")), PART_BUDGET_S[name]))
    sizes = ["--steps", "2", "--val-images", "1"] if a.tiny else ["--steps", str(a.steps)]
    for preset in a.presets:
        name = f"rehearse_{preset}"
        tiny = [*TINY_MODEL, *TINY_EVAL.get(preset, [])] if a.tiny else []
        parts.append(Part(name, _py(
            "rehearse", "--config", preset, "--device", device, *sizes, "--methods",
            ",".join(a.methods or PRESET_METHODS.get(preset, METHOD_NAMES)),
            "--out", str(out / "rehearse"),
            f"train.mixed_precision={precision(a)}", *tiny), PART_BUDGET_S.get(name, 90)))
    if a.processes > 1 and "pascal" in a.presets:
        parts.append(Part("two_process", two_process_command(a, out),
                          PART_BUDGET_S["two_process"], fresh=str(out / "two_process")))
    if a.tiny:
        for p in parts:
            p.budget_s = TINY_BUDGET_S
    return parts


def precision(a: argparse.Namespace) -> str:
    """bf16 on the GPU; fp32 in tiny mode (CPU bf16 convolutions are slower, and the bench
    parts already run a bf16 step on the CPU)."""
    return "no" if a.tiny else "bf16"


def two_process_command(a: argparse.Namespace, out: Path) -> list[str]:
    """Two processes of MLCL on the data and weights the pascal rehearsal fabricated (one
    process's epoch of ``steps`` steps is one step for each of two processes)."""
    width = 4 if a.tiny else 64
    weights = out / "rehearse" / "pretrained" / weights_name("resnet50_deepstem", width)
    over = [f"data.root={out / 'rehearse' / 'data' / 'pascal'}", "method=mlcl",
            f"model.pretrained={weights}", "train.max_iters=2",
            f"output_dir={out / 'two_process'}", f"train.mixed_precision={precision(a)}"]
    if a.tiny:
        over += [*TINY_MODEL, "train.batch_size=2"]
    return train_command("pascal", over, num_processes=2)


def run_part(part: Part, deadline: float) -> None:
    """Run ``part`` within its budget and what is left before ``deadline``, in a folder of
    its own emptied first (``part.fresh``)."""
    left = deadline - time.monotonic()
    if left < 5:
        part.status, part.tail = "SKIP", "no time left in the check's budget"
        return
    problem = clear_fresh(Path(part.fresh)) if part.fresh else None
    if problem:
        part.status, part.tail = "FAIL", problem
        return
    t0, cpu0 = time.monotonic(), _children_cpu()
    part.returncode, part.tail = run_group(part.command, min(part.budget_s, left))
    part.status = ("TIMEOUT" if part.returncode is None
                   else "PASS" if part.returncode == 0 else "FAIL")
    part.seconds, part.cpu_s = time.monotonic() - t0, _children_cpu() - cpu0


def clear_fresh(folder: Path) -> Optional[str]:
    """Remove ``folder`` when an earlier check left it (a training run whose config.yaml
    names it as output_dir, or empty), so the part trains anew instead of resuming or
    reporting the old run; the reason it was kept otherwise (None when cleared)."""
    if not folder.exists():
        return None
    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        ours = Path(str(saved.get("output_dir"))).resolve() == folder.resolve()
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        ours = folder.is_dir() and not any(folder.iterdir())
    if not ours:
        return (f"{folder} exists and is not a run an earlier gpu-check left there; "
                "remove it or choose another --out")
    shutil.rmtree(folder)
    return None


def run_group(command: list[str], timeout: float) -> tuple[Optional[int], str]:
    """Run ``command`` in a process group of its own: (return code, or None when it ran past
    ``timeout`` seconds, and the last 3000 characters of its output). On a timeout, or when
    this process is interrupted, the whole group is stopped (accelerate launch's workers
    too, so none keeps the GPU)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", env=thread_env(),
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out[-3000:]
    except subprocess.TimeoutExpired:
        stop_group(proc)
        return None, (proc.communicate()[0] or "")[-3000:]
    except BaseException:
        stop_group(proc)
        raise


def stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to ``proc``'s process group (a run stops at its next step), SIGKILL to what
    is left of it after ``grace_s`` seconds."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the whole group has already left
        pass


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- results
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def collect(parts: list[Part], out: Path) -> dict[str, Any]:
    """Headline numbers from the parts' JSON files (bench, rehearsals, two processes)."""
    found: dict[str, Any] = {"bench": {}, "rehearsals": {}, "sustained_tflops": {}}
    for p in parts:
        if p.name.startswith("bench_"):
            b = _read_json(out / f"{p.name}.json")
            p.result = {k: b.get(k) for k in ("step_s", "ratio_mlcl_over_unimatch",
                                              "peak_mem_mb", "mem_ratio_mlcl_over_unimatch",
                                              "fka_sai_speedup_over_released",
                                              "pipeline_samples_per_s", "targets")}
            found["bench"][p.name.removeprefix("bench_")] = p.result
        elif p.name.startswith("rehearse_"):
            preset = p.name.removeprefix("rehearse_")
            r = _read_json(out / "rehearse" / preset / "rehearse.json")
            p.result = {"ok": r.get("ok"), "methods": r.get("methods", {}),
                        "failed": [f"{s['method'] or preset} {s['name']}: {s['detail']}"
                                   for s in r.get("stages", []) if s["status"] == "FAIL"]}
            if p.status == "PASS" and not r:
                p.status, p.tail = "FAIL", "no rehearse.json was written\n" + p.tail
            found["rehearsals"][preset] = p.result
            found["sustained_tflops"][preset] = {
                m: n.get("achieved_tflops") for m, n in p.result["methods"].items()}
        elif p.name == "two_process":
            m = _read_json(out / "two_process" / "metrics.json")
            p.result = {k: m.get(k) for k in ("complete", "num_processes", "iterations",
                                              "bank_spread_across_processes")}
            if p.status == "PASS" and p.result.get("num_processes") != 2:
                p.status = "FAIL"
    found["memory_voc"] = voc_memory(found["rehearsals"].get("pascal", {}))
    return found


def voc_memory(rehearsal: dict[str, Any]) -> dict[str, Any]:
    """MLCL's peak memory per process against UniMatch's, from the pascal rehearsal."""
    methods = rehearsal.get("methods", {})
    peak = {m: methods.get(m, {}).get("peak_mb") for m in ("unimatch", "mlcl")}
    ratio = peak["mlcl"] / peak["unimatch"] if peak["mlcl"] and peak["unimatch"] else None
    what = next((n.get("memory_what") for n in methods.values() if n.get("memory_what")), None)
    return {"peak_mb": peak, "mlcl_over_unimatch": ratio, "what": what}


def summary(check: dict[str, Any]) -> list[str]:
    """The short human summary (SUMMARY.md)."""
    m = check["machine"]
    lines = [f"# gpu-check {'PASSED' if check['ok'] else 'FAILED'}", "",
             f"{m.get('gpu') or 'CPU (tiny mode)'} x {m.get('gpus', 0)}, torch {m['torch']}, "
             f"{check['seconds']:.0f} s of {check['budget_s']} s", "",
             "| part | status | seconds | CPU seconds | budget |", "|---|---|---|---|---|"]
    lines += [f"| {p['name']} | {p['status']} | {p['seconds']:.0f} | {p['cpu_s']:.0f} | "
              f"{p['budget_s']} |" for p in check["parts"]]
    for name, b in check["bench"].items():
        steps = ", ".join(f"{k} {v:.3f} s" for k, v in (b.get("step_s") or {}).items())
        lines.append(f"\nbench {name}: {steps}; MLCL/UniMatch step "
                     f"{_g(b.get('ratio_mlcl_over_unimatch'))}, memory "
                     f"{_g(b.get('mem_ratio_mlcl_over_unimatch'))}")
    for preset, r in check["rehearsals"].items():
        per = ", ".join(f"{k} {_g(n.get('seconds_per_step'))} s/step, "
                        f"{_mb(n.get('peak_mb'))}, {_g(n.get('achieved_tflops'))} TFLOP/s"
                        for k, n in r.get("methods", {}).items())
        lines.append(f"\nrehearse {preset}: {'ALL PASS' if r.get('ok') else 'FAILED'}; {per}")
        lines += [f"- FAIL {f}" for f in r.get("failed", [])]
    two = next((p["result"] for p in check["parts"] if p["name"] == "two_process"), None)
    if two:
        lines.append(f"\ntwo processes: {two}")
    v = check["memory_voc"]
    lines.append(f"\nVOC preset peak memory per process: MLCL {_mb(v['peak_mb']['mlcl'])}, "
                 f"UniMatch {_mb(v['peak_mb']['unimatch'])}, ratio "
                 f"{_g(v['mlcl_over_unimatch'])} ({v['what']})")
    return lines


def _mb(x: Any) -> str:
    return "- MB" if x is None else f"{x:.0f} MB"


def _g(x: Any) -> str:
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = CommandLineParser(prog="python -m mlcl gpu-check", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder (default runs/gpu-check)")
    p.add_argument("--budget-s", type=int, default=BUDGET_S,
                   help=f"the whole check's time limit (default {BUDGET_S})")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated")
    p.add_argument("--methods", default=None,
                   help="comma-separated, for every preset (default: every method; MLCL alone "
                        "on pascal_blended, which shares pascal's model and crop)")
    p.add_argument("--steps", type=int, default=3, help="rehearsal steps (default 3)")
    p.add_argument("--processes", type=int, default=None,
                   help="processes of the multi-process run (default: 2 with two or more "
                        "GPUs, else none)")
    p.add_argument("--tiny", action="store_true", help="CPU, toy sizes: a wiring check")
    p.add_argument("--dry-run", action="store_true", help="print the parts and exit")
    return p


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    a.out = Path(a.out) if a.out else paths.runs_dir() / "gpu-check"
    a.presets = [s for s in a.presets.split(",") if s]
    a.methods = [s for s in a.methods.split(",") if s] if a.methods else None
    if a.tiny:
        a.budget_s = max(a.budget_s, TINY_BUDGET_S * 4)
    gpus = torch.cuda.device_count()
    if a.processes is None:
        a.processes = 2 if gpus >= 2 else 0
    if not a.tiny and not a.dry_run and gpus == 0:
        raise SystemExit("error: gpu-check needs a CUDA device (none is visible); "
                         "--tiny runs its parts on the CPU at toy sizes")
    return a


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "gpus": torch.cuda.device_count(),
                            "cuda": torch.version.cuda}
    if info["gpus"]:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    return info


def main(argv: list[str] | None = None) -> int:
    """The command: exit status 0 every part PASS, 1 a part failed, 2 bad input (one line,
    mlcl.errors), 130 Ctrl-C (the running part's process group stopped first)."""
    a = resolve(build_parser().parse_args(argv))
    try:
        return run_reported(lambda: run_check(a))
    except KeyboardInterrupt:
        print("gpu-check interrupted: its parts so far are in their folders under "
              f"{a.out}; no gpu_check.json was written", file=sys.stderr)
        return 130


def run_check(a: argparse.Namespace) -> int:
    """Every part of the check within the budget, then gpu_check.json and SUMMARY.md."""
    parts = plan_parts(a)
    if a.dry_run:
        for p in parts:
            print(f"{p.name} ({p.budget_s} s): {' '.join(p.command)}")
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    for p in parts:
        run_part(p, t0 + a.budget_s)
        print(f"{p.status:<7s} {p.name} ({p.seconds:.0f} s of {p.budget_s})", flush=True)
    found = collect(parts, a.out)
    check = {"ok": all(p.status == "PASS" for p in parts), "tiny": a.tiny,
             "seconds": time.monotonic() - t0, "budget_s": a.budget_s, "machine": machine(),
             "parts": [asdict(p) for p in parts], **found,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(a.out / "gpu_check.json", check)
    text = "\n".join(summary(check)) + "\n"
    atomic_write_text(a.out / "SUMMARY.md", text)
    print(text + f"wrote {a.out / 'gpu_check.json'} and {a.out / 'SUMMARY.md'}")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

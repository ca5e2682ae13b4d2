"""The rehearsal of a paper preset on its own configuration, a PASS / FAIL / SKIP line per
stage, then OUT/PRESET/rehearse.json; and what a whole run of each cell costs (the stages and
the projection's formula: docs/real_data.md, section 9)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shutil
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from mlcl import methods
from mlcl.config import Config, ConfigError, flatten, load_config, uses_teacher
from mlcl.data.datasets import ValDataset
from mlcl.engine import make_accelerator
from mlcl.errors import RunInterrupted
from mlcl.evaluate import evaluate
from mlcl.files import atomic_write_json
from mlcl.measure.fabricate import (LAYOUT, backbone_of, fabricate_backbone, fabricate_dataset,
                                    weights_name)
from mlcl.measure.harness import (MiB, PeakMemory, eval_flops, md_table, step_flops,
                                  step_memory, sync)
from mlcl.model import DINOV2, load_backbone_weights
from mlcl.prepare.split_lists import STANDARD_POOLS, UNLABELED_POOL, standard_size
from mlcl.prepare.verify import verify_dataset
from mlcl.study.predict import load_weights
from mlcl.train import fit

OUT_MARKER = ".mlcl-rehearse"  # an output folder holding it was made by a rehearsal
CPU_BATCH = 2  # the smallest batch ASPP's image-pooling batch norm and the CutMix roll allow
VAL_IMAGES = 2
# (H, W) for the eval FLOPs: a typical image of each dataset
EVAL_IMAGE = {"pascal": (375, 500), "cityscapes": (1024, 2048), "ade20k": (512, 683),
              "coco": (480, 640)}
MIOU_TOLERANCE = 0.1  # points: last.pt re-evaluated vs training's evaluation (GPU kernels vary)
SPLIT_KEYS = ("labeled_split", "unlabeled_split", "val_split")
# the global batch of the presets (docs/real_data.md, section 7): VOC 2 GPUs x 4, Cityscapes,
# ADE20K and COCO 4 GPUs
REFERENCE_GPUS = {"pascal": 2, "cityscapes": 4, "ade20k": 4, "coco": 4}
# sustained TFLOP/s per GPU (FLOPs as counted here) of UniMatch's own published runs: VOC R50
# split 183, 80 epochs in 14.3 h on 4 GPUs at batch 2; Cityscapes R50 1/4, 240 epochs in 26.6 h.
# ADE20K and COCO: no published time; VOC's (the same kind of run: DeepLabV3+, whole-image eval)
DEFAULT_TFLOPS = {"pascal": 4.1, "cityscapes": 9.4, "ade20k": 4.1, "coco": 4.1}
# DINOv2: what UniMatch V2's published runs (4 GPUs) sustained, counted the same way (both of
# each epoch's evaluations included): VOC 183, 60 epochs, 16 + 16 per step in 5.67 h (S),
# 13.16 h (B), 32.33 h (L); Cityscapes 1/4, 180 epochs, 8 + 8 in 27.06 h (S), 41.74 h (B).
# Other datasets, and Cityscapes with L: VOC's pace of that encoder
V2_TFLOPS = {("pascal", "dinov2_s"): 9.2, ("pascal", "dinov2_b"): 13.2,
             ("pascal", "dinov2_l"): 18.6, ("cityscapes", "dinov2_s"): 5.6,
             ("cityscapes", "dinov2_b"): 10.7}
# cards whose memory the estimate is held against (GiB), and what a run takes besides the
# estimated tensors: the caching allocator's slack over what is allocated, the CUDA context
CARDS_GIB, ALLOCATOR_SLACK, CONTEXT_GIB = (40, 80), 1.15, 1.0
NOT_IN_A_STEP = ("split", "output_dir", "data.root", "data.labeled_split", "data.unlabeled_split",
                 "data.val_split", "model.pretrained", "train.epochs", "train.max_iters",
                 "train.cpu", "data.num_workers")
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


class StageError(RuntimeError):
    """A stage's check did not hold; the message is the reason printed beside FAIL."""


def expect(ok: bool, reason: str) -> None:
    if not ok:
        raise StageError(reason)


@dataclasses.dataclass
class Plan:
    """The command line resolved against the preset."""
    preset: str
    base: Config  # the preset + the user's overrides
    a: argparse.Namespace
    device: torch.device
    batch: int
    given: dict[str, str]  # data.root / model.pretrained given as overrides
    dir: Path  # OUT/PRESET
    latest: str = ""  # the checkpoint the train stage left (the resume starts from it)

    def config(self, *extra: str) -> Config:
        return load_config(self.preset, [*self.a.overrides, *extra,
                                         f"train.cpu={self.device.type == 'cpu'}"])


def make_plan(preset: str, a: argparse.Namespace) -> Plan:
    base = load_config(preset, a.overrides)
    if base.data.dataset not in LAYOUT or not base.split:
        raise ConfigError(f"--config {preset}: rehearsals are for the paper's presets (pascal, "
                          f"pascal_blended, pascal_blended_r101, cityscapes, ade20k, coco, "
                          f"pascal_v2, cityscapes_v2)")
    if a.steps < 2:
        raise ConfigError("--steps: at least 2 (a step time needs two steps)")
    given = dict(o.split("=", 1) for o in a.overrides if o.split("=", 1)[0] in
                 ("data.root", "model.pretrained"))
    batch = base.train.batch_size if a.device == "cuda" else min(CPU_BATCH,
                                                                 base.train.batch_size)
    return Plan(preset, base, a, torch.device(a.device), batch, given, a.out / preset)


@dataclasses.dataclass
class Stage:
    """One line of the rehearsal: ``status`` of ``name`` (for ``method``, or the preset)."""
    preset: str
    name: str
    method: Optional[str]
    status: str
    detail: str
    seconds: float = 0.0
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


class StageBook:
    """Runs stages, prints a PASS/FAIL/SKIP line for each and keeps them."""

    def __init__(self, preset: str, log: Callable[[str], None] = print):
        self.preset, self.log, self.stages = preset, log, []

    def status(self, name: str, method: Optional[str] = None) -> Optional[str]:
        return next((s.status for s in self.stages if (s.name, s.method) == (name, method)), None)

    def run(self, name: str, method: Optional[str], fn: Callable[[], tuple[str, dict]],
            needs: tuple[tuple[str, Optional[str]], ...] = ()) -> Optional[dict]:
        """``fn()`` -> (detail, data) unless a stage in ``needs`` did not pass; ``data`` on
        PASS, else None. An error is FAIL; RunInterrupted (Ctrl-C, SIGTERM) ends it all."""
        missing = [f"{n}{'/' + m if m else ''}" for n, m in needs if self.status(n, m) != PASS]
        if missing:
            return self.add(Stage(self.preset, name, method, SKIP, f"needs {', '.join(missing)}"))
        t0, status = time.perf_counter(), PASS
        try:
            detail, data = fn()
        except RunInterrupted:
            raise
        except Exception as e:  # noqa: BLE001 - any failure is this stage's FAIL line
            text = " ".join(str(e).split()) or "(no message)"
            detail = text if isinstance(e, StageError) else f"{type(e).__name__}: {text}"
            status, data = FAIL, {"traceback": traceback.format_exc()}
        self.add(Stage(self.preset, name, method, status, detail[:400],
                       time.perf_counter() - t0, data))
        return data if status == PASS else None

    def add(self, s: Stage) -> None:
        self.stages.append(s)
        who = f"{s.preset}/{s.method}" if s.method else s.preset
        self.log(f"{s.status}  {who:<32s} {s.name:<10s} {s.detail}")


def data_stage(plan: Plan) -> tuple[str, dict]:
    """The given data.root's lists cut to the rehearsal, or a fabricated dataset whose images
    are the real sizes times data.crop_size over the preset's (1 at the preset's crop)."""
    cfg, n_unl = plan.base, plan.a.steps * plan.batch
    if "data.root" in plan.given:
        root, lists, full = Path(plan.given["data.root"]), *cut_lists(plan, n_unl)
        kind = "given"
    else:
        scale = cfg.data.crop_size / load_config(plan.preset).data.crop_size
        root = fabricate_dataset(cfg.data.dataset, plan.a.out / "data" / cfg.data.dataset,
                                 labeled=plan.batch, unlabeled=n_unl, val=VAL_IMAGES,
                                 scale=scale)
        lists, full, kind = [], real_sizes(cfg), f"fabricated, {scale:.3g} x the real sizes"
    paths = [v.split("=", 1)[1] for v in lists] or [getattr(cfg.data, k) for k in SPLIT_KEYS]
    report = verify_dataset(root, cfg.data.layout, paths, cfg.data.num_classes,
                            log=lambda msg: None, ignore_index=cfg.data.ignore_index)
    expect(report.ok, "verify: " + "; ".join(p for s in report.splits for p in s.problems[:3]))
    counts = ", ".join(f"{Path(s.path).name} {s.count}" for s in report.splits)
    return f"{root} ({kind}) verified ({counts})", {"root": root, "lists": lists, "full": full}


def cut_lists(plan: Plan, n_unl: int) -> tuple[list[str], tuple[int, int]]:
    """Overrides naming the cell's lists cut to the rehearsal (OUT/PRESET/lists); the full
    unlabeled and val counts."""
    want = {"labeled_split": plan.batch, "unlabeled_split": n_unl, "val_split": VAL_IMAGES}
    overrides, full = [], {}
    for key, n in want.items():
        src = plan.base.split_path(key)
        expect(src.is_file(), f"data.{key}: {src} does not exist (is data.root right?)")
        lines = [ln for ln in src.read_text().splitlines() if ln.split("#")[0].strip()]
        expect(len(lines) >= n, f"{src} lists {len(lines)} samples, the rehearsal needs {n}")
        dest = plan.dir / "lists" / src.name.replace(".txt", f"-{key}.txt")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text("".join(ln + "\n" for ln in lines[:n]))
        overrides.append(f"data.{key}={dest.resolve()}")
        full[key] = len(lines)
    return overrides, (full["unlabeled_split"], full["val_split"])


def weights_stage(plan: Plan) -> tuple[str, dict]:
    m = plan.base.model
    path = Path(plan.given.get("model.pretrained") or fabricate_backbone(
        plan.a.out / "pretrained" / weights_name(m.backbone, m.width), m.backbone, m.width))
    kind = "given" if "model.pretrained" in plan.given else "fabricated: real keys and shapes"
    load_backbone_weights(backbone_of(m.backbone, m.width), path)
    return (f"{path} ({path.stat().st_size / MiB:.0f} MB, {kind}) loads strictly into "
            f"{m.backbone}", {"path": str(path.resolve())})


def flops_stage(plan: Plan, method: str, full: tuple[int, int] | None) -> tuple[str, dict]:
    """FLOPs of a step at the preset's batch and at the rehearsal's, and of the whole run; the
    estimated peak memory per GPU in bf16 at the preset's batch."""
    proj = cell_cost(plan, method, full)
    small = plan.config(f"method={method}", "model.pretrained=false",
                        f"train.batch_size={plan.batch}")
    run_step = counted(small, lambda: step_flops(small))
    mem = memory_estimate(plan, method, "bf16")
    return (f"{human_flops(proj['step_flops'])}/step at batch {proj['batch']}; full run "
            f"{human_flops(proj['total_flops'])} = {proj['gpu_hours']:.0f} GPU-h at "
            f"{proj['tflops_per_gpu']:g} TFLOP/s/GPU ({proj['wall_hours']:.1f} h on "
            f"{proj['gpus']} GPUs); bf16 peak ~{mem['gib']:.1f} GiB/GPU (estimate)",
            {"step_flops": proj["step_flops"], "run_step_flops": run_step, "projection": proj,
             "memory_estimate": mem})


def cell_cost(plan: Plan, method: str, full: tuple[int, int] | None) -> dict[str, Any]:
    """:func:`projection` of ``method`` on the preset, ``full`` (unlabeled, val) images or
    the real dataset's; a step counted once per config, an evaluation once per model."""
    cfg = plan.config(f"method={method}", "model.pretrained=false")
    step = counted(cfg, lambda: step_flops(cfg))
    gpus, tflops = reference_run(cfg)
    return projection(cfg, *(full or real_sizes(cfg)), plan.a.gpus or gpus, step,
                      image_flops(cfg), plan.a.tflops or tflops)


def reference_run(cfg: Config) -> tuple[int, float]:
    """(GPUs, sustained TFLOP/s per GPU) of the published runs a projection of ``cfg`` follows:
    UniMatch's on a ResNet, UniMatch V2's on DINOv2."""
    ds, backbone = cfg.data.dataset, cfg.model.backbone
    if backbone in DINOV2:
        return 4, V2_TFLOPS.get((ds, backbone), V2_TFLOPS[("pascal", backbone)])
    return REFERENCE_GPUS[ds], DEFAULT_TFLOPS[ds]


def memory_estimate(plan: Plan, method: str, precision: str) -> dict[str, Any]:
    """harness.step_memory of ``method`` at the preset's batch in ``precision`` (GiB), with
    DDP's gradient buckets (a copy of the gradients) when the run has several GPUs, and
    whether it fits each card of CARDS_GIB after ALLOCATOR_SLACK and CONTEXT_GIB."""
    cfg = plan.config(f"method={method}", "model.pretrained=false",
                      f"train.mixed_precision={precision}")
    m = counted(cfg, lambda: step_memory(cfg), "memory")
    gpus = plan.a.gpus or reference_run(cfg)[0]
    ddp = 4 * m["parameters"] if gpus > 1 else 0
    gib = (m["peak_bytes"] + ddp) / 2 ** 30
    return {**m, "ddp_bucket_bytes": ddp, "gib": gib, "gpus": gpus,
            "fits": {f"{c} GB": ALLOCATOR_SLACK * gib + CONTEXT_GIB <= c for c in CARDS_GIB}}


def image_flops(cfg: Config) -> int:
    """FLOPs of evaluating one image of the real dataset's size, once per model and eval
    settings."""
    h, w = EVAL_IMAGE[cfg.data.dataset]
    what = {k: v for k, v in flatten(cfg.to_dict()).items() if k.startswith(("model.", "eval."))
            or k in ("data.crop_size", "data.num_classes")}
    return counted([h, w, what], lambda: eval_flops(cfg, h, w), "eval FLOPs")


_counted: dict[str, Any] = {}


def counted(key: Any, count: Callable[[], Any], what: str = "step FLOPs") -> Any:
    """``count()`` once per key and ``what`` (a Config: its keys that can change a step)."""
    if isinstance(key, Config):
        key = {k: v for k, v in flatten(key.to_dict()).items() if k not in NOT_IN_A_STEP}
    text = json.dumps([what, key], sort_keys=True, default=str)
    if text not in _counted:
        _counted[text] = count()
    return _counted[text]


def real_sizes(cfg: Config) -> tuple[int, int]:
    """(unlabeled, val) image counts of ``cfg``'s cell on the real dataset."""
    pools = STANDARD_POOLS[cfg.data.dataset]
    return (pools[UNLABELED_POOL[cfg.data.dataset]] - standard_size(cfg.data.dataset, cfg.split),
            pools["val"])


def projection(cfg: Config, unlabeled: int, val: int, gpus: int, step: int, per_image: int,
               tflops: float) -> dict[str, Any]:
    """The whole run at the preset's batch per GPU on ``gpus`` GPUs, as ``fit`` schedules it
    (evaluation every train.eval_every epochs and at the end, of the student and the teacher
    when there is one), at ``tflops`` per GPU."""
    batch, epochs = cfg.train.batch_size, cfg.train.epochs
    per_epoch, every = unlabeled // (batch * gpus), max(cfg.train.eval_every, 1)
    evaluations = -(-epochs // every) * (2 if uses_teacher(cfg) else 1)
    train, evaluation = epochs * per_epoch * gpus * step, evaluations * val * per_image
    gpu_hours = (train + evaluation) / (tflops * 1e12) / 3600
    return {"unlabeled": unlabeled, "val": val, "batch": batch, "gpus": gpus, "epochs": epochs,
            "iters_per_epoch": per_epoch, "iterations": epochs * per_epoch,
            "evaluations": evaluations, "step_flops": step, "eval_flops_per_image": per_image,
            "train_flops": train, "eval_flops": evaluation, "total_flops": train + evaluation,
            "tflops_per_gpu": tflops, "gpu_hours": gpu_hours, "wall_hours": gpu_hours / gpus}


def human_flops(n: float) -> str:
    """1.23e15 -> '1.23 PFLOP'."""
    unit, scale = next(((u, s) for u, s in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12),
                                            ("GFLOP", 1e9), ("MFLOP", 1e6)) if n >= s),
                       ("FLOP", 1))
    return f"{n / scale:.3g} {unit}"


@contextlib.contextmanager
def step_probe(method: str, device: torch.device) -> Iterator[tuple[list, list]]:
    """(starts, losses): the wall-clock start (the device synchronised) and the loss of every
    call the loop makes to ``methods.STEPS[method]`` while active."""
    step, starts, losses = methods.STEPS[method], [], []

    def probe(model, batch, ctx):
        sync(device)
        starts.append(time.perf_counter())
        terms = step(model, batch, ctx)
        losses.append(float(terms["loss"].detach()))
        return terms

    methods.STEPS[method] = probe
    try:
        yield starts, losses
    finally:
        methods.STEPS[method] = step


def fit_stage(cfg: Config, plan: Plan, done: int) -> tuple[str, dict]:
    """``fit(cfg)`` probed: it must take ``plan.a.steps`` steps from ``done`` (a resume takes
    N more steps, not 2N) and end with an evaluation."""
    n, meter = plan.a.steps, PeakMemory(plan.device)
    meter.reset()
    with step_probe(cfg.method, plan.device) as (starts, losses):
        metrics = fit(cfg)
    mem = meter.read()
    expect(metrics.get("iterations") == done + n,
           f"fit reports {metrics.get('iterations')} iterations, expected {done + n}")
    expect(len(starts) == n, f"the loop ran {len(starts)} steps, expected {n}" + (
        f" ({done + n} would mean it started over)" if done else ""))
    expect(all(math.isfinite(v) for v in losses), f"non-finite loss: {losses}")
    expect(metrics.get("last_miou") is not None, "fit did not evaluate at the end of the run")
    pointer = Path(cfg.output_dir) / "checkpoints" / "LATEST"
    expect(pointer.is_file(), f"{pointer} was not written")
    after = pointer.read_text().strip()
    expect((pointer.parent / after).is_dir(), f"{pointer} names {after!r}, not a folder")
    gaps = [b - a for a, b in zip(starts, starts[1:])]  # loading included; not the first
    gaps = gaps[1:] if len(gaps) > 1 else gaps
    return (f"{'from ' + plan.latest + ': ' if done else ''}{n} steps, loss "
            f"{losses[0]:.3f} -> {losses[-1]:.3f}, LATEST -> {after}, "
            f"{statistics.median(gaps):.2f} s/step, peak {mem['peak_mb']:.0f} MB",
            {"intervals": gaps, "memory": mem, "metrics": metrics, "latest": after})


def checkpoint_stage(cfg: Config, latest: str) -> tuple[str, dict]:
    """best.pt and last.pt load strictly; with a teacher, the checkpoint holds it (the
    resume's) and it is last.pt's network (both were saved after the last step)."""
    out, sizes = Path(cfg.output_dir), []
    for f in ("best.pt", "last.pt"):
        model = load_weights(out / f)[0]  # strict, as `mlcl evaluate` / `mlcl predict` load it
        sizes.append(f"{f} {(out / f).stat().st_size / MiB:.0f} MB")
    teacher = ""
    if uses_teacher(cfg):
        folder = out / "checkpoints" / latest
        parts = [torch.load(f, weights_only=True) for f in folder.glob("custom_checkpoint_*.pkl")]
        net = next(({k.removeprefix("net."): v for k, v in part.items()} for part in parts
                    if next(iter(part), "").startswith("net.")), None)
        expect(net is not None, f"{folder} holds no EMA teacher")
        weights = model.state_dict()  # last.pt's
        expect(net.keys() == weights.keys() and all(torch.equal(net[k], weights[k])
                                                     for k in net),
               f"the teacher in {folder} is not last.pt's network")
        teacher = "; the checkpoint's EMA teacher = last.pt"
    return f"checkpoints/LATEST -> {latest}; {', '.join(sizes)} load strictly{teacher}", {}


def evaluate_stage(cfg: Config, trained: dict, plan: Plan) -> tuple[str, dict]:
    """last.pt evaluated the way ``mlcl evaluate`` does it, against fit's last evaluation (with
    a teacher, both are the teacher's: last.pt holds it, metrics' miou is its)."""
    model, wcfg, _ = load_weights(Path(cfg.output_dir) / "last.pt")
    expect(wcfg.eval.mode == plan.base.eval.mode,
           f"last.pt evaluates in {wcfg.eval.mode!r}, the preset in {plan.base.eval.mode!r}")
    teacher = uses_teacher(cfg)
    expect(not teacher or "miou_student" in trained["epochs"][-1],
           "training did not evaluate the teacher beside the student (no miou_student)")
    acc = make_accelerator(wcfg)
    result = evaluate(model.to(acc.device), ValDataset(wcfg, wcfg.split_path("val_split")),
                      wcfg, acc)
    n, want = result["num_images"], trained["last_miou"]
    expect(n == VAL_IMAGES, f"evaluated {n} images, expected {VAL_IMAGES}")
    expect(abs(result["miou"] - want) <= MIOU_TOLERANCE,
           f"mIoU {result['miou']:.3f} from last.pt, {want:.3f} in training's evaluation")
    return (f"{wcfg.eval.mode} on {n} images: mIoU {result['miou']:.2f} = training's "
            f"{want:.2f}{' (the teacher)' if teacher else ''}", {"miou": result["miou"]})


def run_config(plan: Plan, method: str, data: dict, weights: str, iters: int) -> Config:
    """The preset's config for ``method`` with only the rehearsal's keys changed."""
    return plan.config(
        f"method={method}", f"data.root={data['root']}", f"model.pretrained={weights}",
        f"train.max_iters={iters}", f"output_dir={(plan.dir / method).resolve()}",
        *data["lists"], f"train.batch_size={plan.batch}")


def rehearse_method(book: StageBook, plan: Plan, method: str, data: Optional[dict],
                    weights: Optional[str]) -> None:
    book.run("flops", method, lambda: flops_stage(plan, method, data and data["full"]))
    shutil.rmtree(plan.dir / method, ignore_errors=True)  # an earlier rehearsal's run
    cfg = data and weights and run_config(plan, method, data, weights, plan.a.steps)
    trained = book.run("train", method, lambda: fit_stage(cfg, plan, 0),
                       (("data", None), ("weights", None)))
    plan.latest = (trained or {}).get("latest", "")
    book.run("checkpoint", method, lambda: checkpoint_stage(cfg, plan.latest),
             (("train", method),))
    resumed = book.run("resume", method, lambda: fit_stage(
        run_config(plan, method, data, weights, 2 * plan.a.steps), plan, plan.a.steps),
        (("checkpoint", method),))
    book.run("evaluate", method, lambda: evaluate_stage(cfg, resumed["metrics"], plan),
             (("resume", method),))


def rehearse(preset: str, a: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Every stage of ``preset`` for ``a.methods``; the report (OUT/PRESET/rehearse.json)."""
    plan = make_plan(preset, a)
    if a.out.exists() and any(a.out.iterdir()) and not (a.out / OUT_MARKER).is_file():
        raise ConfigError(f"--out {a.out}: the folder exists and was not made by a rehearsal "
                          f"(no {OUT_MARKER}); choose another folder")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / OUT_MARKER).touch()
    cfg, book = plan.base, StageBook(preset, log)
    log(f"rehearsal of {preset} (split {cfg.split}) on {a.device}, batch {plan.batch} per "
        f"process (preset {cfg.train.batch_size}), {a.steps} steps then {a.steps} resumed")
    data = book.run("data", None, lambda: data_stage(plan))
    weights = book.run("weights", None, lambda: weights_stage(plan))
    methods = a.methods or preset_methods(cfg)
    for method in methods:
        rehearse_method(book, plan, method, data, weights and weights["path"])
    report = {"preset": preset, "split": cfg.split, "dataset": cfg.data.dataset,
              "device": a.device, "batch": plan.batch, "preset_batch": cfg.train.batch_size,
              "mixed_precision": cfg.train.mixed_precision, "eval_mode": cfg.eval.mode,
              "crop": cfg.data.crop_size, "backbone": cfg.model.backbone, "steps": a.steps,
              "val_images": VAL_IMAGES, "overrides": list(a.overrides),
              "ok": all(s.status == PASS for s in book.stages),
              "methods": {m: method_numbers(book, m) for m in methods},
              "stages": [dataclasses.asdict(s) for s in book.stages],
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(plan.dir / "rehearse.json", report)
    failed = sum(s.status == FAIL for s in book.stages)
    log(f"{'ALL PASS' if report['ok'] else f'{failed} stage(s) FAILED'}; wrote "
        f"{plan.dir / 'rehearse.json'}")
    return report


def method_numbers(book: StageBook, method: str) -> dict[str, Any]:
    """Step time, memory and FLOPs of ``method`` from its stages' data."""
    got = {s.name: s.data for s in book.stages if s.method == method and s.status == PASS}
    fits = [got[n] for n in ("train", "resume") if n in got]
    steps, mems = [t for f in fits for t in f["intervals"]], [f["memory"] for f in fits]
    out: dict[str, Any] = {
        "stages": {s.name: s.status for s in book.stages if s.method == method},
        "seconds_per_step": statistics.median(steps) if steps else None,
        "step_samples": len(steps), "memory_what": mems[0]["what"] if mems else None,
        "peak_mb": max(m["peak_mb"] for m in mems) if mems else None,
        "reserved_mb": max((m.get("reserved_mb", 0) for m in mems), default=None)}
    if "flops" in got:
        out.update({k: got["flops"][k] for k in ("step_flops", "run_step_flops", "projection")})
        if out["seconds_per_step"]:
            out["achieved_tflops"] = out["run_step_flops"] / out["seconds_per_step"] / 1e12
    return out


def preset_methods(cfg: Config) -> list[str]:
    """The methods of a preset's table rows: supervised, its baseline (``mlcl.base``: UniMatch
    or UniMatch V2) and MLCL on it."""
    return ["supervised", cfg.mlcl.base, "mlcl"]


def cost_table(preset: str, a: argparse.Namespace, cells: list[str]) -> list[str]:
    """Markdown tables: what a whole run costs (one row per cell and method), then the
    estimated peak memory per GPU of each method (the same for every cell)."""
    rows, plan = [], make_plan(preset, a)
    methods = a.methods or preset_methods(plan.base)
    for cell in cells:
        cell_plan = make_plan(preset, argparse.Namespace(**{**vars(a), "overrides": [
            *a.overrides, f"split={cell}"]}))
        for m in methods:
            p = cell_cost(cell_plan, m, None)
            rows.append({"cell": cell, "method": m, "FLOPs / step / GPU":
                         human_flops(p["step_flops"]), "iterations": f"{p['iterations']:,} "
                         f"({p['epochs']} × {p['iters_per_epoch']:,})",
                         "full run": human_flops(p["total_flops"]),
                         "GPU-hours": f"{p['gpu_hours']:,.0f}",
                         "wall hours": f"{p['wall_hours']:,.1f} on {p['gpus']}"})
    return [*md_table(rows), "", *memory_table(plan, methods)]


def memory_table(plan: Plan, methods: list[str]) -> list[str]:
    """One row per method: parameters, the estimated peak per GPU (:func:`memory_estimate`)
    in bf16, or in the precision a ``train.mixed_precision`` override names, and whether it
    fits each card."""
    rows, b = [], plan.base
    given = dict(o.split("=", 1) for o in plan.a.overrides if "=" in o)
    precision = given.get("train.mixed_precision", "bf16")
    for m in methods:
        est = memory_estimate(plan, m, precision)
        rows.append({"method": m, "parameters": f"{est['parameters'] / 1e6:.1f} M",
                     "peak GiB / GPU": f"{est['gib']:.1f}",
                     **{f"fits {k}": "yes" if ok else "no" for k, ok in est["fits"].items()}})
    label = {"no": "fp32"}.get(precision, precision)
    return [f"peak memory per GPU in {label} (estimate, no GPU used): {b.model.backbone}, "
            f"crop {b.data.crop_size}, batch {b.train.batch_size} per GPU on "
            f"{plan.a.gpus or reference_run(b)[0]} GPUs", *md_table(rows)]

"""One rehearsal: a preset's own configuration, every stage, every method.

The configuration each stage runs is the preset's (with the user's overrides) and only these
keys changed: ``data.root`` (the fabricated dataset, or ``--data-root``), ``model.pretrained``
(the fabricated checkpoint, or ``--weights``), ``train.max_iters`` (the steps), ``output_dir``,
and, on a CPU, ``train.batch_size`` (2, said in the summary) and ``train.cpu``. On real data
the three split lists are cut to their first lines (so an epoch is the rehearsal's steps and
validation its few images) and written beside the runs; the projection of the whole run
counts the full lists.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mlcl.config import METHOD_NAMES, Config, ConfigError, load_config
from mlcl.data.datasets import ValDataset
from mlcl.engine import make_accelerator
from mlcl.evaluate import evaluate
from mlcl.files import atomic_write_json
from mlcl.model import build_backbone
from mlcl.study.predict import load_weights
from mlcl.prepare.pretrained import load_pretrained
from mlcl.prepare.verify import verify_dataset
from mlcl.rehearse import flops as F
from mlcl.rehearse.fabricate import (LAYOUT, fabricate_backbone, fabricate_dataset,
                                     weights_name)
from mlcl.rehearse.report import build_report
from mlcl.rehearse.stages import (MiB, PeakMemory, StageBook, StepProbe, expect,
                                  latest_checkpoint, median_or_nan)
from mlcl.train import fit

OUT_MARKER = ".mlcl-rehearse"  # an output folder holding it was made by a rehearsal
CPU_BATCH = 2  # the smallest batch ASPP's image-pooling batch norm and the CutMix roll allow
EVAL_IMAGE = {"pascal": (375, 500), "cityscapes": (1024, 2048)}  # (H, W) for the eval FLOPs
MIOU_TOLERANCE = 0.1  # points: last.pt re-evaluated vs training's evaluation (GPU kernels vary)
SPLIT_KEYS = ("labeled_split", "unlabeled_split", "val_split")


@dataclass
class Options:
    """What the command line sets (see ``python -m mlcl rehearse --help``)."""

    out: Path
    steps: int = 3
    val_images: int = 2
    batch: Optional[int] = None  # per process; None: the preset's on GPU, CPU_BATCH on CPU
    device: Optional[str] = None  # cpu | cuda; None: cuda when available
    data_root: Optional[str] = None
    weights: Optional[str] = None
    methods: tuple[str, ...] = METHOD_NAMES
    gpus: Optional[int] = None  # for the projection; None: the preset's (REFERENCE_GPUS)
    tflops: Optional[float] = None  # sustained TFLOP/s per GPU; None: DEFAULT_TFLOPS
    overrides: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """Options resolved against the preset."""

    preset: str
    base: Config  # the preset + the user's overrides
    opts: Options
    device: torch.device
    batch: int
    notes: list[str]

    @property
    def dir(self) -> Path:
        return self.opts.out / self.preset


def make_plan(preset: str, opts: Options) -> Plan:
    base = load_config(preset, opts.overrides)
    if base.data.dataset not in LAYOUT:
        raise ConfigError(f"preset '{preset}' is for data.dataset={base.data.dataset!r}; "
                          f"rehearsals are for the paper's datasets ({', '.join(LAYOUT)})")
    if not base.split:
        raise ConfigError(f"preset '{preset}' has no split cell; rehearse a preset that has "
                          f"(pascal, pascal_blended, pascal_blended_r101, cityscapes)")
    if opts.steps < 2:
        raise ConfigError("--steps: at least 2 (a step time needs two steps)")
    if opts.val_images < 1:
        raise ConfigError("--val-images: at least 1")
    name = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    preset_batch = base.train.batch_size
    batch = opts.batch or (preset_batch if name == "cuda" else min(CPU_BATCH, preset_batch))
    notes = []
    if batch != preset_batch:
        why = "on CPU" if name == "cpu" and not opts.batch else "by --batch"
        notes.append(f"batch {batch} per process {why}, not the preset's {preset_batch}")
    return Plan(preset, base, opts, torch.device(name), batch, notes)


def prepare_out(out: Path) -> None:
    """Create ``out``, or reuse it if a rehearsal made it; refuse a folder it did not make."""
    if out.exists() and any(out.iterdir()) and not (out / OUT_MARKER).is_file():
        raise ConfigError(f"--out {out}: the folder exists and was not made by `mlcl rehearse` "
                          f"(no {OUT_MARKER}); choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / OUT_MARKER).touch()


# --------------------------------------------------------------------------- data and weights
@dataclass
class Data:
    root: Path
    overrides: list[str]  # split lists replaced by their cut copies (real data only)
    unlabeled: int  # of the full cell, for the projection
    val: int
    fabricated: bool


def data_stage(plan: Plan) -> tuple[str, dict]:
    cfg, o = plan.base, plan.opts
    n_unl = o.steps * plan.batch
    if o.data_root:
        data = _cut_real_lists(plan, Path(o.data_root), n_unl)
    else:
        root = fabricate_dataset(cfg.data.dataset, o.out / "data" / cfg.data.dataset,
                                 labeled=plan.batch, unlabeled=n_unl, val=o.val_images)
        data = Data(root, [], *F.real_sizes(cfg), fabricated=True)
    # the cut copies (absolute), or the cell's own lists (relative to the root, as configured)
    lists = [v.split("=", 1)[1] for v in data.overrides] or [getattr(cfg.data, k)
                                                              for k in SPLIT_KEYS]
    report = verify_dataset(data.root, cfg.data.layout, lists, cfg.data.num_classes,
                            log=lambda msg: None, ignore_index=cfg.data.ignore_index)
    expect(report.ok, "verify: " + "; ".join(p for s in report.splits for p in s.problems[:3]))
    kind = "fabricated" if data.fabricated else "given"
    counts = ", ".join(f"{Path(s.path).name} {s.count}" for s in report.splits)
    return f"{kind} {data.root} verified ({counts})", {"data": data}


def _cut_real_lists(plan: Plan, root: Path, n_unl: int) -> Data:
    """Copies of the cell's lists cut to ``batch`` labeled, ``n_unl`` unlabeled and
    ``val_images`` val lines, in the rehearsal folder; the full counts for the projection."""
    cfg = load_config(plan.preset, [*plan.opts.overrides, f"data.root={root}"])
    want = {"labeled_split": plan.batch, "unlabeled_split": n_unl,
            "val_split": plan.opts.val_images}
    overrides, full = [], {}
    for key, n in want.items():
        src = cfg.split_path(key)
        expect(src.is_file(), f"data.{key}: {src} does not exist (is --data-root right?)")
        lines = [ln for ln in src.read_text().splitlines() if ln.split("#")[0].strip()]
        expect(len(lines) >= n, f"{src} lists {len(lines)} samples, the rehearsal needs {n}")
        dest = plan.dir / "lists" / src.name.replace(".txt", f"-{key}.txt")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text("".join(ln + "\n" for ln in lines[:n]))
        overrides.append(f"data.{key}={dest.resolve()}")
        full[key] = len(lines)
    return Data(root, overrides, full["unlabeled_split"], full["val_split"], fabricated=False)


def weights_stage(plan: Plan) -> tuple[str, dict]:
    m, o = plan.base.model, plan.opts
    if o.weights:
        path, kind = Path(o.weights), "given"
    else:
        path = fabricate_backbone(o.out / "pretrained" / weights_name(m.backbone, m.width),
                                  m.backbone, m.width)
        kind = "fabricated: real keys and shapes, random values"
    load_pretrained(build_backbone(m.backbone, m.width, m.output_stride),
                    dataclasses.replace(m, pretrained=str(path)))
    size = path.stat().st_size / MiB
    return (f"{path} ({size:.0f} MB, {kind}) loads strictly into {m.backbone}",
            {"path": str(path.resolve())})


# --------------------------------------------------------------------------- per method
def run_config(plan: Plan, method: str, data: Data, weights: str, iters: int) -> Config:
    """The preset's config for ``method`` with only the rehearsal's keys changed."""
    over = [*plan.opts.overrides, f"method={method}", f"data.root={data.root}",
            f"model.pretrained={weights}", f"train.max_iters={iters}",
            f"output_dir={(plan.dir / method).resolve()}", *data.overrides]
    if plan.batch != plan.base.train.batch_size:
        over.append(f"train.batch_size={plan.batch}")
    if plan.device.type == "cpu":
        over.append("train.cpu=true")
    return load_config(plan.preset, over)


def flops_stage(plan: Plan, method: str, data: Optional[Data],
                run_batch: bool = True) -> tuple[str, dict]:
    """FLOPs of a step at the preset's batch (and, with ``run_batch``, at the rehearsal's),
    of an evaluation, and of the whole run."""
    cfg = load_config(plan.preset, [*plan.opts.overrides, f"method={method}"])
    step = F.preset_step_flops(cfg)
    run_step = step if plan.batch == cfg.train.batch_size or not run_batch else \
        F.preset_step_flops(load_config(plan.preset, [*plan.opts.overrides, f"method={method}",
                                                      f"train.batch_size={plan.batch}"]))
    per_image = F.eval_flops(cfg, *EVAL_IMAGE[cfg.data.dataset])
    unl, val = (data.unlabeled, data.val) if data else F.real_sizes(cfg)
    gpus = plan.opts.gpus or F.REFERENCE_GPUS[cfg.data.dataset]
    tflops = plan.opts.tflops or F.default_tflops(cfg.data.dataset)
    proj = F.projection(F.schedule(cfg, unl, val, cfg.train.batch_size, gpus), step,
                        per_image, tflops)
    detail = (f"{F.human_flops(step)}/step at batch {cfg.train.batch_size}; full run "
              f"{F.human_flops(proj['total_flops'])} = {proj['gpu_hours']:.0f} GPU-h at "
              f"{tflops:g} TFLOP/s/GPU ({proj['wall_hours']:.1f} h on {gpus} GPUs)")
    return detail, {"step_flops": step, "run_step_flops": run_step, "projection": proj}


def fit_probed(cfg: Config, device: torch.device) -> tuple[dict, StepProbe, dict]:
    """``fit(cfg)`` with the step probe and the memory meter on."""
    meter = PeakMemory(device)
    meter.reset()
    with StepProbe(cfg.method, device) as probe:
        metrics = fit(cfg)
    return metrics, probe, meter.read()


def train_stage(cfg: Config, plan: Plan) -> tuple[str, dict]:
    n = plan.opts.steps
    metrics, probe, mem = fit_probed(cfg, plan.device)
    expect(probe.calls == n, f"the loop ran {probe.calls} steps, expected {n}")
    expect(metrics.get("iterations") == n,
           f"fit reports {metrics.get('iterations')} iterations, expected {n}")
    expect(all(map(_finite, probe.losses)), f"non-finite loss: {probe.losses}")
    expect(metrics.get("last_miou") is not None, "fit did not evaluate at the end of the run")
    return (f"{n} steps, loss {probe.losses[0]:.3f} -> {probe.losses[-1]:.3f}, "
            f"{median_or_nan(probe.intervals()):.2f} s/step, peak {mem['peak_mb']:.0f} MB",
            {"intervals": probe.intervals(), "cpu_intervals": probe.intervals(cpu=True),
             "memory": mem})


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def checkpoint_stage(cfg: Config) -> tuple[str, dict]:
    out = Path(cfg.output_dir)
    name = latest_checkpoint(out)
    sizes = []
    for f in ("best.pt", "last.pt"):
        load_weights(out / f)  # strict, as `mlcl evaluate` / `mlcl predict` load it
        sizes.append(f"{f} {(out / f).stat().st_size / MiB:.0f} MB")
    return f"checkpoints/LATEST -> {name}; {', '.join(sizes)} load strictly", {"latest": name}


def resume_stage(cfg: Config, plan: Plan, before: str) -> tuple[str, dict]:
    n = plan.opts.steps
    metrics, probe, mem = fit_probed(cfg, plan.device)
    expect(metrics.get("iterations") == 2 * n,
           f"fit reports {metrics.get('iterations')} iterations, expected {2 * n}")
    expect(probe.calls == n, f"the resumed run ran {probe.calls} steps, expected {n} "
                             f"({2 * n} would mean it started over)")
    after = latest_checkpoint(Path(cfg.output_dir))
    expect(after != before, f"checkpoints/LATEST still names {before}")
    return (f"from {before}: {n} more steps to {2 * n}, LATEST -> {after}, "
            f"{median_or_nan(probe.intervals()):.2f} s/step, peak {mem['peak_mb']:.0f} MB",
            {"intervals": probe.intervals(), "cpu_intervals": probe.intervals(cpu=True),
             "memory": mem, "metrics": metrics})


def evaluate_stage(cfg: Config, trained: dict, plan: Plan) -> tuple[str, dict]:
    """last.pt evaluated the way ``mlcl evaluate`` does it, against fit's last evaluation."""
    model, wcfg, _ = load_weights(Path(cfg.output_dir) / "last.pt")
    expect(wcfg.eval.mode == plan.base.eval.mode,
           f"last.pt evaluates in {wcfg.eval.mode!r}, the preset in {plan.base.eval.mode!r}")
    acc = make_accelerator(wcfg)
    result = evaluate(model.to(acc.device), ValDataset(wcfg, wcfg.split_path("val_split")),
                      wcfg, acc)
    expect(result["num_images"] == plan.opts.val_images,
           f"evaluated {result['num_images']} images, expected {plan.opts.val_images}")
    want = trained["last_miou"]
    expect(abs(result["miou"] - want) <= MIOU_TOLERANCE,
           f"mIoU {result['miou']:.3f} from last.pt, {want:.3f} in training's evaluation")
    n = result["num_images"]
    return (f"{wcfg.eval.mode} on {n} image{'s' * (n != 1)}: mIoU {result['miou']:.2f} = "
            f"training's {want:.2f}", {"miou": result["miou"]})


def rehearse_method(book: StageBook, plan: Plan, method: str, data: Optional[Data],
                    weights: Optional[str]) -> None:
    book.run("flops", method, lambda: flops_stage(plan, method, data))
    if data is None or weights is None:
        for name in ("train", "checkpoint", "resume", "evaluate"):
            book.skip(name, method, "needs " + " and ".join(
                n for n, ok in (("data", data), ("weights", weights)) if ok is None))
        return
    run_dir = plan.dir / method
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an earlier rehearsal's run (the folder carries OUT_MARKER)
    cfg = run_config(plan, method, data, weights, plan.opts.steps)
    book.run("train", method, lambda: train_stage(cfg, plan))
    ck = book.run("checkpoint", method, lambda: checkpoint_stage(cfg), (("train", method),))
    resumed = book.run("resume", method, lambda: resume_stage(
        run_config(plan, method, data, weights, 2 * plan.opts.steps), plan,
        ck["latest"] if ck else ""), (("checkpoint", method),))
    book.run("evaluate", method, lambda: evaluate_stage(cfg, resumed["metrics"], plan),
             (("resume", method),))


def rehearse(preset: str, opts: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every stage of ``preset`` for ``opts.methods``; the report (see report.build_report),
    also written to OUT/PRESET/rehearse.json."""
    plan = make_plan(preset, opts)
    prepare_out(opts.out)
    log(f"rehearsal of {preset} (split {plan.base.split}) on {plan.device.type}, batch "
        f"{plan.batch} per process, {opts.steps} steps then {opts.steps} resumed"
        + "".join(f"; {n}" for n in plan.notes))
    book = StageBook(preset, log)
    got = book.run("data", None, lambda: data_stage(plan))
    data = got["data"] if got else None
    got = book.run("weights", None, lambda: weights_stage(plan))
    weights = got["path"] if got else None
    for method in opts.methods:
        rehearse_method(book, plan, method, data, weights)
    report = build_report(plan, book)
    atomic_write_json(plan.dir / "rehearse.json", report)
    return report

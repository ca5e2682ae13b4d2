"""fit(cfg): the one training loop, for every method, on HuggingFace Accelerate (one or
several processes); resuming, stopping and output_dir's files: docs/clusters.md."""
from __future__ import annotations

import contextlib
import itertools
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from mlcl.checkpoints import Checkpoints, TrainerState, save_weights, schedule_settings
from mlcl.config import Config, ConfigError, config_changes, save_config
from mlcl.data import preflight
from mlcl.data.classes import class_names, reconcile_classes
from mlcl.data.datasets import build_datasets
from mlcl.engine import (EpochSums, backward_and_step, forward_terms, make_accelerator,
                         make_optimizer, poly_lr)
from mlcl.evaluate import evaluate
from mlcl.loaders import epoch_batches, prepare_loaders, train_loaders
from mlcl.methods import StepContext, make_bank, make_teacher
from mlcl.model import build_model
from mlcl.outputs import (RESULT_FILES, RUN_FILES, check_free_space, check_output_place,
                          git_commit, OutputLock, read_metrics, remove_fresh_output,
                          run_changes, save_progress, saved_config, write_metrics)
from mlcl.errors import RunDiverged, RunInterrupted, RunStopped
from mlcl.stopping import NonFiniteGuard, StopSignals


@dataclass
class Run:
    """Everything a training run holds, built by :func:`setup`."""

    cfg: Config
    acc: Accelerator
    out: Path
    model: Any
    optimizer: torch.optim.Optimizer
    bank: Any
    loaders: dict[str, Any]
    val_set: Any
    names: list[str]
    iters_per_epoch: int
    total_iters: int
    epochs: int
    created_out: bool
    ctx: StepContext
    ckpt: Checkpoints
    guard: NonFiniteGuard
    state: TrainerState = field(default_factory=TrainerState)
    sums: EpochSums = field(default_factory=EpochSums)
    last_checkpoint: Path | None = None
    bank_spread: float | None = None
    started: float = field(default_factory=time.time)
    lock: OutputLock | None = None  # output_dir held (main process)

    def steps_in(self, epoch: int) -> int:
        return min(self.iters_per_epoch, self.total_iters - epoch * self.iters_per_epoch)

    def elapsed(self) -> float:
        return time.time() - self.started


def fit(cfg: Config) -> dict[str, Any]:
    """Train ``cfg.method`` (resuming output_dir's checkpoint, if any); return metrics.json."""
    run = setup(cfg)
    try:
        with StopSignals(run.acc, on_abort=lambda: leave_at_once(run)) as stop, stop_status(run):
            for epoch in range(run.state.epoch, run.epochs):
                train_epoch(run, epoch, stop)
                end_of_epoch(run, epoch, stop)
        return finish(run)
    finally:
        if run.lock is not None:
            run.lock.release()


def setup(cfg: Config) -> Run:
    """Everything before the first step; bad input fails here, before output_dir changes
    (beyond the lock file of a folder that then stays, or the folder made for it)."""
    out = Path(cfg.output_dir)
    created = not out.exists()
    check_output_place(out)
    acc = make_accelerator(cfg, project_dir=out)
    lock = OutputLock(out) if acc.is_main_process else None
    try:
        return build_run(cfg, acc, out, created, lock)
    except BaseException:
        if lock is not None:
            lock.release(failed=True)
        raise


def build_run(cfg: Config, acc: Accelerator, out: Path, created: bool,
              lock: OutputLock | None) -> Run:
    """:func:`setup` once output_dir is held."""
    set_seed(cfg.seed, device_specific=True)
    reconcile_classes(cfg, acc.print)  # the data's classes.txt gives the classes
    check_same_run(out, cfg)
    sets, plain_loaders = training_data(cfg, acc)
    model, optimizer, bank, teacher = build_trainables(cfg, acc)
    check_free_space(out, acc.unwrap_model(model), cfg.train.optimizer)
    loaders = prepare_loaders(plain_loaders, acc)
    ipe, total, epochs = schedule(cfg, loaders)
    if cfg.train.compile:
        model = torch.compile(model)
    ctx = StepContext(cfg=cfg, bank=bank, accelerator=acc, total_iters=total, teacher=teacher)
    run = Run(cfg=cfg, acc=acc, out=out, model=model, optimizer=optimizer, bank=bank,
              loaders=loaders, val_set=sets["val"], names=class_names(cfg), iters_per_epoch=ipe,
              total_iters=total, epochs=epochs, created_out=created, ctx=ctx,
              ckpt=Checkpoints(out, acc, model), guard=NonFiniteGuard(acc.device), lock=lock)
    resume(run)
    commit = broadcast_object_list([git_commit() if acc.is_main_process else None])[0]  # main's
    if commit not in run.state.git_commits[-1:]:
        run.state.git_commits.append(commit)
    if acc.is_main_process:
        save_config(cfg, out / "config.yaml")  # creates out
    acc.wait_for_everyone()
    acc.init_trackers("tensorboard")
    save_progress(run, "running")
    return run


def training_data(cfg: Config, acc: Accelerator) -> tuple[dict[str, Any], dict[str, Any]]:
    """(datasets, their unprepared training loaders), after the pre-flight of the sets read."""
    sets = build_datasets(cfg, with_unlabeled=bool(cfg.data.unlabeled_split))
    if cfg.method != "supervised" and "unlabeled" not in sets:
        raise ConfigError(f"config key 'data.unlabeled_split': method={cfg.method} needs "
                          "an unlabeled split")
    loaders = train_loaders(sets, cfg)
    read = {id(loader.dataset) for loader in loaders.values()}
    preflight.check(cfg, {k: ds for k, ds in sets.items() if k == "val" or id(ds) in read}, acc)
    return sets, loaders


def build_trainables(cfg: Config, acc: Accelerator):
    """(prepared model, prepared optimiser, prototype bank or None, EMA teacher or None)."""
    with acc.main_process_first():  # model.pretrained: one download, the others read it
        model = build_model(cfg)
    if acc.num_processes > 1 and acc.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    bank = make_bank(cfg)
    model, optimizer = acc.prepare(model, optimizer)
    if bank is not None:
        bank.to(acc.device)
        acc.register_for_checkpointing(bank)
    teacher = make_teacher(cfg, acc.unwrap_model(model))
    if teacher is not None:
        acc.register_for_checkpointing(teacher)
    return model, optimizer, bank, teacher


def schedule(cfg: Config, loaders: dict[str, Any]) -> tuple[int, int, int]:
    """(iterations per epoch, total iterations, epochs), per process."""
    ipe = min(len(v) for v in loaders.values())
    if ipe == 0:
        name = min(loaders, key=lambda k: len(loaders[k]))
        images, procs = len(loaders[name].dataset), PartialState().num_processes
        raise ConfigError(f"config key 'train.batch_size': {cfg.train.batch_size} images per "
                          f"process, but the {'labeled' if name == 'x' else 'unlabeled'} set "
                          f"has {images} over {procs} process(es): give train.batch_size="
                          f"{max(1, images // procs)} or less, or more images")
    total = min(cfg.train.epochs * ipe, cfg.train.max_iters or cfg.train.epochs * ipe)
    return ipe, total, math.ceil(total / ipe)


def resume(run: Run) -> None:
    """Load output_dir's checkpoint, if any; a longer schedule goes to run.state.resumes."""
    path = run.ckpt.resume_point()
    if path is not None:
        # optimiser settings (lr, ...) from the configuration given now, its state from path
        settings = [{k: v for k, v in g.items() if k != "params"}
                    for g in run.optimizer.param_groups]
        run.state = run.ckpt.load(path, run.iters_per_epoch)
        for group, setting in zip(run.optimizer.param_groups, settings):
            group.update(setting)
        run.sums.restore(run.acc, run.state)
        run.started = time.time() - run.state.wall_time_s
        run.last_checkpoint = path
    now = schedule_settings(run.cfg)
    changes = config_changes(run.state.settings or saved_config(run.out) or {}, now, ignore=())
    check_continuation(run, path, changes)
    run.state.iters_per_epoch, run.state.settings = run.iters_per_epoch, now
    if path is None:
        return
    if changes:
        run.state.resumes.append({"iteration": run.state.iteration, "changes": changes})
    run.acc.print(f"resuming from {path} (iteration {run.state.iteration} of "
                  f"{run.total_iters}{'; changed: ' + '; '.join(changes) if changes else ''})")


def check_same_run(out: Path, cfg: Config) -> None:
    """Refuse an output_dir holding another run (run_changes), or a run's files but no config."""
    saved = saved_config(out)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if saved is None and found:
        raise ConfigError(f"output_dir {out} holds {', '.join(found)} but no config.yaml "
                          "(not a run of this program, or its config.yaml is gone): "
                          "choose another output_dir or delete those")
    changed = run_changes(saved, cfg.to_dict()) if saved is not None else []
    if changed:
        raise ConfigError(f"output_dir {out} holds a run with other settings "
                          f"({'; '.join(changed)}): choose another output_dir or delete it")


def check_continuation(run: Run, path: Path | None, changes: list[str]) -> None:
    """Refuse results without a checkpoint under ``changes``, a checkpoint past the schedule
    or ended mid-epoch, a complete run whose ``changes`` cannot grow it."""
    it, total, epoch = run.state.iteration, run.total_iters, run.state.epoch
    left = [name for name in RESULT_FILES if (run.out / name).exists()]
    if path is None and left and changes:
        raise ConfigError(f"output_dir {run.out} holds {', '.join(left)} of a run with other "
                          f"settings ({'; '.join(changes)}) and no checkpoint to continue: "
                          "choose another output_dir, or delete those files")
    if path is not None and it > total:
        raise ConfigError(f"checkpoint {path} is at iteration {it}, past the {total} iterations "
                          "train.epochs / train.max_iters now give: raise them back or choose "
                          "another output_dir")
    if path is not None and it < total and it < epoch * run.iters_per_epoch:
        raise ConfigError(f"checkpoint {path} ended epoch {epoch} early at iteration {it} "
                          "(train.max_iters): a run continues only from the end of a whole "
                          "epoch; keep train.max_iters, or choose another output_dir")
    if path is not None and changes and it >= total:
        raise ConfigError(f"output_dir {run.out} holds a complete run, which a changed setting "
                          f"cannot change ({'; '.join(changes)}): choose another output_dir, "
                          "or raise train.epochs / train.max_iters to continue it")


def live_bar() -> bool:
    """A progress bar on a terminal or in a notebook; plain lines when stderr is a file."""
    return sys.stderr.isatty() or any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)


def train_epoch(run: Run, epoch: int, stop: StopSignals) -> None:
    """The steps of ``epoch`` from where the run stands (mid-epoch after a resume)."""
    done = run.state.iteration - epoch * run.iters_per_epoch
    n = run.steps_in(epoch)
    run.model.train()
    batches = itertools.islice(epoch_batches(run.loaders, epoch, done, run.acc), n - done)
    with tqdm(total=n, initial=done, desc=f"epoch {epoch + 1}/{run.epochs}", leave=False,
              disable=not (run.acc.is_local_main_process and live_bar())) as bar:
        for batch in batches:
            terms = train_step(run, batch, epoch)
            bar.update()
            after_step(run, terms, bar, stop)


def train_step(run: Run, batch: dict[str, Any], epoch: int) -> dict[str, torch.Tensor]:
    """One optimiser step on ``batch`` ({'x', 'u', 'mix'?}); its loss terms (0-d tensors)."""
    ctx, t = run.ctx, run.cfg.train
    ctx.iteration, ctx.epoch = run.state.iteration, epoch
    poly_lr(run.optimizer, ctx.iteration, run.total_iters, t.poly_power, t.lr_lag)
    terms = forward_terms(run.model, batch, ctx)
    backward_and_step(run.model, run.optimizer, terms, ctx, run.guard)
    run.state.iteration += 1
    run.sums.add(terms)
    return terms


def after_step(run: Run, terms: dict[str, Any], bar, stop: StopSignals) -> None:
    """Every log_every steps: the guard, the tracker, progress.json; then stop or checkpoint."""
    it, t = run.state.iteration, run.cfg.train
    if it % t.log_every == 0:
        check_finite(run, stop)
        values = {f"train/{k}": float(v.detach()) for k, v in terms.items()
                  if torch.is_tensor(v) and v.dim() == 0}
        run.acc.log({**values, "train/lr": run.optimizer.param_groups[0]["lr"]}, step=it)
        if "loss" in run.sums.values:  # the epoch's running mean over its steps so far
            loss = float(run.sums.values["loss"]) / ((it - 1) % run.iters_per_epoch + 1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if bar.disable:  # no bar (stderr is a file, or not the main process): a plain line
                run.acc.print(f"iteration {it}/{run.total_iters}: loss {loss:.4f} (epoch mean)")
        save_progress(run, "running")
    if stop.poll():
        interrupt(run, stop)
    epoch_end = it % run.iters_per_epoch == 0 or it == run.total_iters  # end_of_epoch saves
    if t.checkpoint_every and it % t.checkpoint_every == 0 and not epoch_end:
        save_checkpoint(run)


def end_of_epoch(run: Run, epoch: int, stop: StopSignals) -> None:
    """Evaluate (then best.pt, last.pt), checkpoint, write metrics.json and progress.json."""
    check_finite(run, stop)
    if stop.poll():  # before a possibly long evaluation
        interrupt(run, stop)
    s, acc, done = run.state, run.acc, epoch + 1
    record = {"epoch": done, "iteration": s.iteration, **run.sums.means(acc, run.steps_in(epoch))}
    if done == run.epochs or done % run.cfg.train.eval_every == 0:
        result = evaluate(run.model, run.val_set, run.cfg, acc)
        teacher = run.ctx.teacher
        if teacher is not None:  # the teacher is UniMatch V2's model; the student's beside it
            record["miou_student"] = result["miou"]
            result = evaluate(teacher, run.val_set, run.cfg, acc)
        record["miou"], record["iou"] = result["miou"], result["iou"]
        acc.print(f"epoch {done}/{run.epochs}: loss {record.get('loss', 0):.4f} "
                  f"mIoU {result['miou']:.2f}")
        kept = ["last.pt"]
        if result["miou"] > s.best_miou:
            s.best_miou, s.best_epoch = result["miou"], done
            kept.insert(0, "best.pt")
        net = (teacher.net if teacher is not None  # keys without _orig_mod.
               else acc.unwrap_model(run.model, keep_torch_compile=False))
        for name in kept if acc.is_main_process else []:
            save_weights(run.out / name, net, run.cfg, run.names, done, result["miou"], run.bank)
    s.history.append(record)
    s.epoch = done
    run.sums = EpochSums()
    acc.log({f"epoch/{k}": v for k, v in record.items() if isinstance(v, float)}, step=s.iteration)
    if run.bank is not None:  # every process must hold the same bank; record the spread
        banks = acc.gather(run.bank.protos.unsqueeze(0))
        run.bank_spread = float((banks - banks[:1]).abs().max())
    save_checkpoint(run)
    status = "complete" if s.iteration >= run.total_iters else "running"
    write_metrics(run, status)
    save_progress(run, status)


def save_checkpoint(run: Run) -> Path:
    """A checkpoint of the run as it stands (after the guard: nothing non-finite is saved)."""
    check_finite(run)
    run.state.wall_time_s = run.elapsed()
    run.sums.save(run.acc, run.state)
    run.last_checkpoint = run.ckpt.save(run.state)
    return run.last_checkpoint


def check_finite(run: Run, stop: StopSignals | None = None) -> None:
    """RunDiverged after a non-finite term or norm; with ``stop``, share its requests (one sync)."""
    bad, stop_requested = run.guard.read(run.acc, stop is not None and stop.signum is not None)
    if stop is not None:  # the shared read, the same on every process
        stop.seen_shared |= stop_requested
    if bad is None:
        return
    it, names = bad
    kept = (f"the last checkpoint ({run.last_checkpoint}), best.pt and last.pt are from "
            "before it" if run.last_checkpoint else "no checkpoint was written")
    raise RunDiverged(
        f"training diverged: non-finite {', '.join(names)} at iteration {it + 1} (epoch "
        f"{it // run.iters_per_epoch + 1}); stopped without saving, {kept}; try a lower "
        "train.lr in a new output_dir")


def interrupt(run: Run, stop: StopSignals) -> None:
    """Checkpoint, then raise RunInterrupted (exit status 128 + the signal received)."""
    path = save_checkpoint(run)
    signum = stop.signum or int(signal.SIGTERM)  # SIGTERM when another process received it
    raise RunInterrupted(f"{signal.Signals(signum).name}: stopped at iteration "
                         f"{run.state.iteration} of {run.total_iters}; checkpoint {path}; run "
                         "the same command again to resume", signum)


@contextlib.contextmanager
def stop_status(run: Run) -> Iterator[None]:
    """Record why a run stopped early; remove the output_dir it made if it failed unsaved."""
    try:
        yield
    except BaseException as e:
        if isinstance(e, RunStopped):
            e.report = run.acc.is_main_process
        status = {RunInterrupted: "interrupted", RunDiverged: "diverged"}.get(type(e), "failed")
        fresh = run.created_out and status == "failed" and run.acc.is_main_process
        if not (fresh and remove_fresh_output(run.out, run.ckpt.root)):
            with contextlib.suppress(Exception):  # e.g. a full disk: keep the first error
                write_metrics(run, status, None if status == "interrupted" else str(e))
                save_progress(run, status)
        with contextlib.suppress(Exception):
            run.acc.end_training()
        raise


def leave_at_once(run: Run) -> None:
    """Before a second stop signal's exit: as :func:`stop_status`, without metrics.json."""
    if run.acc.is_main_process and not (run.created_out and
                                        remove_fresh_output(run.out, run.ckpt.root)):
        save_progress(run, "interrupted")


def finish(run: Run) -> dict[str, Any]:
    """The metrics of the finished run (re-read when it was already complete)."""
    metrics = read_metrics(run.out) if run.acc.is_main_process else None
    if metrics is None or not metrics.get("complete"):
        metrics = write_metrics(run, "complete")
    save_progress(run, "complete")
    run.acc.wait_for_everyone()
    run.acc.end_training()
    return metrics

"""Runs you can trust: a killed, pre-empted or interrupted run started again with the same
command ends bitwise equal to the same run left alone (weights, optimiser state, prototype
bank, RNG states, per-epoch history, metrics, best.pt / last.pt); a diverging run stops
without touching what it wrote before; bad output places are refused before any work.

Every run here: synthetic 1_8 (42 unlabeled images, batch 4: 10 steps per epoch), 2 epochs,
a checkpoint every 3 steps, so a run killed after its first checkpoint resumes mid-epoch."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mlcl import outputs
from mlcl.study import registry, reproduce
from mlcl.__main__ import main
from mlcl.checkpoints import Checkpoints, CheckpointWriteError, TrainerState
from mlcl.config import ConfigError, load_config
from mlcl.errors import RunInterrupted
from mlcl.stopping import REPEAT_AFTER_S, NonFiniteGuard, StopSignals
from mlcl.train import fit

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ROOT = Path(__file__).resolve().parents[1]
RUN = ["data.crop_size=32", "split=1_8", "train.batch_size=4", "train.log_every=2",
       "model.width=8", "train.epochs=2", "train.checkpoint_every=3", "data.num_workers=0"]
IGNORED = ("wall_time_s", "output_dir", "git_commit", "files")  # differ by nature


def overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", f"output_dir={out}", *RUN, *extra]


def train_cli(root: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlcl", "train", "--config", "synthetic",
         *overrides(root, out, *extra)], env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended first:\n{proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def progress_at_least(out: Path, iteration: int):
    def check() -> bool:
        try:
            return json.loads((out / "progress.json").read_text())["iteration"] >= iteration
        except (OSError, ValueError, KeyError):
            return False
    return check


# --------------------------------------------------------------------------- equality
def latest(out: Path) -> Path:
    root = out / "checkpoints"
    return root / (root / "LATEST").read_text().strip()


def drop(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in IGNORED}


def equal(a, b) -> bool:
    """Bitwise equality of nested tensors / floats (NaN equals NaN: a class never seen)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b) or (a.is_floating_point() and bool(
            ((a == b) | (a.isnan() & b.isnan())).all()))
    if isinstance(a, np.ndarray):  # numpy's RNG state
        return np.array_equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def assert_same_run(a: Path, b: Path) -> None:
    """The final checkpoints, metrics and weights files of two output dirs are identical."""
    ca, cb = latest(a), latest(b)
    assert ca.name == cb.name
    parts = {"model": lambda c: load_file(c / "model.safetensors"),
             "trainer": lambda c: drop(json.loads((c / "trainer.json").read_text()))}
    for f in sorted(p.name for p in ca.iterdir()):
        if f.endswith((".bin", ".pkl", ".pt")):  # optimiser, bank, RNG states, buffers
            # files these tests wrote; the RNG states hold numpy's, which weights_only refuses
            parts[f] = lambda c, f=f: torch.load(c / f, weights_only=False)
    for name, read in parts.items():
        assert equal(read(ca), read(cb)), f"{name} differs"
    assert equal(drop(json.loads((a / "metrics.json").read_text())),
                 drop(json.loads((b / "metrics.json").read_text())))
    for w in ("best.pt", "last.pt"):
        assert equal(torch.load(a / w, weights_only=True)["model"],
                     torch.load(b / w, weights_only=True)["model"]), w


@pytest.fixture(scope="module")
def reference(synth_root, tmp_path_factory):
    """Uninterrupted runs, one per method, made on first use."""
    made: dict[str, Path] = {}

    def get(method: str, *extra: str) -> Path:
        key = " ".join((method, *extra))
        if key not in made:
            out = tmp_path_factory.mktemp("reference") / method
            fit(load_config("synthetic", overrides(synth_root, out, f"method={method}", *extra)))
            made[key] = out
        return made[key]
    return get


# --------------------------------------------------------------------------- kills
def test_sigkill_then_resume_equals_the_uninterrupted_run(synth_root, tmp_path, reference):
    out = tmp_path / "run"
    proc = train_cli(synth_root, out, "method=mlcl")
    wait_for(lambda: (out / "checkpoints" / "LATEST").is_file(), proc)
    proc.kill()  # SIGKILL: no handler runs, wherever the run was (a step, a checkpoint)
    proc.communicate()
    assert json.loads((latest(out) / "trainer.json").read_text())["iteration"] % 10, \
        "the kill should land in the first epoch, after a mid-epoch checkpoint"
    fit(load_config("synthetic", overrides(synth_root, out, "method=mlcl")))
    assert_same_run(reference("mlcl"), out)


def test_sigterm_mid_epoch_checkpoints_and_resumes_exactly(synth_root, tmp_path, reference,
                                                           monkeypatch):
    import mlcl.train

    out = tmp_path / "run"
    extra = ("method=unimatch", "train.checkpoint_every=0")  # no checkpoint but the signal's
    step = mlcl.train.train_step

    def noticed_during_step_4(run, batch, epoch):
        if run.state.iteration == 3:
            signal.raise_signal(signal.SIGTERM)  # the handler notes it; the step goes on
        return step(run, batch, epoch)

    monkeypatch.setattr(mlcl.train, "train_step", noticed_during_step_4)
    with pytest.raises(RunInterrupted) as e:
        fit(load_config("synthetic", overrides(synth_root, out, *extra)))
    monkeypatch.undo()
    assert e.value.exit_code == 128 + signal.SIGTERM
    message = str(e.value)
    assert message.startswith("SIGTERM: stopped at iteration 4 of 20") and "\n" not in message
    assert str(latest(out)) in message and "run the same command again" in message
    assert latest(out).name == "iter-00000004-epoch-0000"  # mid-epoch
    for f in ("metrics.json", "progress.json"):
        assert json.loads((out / f).read_text())["status"] == "interrupted"
    fit(load_config("synthetic", overrides(synth_root, out, *extra)))
    assert_same_run(reference("unimatch"), out)


@pytest.mark.parametrize("extra", [
    ("method=unimatch_v2",), ("method=mlcl", "mlcl.base=unimatch_v2"),
    ("method=mlcl", "mlcl.base=unimatch_v2", "model.backbone=vit_w64d4p8")])  # DPT on a ViT
def test_a_run_with_a_teacher_resumes_exactly_teacher_included(synth_root, tmp_path, reference,
                                                               monkeypatch, extra):
    """UniMatch V2 (and MLCL on it; on a ResNet and on DPT): the EMA teacher is in every
    checkpoint and a run stopped mid-epoch continues bitwise; best.pt / last.pt hold the
    teacher, not the model."""
    import mlcl.train

    out, step = tmp_path / "run", mlcl.train.train_step

    def noticed_during_step_5(run, batch, epoch):
        if run.state.iteration == 4:
            signal.raise_signal(signal.SIGTERM)
        return step(run, batch, epoch)

    monkeypatch.setattr(mlcl.train, "train_step", noticed_during_step_5)
    with pytest.raises(RunInterrupted):
        fit(load_config("synthetic", overrides(synth_root, out, *extra)))
    monkeypatch.undo()
    stopped = latest(out)
    assert stopped.name == "iter-00000005-epoch-0000"
    teachers = [torch.load(f, weights_only=False) for f in stopped.glob("custom_checkpoint_*.pkl")]
    teacher = next(t for t in teachers if any(k.startswith("net.") for k in t))
    model = load_file(stopped / "model.safetensors")
    assert teacher.keys() >= {f"net.{k}" for k in model}
    assert any(not torch.equal(teacher[f"net.{k}"], v) for k, v in model.items())  # an EMA
    fit(load_config("synthetic", overrides(synth_root, out, *extra)))
    ref = reference(extra[0].removeprefix("method="), *extra[1:])
    assert_same_run(ref, out)
    metrics = json.loads((ref / "metrics.json").read_text())
    assert all("miou_student" in e for e in metrics["epochs"]) and "best_miou_student" in metrics
    final = torch.load(latest(ref) / next(
        f.name for f in latest(ref).glob("custom_checkpoint_*.pkl")
        if any(k.startswith("net.") for k in torch.load(f, weights_only=False))),
        weights_only=False)
    last = torch.load(ref / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(last[k], final[f"net.{k}"]) for k in last)


def test_ctrl_c_twice_with_workers_then_resume_equals_the_uninterrupted_run(synth_root,
                                                                            tmp_path, reference):
    out = tmp_path / "run"
    # loader workers; a checkpoint every step, so the second signal often lands in a write
    extra = ("method=supervised", "data.num_workers=2", "train.checkpoint_every=1")
    proc = train_cli(synth_root, out, *extra)
    wait_for(lambda: (out / "checkpoints" / "LATEST").is_file(), proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(REPEAT_AFTER_S + 0.1)
    if proc.poll() is None:  # still finishing its step / checkpoint: now at once
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    # 130: stopped (at once, or cleanly before the second signal); killed by SIGINT: the
    # second one came while the finished process was exiting
    assert proc.returncode in (128 + signal.SIGINT, -signal.SIGINT), err[-2000:]
    fit(load_config("synthetic", overrides(synth_root, out, *extra)))
    assert_same_run(reference("supervised"), out)


def test_a_second_signal_exits_at_once_a_duplicate_does_not(monkeypatch):
    import mlcl.stopping

    exits, aborted = [], []
    monkeypatch.setattr(mlcl.stopping.os, "_exit", exits.append)
    now = [100.0]
    monkeypatch.setattr(mlcl.stopping.time, "monotonic", lambda: now[0])
    acc = type("Acc", (), {"is_main_process": True, "num_processes": 1})()
    stop = StopSignals(acc, on_abort=lambda: aborted.append(True))
    assert not stop.poll()
    stop.handle(signal.SIGTERM, None)
    assert stop.poll() and stop.signum == signal.SIGTERM and not exits
    now[0] += 0.01  # the scheduler's and the launcher's copies of one notice
    stop.handle(signal.SIGTERM, None)
    assert not exits and not aborted
    now[0] += REPEAT_AFTER_S
    stop.handle(signal.SIGINT, None)  # a second request: exit at once, after the clean-up
    assert exits == [128 + signal.SIGINT] and aborted == [True]


def test_several_processes_share_stop_requests_only_in_the_guards_read():
    """With two processes no step runs a collective for the stop request: poll() reads what
    the guard's read (every log_every steps, one gather) last saw of every process's request
    and non-finite terms."""
    class TwoProcesses:
        is_main_process, num_processes, gathers = True, 2, 0
        other = None  # the other process's row: stop request, first bad iteration, flags

        def gather(self, rows):
            self.gathers += 1
            return torch.cat([rows, self.other])

        def reduce(self, *args, **kwargs):
            raise AssertionError("a collective outside the guard's read")

    acc, guard = TwoProcesses(), NonFiniteGuard(torch.device("cpu"))
    stop = StopSignals(acc, on_abort=lambda: None)
    guard.observe(0, {"loss": torch.tensor(1.0)}, None)
    acc.other = torch.tensor([[1, -1, 0]])  # the other process was signalled; all finite
    assert not stop.poll() and stop.signum is None  # not seen before a shared read
    bad, anyone = guard.read(acc, stop.signum is not None)
    stop.seen_shared |= anyone  # as mlcl.train.check_finite records it
    assert bad is None and stop.poll() and acc.gathers == 1
    acc.other = torch.tensor([[0, 5, 1]])  # no request there; a non-finite loss at step 5
    assert guard.read(acc, stop.signum is not None) == ((5, ["loss"]), False)
    assert stop.poll()  # a request once seen stays


# --------------------------------------------------------------------------- other runs
def files_of(out: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_an_output_dir_of_another_run_is_refused_before_any_work(synth_root, tmp_path):
    out = tmp_path / "run"
    short = ("method=supervised", "train.max_iters=2")
    fit(load_config("synthetic", overrides(synth_root, out, *short)))
    before = files_of(out)
    with pytest.raises(ConfigError, match=r"other settings \(mlcl.use_dt: True -> False\): "
                                          "choose another output_dir") as e:
        fit(load_config("synthetic", overrides(synth_root, out, *short, "mlcl.use_dt=false")))
    assert str(out) in str(e.value) and "\n" not in str(e.value)
    # a longer train.max_iters cannot extend an epoch that the shorter one ended
    with pytest.raises(ConfigError, match="ended epoch 1 early at iteration 2"):
        fit(load_config("synthetic", overrides(synth_root, out, "method=supervised",
                                               "train.max_iters=4")))
    assert files_of(out) == before  # config.yaml still describes the run it holds
    foreign = tmp_path / "foreign"  # another program's results: no config.yaml of ours
    foreign.mkdir()
    for name in ("metrics.json", "best.pt"):
        (foreign / name).write_text("theirs")
    with pytest.raises(ConfigError, match="holds metrics.json, best.pt but no config.yaml"):
        fit(load_config("synthetic", overrides(synth_root, foreign, *short)))
    assert sorted(p.name for p in foreign.iterdir()) == ["best.pt", "metrics.json"]
    assert (foreign / "best.pt").read_text() == "theirs"
    theirs = tmp_path / "theirs"  # another program's config.yaml, no key in common with ours
    theirs.mkdir()
    (theirs / "config.yaml").write_text("lr: 0.1\nmodel: resnet\n")
    with pytest.raises(ConfigError, match="is not a run's configuration"):
        fit(load_config("synthetic", overrides(synth_root, theirs, *short)))
    assert (theirs / "config.yaml").read_text() == "lr: 0.1\nmodel: resnet\n"


def test_a_longer_run_records_what_changed_and_each_parts_commit(synth_root, tmp_path,
                                                                 monkeypatch, capsys):
    import mlcl.train

    out, calls = tmp_path / "run", []

    def checkout(name: str):
        return lambda: calls.append(name) or name

    monkeypatch.setattr(mlcl.train, "git_commit", checkout("aaa"))
    first = fit(load_config("synthetic", overrides(synth_root, out, "method=supervised",
                                                   "train.epochs=1")))
    assert first["git_commit"] == "aaa" and first["resumes"] == [] and calls == ["aaa"]
    monkeypatch.setattr(mlcl.train, "git_commit", checkout("bbb"))  # HEAD moved since
    capsys.readouterr()
    longer = ("method=supervised", "train.epochs=2")
    metrics = fit(load_config("synthetic", overrides(synth_root, out, *longer)))
    assert calls == ["aaa", "bbb"]  # read once per part, at its set-up
    changes = ["train.epochs: 1 -> 2"]
    assert metrics["complete"] and metrics["iterations"] == 20
    assert metrics["resumes"] == [{"iteration": 10, "changes": changes}]
    assert metrics["git_commit"] == ["aaa", "bbb"]
    assert json.loads((out / "metrics.json").read_text())["resumes"] == metrics["resumes"]
    assert f"changed: {'; '.join(changes)})" in capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]  # now in force
    assert saved["epochs"] == 2
    # not the run a fresh train with these settings makes: reproduce and tables say so
    said = [f"resumed at iteration 10 with {c}" for c in changes]
    cfg = load_config("synthetic", overrides(synth_root, out, *longer))
    assert reproduce.stored_changes(out, cfg) == said
    with pytest.raises(ValueError, match=re.escape(said[0])):
        registry.check_comparable([{"name": "run", "config": cfg.to_dict(), "metrics": metrics}])


def test_a_run_continues_only_with_its_own_settings_and_a_longer_schedule(synth_root, tmp_path):
    """The one rule of mlcl.outputs.run_changes: another lr or a shorter schedule is another
    run, refused before any file is touched."""
    out = tmp_path / "run"
    fit(load_config("synthetic", overrides(synth_root, out, "method=supervised",
                                           "train.epochs=2", "train.max_iters=15")))
    before = files_of(out)
    for changed, what in (("train.lr=0.0005", "train.lr: 0.001 -> 0.0005"),
                          ("train.epochs=1", "train.epochs: 2 -> 1 (a run may only grow"),
                          ("train.max_iters=12", "train.max_iters: 15 -> 12 (a run may")):
        cfg = load_config("synthetic", overrides(synth_root, out, "method=supervised",
                                                 "train.epochs=2", "train.max_iters=15",
                                                 changed))
        with pytest.raises(ConfigError, match=f"other settings \\({re.escape(what)}"):
            fit(cfg)
        assert reproduce.stored_changes(out, cfg)[0].startswith(what)
    assert files_of(out) == before
    assert outputs.run_changes({"train": {"max_iters": 15}}, {"train": {"max_iters": 0}}) == []
    assert outputs.run_changes({"train": {"max_iters": 0}}, {"train": {"max_iters": 9}}) != []


def test_a_complete_run_is_not_relabelled_by_a_changed_setting(synth_root, tmp_path, capsys):
    """A complete run started again: the same settings give its stored result; a changed
    train.lr is another run, a schedule that adds no step is refused, and config.yaml still
    says what the result was made with."""
    out = tmp_path / "run"
    done = ("method=supervised", "train.max_iters=2")
    fit(load_config("synthetic", overrides(synth_root, out, *done)))
    stored = json.loads((out / "metrics.json").read_text())
    assert fit(load_config("synthetic", overrides(synth_root, out, *done))) == stored
    before = files_of(out)
    for changed, what in (("train.lr=0.5", "other settings (train.lr: 0.001 -> 0.5)"),
                          ("train.epochs=3", "holds a complete run, which a changed setting "
                           "cannot change (train.epochs: 2 -> 3)")):  # still 2 steps
        with pytest.raises(ConfigError, match=re.escape(what)):
            fit(load_config("synthetic", overrides(synth_root, out, *done, changed)))
    capsys.readouterr()
    assert main(["train", "--config", "synthetic",
                 *overrides(synth_root, out, *done, "train.epochs=3")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and str(out) in err[0] and "choose another output_dir" in err[0]
    assert files_of(out) == before
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 2
    # its checkpoints deleted by hand: a longer schedule would be a fresh run over its results
    shutil.rmtree(out / "checkpoints")
    before = files_of(out)
    with pytest.raises(ConfigError, match="holds metrics.json, best.pt, last.pt of a run with "
                       r"other settings \(train.epochs: 2 -> 3\) and no checkpoint"):
        fit(load_config("synthetic", overrides(synth_root, out, *done, "train.epochs=3")))
    assert files_of(out) == before
    assert fit(load_config("synthetic", overrides(synth_root, out, *done)))["complete"]


# --------------------------------------------------------------------------- divergence
def test_divergence_stops_without_touching_earlier_files(synth_root, tmp_path):
    out = tmp_path / "run"
    # an lr that one epoch survives and a longer schedule does not (here: in epoch 2 of 100)
    diverging = ("train.lr=5e4", "train.checkpoint_every=0")
    fit(load_config("synthetic", overrides(synth_root, out, "train.epochs=1", *diverging)))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()
              and p.suffix in (".pt", ".pkl", ".bin", ".safetensors") or p.name == "LATEST"}
    # continued, it diverges (no checkpoint_every: nothing may be written)
    proc = train_cli(synth_root, out, *diverging, "train.epochs=100")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3
    line = err.replace("\r", "\n").strip().splitlines()[-1]
    assert line.startswith("error: training diverged: non-finite")
    assert re.search(r"at iteration \d+ \(epoch ([2-9]|\d\d+)\)", line)
    assert "grad_norm" in line and "Traceback" not in err
    assert {p: p.read_bytes() for p in before} == before  # byte-identical
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and not metrics["complete"]
    assert metrics["error"] in line
    assert json.loads((out / "progress.json").read_text())["status"] == "diverged"


# --------------------------------------------------------------------------- bad places
def test_output_dir_that_is_a_file_or_unwritable_is_refused(synth_root, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for out, words in ((afile, "is a file"), (afile / "run", "lies under the file")):
        with pytest.raises(ConfigError, match=words) as e:
            fit(load_config("synthetic", overrides(synth_root, out)))
        assert str(out) in str(e.value)
    assert afile.read_text() == "mine"
    with read_only_folder(tmp_path / "ro") as ro:
        with pytest.raises(ConfigError, match="not writable") as e:
            fit(load_config("synthetic", overrides(synth_root, ro / "run")))
        assert str(ro / "run") in str(e.value) and not (ro / "run").exists()


class read_only_folder:
    """A folder the process cannot write to: chmod for users; for root (whom permissions do
    not stop) a read-only tmpfs, or skip where mounting is not allowed."""

    def __init__(self, path: Path):
        self.path, self.mounted = path, False

    def __enter__(self) -> Path:
        self.path.mkdir()
        if os.geteuid() != 0:
            self.path.chmod(0o555)
            return self.path
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs",
                           str(self.path)], capture_output=True).returncode != 0:
            pytest.skip("running as root without permission to mount a read-only tmpfs")
        self.mounted = True
        return self.path

    def __exit__(self, *exc) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=True)
        self.path.chmod(0o755)


def test_a_full_disk_is_refused_before_training(synth_root, tmp_path, monkeypatch):
    import mlcl.outputs

    out = tmp_path / "run"
    real = shutil.disk_usage
    monkeypatch.setattr(mlcl.outputs.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=2 * 2**20))
    with pytest.raises(ConfigError, match="2 MiB free") as e:
        fit(load_config("synthetic", overrides(synth_root, out)))
    assert str(out) in str(e.value) and not out.exists()


def test_broken_latest_and_truncated_folders_fall_back_or_say_what_to_delete(synth_root,
                                                                              tmp_path):
    out = tmp_path / "run"
    fit(load_config("synthetic", overrides(synth_root, out, "train.epochs=1")))
    good = latest(out)
    ckpt = Checkpoints(out, None, None)
    (out / "checkpoints" / "LATEST").write_bytes(b"\xff\x00garbage")
    assert ckpt.resume_point() == good
    newer = good.with_name("iter-00000013-epoch-0001")  # as if killed while writing it
    shutil.copytree(good, newer)
    weights = newer / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (out / "checkpoints" / "LATEST").write_text(newer.name + "\n")
    assert ckpt.resume_point() == good
    shutil.rmtree(good)
    with pytest.raises(ConfigError, match="no complete checkpoint") as e:
        ckpt.resume_point()
    assert f"delete {out / 'checkpoints'}" in str(e.value) and "model.safetensors" in str(e.value)


def test_a_run_failing_before_its_first_checkpoint_leaves_no_folder(synth_root, tmp_path,
                                                                    monkeypatch):
    import mlcl.train

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(mlcl.train, "train_step", broken)
    out = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError, match="boom"):
        fit(load_config("synthetic", overrides(synth_root, out)))
    assert not out.exists()
    mine = tmp_path / "mine"  # a folder the user made is kept, with the failure recorded
    mine.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        fit(load_config("synthetic", overrides(synth_root, mine)))
    assert json.loads((mine / "metrics.json").read_text())["status"] == "failed"


# --------------------------------------------------------------------------- two processes
def launch(root: Path, out: Path, *extra: str) -> subprocess.Popen:
    """`accelerate launch` of two CPU processes training into ``out``."""
    return subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
         "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "mlcl", "train", "--config", "synthetic", *overrides(root, out, *extra)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_stop_together_on_sigterm_and_resume_exactly(synth_root, tmp_path):
    extra = ("method=mlcl", "train.checkpoint_every=0")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = launch(synth_root, whole, *extra)
    printed, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert printed.count("wrote ") == 1 and printed.count('"best_miou"') == 1  # main only
    metrics = json.loads((whole / "metrics.json").read_text())
    # 42 unlabeled images / 2 processes / batch 4 -> 5 steps per process and epoch
    assert metrics["complete"] and metrics["num_processes"] == 2 and metrics["iterations"] == 10
    assert isinstance(metrics["git_commit"], str)  # the main process's, read once
    assert metrics["bank_spread_across_processes"] == 0.0  # one bank on both processes
    proc = launch(synth_root, cut, *extra)
    wait_for(progress_at_least(cut, 2), proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher, which passes it to both processes
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count("stopped at iteration") == 1, err[-3000:]  # the main process's line
    assert json.loads((cut / "metrics.json").read_text())["status"] == "interrupted"
    proc = launch(synth_root, cut, *extra)
    assert proc.wait(timeout=400) == 0, proc.communicate()[1][-3000:]
    assert_same_run(whole, cut)


@pytest.mark.slow
def test_a_failure_on_one_process_ends_both_with_the_same_line(synth_root, tmp_path):
    """A bad sample in process 1's share of the pre-flight, then a checkpoint write that
    fails on process 1 only: both processes raise the same error (neither waits for ever in
    a collective)."""
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    broken = data / "JPEGImages" / "val_000001.jpg"  # the 2nd sample: process 1's share
    broken.write_bytes(b"not a jpeg")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "two_process_agree.py"),
                               str(data), str(tmp_path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    try:
        for p in procs:
            out, _ = p.communicate(timeout=180)  # a process left waiting times out here
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            p.kill()
    said = {part: [(tmp_path / f"rank{r}-{part}.txt").read_text() for r in range(2)]
            for part in ("preflight", "checkpoint")}
    assert said["preflight"][0] == said["preflight"][1]
    assert said["preflight"][0].startswith(f"DataError: data pre-flight: cannot read image "
                                           f"{broken}")
    assert said["checkpoint"][0] == said["checkpoint"][1]
    assert said["checkpoint"][0].startswith("CheckpointWriteError: could not write checkpoint")
    assert "No space left on device" in said["checkpoint"][0]
    assert not (tmp_path / "run" / "checkpoints" / "LATEST").exists()


def test_a_checkpoint_write_failing_in_any_library_is_one_line(tmp_path, monkeypatch):
    """safetensors reports a full disk with its own exception class (not an OSError): the
    write is still abandoned with CheckpointWriteError, which every process would share."""
    from accelerate import Accelerator

    acc, model = Accelerator(cpu=True), torch.nn.Linear(2, 2)

    class SafetensorError(Exception):
        pass

    def full_disk(path, *a, **kw):
        Path(path).mkdir(parents=True, exist_ok=True)
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(acc, "save_state", full_disk)
    ckpt = Checkpoints(tmp_path, acc, model)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        ckpt.save(TrainerState(epoch=1, iteration=3, iters_per_epoch=3))
    assert not any((tmp_path / "checkpoints").glob("iter-*"))  # the half-written one removed

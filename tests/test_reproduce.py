"""Batch reproduction on tiny grids (mlcl.study.grids.build_grid monkeypatched): the papermill
executor runs the run notebook per cell and then the figures notebook, a failing run does
not stop the others and is reported, a finished grid trains nothing when run again; the CLI
executor likewise; the multi-process command; `make demo` on a tiny grid."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from mlcl.study import demo, grids, registry, reproduce
from mlcl.__main__ import build_parser, main
from mlcl.config import ConfigError, load_config
from mlcl.errors import RunInterrupted
from mlcl.files import atomic_write_text
from mlcl.study.grids import Run

TINY = ("data.crop_size=32", "train.batch_size=4", "model.width=16", "data.num_workers=0",
        "train.max_iters=2", "train.epochs=1")
OK = [Run("synthetic", "1_8", "supervised", 0), Run("synthetic", "1_8", "mlcl", 0)]
# a cell that fails in training (its validation split does not exist)
BAD = Run("synthetic", "1_8", "supervised", 7, overrides=("data.val_split=nope.txt",))


def snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}


def test_papermill_grid_failure_report_figures_and_rerun(synth_root, tmp_path, monkeypatch,
                                                          capsys):
    monkeypatch.setattr(grids, "build_grid", lambda name: [OK[0], BAD, OK[1]])
    figures = tmp_path / "figures"
    result = reproduce.reproduce("tiny", runs_root=tmp_path / "runs", jobs=2, figures_dir=figures,
                                 overrides=[f"data.root={synth_root}", *TINY])
    assert result["done"] == [r.name for r in OK]
    assert result["failed"] == [BAD.name] and result["skipped"] == []
    report = capsys.readouterr().out
    assert f"FAILED  {BAD.name}" in report and "failed:" in report.split("FAILED")[-1]
    cause = f"DataError: split file {synth_root / 'nope.txt'} does not exist"
    assert report.count(cause) == 2  # in the FAILED line and in the summary
    runs = tmp_path / "runs"
    for run in OK:  # executed notebook kept beside the run; the notebook recorded the run
        assert (runs / "cells" / run.name / "run.ipynb").is_file()
        entry = registry.load_entry(run.name, runs / "registry")
        assert entry["executor"] == "papermill" and entry["grid"] == "tiny"
        assert entry["notebook"] == str(runs / "cells" / run.name / "run.ipynb")
    # no checkpoint: no cell folder left; the executed notebook (with the error) beside the log
    assert not (runs / "cells" / BAD.name).exists()
    bad_nb = json.loads((runs / "cells" / f"{BAD.name}.ipynb").read_text())
    assert "nope.txt" in json.dumps(bad_nb["cells"])
    assert registry.load_entry(BAD.name, runs / "registry") is None
    assert result["figures"] and (figures / "table_I.csv").is_file()
    side = json.loads((figures / "curves_synthetic_1_8.json").read_text())
    assert set(side["runs"]) == {r.name for r in OK} and side["synthetic"]

    # the finished grid again: nothing trains, nothing is written
    monkeypatch.setattr(grids, "build_grid", lambda name: OK)
    before = snapshot(runs)
    again = reproduce.reproduce("tiny", runs_root=runs, jobs=2, figures=False,
                                overrides=[f"data.root={synth_root}", *TINY])
    assert again == {"done": [], "skipped": [r.name for r in OK], "failed": [], "interrupted": [],
                     "figures": []}
    assert snapshot(runs) == before


def test_cli_executor_records_and_goes_on(synth_root, tmp_path, monkeypatch):
    monkeypatch.setattr(grids, "build_grid", lambda name: [BAD, OK[0]])
    runs = tmp_path / "runs"
    result = reproduce.reproduce("tiny", runs_root=runs, executor="cli", figures=False,
                                 overrides=[f"data.root={synth_root}", *TINY])
    assert result["done"] == [OK[0].name] and result["failed"] == [BAD.name]
    entry = registry.load_entry(OK[0].name, runs / "registry")
    assert entry["executor"] == "cli" and entry["metrics"]["complete"]
    assert entry["run"]["method"] == "supervised" and entry["timings"]["iterations"] == 2
    # a complete run whose registry entry went missing is recorded again, not retrained
    (runs / "registry" / f"{OK[0].name}.json").unlink()
    mtime = (runs / "cells" / OK[0].name / "metrics.json").stat().st_mtime
    again = reproduce.reproduce("tiny", runs_root=runs, executor="cli", figures=False,
                                only="supervised-s0",
                                overrides=[f"data.root={synth_root}", *TINY])
    assert again["skipped"] == [OK[0].name]
    assert registry.load_entry(OK[0].name, runs / "registry")["metrics"]["complete"]
    assert (runs / "cells" / OK[0].name / "metrics.json").stat().st_mtime == mtime


def test_misspelt_override_fails_once_before_any_training(synth_root, tmp_path, monkeypatch,
                                                         capsys):
    monkeypatch.setattr(grids, "build_grid", lambda name: OK)
    rc = main(["reproduce", "--grid", "demo", "--runs", str(tmp_path / "runs"), "--no-figures",
               f"data.root={synth_root}", *TINY, "train.lrr=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown config key 'train.lrr'" in err[0]
    assert "every cell; nothing was trained" in err[0]
    assert not (tmp_path / "runs" / "cells").exists()


def test_a_missing_weights_file_fails_before_any_training(synth_root, tmp_path, monkeypatch,
                                                          capsys):
    """A cell whose model.pretrained file is missing (e.g. DINOv2-B's for the B cells of
    voc-v2, trained after all the S cells) stops the grid before the first cell trains."""
    weights = tmp_path / "pretrained/resnet18.pth"
    monkeypatch.setattr(grids, "build_grid", lambda name: [
        OK[0], Run("synthetic", "1_8", "unimatch", 0, overrides=(f"model.pretrained={weights}",))])
    rc = main(["reproduce", "--grid", "demo", "--runs", str(tmp_path / "runs"), "--no-figures",
               f"data.root={synth_root}", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{weights} does not exist" in err[0]
    assert "cell synthetic-1_8-unimatch-s0; nothing was trained" in err[0]
    assert not (tmp_path / "runs" / "cells").exists()


def test_changed_settings_refused_then_rerun(synth_root, tmp_path, monkeypatch):
    """A cell trained with other settings is never skipped as complete: refused (naming the
    keys) before anything trains, or trained again with --rerun-changed."""
    monkeypatch.setattr(grids, "build_grid", lambda name: OK[:1])
    runs, base = tmp_path / "runs", [f"data.root={synth_root}", *TINY]
    reproduce.reproduce("tiny", runs_root=runs, executor="cli", figures=False, overrides=base)
    cell = runs / "cells" / OK[0].name
    before = snapshot(runs)
    changed = [*base, "model.width=32", "train.lr=0.5"]
    with pytest.raises(ConfigError) as e:
        reproduce.reproduce("tiny", runs_root=runs, executor="cli", figures=False,
                            overrides=changed)
    assert "model.width: 16 -> 32" in str(e.value) and "train.lr: 0.001 -> 0.5" in str(e.value)
    assert snapshot(runs) == before
    again = reproduce.reproduce("tiny", runs_root=runs, executor="cli", figures=False,
                                overrides=changed, rerun_changed=True)
    assert again["done"] == [OK[0].name]
    entry = registry.load_entry(OK[0].name, runs / "registry")
    assert entry["config"]["model"]["width"] == 32
    old = [p for p in (runs / "cells").iterdir() if p.name.startswith(f"{cell.name}.replaced-")]
    assert len(old) == 1 and (old[0] / "metrics.json").is_file()  # the old run is kept


def test_a_moved_dataset_is_the_same_run_other_classes_are_not(tmp_path):
    """data.root is result-neutral (mlcl.config.RESULT_NEUTRAL) for reproduce as for the
    registry: moving the dataset keeps the cells; the data's classes are compared."""
    cfg = load_config("synthetic", ["data.root=/old/place/synthetic", *TINY])
    atomic_write_text(tmp_path / "config.yaml", yaml.safe_dump(cfg.to_dict()))
    moved = load_config("synthetic", ["data.root=/new/place/synthetic", *TINY])
    assert reproduce.stored_changes(tmp_path, moved) == []
    moved.data.class_names = [*moved.data.class_names[:-1], "other"]
    assert [c.split(":")[0] for c in reproduce.stored_changes(tmp_path, moved)] == \
        ["data.class_names"]


def test_commands_and_cli_flags():
    cmd = reproduce.train_command("cityscapes", ["split=1_8"], num_processes=4)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[cmd.index("mlcl") - 1:] == ["-m", "mlcl", "train", "--config", "cityscapes",
                                           "split=1_8"]
    assert reproduce.train_command("synthetic", [])[1:] == ["-m", "mlcl", "train", "--config",
                                                            "synthetic"]
    params = reproduce.run_parameters(Run("pascal", "183", "mlcl", 2, "released", "no_dt",
                                          ("mlcl.use_dt=false",)), Path("/o"), Path("/r"),
                                      ["data.root=D"], "voc-original", 2)
    assert params["overrides"] == ["mlcl.use_dt=false", "data.root=D"]
    assert (params["seed"], params["variant"], params["num_processes"]) == (2, "released", 2)
    args = build_parser().parse_args(["reproduce", "--grid", "demo", "--executor", "cli",
                                      "--jobs", "2", "--num-processes", "2", "--no-figures",
                                      "data.root=x"])
    assert (args.executor, args.jobs, args.num_processes, args.no_figures, args.overrides) == \
        ("cli", 2, 2, True, ["data.root=x"])
    assert build_parser().parse_args(["reproduce", "--grid", "demo"]).executor == "papermill"
    with pytest.raises(ValueError, match="executor"):
        reproduce.reproduce("demo", executor="bash", runs=[])


def test_seeds_replace_a_grids_seed_axis(tmp_path, monkeypatch, capsys):
    assert grids.parse_seeds("0-2,7,1") == (0, 1, 2, 7)
    assert build_parser().parse_args(["reproduce", "--grid", "demo", "--seeds", "3"]).seeds == (3,)
    for bad in ("2-1", "-1", "a", "0,,1"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["reproduce", "--grid", "demo", "--seeds", bad])
    err = capsys.readouterr().err.strip().splitlines()  # one line per bad value
    assert len(err) == 4 and all("argument --seeds: expected seeds" in e for e in err)
    assert "'0,,1'" in err[-1]
    grid = grids.build_grid("mix-partner")  # seeds 0-2, seed-major
    more = grids.with_seeds(grid, (0, 1, 2, 3, 4))
    assert more[:len(grid)] == grid and len(more) == 5 * len(grid) // 3
    assert [r.seed for r in more[len(grid):]] == [3] * 4 + [4] * 4
    assert {replace(r, seed=0) for r in more} == {replace(r, seed=0) for r in grid}
    started = []
    monkeypatch.setattr(reproduce, "check_cells", lambda *a: None)
    monkeypatch.setattr(reproduce.GridRunner, "one", lambda self, run: started.append(run.name))
    reproduce.reproduce("mix-partner", runs_root=tmp_path, seeds=(4,), only="unimatch",
                        figures=False)
    assert started == ["synthetic-1_16-unimatch-mix_roll-s4", "synthetic-1_16-unimatch-mix_same-s4"]


@pytest.mark.slow
def test_demo_docstring_names_the_demo_split():
    labeled, total = grids.DEMO_SPLIT.split("_")
    assert f"at {labeled}/{total} labels" in " ".join(demo.__doc__.split())


def test_demo_on_a_tiny_grid(synth_root, tmp_path, monkeypatch, capsys):
    """`python -m mlcl demo` end to end with the demo grid cut down to tiny runs."""
    data = tmp_path / "data"
    shutil.copytree(synth_root, data / "synthetic")
    monkeypatch.setenv("MLCL_DATA", str(data))
    monkeypatch.setenv("MLCL_FIGURES", str(tmp_path / "figures"))
    tiny = [Run("synthetic", "1_8", m, 0, overrides=TINY) for m in demo.DEMO_METHODS]
    monkeypatch.setattr(grids, "build_grid", lambda name: tiny)
    out = tmp_path / "demo"
    rc = build_parser().parse_args(["demo", "--out", str(out)])
    assert demo.run_demo(rc) == 0
    text = capsys.readouterr().out
    figs = tmp_path / "figures" / "demo"
    assert "SYNTHETIC" in text and str(figs) in text
    for run in tiny:
        best = registry.load_entry(run.name, out / "registry")["metrics"]["best_miou"]
        assert f"{best:9.2f}" in text
    for name in ("synthetic_study_bars.png", "qualitative.png", "curves_synthetic_1_8.png",
                 "perturbations_paper.png", "sai_response.png", "embedding.png",
                 "prototypes.png", "compactness_bars.png", "table_I.csv", "figures.json"):
        assert (figs / name).is_file(), name
    for name in ("prototypes", "perturbations", "figures"):  # always all four notebooks
        assert f"done    {name} notebook" in text
        assert (out / "notebooks" / f"{name}-demo.ipynb").is_file()
    assert f"python -m mlcl evaluate --checkpoint {out / 'cells' / tiny[2].name / 'best.pt'}" in text
    progress = json.loads((out / "cells" / tiny[2].name / "progress.json").read_text())
    assert progress["status"] == "complete" and progress["iteration"] == progress["total_iters"] == 2


@pytest.mark.slow
def test_train_with_two_processes_streams_and_returns_metrics(synth_root, tmp_path, capfd):
    """num_processes > 1 (the run notebook's multi-GPU path) through `accelerate launch`,
    here two CPU processes."""
    out = tmp_path / "two"
    metrics = reproduce.train_run("synthetic", [f"data.root={synth_root}", "split=1_8",
                                            f"output_dir={out}", *TINY], num_processes=2)
    assert metrics["complete"] and metrics["num_processes"] == 2
    assert "mIoU" in capfd.readouterr().out  # the launched run's output is streamed


def test_a_stop_signal_stops_the_grid_and_the_same_call_resumes_it(synth_root, tmp_path,
                                                                   monkeypatch):
    """SIGTERM to `reproduce` reaches the running training, which checkpoints and exits; no
    other run starts; the same call then resumes that run and trains the rest."""
    long = ("train.max_iters=0", "train.epochs=3", "train.checkpoint_every=1")
    runs = [Run("synthetic", "1_8", "supervised", s, overrides=long) for s in (0, 1)]
    monkeypatch.setattr(grids, "build_grid", lambda name: runs)
    root = tmp_path / "runs"
    first = root / "cells" / runs[0].name
    call = dict(runs_root=root, executor="cli", figures=False,
                overrides=[f"data.root={synth_root}", *TINY[:4]])

    def stop_when_it_has_a_checkpoint():
        deadline = time.time() + 300
        while not (first / "checkpoints" / "LATEST").is_file() and time.time() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_it_has_a_checkpoint, daemon=True).start()
    result = reproduce.reproduce("tiny", **call)
    assert result["interrupted"] == [runs[0].name] and result["signal"] == ["SIGTERM"]
    assert not result["done"] and not result["failed"]
    assert not (root / "cells" / runs[1].name).exists()  # never started
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    with pytest.raises(RunInterrupted, match=r"^SIGTERM: grid tiny stopped; 1 run\(s\) kept a "
                                              "checkpoint, 0 finished: run the same command") as e:
        reproduce.raise_if_stopped(result, "grid tiny")  # what `reproduce` and `demo` exit with
    assert e.value.exit_code == 128 + signal.SIGTERM
    again = reproduce.reproduce("tiny", **call)
    assert again["done"] == [r.name for r in runs] and "signal" not in again
    assert "resuming from" in (root / "cells" / f"{runs[0].name}.log").read_text()

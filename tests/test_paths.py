"""mlcl.study.registry.resolve (relative paths work from any folder, e.g. a kernel in
notebooks/), the registry a reader picks, and `python -m mlcl figures` without any registry."""
from __future__ import annotations

from pathlib import Path

from mlcl.__main__ import main
from mlcl.config import Config
from mlcl.paths import REPO
from mlcl.study import registry
from mlcl.study.registry import find_registry, registry_dir


def test_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.txt").write_text("x")
    assert registry.resolve("mlcl/paths.py") == REPO / "mlcl" / "paths.py"  # from the root
    assert registry.resolve("here.txt") == Path("here.txt")  # the current folder wins
    assert registry.resolve(tmp_path / "x") == tmp_path / "x"  # absolute: as given
    assert registry.resolve("nowhere/best.pt") == Path("nowhere/best.pt")  # named as typed
    assert registry.resolve("nowhere/out", output=True) == REPO / "nowhere" / "out"
    assert registry.resolve("~/x") == Path.home() / "x"


def test_the_registry_that_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("MLCL_RUNS", str(tmp_path))
    study, demo = tmp_path / "registry", tmp_path / "demo" / "registry"
    assert registry.registry_dirs() == [study, demo]
    assert find_registry() == study == registry_dir()  # nothing yet: the study's
    demo.mkdir(parents=True)
    (demo / "synthetic-1_16-mlcl-paper-s0.json").write_text("{}")
    assert find_registry() == demo  # only the demo has run
    assert registry.figures_for(demo) == registry.figures_dir() / "demo"
    study.mkdir()
    (study / "pascal-183-mlcl-paper-s0.json").write_text("{}")
    assert find_registry() == study and registry.figures_for(study) == registry.figures_dir()
    assert find_registry(str(demo)) == demo
    assert registry.registry_dir() == study  # records always go to the study's


def test_figures_command_without_a_registry(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLCL_RUNS", str(tmp_path))
    assert main(["figures"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no results registry") and "make demo" in err[0]
    assert str(tmp_path / "demo" / "registry") in err[0]


def test_fix_data_root_takes_a_relative_root_from_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # e.g. a kernel in notebooks/: "mlcl" is not found from here
    cfg = Config()
    cfg.data.root = "mlcl"
    assert registry.fix_data_root(cfg).data.root == str(REPO / "mlcl")
    (tmp_path / "mlcl").mkdir()  # found from the current folder: kept as given
    cfg.data.root = "mlcl"
    assert registry.fix_data_root(cfg).data.root == "mlcl"

"""The environment is declared once: pyproject.toml names the libraries (the core's, and each
tool's as an extra), requirements.lock pins every one of them and their dependencies to an
exact version, and both `make install` and environment.yml install that lock."""
import re
import tomllib

import yaml

from mlcl import paths


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def locked() -> dict[str, str]:
    """requirements.lock as {name: version}."""
    pins = [line.split("==") for line in (paths.REPO / "requirements.lock").read_text().splitlines()
            if line and not line.startswith((" ", "#"))]
    assert all(len(pin) == 2 for pin in pins), pins  # every line an exact version
    return {_name(name): version for name, version in pins}


def test_the_lock_pins_every_declared_library():
    project = tomllib.loads((paths.REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = project["dependencies"] + [r for name, reqs in extras.items() if name != "all"
                                          for r in reqs]
    assert extras["all"] == [f"mlcl[{','.join(sorted(set(extras) - {'all', 'dev'}))}]"]
    lock = locked()
    assert {_name(r) for r in declared} <= lock.keys()
    assert "torch==2.14.1" in declared and lock["torch"] == "2.14.1"
    assert "torchvision==0.29.1" in declared and lock["torchvision"] == "0.29.1"


def test_make_install_and_environment_yml_install_the_lock():
    env = yaml.safe_load((paths.REPO / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == ["-r requirements.lock", "-e ."]
    assert "pip install --quiet -r requirements.lock" in (paths.REPO / "Makefile").read_text()


def test_ci_runs_make_test():
    assert "make test" in (paths.REPO / ".ci" / "run").read_text()

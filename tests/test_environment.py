"""pyproject.toml and environment.yml describe the same environment."""
import re
import tomllib

import yaml

from mlcl import paths


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((paths.REPO / "pyproject.toml").read_text())["project"]
    declared = {_name(r): r.replace(" ", "") for r in project["dependencies"]}
    declared.update({_name(r): r.replace(" ", "") for r in project["optional-dependencies"]["dev"]})
    env = yaml.safe_load((paths.REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-e")}
    assert listed.keys() == declared.keys()
    # pins agree too (torch / torchvision are pinned exactly)
    assert listed == declared
    assert declared["torch"] == "torch==2.14.1" and declared["torchvision"] == "torchvision==0.29.1"


def test_ci_runs_make_test():
    assert "make test" in (paths.REPO / ".ci" / "run").read_text()

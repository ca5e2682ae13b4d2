"""Backbone checkpoints: torchvision's into the hub cache (sha256-prefix checked), and the
deep-stem check (size, sha256 recorded on first sight, exact load)."""
from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch

from mlcl.model import build_backbone
from mlcl.prepare import cli
from mlcl.prepare.download import ChecksumError, PrepareError
from fakes import LocalServer
from mlcl.prepare.pretrained import check_checkpoint, fetch_torchvision


def quiet(msg):
    pass


@pytest.fixture
def server(monkeypatch, tmp_path):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with LocalServer() as srv:
        yield srv


def test_torchvision_weights_land_in_the_hub_cache(server, tmp_path):
    data = b"fake weights" * 100
    prefix = hashlib.sha256(data).hexdigest()[:8]
    url = server.add(f"/resnet50-{prefix}.pth", data)
    path = fetch_torchvision("resnet50", url=url, log=quiet, backoff=0)
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / f"resnet50-{prefix}.pth"
    assert path.read_bytes() == data


def test_torchvision_weights_with_a_wrong_hash_prefix_are_removed(server, tmp_path, capsys):
    url = server.add("/resnet101-deadbeef.pth", b"not the real file")
    assert cli.main(["pretrained", "--torchvision", "resnet101", "--url", url,
                     "--backoff", "0"]) == 1
    assert "deadbeef" in capsys.readouterr().err
    assert not list((tmp_path / "torch").rglob("resnet101-*"))


def small_deepstem(path, arch="resnet50_deepstem", width=8):
    torch.save(build_backbone(arch, width).state_dict(), path)
    return path


def check(path, arch="resnet50_deepstem"):
    return check_checkpoint(path, build_backbone(arch, width=8), arch, log=quiet)


def test_deepstem_check_records_then_enforces_the_sha256(tmp_path):
    ckpt = small_deepstem(tmp_path / "resnet50.pth")
    entry = check(ckpt)
    prov = json.loads((tmp_path / "PROVENANCE.json").read_text())
    assert prov["resnet50.pth"]["sha256"] == entry["sha256"] == hashlib.sha256(
        ckpt.read_bytes()).hexdigest()
    assert entry["checksum"] == "recorded on first check"
    assert entry["backbone"] == "resnet50_deepstem"
    check(ckpt)  # unchanged: fine
    small_deepstem(ckpt)  # a different file under the same name
    with pytest.raises(ChecksumError, match="differs from the one recorded"):
        check(ckpt)


def test_deepstem_check_refuses_a_checkpoint_of_another_backbone(tmp_path):
    ckpt = tmp_path / "resnet101.pth"
    buf = io.BytesIO()  # plain stem, ResNet-50 depth
    torch.save(build_backbone("resnet50", 8).state_dict(), buf)
    ckpt.write_bytes(buf.getvalue())
    with pytest.raises(PrepareError, match="does not load into resnet101_deepstem"):
        check(ckpt, "resnet101_deepstem")


def test_missing_deepstem_file_says_where_to_get_it(tmp_path, capsys):
    assert cli.main(["pretrained", "--check", str(tmp_path / "resnet50.pth")]) == 1
    err = capsys.readouterr().err
    assert "drive.google.com" in err and "resnet50" in err

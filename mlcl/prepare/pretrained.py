"""Backbone weights, in one place: where each file comes from, its download, its check, and
the strict load into a backbone (``model.pretrained``; :func:`mlcl.model.build_model` calls
:func:`load_pretrained`).

* ``model.pretrained: false``: random init (the only one).
* ``model.pretrained: true`` (plain ResNets): torchvision's IMAGENET1K_V1 files in the torch hub
  cache (``$TORCH_HOME/hub/checkpoints``, default ~/.cache/torch). Missing, they are downloaded
  by :func:`fetch_torchvision` with the project's :func:`mlcl.prepare.download.fetch`
  (resumable, retried, the sha256 prefix in the file name checked); torch.hub's own downloader
  is not used because it neither resumes nor retries.
* ``model.pretrained: pretrained/resnet50.pth`` (the presets; ``resnet101.pth`` for R101): the
  deep-stem checkpoints of UniMatch and the MLCL release, shared on Google Drive (links in
  :data:`DEEPSTEM_SOURCES`; they need a browser or ``gdown``). :func:`check_checkpoint` records
  their size and sha256 in ``pretrained/PROVENANCE.json`` on first sight (no official checksum
  is published), refuses a file that later changes, and loads it exactly as training does.

Anything that cannot be loaded exactly (missing file, missing or unexpected key, wrong shape)
is a :class:`PretrainedWeightsError` naming the file and the keys.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision import models as tvm

from mlcl.config import ConfigError, ModelConfig
from mlcl.errors import MlclError
from mlcl.files import atomic_write_json
from mlcl.prepare.download import (ChecksumError, Log, PrepareError, digests, fetch, human, now,
                                   read_marker, say)

DEEPSTEM_SOURCES = {
    "resnet50": "https://drive.google.com/file/d/1mqUrqFvTQ0k5QEotk4oiOFyP6B9dVZXS/view",
    "resnet101": "https://drive.google.com/file/d/1Rx0legsMolCWENpfvE2jUScT3ogalMO8/view",
}
DEFAULT_PATHS = {"resnet50": "pretrained/resnet50.pth", "resnet101": "pretrained/resnet101.pth"}
# file name -> sha256, where known (none published; see the module docstring)
KNOWN_SHA256: dict[str, str] = {}
# torchvision's ImageNet weights for ``model.pretrained: true``. IMAGENET1K_V1 (the original
# 76.1% ResNet-50) is what DeepLab-style segmentation code has used; V2 is a different recipe.
TORCHVISION_WEIGHTS = {
    "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": tvm.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": tvm.ResNet101_Weights.IMAGENET1K_V1,
}
DOWNLOAD_PROBE_TIMEOUT_S = 3.0  # at training start a download is tried only if the host answers


class PretrainedWeightsError(MlclError):
    """Pretrained weights could not be found or loaded exactly; the message says what to do."""


# --------------------------------------------------------------------------- torchvision files
def torchvision_file(arch: str) -> tuple[str, Path]:
    """(URL, hub-cache path) of torchvision's ImageNet weights for ``arch``."""
    if arch not in TORCHVISION_WEIGHTS:
        raise PrepareError(f"no torchvision ImageNet weights for {arch!r} "
                           f"(available: {', '.join(TORCHVISION_WEIGHTS)})")
    url = TORCHVISION_WEIGHTS[arch].url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def fetch_torchvision(arch: str, url: Optional[str] = None, log: Log = say, **fetch_kw) -> Path:
    """torchvision's ImageNet weights for ``arch`` into the torch hub cache; return the file.

    ``url`` replaces torchvision's (a mirror, or a test server); the file keeps the URL's
    name, whose ``-<hex>.`` part must prefix the file's sha256 (torch.hub's convention)."""
    real_url, path = torchvision_file(arch)
    url = url or real_url
    path = path.with_name(url.rsplit("/", 1)[-1])
    m = re.search(r"-([a-f0-9]{6,})\.", path.name)
    return fetch(url, path, sha256_prefix=m.group(1) if m else None, log=log, **fetch_kw)


def torchvision_weights(arch: str) -> Path:
    """The hub-cache file of ``arch``'s ImageNet weights, downloaded when the host answers at
    once (not under ``MLCL_OFFLINE``); otherwise a PretrainedWeightsError saying where to put it."""
    url, path = torchvision_file(arch)
    if path.is_file():
        return path
    try:
        if os.environ.get("MLCL_OFFLINE"):
            raise RuntimeError("downloads disabled by MLCL_OFFLINE")
        socket.create_connection((urlparse(url).hostname, 443),
                                 timeout=DOWNLOAD_PROBE_TIMEOUT_S).close()
        return fetch_torchvision(arch, retries=2)
    except Exception as e:  # offline, refused, checksum: all mean "put the file there yourself"
        raise PretrainedWeightsError(
            f"ImageNet weights for {arch} not found: put {path.name} at {path} (fetch it "
            f"from {url} on a connected machine); download failed: {type(e).__name__}: {e}"
        ) from e


# --------------------------------------------------------------------------- strict loading
def _state_dict_of(obj, path: Path) -> dict[str, Tensor]:
    """A plain state dict, or one nested under 'state_dict' / 'model'."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise PretrainedWeightsError(
            f"{path}: not a state dict (expected name -> tensor, or one under 'state_dict' "
            f"or 'model')")
    return obj


def _first(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a checkpoint file strictly into ``backbone``; only the classifier keys ``fc.*``
    are dropped. A missing file, a missing or unexpected key or a shape mismatch raises
    :class:`PretrainedWeightsError` naming the file and the keys.

    The keys are copied into a fresh dict, so the file's module-version metadata is not used:
    like any pre-1.0 checkpoint, a file without BN ``num_batches_tracked`` counters loads (the
    counters stay at their defaults); every weight and running statistic must be present.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise PretrainedWeightsError(f"model.pretrained: checkpoint file {path.resolve()} "
                                     f"does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with non-tensor objects ...
        raise PretrainedWeightsError(f"{path}: cannot be read as a weights-only checkpoint "
                                     f"({type(e).__name__}: {e})") from e
    state = {k: v for k, v in _state_dict_of(obj, path).items() if not k.startswith("fc.")}
    expected = backbone.state_dict()
    missing = {k for k in expected if k not in state and not k.endswith("num_batches_tracked")}
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        parts = [f"missing keys: {_first(missing)}"] if missing else []
        parts += [f"unexpected keys: {_first(unexpected)}"] if unexpected else []
        raise PretrainedWeightsError(
            f"{path} does not match the backbone ({'; '.join(parts)}); is it the checkpoint "
            f"of this model.backbone (and width 64)?")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
           for k, v in state.items() if v.shape != expected[k].shape]
    if bad:
        raise PretrainedWeightsError(f"{path}: shape mismatch: {_first(bad, 3)}")
    backbone.load_state_dict(state, strict=True)


def check_pretrained_config(m: ModelConfig) -> None:
    """The ``model.pretrained`` value makes sense for ``model.backbone`` / ``model.width``."""
    if m.pretrained is True:
        if m.backbone not in TORCHVISION_WEIGHTS:
            raise ConfigError(
                f"config key 'model.pretrained': true means torchvision's ImageNet weights, "
                f"which do not exist for the deep-stem {m.backbone}; give the checkpoint file "
                f"instead (UniMatch's pretrained/{m.backbone.removesuffix('_deepstem')}.pth): "
                f"model.pretrained=PATH")
        if m.width != 64:
            raise ConfigError(
                f"config key 'model.pretrained': true means torchvision's ImageNet weights, "
                f"which exist only for model.width=64 (got {m.width}); use width 64 or "
                f"pretrained=false")
    elif isinstance(m.pretrained, str) and not m.pretrained.strip():
        raise ConfigError("config key 'model.pretrained': empty path; give a checkpoint file, "
                          "true (torchvision ImageNet) or false (random init)")


def load_pretrained(backbone: nn.Module, m: ModelConfig) -> None:
    """Load what ``m.pretrained`` names into ``backbone`` (false: leave it as initialised)."""
    check_pretrained_config(m)
    if m.pretrained is True:
        load_backbone_weights(backbone, torchvision_weights(m.backbone))
    elif m.pretrained is not False:
        load_backbone_weights(backbone, m.pretrained)


# --------------------------------------------------------------------------- deep-stem files
def backbone_for(path: Path) -> str:
    """The deep-stem backbone a checkpoint's file name suggests (``resnet101.pth`` -> R101)."""
    return "resnet101_deepstem" if "101" in path.name else "resnet50_deepstem"


def check_checkpoint(path: str | Path, backbone: nn.Module, name: str, log: Log = say) -> dict:
    """Size, sha256 and an exact load into ``backbone`` (the ``name`` backbone, e.g. from
    :func:`mlcl.model.build_backbone`) of a deep-stem checkpoint; return what was recorded."""
    path = Path(path)
    arch = name.removesuffix("_deepstem")
    if not path.is_file():
        raise PrepareError(
            f"{path} does not exist. Download UniMatch's {arch} deep-stem ImageNet checkpoint "
            f"from {DEEPSTEM_SOURCES.get(arch, '(UniMatch README)')} (e.g. `pip install gdown; "
            f"gdown --fuzzy URL -O {path}`) and run this check again")
    info = {"bytes": path.stat().st_size, **digests(path)}
    log(f"[check] {path}: {human(info['bytes'])}, sha256 {info['sha256']}")
    known = KNOWN_SHA256.get(path.name)
    prov = read_marker(path.parent / "PROVENANCE.json") or {}
    recorded = prov.get(path.name, {}).get("sha256")
    if known and info["sha256"] != known:
        raise ChecksumError(f"{path}: sha256 {info['sha256']} is not the published {known}")
    if recorded and info["sha256"] != recorded:
        raise ChecksumError(f"{path}: sha256 {info['sha256']} differs from the one recorded on "
                            f"{prov[path.name].get('date')} ({recorded}); replace the file or "
                            f"delete its entry in {path.parent / 'PROVENANCE.json'}")
    try:
        load_backbone_weights(backbone, path)
    except PretrainedWeightsError as e:
        raise PrepareError(f"{path} does not load into {name}: {e}") from None
    entry = {"backbone": name, **info, "source": DEEPSTEM_SOURCES.get(arch),
             "checksum": "published" if known else "recorded on first check",
             "date": prov.get(path.name, {}).get("date") or now()}
    prov[path.name] = entry
    atomic_write_json(path.parent / "PROVENANCE.json", prov)
    log(f"[ok] {path} loads into {name} (every key and shape)")
    return entry

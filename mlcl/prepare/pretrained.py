"""Backbone weights: where each file comes from, its download and its check (the strict load
into a backbone, ``model.pretrained``, is :func:`mlcl.model.load_backbone_weights`).

* ``model.pretrained: false``: random init (the only one).
* ``model.pretrained: true`` (plain ResNets): torchvision's IMAGENET1K_V1 files in the torch hub
  cache (``$TORCH_HOME/hub/checkpoints``, default ~/.cache/torch), downloaded by
  :func:`fetch_torchvision` (``python -m mlcl data pretrained --torchvision ARCH``) with the
  project's :func:`mlcl.prepare.download.fetch` (resumable, retried, the sha256 prefix in the
  file name checked); torch.hub's own downloader is not used because it neither resumes nor
  retries.
* ``model.pretrained: pretrained/resnet50.pth`` (the presets; ``resnet101.pth`` for R101): the
  deep-stem checkpoints of UniMatch and the MLCL release, shared on Google Drive (links in
  :data:`DEEPSTEM_SOURCES`; they need a browser or ``gdown``). :func:`check_checkpoint` records
  their size and sha256 in ``pretrained/PROVENANCE.json`` on first sight (no official checksum
  is published), refuses a file that later changes, and loads it exactly as training does.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from torch import nn

from mlcl.config import ConfigError
from mlcl.errors import MlclError
from mlcl.files import atomic_write_json
from mlcl.model import TORCHVISION_WEIGHTS, imagenet_file, load_backbone_weights
from mlcl.prepare.download import (ChecksumError, Log, PrepareError, digests, fetch, human, now,
                                   read_marker, say)

DEEPSTEM_SOURCES = {
    "resnet50": "https://drive.google.com/file/d/1mqUrqFvTQ0k5QEotk4oiOFyP6B9dVZXS/view",
    "resnet101": "https://drive.google.com/file/d/1Rx0legsMolCWENpfvE2jUScT3ogalMO8/view",
}
DEFAULT_PATHS = {"resnet50": "pretrained/resnet50.pth", "resnet101": "pretrained/resnet101.pth"}
# file name -> sha256, where known (none published; see the module docstring)
KNOWN_SHA256: dict[str, str] = {}


class PretrainedWeightsError(MlclError):
    """Pretrained weights could not be found or loaded exactly; the message says what to do."""


# --------------------------------------------------------------------------- torchvision files
def torchvision_file(arch: str) -> tuple[str, Path]:
    """(URL, hub-cache path) of torchvision's ImageNet weights for ``arch``."""
    if arch not in TORCHVISION_WEIGHTS:
        raise PrepareError(f"no torchvision ImageNet weights for {arch!r} "
                           f"(available: {', '.join(TORCHVISION_WEIGHTS)})")
    return TORCHVISION_WEIGHTS[arch].url, imagenet_file(arch)


def fetch_torchvision(arch: str, url: Optional[str] = None, log: Log = say, **fetch_kw) -> Path:
    """torchvision's ImageNet weights for ``arch`` into the torch hub cache; return the file.

    ``url`` replaces torchvision's (a mirror, or a test server); the file keeps the URL's
    name, whose ``-<hex>.`` part must prefix the file's sha256 (torch.hub's convention)."""
    real_url, path = torchvision_file(arch)
    url = url or real_url
    path = path.with_name(url.rsplit("/", 1)[-1])
    m = re.search(r"-([a-f0-9]{6,})\.", path.name)
    return fetch(url, path, sha256_prefix=m.group(1) if m else None, log=log, **fetch_kw)


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
    except ConfigError as e:
        raise PrepareError(f"{path} does not load into {name}: {e}") from None
    entry = {"backbone": name, **info, "source": DEEPSTEM_SOURCES.get(arch),
             "checksum": "published" if known else "recorded on first check",
             "date": prov.get(path.name, {}).get("date") or now()}
    prov[path.name] = entry
    atomic_write_json(path.parent / "PROVENANCE.json", prov)
    log(f"[ok] {path} loads into {name} (every key and shape)")
    return entry

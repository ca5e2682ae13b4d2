"""ImageNet backbone checkpoints: torchvision's (downloadable) and UniMatch's deep-stem ones.

* ``model.pretrained: true`` (plain ResNet-50/101): torchvision's IMAGENET1K_V1 files, which
  :func:`fetch_torchvision` puts in the torch hub cache (``$TORCH_HOME/hub/checkpoints``,
  default ~/.cache/torch) where :mod:`mlcl.model` looks; the sha256 prefix in their file names
  is checked.
* ``model.pretrained: pretrained/resnet50.pth`` (the presets; ``resnet101.pth`` for R101):
  the deep-stem checkpoints that UniMatch and the MLCL release use. They are shared on Google
  Drive (links in :data:`DEEPSTEM_SOURCES`), which needs a browser or ``gdown``; place them
  at ``pretrained/`` under the directory you launch training from (the repo root) and run
  :func:`check_checkpoint`: it records size and sha256 in ``pretrained/PROVENANCE.json`` on
  first sight (no official checksum is published) and refuses a file that later changes, and
  it loads the file into the backbone exactly as training will (every key and shape).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from mlcl.prepare.download import (ChecksumError, Log, PrepareError, digests, fetch, human, now,
                                   say)

DEEPSTEM_SOURCES = {
    "resnet50": "https://drive.google.com/file/d/1mqUrqFvTQ0k5QEotk4oiOFyP6B9dVZXS/view",
    "resnet101": "https://drive.google.com/file/d/1Rx0legsMolCWENpfvE2jUScT3ogalMO8/view",
}
DEFAULT_PATHS = {"resnet50": "pretrained/resnet50.pth", "resnet101": "pretrained/resnet101.pth"}
# file name -> sha256, where known (none published; see the module docstring)
KNOWN_SHA256: dict[str, str] = {}


def fetch_torchvision(arch: str, url: Optional[str] = None, log: Log = say, **fetch_kw) -> Path:
    """torchvision's ImageNet weights for ``arch`` into the torch hub cache; return the file.

    ``url`` replaces torchvision's (a mirror, or a test server); the file keeps the URL's
    name, whose ``-<hex>.`` part must prefix the file's sha256 (torch.hub's convention)."""
    from mlcl.model import TORCHVISION_WEIGHTS, torchvision_weights_file

    if arch not in TORCHVISION_WEIGHTS:
        raise PrepareError(f"no torchvision ImageNet weights for {arch!r} "
                           f"(available: {', '.join(TORCHVISION_WEIGHTS)})")
    real_url, path = torchvision_weights_file(arch)
    url = url or real_url
    path = path.with_name(url.rsplit("/", 1)[-1])
    m = re.search(r"-([a-f0-9]{6,})\.", path.name)
    return fetch(url, path, sha256_prefix=m.group(1) if m else None, log=log, **fetch_kw)


def _provenance(folder: Path) -> dict:
    try:
        return json.loads((folder / "PROVENANCE.json").read_text())
    except (OSError, ValueError):
        return {}


def backbone_for(path: Path) -> str:
    return "resnet101_deepstem" if "101" in path.name else "resnet50_deepstem"


def check_checkpoint(path: str | Path, backbone: Optional[str] = None, width: int = 64,
                     log: Log = say) -> dict:
    """Size, sha256 and an exact load of a deep-stem checkpoint; return what was recorded."""
    from mlcl.files import atomic_write_json
    from mlcl.model import (BACKBONES, PretrainedWeightsError, ResNetBackbone,
                            load_backbone_weights)

    path = Path(path)
    backbone = backbone or backbone_for(path)
    arch = backbone.removesuffix("_deepstem")
    if not path.is_file():
        raise PrepareError(
            f"{path} does not exist. Download UniMatch's {arch} deep-stem ImageNet checkpoint "
            f"from {DEEPSTEM_SOURCES.get(arch, '(UniMatch README)')} (e.g. `pip install gdown; "
            f"gdown --fuzzy URL -O {path}`) and run this check again")
    info = {"bytes": path.stat().st_size, **digests(path)}
    log(f"[check] {path}: {human(info['bytes'])}, sha256 {info['sha256']}")
    known = KNOWN_SHA256.get(path.name)
    prov = _provenance(path.parent)
    recorded = prov.get(path.name, {}).get("sha256")
    if known and info["sha256"] != known:
        raise ChecksumError(f"{path}: sha256 {info['sha256']} is not the published {known}")
    if recorded and info["sha256"] != recorded:
        raise ChecksumError(f"{path}: sha256 {info['sha256']} differs from the one recorded on "
                            f"{prov[path.name].get('date')} ({recorded}); replace the file or "
                            f"delete its entry in {path.parent / 'PROVENANCE.json'}")
    if backbone not in BACKBONES:
        raise PrepareError(f"unknown backbone {backbone!r} (known: {', '.join(BACKBONES)})")
    block, layers, deep_stem = BACKBONES[backbone]
    try:
        load_backbone_weights(ResNetBackbone(block, layers, width, deep_stem, 16), path)
    except PretrainedWeightsError as e:
        raise PrepareError(f"{path} does not load into {backbone}: {e}") from None
    entry = {"backbone": backbone, **info, "source": DEEPSTEM_SOURCES.get(arch),
             "checksum": "published" if known else "recorded on first check",
             "date": prov.get(path.name, {}).get("date") or now()}
    prov[path.name] = entry
    atomic_write_json(path.parent / "PROVENANCE.json", prov)
    log(f"[ok] {path} loads into {backbone} (every key and shape)")
    return entry

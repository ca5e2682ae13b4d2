"""Backbone weights (docs/real_data.md): torchvision's ImageNet files into the torch hub cache
(resumed, retried); UniMatch's deep-stem checkpoints checked: sha256 recorded on first sight
(none is published) and a later change refused, and training's strict load."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from torch import nn

from mlcl.config import ConfigError
from mlcl.files import atomic_write_json
from mlcl.model import TORCHVISION_WEIGHTS, imagenet_file, load_backbone_weights
from mlcl.prepare.download import (ChecksumError, Log, PrepareError, digests, fetch, human, now,
                                   read_marker, say)

DEEPSTEM_SOURCES = {
    "resnet50": "https://drive.google.com/file/d/1mqUrqFvTQ0k5QEotk4oiOFyP6B9dVZXS/view",
    "resnet101": "https://drive.google.com/file/d/1Rx0legsMolCWENpfvE2jUScT3ogalMO8/view",
}
DEFAULT_PATHS = {"resnet50": "pretrained/resnet50.pth", "resnet101": "pretrained/resnet101.pth"}


def fetch_torchvision(arch: str, url: Optional[str] = None, log: Log = say, **fetch_kw) -> Path:
    """torchvision's ImageNet weights for ``arch`` (or ``url``'s, a mirror) into the torch hub
    cache, the ``-<hex>.`` of the file name prefixing its sha256 (torch.hub's rule)."""
    if arch not in TORCHVISION_WEIGHTS:
        raise PrepareError(f"no torchvision ImageNet weights for {arch!r} "
                           f"(available: {', '.join(TORCHVISION_WEIGHTS)})")
    url = url or TORCHVISION_WEIGHTS[arch].url
    path = imagenet_file(arch).with_name(url.rsplit("/", 1)[-1])
    m = re.search(r"-([a-f0-9]{6,})\.", path.name)
    return fetch(url, path, sha256_prefix=m.group(1) if m else None, log=log, **fetch_kw)


def check_checkpoint(path: str | Path, backbone: nn.Module, name: str, log: Log = say) -> dict:
    """Size, sha256 and an exact load into ``backbone`` (``name``); what was recorded."""
    path = Path(path)
    arch = name.removesuffix("_deepstem")
    if not path.is_file():
        raise PrepareError(
            f"{path} does not exist. Download UniMatch's {arch} deep-stem ImageNet checkpoint "
            f"from {DEEPSTEM_SOURCES.get(arch, '(UniMatch README)')} (e.g. `pip install gdown; "
            f"gdown --fuzzy URL -O {path}`) and run this check again")
    info = {"bytes": path.stat().st_size, **digests(path)}
    log(f"[check] {path}: {human(info['bytes'])}, sha256 {info['sha256']}")
    prov = read_marker(path.parent / "PROVENANCE.json") or {}
    recorded = prov.get(path.name, {}).get("sha256")
    if recorded and info["sha256"] != recorded:
        raise ChecksumError(f"{path}: sha256 {info['sha256']} differs from the one recorded on "
                            f"{prov[path.name].get('date')} ({recorded}); replace the file or "
                            f"delete its entry in {path.parent / 'PROVENANCE.json'}")
    try:
        load_backbone_weights(backbone, path)
    except ConfigError as e:
        raise PrepareError(f"{path} does not load into {name}: {e}") from None
    entry = {"backbone": name, **info, "source": DEEPSTEM_SOURCES.get(arch),
             "checksum": "recorded on first check",
             "date": prov.get(path.name, {}).get("date") or now()}
    prov[path.name] = entry
    atomic_write_json(path.parent / "PROVENANCE.json", prov)
    log(f"[ok] {path} loads into {name} (every key and shape)")
    return entry

"""Backbone weights (docs/real_data.md): torchvision's ImageNet files into the torch hub cache
and the official DINOv2 files to ``pretrained/`` (resumed, retried); those and UniMatch's
deep-stem checkpoints checked: sha256 recorded on first sight (none is published) and a later
change refused, and training's strict load."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from torch import nn

from mlcl.config import ConfigError, load_config
from mlcl.files import atomic_write_json
from mlcl.model import (DINOV2, TORCHVISION_WEIGHTS, build_backbone, build_model, dinov2_url,
                        imagenet_file, load_backbone_weights)
from mlcl.prepare.download import (ChecksumError, Log, PrepareError, digests, fetch, human, now,
                                   read_marker, say)

DEEPSTEM_SOURCES = {
    "resnet50": "https://drive.google.com/file/d/1mqUrqFvTQ0k5QEotk4oiOFyP6B9dVZXS/view",
    "resnet101": "https://drive.google.com/file/d/1Rx0legsMolCWENpfvE2jUScT3ogalMO8/view",
}
# where the presets look (model.pretrained); DINOv2's named as UniMatch V2's README names them
DEFAULT_PATHS = {"resnet50": "pretrained/resnet50.pth", "resnet101": "pretrained/resnet101.pth",
                 "dinov2_s": "pretrained/dinov2_small.pth",
                 "dinov2_b": "pretrained/dinov2_base.pth",
                 "dinov2_l": "pretrained/dinov2_large.pth"}


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


def fetch_dinov2(arch: str, url: Optional[str] = None, log: Log = say, **fetch_kw) -> dict:
    """The official DINOv2 checkpoint of ``arch`` (or ``url``'s, a mirror) to its
    :data:`DEFAULT_PATHS` entry (the V2 presets' model.pretrained), then
    :func:`check_checkpoint`'s record of it."""
    if arch not in DINOV2:
        raise PrepareError(f"no DINOv2 checkpoint for {arch!r} (available: {', '.join(DINOV2)})")
    dest = Path(DEFAULT_PATHS[arch])
    fetch(url or dinov2_url(arch), dest, log=log, **fetch_kw)
    return check_checkpoint(dest, fresh_backbone(arch), arch, log=log)


def fresh_backbone(name: str) -> nn.Module:
    """The randomly initialised encoder ``name`` as training builds it: a ResNet backbone, or
    the DINOv2 (timm) ``backbone`` of the V2 presets' DPT, whose keys a checkpoint must hold."""
    if name not in DINOV2:
        return build_backbone(name)
    cfg = load_config("pascal_v2", [f"model.backbone={name}", "model.pretrained=false"])
    return build_model(cfg).backbone


def published_at(name: str) -> Optional[str]:
    """Where the checkpoint of backbone ``name`` is published (None: not known)."""
    return dinov2_url(name) if name in DINOV2 else DEEPSTEM_SOURCES.get(
        name.removesuffix("_deepstem"))


def check_checkpoint(path: str | Path, backbone: nn.Module, name: str, log: Log = say) -> dict:
    """Size, sha256 and an exact load into ``backbone`` (``name``); what was recorded."""
    path = Path(path)
    arch = name.removesuffix("_deepstem")
    if not path.is_file() and name in DINOV2:
        raise PrepareError(f"{path} does not exist: `python -m mlcl data pretrained --dinov2 "
                           f"{name}` downloads it from {dinov2_url(name)}")
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
    entry = {"backbone": name, **info, "source": published_at(name),
             "checksum": "recorded on first check",
             "date": prov.get(path.name, {}).get("date") or now()}
    prov[path.name] = entry
    atomic_write_json(path.parent / "PROVENANCE.json", prov)
    log(f"[ok] {path} loads into {name} (every key and shape)")
    return entry

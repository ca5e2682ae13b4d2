"""DeepLabV3+ on a ResNet, split into ``encode`` (x -> F) and ``decode`` (the 1x1 classifier,
F -> logits) as MLCL needs it (docs/method.md, "Model: encoder and decoder"); parameter names
are torchvision's (deep stem: UniMatch's), so ImageNet checkpoints load strictly."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from mlcl.config import Config, ConfigError, ModelConfig

# name -> (block, blocks per stage, deep stem)
BACKBONES: dict[str, tuple[type[nn.Module], tuple[int, int, int, int], bool]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), False), "resnet34": (BasicBlock, (3, 4, 6, 3), False),
    "resnet50": (Bottleneck, (3, 4, 6, 3), False), "resnet101": (Bottleneck, (3, 4, 23, 3), False),
    "resnet50_deepstem": (Bottleneck, (3, 4, 6, 3), True),
    "resnet101_deepstem": (Bottleneck, (3, 4, 23, 3), True)}
# ``model.pretrained: true``: IMAGENET1K_V1 (the original 76.1% ResNet-50), as DeepLab code uses
TORCHVISION_WEIGHTS = {f"resnet{n}": getattr(tvm, f"ResNet{n}_Weights").IMAGENET1K_V1
                       for n in (18, 34, 50, 101)}


class SegOutput(NamedTuple):
    """What ``forward`` returns when asked for more than the logits (B, K, H, W)."""

    logits: Tensor
    logits_fp: Optional[Tensor] = None  # (B, K, H, W) of the perturbed copy (fp=True)
    features: Optional[Tensor] = None  # F (B, C, H/4, W/4) (return_features=True)
    features_fp: Optional[Tensor] = None  # F of the perturbed copy (fp and return_features)


def upsample(t: Tensor, size) -> Tensor:
    """Bilinear resize of a (B, *, h, w) map to ``size`` (align_corners=True, as UniMatch)."""
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=True)


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1,
                 stride: int = 1) -> nn.Sequential:
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, pad, dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _make_stage(block, inplanes: int, planes: int, blocks: int, stride: int,
                dilation: int = 1) -> nn.Sequential:
    """One ResNet stage with torchvision's names; as its ``replace_stride_with_dilation``, the
    3×3 convs of all blocks but the first get ``dilation`` (set after: BasicBlock refuses it)."""
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(out, planes) for _ in range(1, blocks)]
    for b in layers[1:]:
        for m in b.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                m.dilation, m.padding = (dilation, dilation), (dilation, dilation)
    return nn.Sequential(*layers)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without avgpool/fc, returning (c1, c4), output stride 16 (layer4
    dilated 2); deep_stem: UniMatch's ResNet-C stem (3→w s2, w→w, w→2w, then ``bn1``)."""

    def __init__(self, block, layers, width: int = 64, deep_stem: bool = False):
        super().__init__()
        stem = 2 * width if deep_stem else width
        # deep stem: keys conv1.{0,1,3,4,6}.* and bn1.*, as UniMatch's checkpoint
        self.conv1 = (nn.Sequential(*conv_bn_relu(3, width, 3, stride=2),
                                    *conv_bn_relu(width, width, 3),
                                    nn.Conv2d(width, stem, 3, padding=1, bias=False))
                      if deep_stem else nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False))
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        e = block.expansion
        self.layer1 = _make_stage(block, stem, width, layers[0], 1)
        self.layer2 = _make_stage(block, width * e, width * 2, layers[1], 2)
        self.layer3 = _make_stage(block, width * 2 * e, width * 4, layers[2], 2)
        self.layer4 = _make_stage(block, width * 4 * e, width * 8, layers[3], 1, dilation=2)
        self.low_level_channels = width * e  # c1
        self.out_channels = width * 8 * e  # c4

        for m in self.modules():  # torchvision's ResNet init (batch norms: 1 and 0 already)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, stem, H/4, W/4)
        c1 = self.layer1(x)  # (B, w·e, H/4, W/4)
        c4 = self.layer4(self.layer3(self.layer2(c1)))  # (B, 8w·e, H/16, W/16)
        return c1, c4


class ASPP(nn.Module):
    """ASPP: 1×1, a 3×3 per dilation, image pooling (each BN+ReLU); concatenated, projected."""

    def __init__(self, in_channels: int, out_channels: int, dilations):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, out_channels, 1)]
            + [conv_bn_relu(in_channels, out_channels, 3, d) for d in dilations])
        # BN over a 1×1 map: training needs more than one image per batch (as in UniMatch)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, out_channels))
        self.project = conv_bn_relu((len(dilations) + 2) * out_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        pooled = upsample(self.pool(x), x.shape[-2:])  # (B, out, 1, 1) -> (B, out, h, w)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ split as the module docstring says; ASPP width: c4 channels // 8 (UniMatch)."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.backbone = build_backbone(cfg.backbone, cfg.width)
        high, low = self.backbone.out_channels, self.backbone.low_level_channels
        aspp_channels = max(high // 8, 1)
        self.aspp = ASPP(high, aspp_channels, cfg.aspp_dilations)
        self.reduce = conv_bn_relu(low, cfg.low_level_channels)
        self.fusion = nn.Sequential(
            conv_bn_relu(aspp_channels + cfg.low_level_channels, cfg.feature_channels, 3),
            conv_bn_relu(cfg.feature_channels, cfg.feature_channels, 3))
        self.classifier = nn.Conv2d(cfg.feature_channels, num_classes, 1)
        self.fp_dropout = nn.Dropout2d(cfg.fp_dropout)  # active in train mode only

    def fuse(self, c1: Tensor, c4: Tensor) -> Tensor:
        """F (B, C, H/4, W/4): ASPP(c4) upsampled, concatenated with reduce(c1), two 3×3 convs."""
        high = upsample(self.aspp(c4), c1.shape[-2:])  # (B, aspp, H/4, W/4)
        return self.fusion(torch.cat([self.reduce(c1), high], dim=1))  # (B, C, H/4, W/4)

    def encode(self, x: Tensor) -> Tensor:
        """The encoder of MLCL: x (B, 3, H, W) -> F (B, C, H/4, W/4)."""
        return self.fuse(*self.backbone(x))

    def decode(self, features: Tensor) -> Tensor:
        """The decoder of MLCL (the 1×1 classifier only): F (B, C, h, w) -> (B, K, h, w)."""
        return self.classifier(features)

    def forward(self, x: Tensor, fp: bool = False, return_features: bool = False):
        """Logits (B, K, H, W), or a :class:`SegOutput` when ``fp`` (UniMatch's feature
        perturbation: c1, c4 and their Dropout2d copy as one batch) or ``return_features``."""
        c1, c4 = self.backbone(x)
        if fp:
            c1 = torch.cat((c1, self.fp_dropout(c1)))  # (2B, ·, H/4, W/4)
            c4 = torch.cat((c4, self.fp_dropout(c4)))  # (2B, ·, H/16, W/16)
        feats = self.fuse(c1, c4)  # (B or 2B, C, H/4, W/4)
        logits = upsample(self.decode(feats), x.shape[-2:])  # (B or 2B, K, H, W)
        if not (fp or return_features):
            return logits
        out = SegOutput(*logits.chunk(2), *feats.chunk(2)) if fp else SegOutput(logits, None, feats)
        return out if return_features else out._replace(features=None, features_fp=None)

    def param_groups(self, lr: float, lr_multi: float) -> list[dict]:
        """Optimizer groups: the backbone at ``lr``, the rest (the head) at lr * lr_multi."""
        backbone = list(self.backbone.parameters())
        head = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        return [{"name": "backbone", "params": backbone, "lr": lr},
                {"name": "head", "params": head, "lr": lr * lr_multi}]


def build_backbone(name: str, width: int = 64) -> ResNetBackbone:
    """The ``name`` backbone of :data:`BACKBONES` (random init), e.g. to load a checkpoint into."""
    if name not in BACKBONES:
        raise ConfigError(f"config key 'model.backbone': {name!r} is not one of "
                          f"{', '.join(BACKBONES)}")
    if width < 1:
        raise ConfigError(f"config key 'model.width': must be positive, got {width}")
    block, layers, deep_stem = BACKBONES[name]
    return ResNetBackbone(block, layers, width, deep_stem)


def imagenet_file(arch: str) -> Path:
    """Where ``python -m mlcl data pretrained`` puts torchvision's weights for ``arch``."""
    name = TORCHVISION_WEIGHTS[arch].url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def pretrained_file(m: ModelConfig) -> Path | None:
    """The weights file ``model.pretrained`` names (None for false), checked early."""
    if m.pretrained is True:
        why = "true means torchvision's ImageNet weights, which"
        if m.backbone not in TORCHVISION_WEIGHTS:
            raise ConfigError(
                f"config key 'model.pretrained': {why} do not exist for the deep-stem "
                f"{m.backbone}; give the checkpoint file instead (UniMatch's pretrained/"
                f"{m.backbone.removesuffix('_deepstem')}.pth): model.pretrained=PATH")
        if m.width != 64:
            raise ConfigError(f"config key 'model.pretrained': {why} exist only for "
                              f"model.width=64 (got {m.width}); use width 64 or pretrained=false")
        path = imagenet_file(m.backbone)
        if not path.is_file():
            raise ConfigError(
                f"model.pretrained: true: torchvision's ImageNet weights for {m.backbone} are not "
                f"in the hub cache ({path}): run `python -m mlcl data pretrained --torchvision "
                f"{m.backbone}`, or put the file from {TORCHVISION_WEIGHTS[m.backbone].url} there")
        return path
    if isinstance(m.pretrained, str) and not m.pretrained.strip():
        raise ConfigError("config key 'model.pretrained': empty path; give a checkpoint file, "
                          "true (torchvision ImageNet) or false (random init)")
    return None if m.pretrained is False else Path(m.pretrained).expanduser()


def _first(keys, n: int = 5) -> str:
    """The first ``n`` of ``keys`` in order, and how many there are when more."""
    keys = sorted(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a state dict file (plain or under 'state_dict' / 'model') strictly into
    ``backbone``, less ``fc.*`` and the ``num_batches_tracked`` a file may lack."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.pretrained: checkpoint file {path.resolve()} does not exist "
                          f"(torchvision's ImageNet files: python -m mlcl data pretrained "
                          f"--torchvision ARCH)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with non-tensor objects ...
        raise ConfigError(f"model.pretrained: {path} cannot be read as a weights-only "
                          f"checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(f"model.pretrained: {path} is not a state dict (expected name -> "
                          f"tensor, or one under 'state_dict' or 'model')")
    state = {k: v for k, v in obj.items() if not k.startswith("fc.")}
    expected = backbone.state_dict()
    missing = {k for k in expected if k not in state and not k.endswith("num_batches_tracked")}
    parts = [f"{what} keys: {_first(keys)}" for what, keys in
             (("missing", missing), ("unexpected", set(state) - set(expected))) if keys]
    if parts:
        raise ConfigError(
            f"model.pretrained: {path} does not match the backbone ({'; '.join(parts)}); is it "
            f"the checkpoint of this model.backbone (and width 64)?")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
           for k, v in state.items() if v.shape != expected[k].shape]
    if bad:
        raise ConfigError(f"model.pretrained: {path}: shape mismatch: {_first(bad, 3)}")
    backbone.load_state_dict(state, strict=True)


def build_model(cfg: Config) -> DeepLabV3Plus:
    """DeepLabV3+ of ``cfg.model`` and ``cfg.data.num_classes``, model.pretrained loaded."""
    path = pretrained_file(cfg.model)  # a bad value fails before the model is built
    model = DeepLabV3Plus(cfg.model, cfg.data.num_classes)
    if path is not None:
        load_backbone_weights(model.backbone, path)
    return model

"""DeepLabV3+ on a ResNet and DPT on DINOv2, split into ``encode`` (x -> F) and ``decode`` (the
1x1 classifier, F -> logits) as MLCL needs it (docs/method.md, "Model: encoder and decoder");
parameter names are torchvision's (deep stem: UniMatch's) and DINOv2's, so the ImageNet and
DINOv2 checkpoints load strictly."""
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
    feature_logits: Optional[Tensor] = None  # decode(F) (B, K, h, w) (return_features=True)


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


class Segmenter(nn.Module):
    """What both networks share: ``levels`` (x -> the encoder's maps the perturbations act on),
    ``fuse`` (maps -> F), ``classifier`` (the 1x1 conv, F -> logits); a ``backbone`` trained at
    the base lr and a head at lr * lr_multi."""

    def encode(self, x: Tensor) -> Tensor:
        """The encoder of MLCL: x (B, 3, H, W) -> F (B, C, h, w)."""
        return self.fuse(self.levels(x))

    def decode(self, features: Tensor) -> Tensor:
        """The decoder of MLCL (the 1×1 classifier only): F (B, C, h, w) -> (B, K, h, w)."""
        return self.classifier(features)

    def forward(self, x: Tensor, fp: bool = False, return_features: bool = False,
                comp_drop: bool = False):
        """Logits (B, K, H, W), or a :class:`SegOutput` when ``fp`` (UniMatch's feature
        perturbation: the maps and their Dropout2d copy as one batch) or ``return_features``;
        ``comp_drop``: UniMatch V2's Complementary Dropout on the maps of cat(s1, s2)."""
        levels = self.levels(x)
        if fp:
            levels = [torch.cat((t, self.fp_dropout(t))) for t in levels]  # (2B, ...)
        if comp_drop:
            levels = complementary_dropout(levels)
        feats = self.fuse(levels)  # (B or 2B, C, h, w)
        coarse = self.decode(feats)  # (B or 2B, K, h, w)
        logits = upsample(coarse, x.shape[-2:])  # (B or 2B, K, H, W)
        if not (fp or return_features):
            return logits
        out = (SegOutput(*logits.chunk(2), *feats.chunk(2), coarse.chunk(2)[0]) if fp
               else SegOutput(logits, None, feats, None, coarse))
        return out if return_features else SegOutput(out.logits, out.logits_fp)

    def param_groups(self, lr: float, lr_multi: float) -> list[dict]:
        """Optimizer groups: the backbone at ``lr``, the rest (the head) at lr * lr_multi."""
        backbone = list(self.backbone.parameters())
        head = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        return [{"name": "backbone", "params": backbone, "lr": lr},
                {"name": "head", "params": head, "lr": lr * lr_multi}]


def complementary_dropout(levels: list[Tensor], p: float = 0.5) -> list[Tensor]:
    """UniMatch V2's Complementary Dropout on maps (2B, D, h, w) of cat(s1, s2): image i of s1
    keeps channels m·2 and image i of s2 the others, (2 - m)·2 with m ~ Bernoulli(1/2) per
    channel (one mask for the maps of one width); a random half of the pairs keep everything."""
    n = levels[0].shape[0] // 2
    masks: dict[int, Tensor] = {}
    for d in dict.fromkeys(t.shape[1] for t in levels):
        m1 = torch.bernoulli(levels[0].new_full((n, d), 1 - p)) * 2  # (B, D): 0 or 2
        m1[torch.randperm(n, device=m1.device)[:int(n * (1 - p))]] = 1.0
        masks[d] = torch.cat((m1, 2 - m1))[:, :, None, None]  # (2B, D, 1, 1)
    return [t * masks[t.shape[1]].to(t.dtype) for t in levels]


class DeepLabV3Plus(Segmenter):
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

    def levels(self, x: Tensor) -> list[Tensor]:
        """[c1 (B, w·e, H/4, W/4), c4 (B, 8w·e, H/16, W/16)]."""
        return list(self.backbone(x))

    def fuse(self, levels: list[Tensor]) -> Tensor:
        """F (B, C, H/4, W/4): ASPP(c4) upsampled, concatenated with reduce(c1), two 3×3 convs."""
        c1, c4 = levels
        high = upsample(self.aspp(c4), c1.shape[-2:])  # (B, aspp, H/4, W/4)
        return self.fusion(torch.cat([self.reduce(c1), high], dim=1))  # (B, C, H/4, W/4)


# DINOv2 (timm names; the official checkpoints' keys): the blocks DPT reads, DPT's widths
DINOV2 = {"dinov2_s": ("vit_small_patch14_dinov2", [2, 5, 8, 11], [48, 96, 192, 384]),
          "dinov2_b": ("vit_base_patch14_dinov2", [2, 5, 8, 11], [96, 192, 384, 768]),
          "dinov2_l": ("vit_large_patch14_dinov2", [4, 11, 17, 23], [256, 512, 1024, 1024])}
DINOV2_FILES = {"dinov2_s": "dinov2_vits14", "dinov2_b": "dinov2_vitb14",
                "dinov2_l": "dinov2_vitl14"}  # dl.fbaipublicfiles.com/dinov2/NAME/NAME_pretrain.pth
# ViTs without released weights, trained from scratch at CPU-sized crops (docs/synthetic_study.md,
# "A ViT on the synthetic set"): as DINOV2, then timm's arguments beyond the model's name.
# vit_w64d4p8: width 64, 4 blocks (one per DPT level), 2 heads, patch 8 (8x8 tokens at 64 px)
SCRATCH_VITS = {"vit_w64d4p8": ("vit_tiny_patch16_224", [0, 1, 2, 3], [8, 16, 32, 64], {
    "embed_dim": 64, "depth": 4, "num_heads": 2, "patch_size": 8, "img_size": 64})}
VITS = {**DINOV2, **SCRATCH_VITS}  # the backbones of DPT


class ResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x)))), 3×3 convs with bias, no normalisation (DPT's)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """DPT's fusion: (x + RCU(skip)), RCU, bilinear ×2 (or to ``size``), 1×1 conv."""

    def __init__(self, c: int, with_skip: bool = True):
        super().__init__()
        self.skip = ResidualConvUnit(c) if with_skip else None
        self.refine = ResidualConvUnit(c)
        self.out_conv = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor, skip: Tensor | None = None, size=None) -> Tensor:
        if skip is not None:
            x = x + self.skip(skip)
        x = self.refine(x)
        size = size or [2 * s for s in x.shape[-2:]]
        return self.out_conv(upsample(x, size))


class DPT(Segmenter):
    """UniMatch V2's network: DINOv2 (timm; or a ViT of SCRATCH_VITS) and a DPT head.
    ``levels``: four blocks' normed patch tokens as maps (B, D, H/p, W/p), p the patch size
    (14 on DINOv2), the input resized to a multiple of p first; F: DPT's last fusion map after
    ``output_conv``'s 3×3 conv and ReLU (B, C, 8H/p, 8W/p), so that ``decode`` is the 1×1
    classifier as on DeepLabV3+ (docs/method.md)."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        import timm  # only this network needs it

        name, self.blocks, widths, *timm_args = VITS[cfg.backbone]
        self.backbone = timm.create_model(name, pretrained=False, num_classes=0,
                                          dynamic_img_size=True, **dict(*timm_args))
        dim, c = self.backbone.embed_dim, cfg.feature_channels
        self.projects = nn.ModuleList(nn.Conv2d(dim, w, 1) for w in widths)
        self.resize = nn.ModuleList([nn.ConvTranspose2d(widths[0], widths[0], 4, stride=4),
                                     nn.ConvTranspose2d(widths[1], widths[1], 2, stride=2),
                                     nn.Identity(), nn.Conv2d(widths[3], widths[3], 3, 2, 1)])
        self.layers_rn = nn.ModuleList(nn.Conv2d(w, c, 3, padding=1, bias=False) for w in widths)
        self.fusions = nn.ModuleList(FusionBlock(c, with_skip=i < 3) for i in range(4))
        self.output_conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(c, num_classes, 1)
        self.fp_dropout = nn.Dropout2d(cfg.fp_dropout)  # UniMatch (V1)'s fp, if asked for

    def levels(self, x: Tensor) -> list[Tensor]:
        """The four token maps (B, D, h, w), h = round(H / p) (UniMatch V2's evaluation)."""
        p = self.backbone.patch_embed.patch_size[0]
        size = [max(int(s / p + 0.5), 1) * p for s in x.shape[-2:]]
        if size != list(x.shape[-2:]):
            x = upsample(x, size)
        return self.backbone.forward_intermediates(x, indices=self.blocks, norm=True,
                                                   output_fmt="NCHW", intermediates_only=True)

    def fuse(self, levels: list[Tensor]) -> Tensor:
        """F (B, C, 8h, 8w): project, resize to ×4 ×2 ×1 ×½, fuse deepest first."""
        maps = [rn(rs(pr(t))) for t, pr, rs, rn in
                zip(levels, self.projects, self.resize, self.layers_rn)]
        path = self.fusions[3](maps[3], size=maps[2].shape[-2:])
        path = self.fusions[2](path, maps[2], size=maps[1].shape[-2:])
        path = self.fusions[1](path, maps[1], size=maps[0].shape[-2:])
        return self.output_conv(self.fusions[0](path, maps[0]))


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
    """Where ``python -m mlcl data pretrained`` puts ``arch``'s weights: torchvision's ImageNet
    files, or the official DINOv2 checkpoint, in the torch hub cache."""
    url = dinov2_url(arch) if arch in DINOV2 else TORCHVISION_WEIGHTS[arch].url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def dinov2_url(arch: str) -> str:
    """The official DINOv2 checkpoint of ``arch`` (the file UniMatch V2 loads)."""
    name = DINOV2_FILES[arch]
    return f"https://dl.fbaipublicfiles.com/dinov2/{name}/{name}_pretrain.pth"


def pretrained_file(m: ModelConfig) -> Path | None:
    """The weights file ``model.pretrained`` names (None for false), checked early."""
    if m.pretrained is True:
        why = "true means torchvision's ImageNet weights, which"
        if m.backbone in DINOV2:
            return _dinov2_file(imagenet_file(m.backbone), m.backbone)
        if m.backbone in SCRATCH_VITS:
            raise ConfigError(f"config key 'model.pretrained': no weights were released for "
                              f"{m.backbone} (it trains from scratch); use false or a file")
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
    if m.pretrained is False:
        return None
    path = Path(m.pretrained).expanduser()
    return _dinov2_file(path, m.backbone) if m.backbone in DINOV2 else _weights_file(path)


def _weights_file(path: Path) -> Path:
    """``path``, or a ConfigError when there is no such file."""
    if not path.is_file():
        raise ConfigError(f"model.pretrained: checkpoint file {path.resolve()} does not exist "
                          f"(torchvision's ImageNet files: python -m mlcl data pretrained "
                          f"--torchvision ARCH)")
    return path


def _dinov2_file(path: Path, arch: str) -> Path:
    """``path``, or a ConfigError saying how to get the official file when it is missing."""
    if not path.is_file():
        raise ConfigError(
            f"model.pretrained: the DINOv2 checkpoint {path} of {arch} does not exist: "
            f"`python -m mlcl data pretrained --dinov2 {arch}` downloads {dinov2_url(arch)} to "
            f"pretrained/ (then model.pretrained=pretrained/dinov2_<size>.pth, the presets' "
            f"path), or save that file as {path} yourself")
    return path


def _first(keys, n: int = 5) -> str:
    """The first ``n`` of ``keys`` in order, and how many there are when more."""
    keys = sorted(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a state dict file (plain or under 'state_dict' / 'model') strictly into
    ``backbone``, less ``fc.*``, ``mask_token`` and the ``num_batches_tracked`` a file may lack."""
    path = _weights_file(Path(path))
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
    # less ImageNet's classifier and DINOv2's masked-modelling token, used in pretraining only
    state = {k: v for k, v in obj.items() if not k.startswith("fc.") and k != "mask_token"}
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


def build_model(cfg: Config) -> Segmenter:
    """DeepLabV3+ or DPT of ``cfg.model`` and ``cfg.data.num_classes``, model.pretrained loaded."""
    path = pretrained_file(cfg.model)  # a bad value fails before the model is built
    net = DPT if cfg.model.backbone in VITS else DeepLabV3Plus
    model = net(cfg.model, cfg.data.num_classes)
    if path is not None:
        load_backbone_weights(model.backbone, path)
    return model

"""One configuration tree: ``load_config("synthetic", ["method=mlcl", "split=1_8"])`` overlays
on the dataclasses below the preset's ``base`` chain, the preset, its named cell (``split=NAME``,
one of its ``splits:``), then the overrides; a bad key or value is a ConfigError naming it."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml

from mlcl import paths
from mlcl.errors import MlclError
from mlcl.files import atomic_write_text

METHOD_NAMES = ("supervised", "unimatch", "unimatch_v2", "mlcl")
# The release's deviations from the paper, one switch each (docs/method.md, "Paper versus release")
RELEASED_QUIRKS = ("double_transform", "pair_by_position", "duplicate_top_anchor",
                   "normalise_by_candidates", "bank_early_stop", "bilinear_ignore",
                   "dt_uninitialised", "bank_local_update")


class ConfigError(MlclError, ValueError):
    """A configuration problem; the message names the key and says how to fix it."""


_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def in_range(value: float, spec: str) -> bool:
    """Whether ``value`` lies in ``spec``: "> 0", ">= 1", "< 1", "[0, 1]", "(0, 1]", "[0, inf)"."""
    op, _, bound = spec.partition(" ")
    if op in _OPS:
        return _OPS[op](value, float(bound))
    lo, hi = (float(b) for b in spec[1:-1].split(","))
    return (_OPS[">=" if spec[0] == "[" else ">"](value, lo)
            and _OPS["<=" if spec[-1] == "]" else "<"](value, hi))


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Check ``obj`` and its sections against their ``RANGES``: "SPEC" a number in in_range's
    SPEC (or None), "SPEC pair" a [low, high] list of such numbers, "len N" a list of N values."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        spec = type(obj).RANGES.get(f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
        elif spec is None or value is None:
            continue
        elif spec.startswith("len "):
            if len(value) != int(spec[4:]):
                raise ConfigError(f"config key '{key}': {value!r} has {len(value)} values, "
                                  f"expected {spec[4:]}")
        else:
            bounds = spec.removesuffix(" pair")
            for v in value if isinstance(value, list) else [value]:
                if not (isinstance(v, (int, float)) and in_range(v, bounds)):  # NaN: never
                    shown = f"{v!r} (in {value!r})" if isinstance(value, list) else f"{v!r}"
                    raise ConfigError(f"config key '{key}': {shown} is out of range; "
                                      f"allowed: {bounds}")
            if spec.endswith(" pair") and (len(value) != 2 or value[0] > value[1]):
                raise ConfigError(f"config key '{key}': {value!r} must be [low, high] with "
                                  f"low <= high, each {bounds}")


@dataclass
class AugmentConfig:
    """UniMatch's augmentation strengths (docs/method.md, "Augmentations")."""

    RANGES: ClassVar[dict[str, str]] = {  # allowed values (check_ranges)
        "scale_range": "> 0 pair", "hflip_p": "[0, 1]", "jitter_p": "[0, 1]",
        "brightness": ">= 0", "contrast": ">= 0", "saturation": ">= 0", "hue": "[0, 0.5]",
        "grayscale_p": "[0, 1]", "blur_p": "[0, 1]", "blur_sigma": "> 0 pair",
        "cutmix_p": "[0, 1]", "cutmix_area": "(0, 1] pair", "cutmix_ratio": "> 0 pair",
        "mean": "len 3", "std": "len 3"}

    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5
    hue: float = 0.25
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    cutmix_p: float = 0.5
    cutmix_area: list[float] = field(default_factory=lambda: [0.02, 0.4])
    cutmix_ratio: list[float] = field(default_factory=lambda: [0.3, 1 / 0.3])
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class DataConfig:
    """Where the data is and how it is read: root, layout, split files, crop, classes."""

    RANGES: ClassVar[dict[str, str]] = {"crop_size": ">= 1", "num_classes": "[2, 255]",
                                        "ignore_index": "[0, 255]", "num_workers": ">= 0"}

    dataset: str = "synthetic"  # synthetic | pascal | cityscapes | folder (-> the root's name)
    layout: str = "voc"  # voc | cityscapes | folder: folder structure and split-file conventions
    root: str = ""
    labeled_split: str = ""  # split files: absolute, or relative to data.root
    unlabeled_split: str = ""
    val_split: str = ""
    crop_size: int = 321
    num_classes: int = 21
    ignore_index: int = 255
    class_names: list[str] = field(default_factory=list)
    num_workers: int = 2
    pin_memory: bool = True  # used only on GPU
    persistent_workers: bool = True  # used only when num_workers > 0
    aug: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    """The network: DeepLabV3+ (output stride 16) on a ResNet, or DPT on DINOv2; its weights."""

    RANGES: ClassVar[dict[str, str]] = {
        "width": ">= 1", "aspp_dilations": ">= 1", "low_level_channels": ">= 1",
        "feature_channels": ">= 1", "fp_dropout": "[0, 1)", "ema_max": "[0, 1]"}

    backbone: str = "resnet50"  # one of CHOICES["model.backbone"]; dinov2_*: DPT on DINOv2
    width: int = 64  # ResNet: channels of the first stage (64 standard; 32 = half width for CPU)
    pretrained: Union[bool, str] = False  # false | true (torchvision ImageNet) | file path
    aspp_dilations: list[int] = field(default_factory=lambda: [6, 12, 18])
    low_level_channels: int = 48
    # C: the fused map F = encode(x); None: the backbone's (DeepLabV3+ 256; DPT: DEFAULT_FEATURES)
    feature_channels: Union[int, None] = None
    fp_dropout: float = 0.5  # UniMatch's feature-perturbation branch
    ema_max: float = 0.996  # the EMA teacher's (unimatch_v2) largest ratio


@dataclass
class TrainConfig:
    """The schedule, optimiser, precision, CutMix partner, logging and checkpoints."""

    RANGES: ClassVar[dict[str, str]] = {
        "epochs": ">= 1", "max_iters": ">= 0", "batch_size": ">= 1", "lr": "> 0",
        "lr_multi": "> 0", "momentum": "[0, 1)", "weight_decay": ">= 0", "poly_power": ">= 0",
        "ohem_thresh": "[0, 1]", "ohem_min_kept": ">= 0", "conf_thresh": "[0, 1]",
        "eval_every": ">= 1", "log_every": ">= 1", "checkpoint_every": ">= 0"}

    epochs: int = 80
    max_iters: int = 0  # > 0 caps the total number of iterations (short runs, tests)
    batch_size: int = 4  # per process and per view (labeled and unlabeled alike)
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.001  # backbone lr; every other parameter uses lr * lr_multi
    lr_multi: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    loss: str = "ce"  # ce | ohem (labeled loss)
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 200_000
    conf_thresh: float = 0.95  # tau: pseudo-label confidence threshold
    mixed_precision: str = "no"  # no | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    # CutMix partner (methods.mix_source): roll | flip | loader | same; None: same if released,
    # flip on UniMatch V2 (its own), else roll
    mix_partner: Union[str, None] = None
    # the lr of step t is lr(t - 1) (UniMatch / released); None: true if released
    lr_lag: Union[bool, None] = None
    cpu: bool = False  # force CPU even where a GPU is visible
    eval_every: int = 1  # epochs between validations (the last epoch is always evaluated)
    log_every: int = 20  # iterations between progress updates, logs and divergence checks
    checkpoint_every: int = 500  # iterations between mid-epoch checkpoints (0: epoch ends)


@dataclass
class MLCLConfig:
    """FKA + SAI (docs/method.md, "MLCL"; the switches: "Paper versus release")."""

    RANGES: ClassVar[dict[str, str]] = {
        "alpha": ">= 0", "omega": ">= 0", "beta": ">= 0", "num_anchors": ">= 1",
        "num_candidates": ">= 1", "bank_momentum": "[0, 1]", "bank_conf": "[0, 1]",
        "kappa": "[0, 0.5]", "mask_jitter": "[0, 1]", "warmup_epochs": ">= 0"}

    variant: str = "paper"  # paper | released
    base: str = "unimatch"  # the step MLCL adds to: unimatch | unimatch_v2
    targets: str = "teacher"  # on unimatch_v2: F_w, F_1, F_2, SAI's targets from teacher | student
    alpha: Union[float, None] = None  # L_p2p weight; None: 0.1 (paper) / 0 (released)
    omega: float = 0.01  # L_dt weight
    beta: float = 0.01  # SAI weight at the end of the ramp-up
    num_anchors: int = 16
    num_candidates: int = 256
    bank_momentum: float = 0.99
    bank_conf: float = 0.95
    kappa: float = 0.15  # 3/20
    mask_jitter: float = 0.1
    warmup_epochs: int = 0  # epochs before SAI starts
    use_p2p: bool = True
    use_dt: bool = True
    use_mask: bool = True
    use_noise: bool = True
    released_passes: bool = False  # the release's separate passes ("Forward passes")
    weak_features: str = "forward"  # F_1, F_2: forward (a pass over w1, w2) | mixed (none)
    # RELEASED_QUIRKS; None follows the variant (filled in by fill_defaults)
    double_transform: Union[bool, None] = None
    pair_by_position: Union[bool, None] = None
    duplicate_top_anchor: Union[bool, None] = None
    normalise_by_candidates: Union[bool, None] = None
    bank_early_stop: Union[bool, None] = None
    bilinear_ignore: Union[bool, None] = None
    dt_uninitialised: Union[bool, None] = None
    bank_local_update: Union[bool, None] = None


@dataclass
class EvalConfig:
    """How validation images are predicted: whole or sliding window."""

    RANGES: ClassVar[dict[str, str]] = {"crop_size": ">= 0", "stride_ratio": "(0, 1]"}

    mode: str = "whole"  # whole | sliding
    crop_size: int = 0  # the sliding window; 0: data.crop_size
    stride_ratio: float = 2 / 3  # sliding window stride = crop * ratio


@dataclass
class Config:
    """A run's whole configuration: method, seed, output folder, named cell and the sections."""

    RANGES: ClassVar[dict[str, str]] = {"seed": "[0, 4294967295]"}

    method: str = "supervised"  # supervised | unimatch | unimatch_v2 | mlcl
    seed: int = 0
    # placeholders: {dataset} {split} {method} {variant} {seed} {backbone} {tag} (the method,
    # mlcl-VARIANT, or mlcl_v2-VARIANT on unimatch_v2)
    output_dir: str = "runs/{dataset}/{split}/{tag}-s{seed}"
    split: str = ""  # name of a preset cell (see the preset's `splits:`), e.g. 1_16 or 183
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlcl: MLCLConfig = field(default_factory=MLCLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """The tree as nested dicts (what config.yaml and checkpoints store)."""
        return dataclasses.asdict(self)

    def split_path(self, name: str) -> Path:
        """The split file ``data.<name>`` as a path (relative entries are under data.root)."""
        if not getattr(self.data, name):
            raise ConfigError(f"data.{name} is empty: give a split file, e.g. data.{name}=PATH")
        return Path(self.data.root).expanduser() / Path(getattr(self.data, name)).expanduser()


CHOICES = {"method": METHOD_NAMES, "data.layout": ("voc", "cityscapes", "folder"),
           "train.optimizer": ("sgd", "adamw"), "train.loss": ("ce", "ohem"),
           "train.mixed_precision": ("no", "bf16", "fp16"), "eval.mode": ("whole", "sliding"),
           "train.mix_partner": ("roll", "flip", "loader", "same"),
           "mlcl.variant": ("paper", "released"), "mlcl.weak_features": ("forward", "mixed"),
           "mlcl.base": ("unimatch", "unimatch_v2"), "mlcl.targets": ("teacher", "student"),
           "model.backbone": ("resnet18", "resnet34", "resnet50", "resnet101",
                              "resnet50_deepstem", "resnet101_deepstem",
                              "dinov2_s", "dinov2_b", "dinov2_l", "vit_w64d4p8")}
# DPT's feature width on each DINOv2 (UniMatch V2's), the default of model.feature_channels;
# vit_w64d4p8's F is at full resolution (patch 8): 32
DEFAULT_FEATURES = {"dinov2_s": 64, "dinov2_b": 128, "dinov2_l": 256, "vit_w64d4p8": 32}

# Keys that do not change a run's results (workers, logging, where files go): two runs that
# differ only in these are the same run (mlcl.study.reproduce, the registry's tables).
RESULT_NEUTRAL = ("output_dir", "data.root", "data.num_workers", "data.pin_memory",
                  "data.persistent_workers", "train.log_every", "train.checkpoint_every",
                  "train.cpu", "train.compile", "train.channels_last")


class CliValue(str):
    """A value typed on the command line: parsed as YAML unless the key wants a string."""


_SCALARS = {bool: ((bool,), "true/false"), int: ((int,), "an integer"),
            float: ((int, float), "a number"), str: ((str, int), "a string")}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` in the annotation ``tp``, or a ConfigError naming ``key``."""
    if isinstance(value, CliValue) and tp is not str:
        try:
            value = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            value = str(value)
    if typing.get_origin(tp) is Union:
        arms = typing.get_args(tp)
        if type(None) in arms and str(value).strip().lower() in ("none", "null", "~"):
            return None  # before a str arm could take "none" as a name
        for arm in (a for a in arms if a is not type(None)):
            with contextlib.suppress(ConfigError):
                return _coerce(value, arm, key)
        raise ConfigError(f"config key '{key}': expected "
                          f"{str(tp).replace('typing.', '')}, got {value!r}")
    if typing.get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    accepted, name = _SCALARS[tp]  # the accepted types, and their name in the error
    if not isinstance(value, accepted) or (isinstance(value, bool) and tp is not bool):
        raise ConfigError(f"config key '{key}': expected {name}, got {value!r}")
    return tp(value)


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set the dotted ``key`` to ``value``, checking its type (a section's: a mapping)."""
    obj, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"unknown config key '{key}': '{parts[i - 1]}' is not a section")
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key '{key}': '{part}' is not a key of {where} "
                              f"(valid: {', '.join(sorted(names))})")
        parent, obj = obj, getattr(obj, part)
    if not dataclasses.is_dataclass(obj):
        setattr(parent, part, _coerce(value, typing.get_type_hints(type(parent))[part], key))
    elif not isinstance(value, dict):
        raise ConfigError(f"config key '{key}' is a section: give a mapping")
    else:
        for sub, v in value.items():
            set_key(cfg, f"{key}.{sub}", v)


def parse_overrides(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}``; each value is parsed (as YAML)
    against its key's type when it is set, so ``split=1_8`` stays the string "1_8"."""
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        k, raw = item.split("=", 1)
        out[k.strip()] = CliValue(raw)
    return out


def _preset_chain(name: str | Path) -> list[dict[str, Any]]:
    """The mappings of the preset (mlcl/configs name or YAML path) and its bases, root first."""
    chain, seen = [], set()
    while name:
        path = Path(name)
        if path.suffix not in (".yaml", ".yml"):
            path = paths.CONFIGS / f"{name}.yaml"
            if not path.is_file():
                names = sorted(p.stem for p in paths.CONFIGS.glob("*.yaml"))
                raise ConfigError(f"unknown preset '{name}' (available: {', '.join(names)})")
        elif not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        if path in seen:
            raise ConfigError(f"{path}: 'base' forms a cycle")
        seen.add(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a preset must be a mapping of config keys")
        chain.insert(0, data)
        name = data.pop("base", None)
    return chain


def preset_splits(preset: str | Path) -> list[str]:
    """The names of the preset's cells (its ``splits:`` and its bases'), in file order."""
    cells: dict[str, Any] = {}
    for layer in _preset_chain(preset):
        cells.update(layer.get("splits") or {})
    return [str(c) for c in cells]


def load_config(preset: str | Path | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """The Config of ``preset`` (None: the defaults) with ``overrides`` on top (module doc)."""
    cfg = Config()
    over = parse_overrides(overrides)
    cells: dict[str, Any] = {}
    for layer in _preset_chain(preset) if preset else []:
        cells.update({str(k): v for k, v in (layer.pop("splits", None) or {}).items()})
        for k, v in layer.items():
            set_key(cfg, k, v)
    if "split" in over:
        set_key(cfg, "split", over.pop("split"))
    if cfg.split and cfg.split not in cells and "*" not in cells:
        raise ConfigError(f"config key 'split': preset '{preset}' has no split '{cfg.split}' "
                          f"(available: {', '.join(cells) or 'none'})")
    cell = cells.get(cfg.split, cells.get("*")) or {} if cfg.split else {}  # "*": any name
    for mapping in ({k: v.replace("{split}", cfg.split) if isinstance(v, str) else v
                     for k, v in cell.items()}, over):
        for k, v in mapping.items():
            set_key(cfg, k, v)
    if cfg.data.dataset == "folder" and cfg.data.root.strip():  # runs named after the folder
        cfg.data.dataset = Path(cfg.data.root).expanduser().resolve().name
    cfg.__dict__["_overridden"] = frozenset(over)  # not a field: never saved
    return fill_defaults(cfg)


def overridden_keys(cfg: Config) -> frozenset[str]:
    """The keys :func:`load_config` took from its overrides to make ``cfg`` (else empty)."""
    return cfg.__dict__.get("_overridden", frozenset())


def fill_defaults(cfg: Config) -> Config:
    """``cfg`` with the values that follow from others filled in, every check passed."""
    m = cfg.mlcl
    released = m.variant == "released"
    if cfg.train.mix_partner is None:
        cfg.train.mix_partner = ("flip" if uses_teacher(cfg) else
                                 "same" if released and cfg.method == "mlcl" else "roll")
    if cfg.model.feature_channels is None:
        cfg.model.feature_channels = DEFAULT_FEATURES.get(cfg.model.backbone, 256)
    if cfg.train.lr_lag is None:
        cfg.train.lr_lag = released and cfg.method == "mlcl"
    flat = flatten(cfg.to_dict())
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"config key '{key}': {flat[key]!r} is not one of "
                              f"{', '.join(allowed)}")
    for quirk in RELEASED_QUIRKS:
        if getattr(m, quirk) is None:
            setattr(m, quirk, released)
    if m.alpha is None:
        m.alpha = 0.0 if released else 0.1
    base = "mlcl_v2" if m.base == "unimatch_v2" else "mlcl"
    tag = f"{base}-{m.variant}" if cfg.method == "mlcl" else cfg.method
    try:
        cfg.output_dir = cfg.output_dir.format(
            dataset=cfg.data.dataset, split=cfg.split or "default", method=cfg.method,
            variant=m.variant, seed=cfg.seed, tag=tag, backbone=cfg.model.backbone)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"config key 'output_dir': bad placeholder in {cfg.output_dir!r} ({e}); "
                          "use {dataset}, {split}, {method}, {variant}, {seed}, {backbone} or "
                          "{tag}") from e
    check_ranges(cfg)
    check_relations(cfg)
    return cfg


def uses_teacher(cfg: Config) -> bool:
    """Whether the run trains with UniMatch V2's EMA teacher."""
    return cfg.method == "unimatch_v2" or (cfg.method, cfg.mlcl.base) == ("mlcl", "unimatch_v2")


def check_relations(cfg: Config) -> None:
    """The checks that involve two keys."""
    d = cfg.data
    if d.class_names and len(d.class_names) != d.num_classes:
        raise ConfigError(f"config key 'data.class_names': {len(d.class_names)} names for "
                          f"data.num_classes={d.num_classes}")
    if d.ignore_index < d.num_classes:
        raise ConfigError(f"config key 'data.ignore_index': {d.ignore_index} is a class index "
                          f"(data.num_classes={d.num_classes}); allowed: {d.num_classes}..255")
    partner = cfg.train.mix_partner
    if cfg.method != "supervised" and partner in ("roll", "flip") and cfg.train.batch_size < 2:
        fix = "raise it" if uses_teacher(cfg) else "or use train.mix_partner=loader"
        raise ConfigError(f"config key 'train.mix_partner': '{partner}' needs train.batch_size >= "
                          f"2 (the CutMix partner is another image): {fix}")
    if uses_teacher(cfg) and partner not in ("flip", "roll"):
        raise ConfigError(f"config key 'train.mix_partner': {partner!r} with UniMatch V2, whose "
                          "CutMix partner is in the batch: use flip (its own) or roll")
    if uses_teacher(cfg) and cfg.mlcl.released_passes:
        raise ConfigError("config key 'mlcl.released_passes': the release's passes are UniMatch's "
                          "(V1); with mlcl.base=unimatch_v2 set it false")
    if cfg.mlcl.released_passes and cfg.mlcl.weak_features == "mixed":
        raise ConfigError("config key 'mlcl.weak_features': 'mixed' replaces a pass that "
                          "mlcl.released_passes=true runs; set one of them")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": value}`` (lists stay values)."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(before: dict[str, Any], after: dict[str, Any],
                   ignore: tuple[str, ...] = RESULT_NEUTRAL) -> list[str]:
    """``"key: old -> new"`` for every setting that differs between two ``to_dict()`` trees,
    less the keys in ``ignore`` (an entry ending in "." a section) and keys missing from one."""
    a, b = flatten(before), flatten(after)
    sections = tuple(k for k in ignore if k.endswith("."))
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if k in b and k not in ignore
            and not k.startswith(sections) and _differs(a[k], b[k])]


def _differs(x: Any, y: Any) -> bool:
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) != len(y) or any(_differs(u, v) for u, v in zip(x, y))
    if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
        return not math.isclose(x, y, rel_tol=1e-12, abs_tol=0.0)
    return x != y


def save_config(cfg: Config, path: str | Path) -> None:
    """``cfg`` as YAML at ``path`` (atomically); :func:`config_from_dict` reads it back."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# Keys older config.yaml files and checkpoints may hold, since fixed at what the code does
REMOVED_KEYS = ("unimatch", "mlcl.rampup_k", "mlcl.sai_ignore_mask", "model.output_stride")


def config_from_dict(d: dict[str, Any]) -> Config:
    """The Config of a saved ``to_dict()`` tree ``d`` (unchanged) less :data:`REMOVED_KEYS`."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for key in REMOVED_KEYS:
        section, _, name = key.rpartition(".")
        (d.get(section) or {} if section else d).pop(name, None)
    cfg = Config()
    for k, v in d.items():
        set_key(cfg, k, v)
    return fill_defaults(cfg)

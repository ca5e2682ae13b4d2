"""Named grids of runs for `python -m mlcl reproduce --grid NAME`."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from itertools import product


@dataclass(frozen=True)
class Run:
    """One cell of a grid; its :attr:`name` names its output folder and registry entry."""

    preset: str
    split: str
    method: str
    seed: int = 0
    variant: str = "paper"  # mlcl only
    ablation: str = ""  # a short name for extra overrides, e.g. "no_dt"
    overrides: tuple[str, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        """``<preset>-<split>-<method>[-<variant>][-<backbone>][-<ablation>]-s<seed>``, the
        backbone where the overrides set ``model.backbone``."""
        variant = [self.variant] if self.method == "mlcl" else []
        backbone = [o.split("=", 1)[1] for o in self.overrides if o.startswith("model.backbone=")]
        ablation = [self.ablation] if self.ablation else []
        return "-".join([self.preset, self.split, self.method, *variant, *backbone[-1:],
                         *ablation, f"s{self.seed}"])

    def config_overrides(self) -> list[str]:
        """The ``key=value`` overrides that make the preset this run."""
        variant = [f"mlcl.variant={self.variant}"] if self.method == "mlcl" else []
        return [f"split={self.split}", f"method={self.method}", f"seed={self.seed}", *variant,
                *self.overrides]


# The MLCL ablations of the paper: each component off on its own.
ABLATIONS = {"no_p2p": ("mlcl.use_p2p=false",), "no_dt": ("mlcl.use_dt=false",),
             "no_mask": ("mlcl.use_mask=false",), "no_noise": ("mlcl.use_noise=false",),
             "no_sai": ("mlcl.use_mask=false", "mlcl.use_noise=false")}

METHOD_VARIANTS = (("supervised", "paper"), ("unimatch", "paper"), ("mlcl", "paper"),
                   ("mlcl", "released"))


def _methods_grid(preset: str, splits, seeds) -> list[Run]:
    return [Run(preset, s, m, seed, v)
            for s, (m, v), seed in product(splits, METHOD_VARIANTS, seeds)]


# UniMatch V2's tables: DINOv2-S (the presets') and DINOv2-B columns, UniMatch V2 and MLCL on it
DINOV2_B = ("model.backbone=dinov2_b", "model.pretrained=pretrained/dinov2_base.pth")


def _v2_grid(preset: str, splits) -> list[Run]:
    return [Run(preset, s, m, 0, overrides=ov)
            for ov in ((), DINOV2_B) for s in splits for m in ("unimatch_v2", "mlcl")]


# `make demo`: 1/32 labels (there the semi-supervised runs lead visibly on this short
# schedule), 400 iterations and 64 fused feature channels instead of 256 (the fusion convs were
# 2/3 of a CPU step's time).
DEMO_SPLIT = "1_32"
DEMO_SCHEDULE = ("train.max_iters=400", "train.eval_every=1", "model.feature_channels=64")


def build_grid(name: str) -> list[Run]:
    """The runs of grid ``name`` (one of :data:`GRIDS`), in the order they are started."""
    if name == "demo":
        # the longest run first: MLCL on one worker, UniMatch then supervised on the other
        return [Run("synthetic", DEMO_SPLIT, m, 0, overrides=DEMO_SCHEDULE)
                for m in ("mlcl", "unimatch", "supervised")]
    if name == "synthetic-study":
        runs = _methods_grid("synthetic", ("1_16", "1_8"), (0, 1, 2))
        # seed-major, so that a grid stopped part-way leaves every ablation with a seed
        runs += [Run("synthetic", "1_16", "mlcl", seed, "paper", abl, tuple(ov))
                 for seed in (0, 1, 2) for abl, ov in ABLATIONS.items()]
        return runs
    if name == "synthetic-study-1_16":  # the first half of the study (one split)
        return [r for r in build_grid("synthetic-study") if r.split == "1_16" and not r.ablation]
    if name == "mix-partner":  # the CutMix partner: a different image vs the same raw image
        return [Run("synthetic", "1_16", m, seed, v, f"mix_{partner}",
                    (f"train.mix_partner={partner}",))
                for seed in (0, 1, 2) for m, v in (("mlcl", "released"), ("unimatch", "paper"))
                for partner in ("roll", "same")]
    if name == "weak-features":  # F_1, F_2 from a pass or CutMixed features (seeds: --seeds)
        return [Run("synthetic", "1_16", m, seed, "paper", abl, ov)
                for seed in range(10) for m, abl, ov in (
                    ("unimatch", "", ()), ("mlcl", "", ()),
                    ("mlcl", "mixed", ("mlcl.weak_features=mixed",)))]
    if name == "vit":  # the synthetic set on a from-scratch ViT; mlcl is MLCL on UniMatch V2
        return [Run("synthetic_vit", "1_16", m, seed)
                for seed in (0, 1, 2) for m in ("supervised", "unimatch_v2", "mlcl")]
    if name == "voc-original":
        return _methods_grid("pascal", ("92", "183", "366", "732", "1464"), (0,))
    if name == "voc-blended":
        return (_methods_grid("pascal_blended", ("1_16", "1_8", "1_4"), (0,))
                + _methods_grid("pascal_blended_r101", ("1_16", "1_8", "1_4"), (0,)))
    if name == "cityscapes":
        return _methods_grid("cityscapes", ("1_16", "1_8", "1_4", "1_2"), (0,))
    if name == "voc-v2":
        return _v2_grid("pascal_v2", ("92", "183", "366", "732", "1464"))
    if name == "cityscapes-v2":
        return _v2_grid("cityscapes_v2", ("1_16", "1_8", "1_4", "1_2"))
    raise ValueError(f"unknown grid '{name}' (available: {', '.join(GRIDS)})")


def with_seeds(runs: list[Run], seeds: tuple[int, ...]) -> list[Run]:
    """``runs`` with their seeds replaced by ``seeds``: every distinct cell once per seed,
    seed-major (a grid stopped part-way leaves every cell with its first seeds)."""
    cells = list(dict.fromkeys(replace(r, seed=0) for r in runs))
    return [replace(c, seed=s) for s in seeds for c in cells]


def parse_seeds(text: str) -> tuple[int, ...]:
    """argparse type for ``--seeds``: ``0,1,2``, ``0-4`` or ``0-2,7`` -> the seeds, each once."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            first, last = int(low), int(high or low)
            if first < 0 or last < first:
                raise ValueError
            seeds += [s for s in range(first, last + 1) if s not in seeds]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected seeds as 0,1,2 or 0-4 (integers >= 0, ranges low-high), got {text!r}"
        ) from None
    return tuple(seeds)


GRIDS = ("demo", "synthetic-study", "synthetic-study-1_16", "mix-partner", "weak-features",
         "vit", "voc-original", "voc-blended", "cityscapes", "voc-v2", "cityscapes-v2")

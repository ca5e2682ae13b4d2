"""The published mIoU (%, single runs) of the MLCL paper's Tables I-III (docs/method.md,
"Published numbers") and of UniMatch V2 on VOC and Cityscapes (docs/real_data.md, section
12); each column is a (preset, split[, backbone]) cell, where registry entries land."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """A column of a published table: the preset and split that reproduce it, its heading, and
    the model.backbone its runs must have (empty: the preset's, whatever it is)."""

    preset: str
    split: str
    label: str
    backbone: str = ""


@dataclass(frozen=True)
class PaperTable:
    """A published table: its columns, the published mIoU per method, the methods shown with
    no published number (``unpublished``), and what 'published' means in its caption."""

    key: str
    title: str
    columns: tuple[Column, ...]
    published: dict[str, tuple[float, ...]]  # method key -> one value per column
    unpublished: tuple[str, ...] = ()
    source: str = "the paper's single runs (docs/method.md)"

    @property
    def methods(self) -> tuple[str, ...]:
        """The method keys of its rows: the published ones, then the unpublished."""
        return (*self.published, *self.unpublished)

    def value(self, method: str, preset: str, split: str, backbone: str = "") -> float | None:
        """The published mIoU of ``method`` in the column of (preset, split, backbone), if any
        (a column naming no backbone matches any)."""
        return next((v for col, v in zip(self.columns, self.published.get(method, ()))
                     if (col.preset, col.split) == (preset, split)
                     and col.backbone in ("", backbone)), None)


# Row labels of the published rows; AugSeg is a baseline of Table I we do not reimplement.
PUBLISHED_LABELS = {"supervised": "Supervised", "unimatch": "UniMatch (CVPR'23)",
                    "augseg": "AugSeg (CVPR'23)", "unimatch_v2": "UniMatch V2 (TPAMI'25)",
                    "mlcl": "MLCL (paper)"}
V2_SOURCE = ("UniMatch V2's single runs, the EMA teacher's best epoch: DINOv2-B from its "
             "README, DINOv2-S from its training logs (docs/real_data.md)")


def _v2_columns(preset: str, splits: tuple[str, ...], labels: tuple[str, ...]) -> tuple:
    """One column per split for DINOv2-S, then one per split for DINOv2-B."""
    return tuple(Column(preset, s, f"{size} {label}", f"dinov2_{size.lower()}")
                 for size in ("S", "B") for s, label in zip(splits, labels))


TABLES: dict[str, PaperTable] = {
    "I": PaperTable(
        "I", "Pascal VOC 2012 original (labeled from the 1,464 fine set), ResNet-50",
        (Column("pascal", "183", "1/8 (183)"), Column("pascal", "366", "1/4 (366)"),
         Column("pascal", "732", "1/2 (732)"), Column("pascal", "1464", "full (1464)")),
        {"supervised": (52.26, 61.65, 66.72, 72.94),
         "unimatch": (72.48, 75.96, 77.39, 78.70),
         "augseg": (72.17, 76.17, 77.40, 78.82),
         "mlcl": (75.22, 76.45, 78.51, 79.62)}),
    "II": PaperTable(
        "II", "Pascal VOC 2012 blended (labeled drawn from all 10,582)",
        (Column("pascal_blended", "1_16", "R50 1/16 (662)"),
         Column("pascal_blended", "1_8", "R50 1/8 (1323)"),
         Column("pascal_blended", "1_4", "R50 1/4 (2646)"),
         Column("pascal_blended_r101", "1_16", "R101 1/16"),
         Column("pascal_blended_r101", "1_8", "R101 1/8"),
         Column("pascal_blended_r101", "1_4", "R101 1/4")),
        {"supervised": (62.40, 68.20, 72.30, 67.50, 71.10, 74.20),
         "unimatch": (75.80, 76.90, 76.80, 78.10, 78.40, 79.20),
         "mlcl": (76.06, 77.55, 77.27, 78.53, 78.71, 79.30)}),
    "III": PaperTable(
        "III", "Cityscapes, ResNet-50",
        (Column("cityscapes", "1_16", "1/16 (186)"), Column("cityscapes", "1_8", "1/8 (372)"),
         Column("cityscapes", "1_4", "1/4 (744)"), Column("cityscapes", "1_2", "1/2 (1488)")),
        {"supervised": (63.30, 70.20, 73.10, 76.60),
         "unimatch": (75.03, 76.77, 77.49, 78.60),
         "mlcl": (75.69, 76.83, 78.20, 79.33)}),
    "V2-VOC": PaperTable(
        "V2-VOC", "Pascal VOC 2012 original, UniMatch V2's setting, DINOv2-S and DINOv2-B",
        _v2_columns("pascal_v2", ("92", "183", "366", "732", "1464"),
                    ("1/16 (92)", "1/8 (183)", "1/4 (366)", "1/2 (732)", "full (1464)")),
        {"unimatch_v2": (79.0, 85.5, 85.9, 86.7, 87.8, 86.3, 87.9, 88.9, 90.0, 90.8)},
        ("mlcl",), V2_SOURCE),
    "V2-Cityscapes": PaperTable(
        "V2-Cityscapes", "Cityscapes, UniMatch V2's setting, DINOv2-S and DINOv2-B",
        _v2_columns("cityscapes_v2", ("1_16", "1_8", "1_4", "1_2"),
                    ("1/16 (186)", "1/8 (372)", "1/4 (744)", "1/2 (1488)")),
        {"unimatch_v2": (80.6, 81.9, 82.4, 82.6, 83.6, 84.3, 84.5, 85.1)},
        ("mlcl",), V2_SOURCE),
}


"""The published mIoU (%, single runs) of the MLCL paper's Tables I-III (docs/method.md,
"Published numbers"); each column is a (preset, split) cell, where registry entries land."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """A column of a published table: the preset and split that reproduce it, its heading."""

    preset: str
    split: str
    label: str


@dataclass(frozen=True)
class PaperTable:
    """One of the paper's Tables I-III: its columns and the published mIoU per method."""

    key: str
    title: str
    columns: tuple[Column, ...]
    published: dict[str, tuple[float, ...]]  # method key -> one value per column

    def value(self, method: str, preset: str, split: str) -> float | None:
        """The published mIoU of ``method`` in the column of (preset, split), if any."""
        return next((v for col, v in zip(self.columns, self.published.get(method, ()))
                     if (col.preset, col.split) == (preset, split)), None)


# Row labels of the published rows; AugSeg is a baseline of Table I we do not reimplement.
PUBLISHED_LABELS = {"supervised": "Supervised", "unimatch": "UniMatch (CVPR'23)",
                    "augseg": "AugSeg (CVPR'23)", "mlcl": "MLCL (paper)"}

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
}


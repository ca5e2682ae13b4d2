"""Datasets in UniMatch's vocabulary: ``x``/``y`` labeled, ``w``/``s1``/``s2`` the weak and
strong views of an unlabeled image, ``ignore`` its padding, ``box1``/``box2`` the CutMix boxes
that paste a partner's strong view into s1 / s2 (shapes: mlcl.augment)."""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mlcl import augment
from mlcl.config import Config
from mlcl.data.splits import DataError, Sample, check_root, read_split


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB; 16-bit grayscale (modes I;16, I) scaled 0..65535 -> 0..255,
    where PIL's own conversion clips every value above 255 to white."""
    if im.mode.startswith("I"):
        arr = np.asarray(im).astype(np.int64)  # I;16 (0..65535) or I (16-bit PNGs as I)
        return Image.fromarray((np.clip(arr, 0, 65535) // 257).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """An RGB PIL image (:func:`to_rgb`), or a DataError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so that a truncated file fails here
            return to_rgb(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def load_mask(path: Path, num_classes: int, ignore_index: int,
              image: tuple[Path, tuple[int, int]] | None = None) -> np.ndarray:
    """A (palette or grayscale) mask as class indices (H, W) uint8; a DataError for a value
    not 0..num_classes-1 or ignore, or a size not ``image``'s ((path, (width, height)))."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, arr = im.mode, np.array(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read mask {path}: {e}") from None
    if mode not in ("P", "L", "I", "I;16"):
        raise DataError(f"mask {path} has mode {mode}: expected a single-channel "
                        f"(L or palette P) PNG of class indices")
    bad = (arr >= num_classes) & (arr != ignore_index)
    if bad.any():
        values = np.unique(arr[bad])
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        raise DataError(f"mask {path} has values {shown}: expected 0..{num_classes - 1} "
                        f"or {ignore_index} (ignore); check data.num_classes")
    if image is not None and arr.shape != image[1][::-1]:
        raise DataError(f"mask {path} is {arr.shape[1]}x{arr.shape[0]} but image {image[0]} "
                        f"is {image[1][0]}x{image[1][1]}")
    return arr.astype(np.uint8, copy=False)


def load_pair(sample: Sample, cfg: Config) -> tuple[Image.Image, np.ndarray]:
    """The RGB image and its (H, W) uint8 mask, checked (size, values) by :func:`load_mask`."""
    image = load_image(sample.image)
    return image, load_mask(sample.mask, cfg.data.num_classes, cfg.data.ignore_index,
                            (sample.image, image.size))


def index_and_rng(key: int | tuple[int, int]) -> tuple[int, Any]:
    """(index, draws) of a key: ``(index, draw_seed)`` a seeded random.Random, an index random."""
    return (key[0], random.Random(key[1])) if isinstance(key, tuple) else (key, random)


class _SplitDataset(Dataset):
    require_mask = True

    def __init__(self, cfg: Config, split_file: str | Path):
        self.cfg, self.split_file = cfg, Path(split_file)
        self.samples = read_split(self.split_file, cfg.data.root, cfg.data.layout,
                                  require_mask=self.require_mask)

    def __len__(self) -> int:
        return len(self.samples)


class LabeledDataset(_SplitDataset):
    """Labeled crops ``{'x', 'y', 'id'}``, the list repeated up to ``nsample`` (UniMatch's)."""

    def __init__(self, cfg: Config, split_file: str | Path, nsample: int | None = None):
        super().__init__(cfg, split_file)
        if nsample is not None and nsample > len(self.samples):
            self.samples = (self.samples * math.ceil(nsample / len(self.samples)))[:nsample]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, rng = index_and_rng(key)
        d, s = self.cfg.data, self.samples[i]
        x, y = augment.labeled_views(*load_pair(s, self.cfg), d.crop_size, d.aug,
                                     d.ignore_index, rng)
        return {"x": x, "y": y, "id": s.id}


class UnlabeledDataset(_SplitDataset):
    """Unlabeled crops ``{'w', 's1', 's2', 'ignore', 'box1', 'box2', 'id'}`` (masks unused)."""

    require_mask = False

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, rng = index_and_rng(key)
        d, s = self.cfg.data, self.samples[i]
        return {**augment.unlabeled_views(load_image(s.image), d.crop_size, d.aug,
                                          d.ignore_index, rng), "id": s.id}


class ValDataset(_SplitDataset):
    """Whole normalised images ``{'x', 'y', 'id'}`` (crop / sliding modes: evaluate.py)."""

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        x, y = augment.val_view(*load_pair(s, self.cfg), self.cfg.data.aug)
        return {"x": x, "y": y, "id": s.id}


def build_datasets(cfg: Config, with_unlabeled: bool) -> dict[str, Dataset]:
    """'labeled' (repeated to the unlabeled set's length), 'unlabeled' (optional), 'val'."""
    check_root(cfg.data.root, cfg.data.dataset)
    u = UnlabeledDataset(cfg, cfg.split_path("unlabeled_split")) if with_unlabeled else None
    sets = {"labeled": LabeledDataset(cfg, cfg.split_path("labeled_split"),
                                      None if u is None else len(u))}
    return {**sets, **({"unlabeled": u} if u is not None else {}),
            "val": ValDataset(cfg, cfg.split_path("val_split"))}

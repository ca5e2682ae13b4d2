"""Class colours: Pascal VOC's colour map, Cityscapes' trainId colours, those a dataset's
classes.txt gives (``name r g b``), and masks as palette images. One place for what
predictions, figures, VOC's stored masks and the synthetic data's masks look like.

    colourise(mask, "cityscapes").save("pred.png")     # (H, W) class indices -> 'P' image
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from mlcl.data.classes import CLASSES_FILE, read_classes

# Cityscapes' 19 trainId colours (from the dataset's label definitions).
CITYSCAPES_COLOURS = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32)]


def voc_palette() -> list[int]:
    """Pascal VOC's colour map (bit-interleaved), 256 RGB entries flat (768 ints, as PIL's
    ``putpalette`` takes them); index 255 is cream."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def palette_for(dataset: str, root: Optional[str | Path] = None) -> np.ndarray:
    """(256, 3) uint8 colours: the VOC colour map, with Cityscapes' trainId colours first,
    and the colours ``root``'s classes.txt gives (if any) over both."""
    pal = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    if dataset == "cityscapes":
        pal[: len(CITYSCAPES_COLOURS)] = CITYSCAPES_COLOURS
    path = Path(root or "").expanduser() / CLASSES_FILE
    if str(root or "").strip() and path.is_file():
        for i, (_, colour) in enumerate(read_classes(path)):
            pal[i] = colour if colour is not None else pal[i]
    return pal


def colourise(mask: np.ndarray, dataset: str, root: Optional[str | Path] = None) -> Image.Image:
    """(H, W) class indices -> palette ('P' mode) image (:func:`palette_for`'s colours)."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(palette_for(dataset, root).reshape(-1).tolist())
    return img

"""Paired (image, mask) augmentations: UniMatch's (docs/method.md, "Augmentations") on
tv_tensors; every draw comes from ``rng`` (training: a seeded ``random.Random``)."""
from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from mlcl.config import AugmentConfig

UNLABELED_PAD = 254  # mask fill of unlabeled crops' padding, then their ignore map (UniMatch)

Rng = Any  # the `random` module or a random.Random


def to_tv(image: Image.Image, mask: np.ndarray | None = None
          ) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """PIL image, (H, W) mask (None: zeros, to track padding) -> uint8 Image and Mask (1, H, W)."""
    img = tv_tensors.Image(F.pil_to_tensor(image.convert("RGB")))
    m = (torch.zeros((1, *img.shape[-2:]), dtype=torch.uint8) if mask is None
         else torch.from_numpy(np.array(mask, dtype=np.uint8, copy=True))[None])
    return img, tv_tensors.Mask(m)


def normalize(image: torch.Tensor, aug: AugmentConfig) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 (3, H, W), scaled to [0, 1] and normalised."""
    x = F.to_dtype(image, torch.float32, scale=True)
    return F.normalize(x, mean=list(aug.mean), std=list(aug.std)).as_subclass(torch.Tensor)


def rescale(image, mask, scale_range, rng: Rng = random):
    """Resize both (aspect kept) so that the long side is a random integer in long * scale_range."""
    long = max(image.shape[-2:])
    new_long = max(1, rng.randint(int(long * scale_range[0]), int(long * scale_range[1])))
    size = [max(1, int(d * new_long / long + 0.5)) for d in image.shape[-2:]]
    return F.resize(image, size, antialias=True), F.resize(mask, size)


def pad_crop(image, mask, size: int, mask_fill: int, rng: Rng = random):
    """Pad right/bottom up to ``size`` (image 0, mask ``mask_fill``), then a random crop."""
    h, w = image.shape[-2:]
    pad = [0, 0, max(size - w, 0), max(size - h, 0)]  # left, top, right, bottom
    if pad[2] or pad[3]:
        image, mask = F.pad(image, pad, fill=0), F.pad(mask, pad, fill=mask_fill)
        h, w = image.shape[-2:]
    top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    return F.crop(image, top, left, size, size), F.crop(mask, top, left, size, size)


def geometry(image, mask, crop_size: int, aug: AugmentConfig, mask_fill: int,
             rng: Rng = random):
    """The shared geometry: rescale, pad to the crop (mask: ``mask_fill``), crop, flip."""
    image, mask = pad_crop(*rescale(image, mask, aug.scale_range, rng), crop_size, mask_fill, rng)
    if rng.random() < aug.hflip_p:
        return F.horizontal_flip(image), F.horizontal_flip(mask)
    return image, mask


def strong(image: torch.Tensor, aug: AugmentConfig, rng: Rng = random) -> torch.Tensor:
    """uint8 (3, H, W) -> strongly augmented uint8 (3, H, W), on PIL (fast): ColorJitter (as
    torchvision's, properties in a random order; strength 0 leaves one alone), gray, blur."""
    pil = F.to_pil_image(image.as_subclass(torch.Tensor))
    if rng.random() < aug.jitter_p:
        ops = [(fn, (max(0.0, 1 - strength), 1 + strength)) for strength, fn in (
            (aug.brightness, F.adjust_brightness), (aug.contrast, F.adjust_contrast),
            (aug.saturation, F.adjust_saturation)) if strength > 0]
        if aug.hue > 0:
            ops.append((F.adjust_hue, (-aug.hue, aug.hue)))
        rng.shuffle(ops)
        for fn, (lo, hi) in ops:
            pil = fn(pil, rng.uniform(lo, hi))
    if rng.random() < aug.grayscale_p:
        pil = F.rgb_to_grayscale(pil, num_output_channels=3)
    if rng.random() < aug.blur_p:
        # PIL's radius is the Gaussian's standard deviation
        pil = pil.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*aug.blur_sigma)))
    return F.pil_to_tensor(pil)


def cutmix_box(size: int | tuple[int, int], p: float, area, ratio,
               rng: Rng = random) -> torch.Tensor:
    """A CutMix box as a BoolTensor (H, W): all False with probability 1 - p, else a box of
    area ``area`` x H * W and aspect ratio (h / w) in ``ratio``, placed where it fits."""
    h, w = (size, size) if isinstance(size, int) else size
    box = torch.zeros((h, w), dtype=torch.bool)
    if rng.random() >= p:
        return box
    target = rng.uniform(*area) * h * w
    for _ in range(1000):
        r = rng.uniform(*ratio)
        bw, bh = int(math.sqrt(target / r)), int(math.sqrt(target * r))
        x, y = rng.randint(0, w - 1), rng.randint(0, h - 1)
        if x + bw <= w and y + bh <= h:
            break
    else:  # pragma: no cover - only for degenerate ranges: clip instead of looping forever
        bw, bh, x, y = min(bw, w), min(bh, h), 0, 0
    box[y:y + bh, x:x + bw] = True
    return box


def labeled_views(image: Image.Image, mask: np.ndarray, crop_size: int, aug: AugmentConfig,
                  ignore_index: int, rng: Rng = random) -> tuple[torch.Tensor, torch.Tensor]:
    """x float (3, S, S) and y long (S, S), padding = ``ignore_index``."""
    img, m = geometry(*to_tv(image, mask), crop_size, aug, ignore_index, rng)
    return normalize(img, aug), m.as_subclass(torch.Tensor)[0].long()


def unlabeled_views(image: Image.Image, crop_size: int, aug: AugmentConfig,
                    ignore_index: int, rng: Rng = random) -> dict[str, torch.Tensor]:
    """w / s1 / s2 float (3, S, S) sharing one geometry; ignore long (S, S),
    ``ignore_index`` where padded else 0; box1 / box2 bool (S, S)."""
    img, pad = geometry(*to_tv(image), crop_size, aug, UNLABELED_PAD, rng)
    out = {"w": normalize(img, aug)}
    for k in ("1", "2"):
        out["s" + k] = normalize(strong(img, aug, rng), aug)
        out["box" + k] = cutmix_box(crop_size, aug.cutmix_p, aug.cutmix_area, aug.cutmix_ratio, rng)
    out["ignore"] = torch.where(pad.as_subclass(torch.Tensor)[0] == UNLABELED_PAD,
                                ignore_index, 0).long()
    return out


def val_view(image: Image.Image, mask: np.ndarray, aug: AugmentConfig
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole image, normalised, and its mask: x float (3, H, W), y long (H, W)."""
    img, m = to_tv(image, mask)
    return normalize(img, aug), m.as_subclass(torch.Tensor)[0].long()

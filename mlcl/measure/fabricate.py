"""Small datasets (real layout, formats, image sizes, classes; UniMatch lists for every cell
listing the same few images) and backbone checkpoints (the keys and shapes of UniMatch's
deep-stem ImageNet files or of the official DINOv2 files, random values) for rehearsals and
tests."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from torch import nn

from mlcl.config import ConfigError, ModelConfig
from mlcl.study.synthetic import render, voc_palette
from mlcl.files import atomic_torch_save, atomic_write_json
from mlcl.model import DINOV2, DPT, build_backbone
from mlcl.prepare.split_lists import PAIRED, SPLITS

MARKER = "FABRICATED.json"  # written last; its presence means mlcl wrote the folder
NUM_CLASSES = {"pascal": 21, "cityscapes": 19, "ade20k": 150, "coco": 81}
# how the lists name a sample: an id of VOC's or Cityscapes' layout, or its `image mask` pair
LAYOUT = {"pascal": "voc", "cityscapes": "cityscapes", "ade20k": "pairs", "coco": "pairs"}
# (width, height) of the images: VOC's at most 500 px on the long side, as in VOC 2012; ADE's
# mostly 512 on the short side; COCO's at most 640 on the long side
SIZES = {"pascal": ((500, 375), (375, 500), (500, 333), (500, 500), (334, 500), (500, 281)),
         "cityscapes": ((2048, 1024),), "ade20k": ((683, 512), (512, 683), (512, 512), (768, 512)),
         "coco": ((640, 480), (480, 640), (640, 427), (427, 640), (640, 640))}
CITYSCAPES_CITIES = {"train": ("aachen", "bochum", "zurich"), "val": ("frankfurt", "munster")}
IMAGENET_CLASSES = 1000


def voc_ids(n: int, start: int = 0, year: int = 2007) -> list[str]:
    """VOC-style ids ``2007_000000``, ``2007_000001``, ..."""
    return [f"{year}_{start + i:06d}" for i in range(n)]


def cityscapes_ids(split: str, cities: tuple[str, ...], per_city: int) -> list[str]:
    """Ids like ``train/aachen/aachen_000000_000019`` (split/city/city_seq_frame)."""
    return [f"{split}/{c}/{c}_{k:06d}_000019" for c in cities for k in range(per_city)]


def paired_lines(dataset: str, pool: str, n: int) -> list[str]:
    """``image mask`` lines of ``n`` images of an ADE20K or COCO pool, named as theirs are."""
    (images, masks), start = PAIRED[dataset][pool], 1 if pool == "train" else 500_001
    stems = ([f"ADE_{'train' if pool == 'train' else 'val'}_{k:08d}" for k in range(1, n + 1)]
             if dataset == "ade20k" else [f"{start + k:012d}" for k in range(n)])
    return [f"{images}/{s}.jpg {masks}/{s}.png" for s in stems]


def unimatch_lists(layout: str, train: list[str], val: list[str],
                   sizes: dict[str, int], extra_train: list[str] = ()) -> dict[str, str]:
    """UniMatch-format lists by path under ``splits/<dataset>/``: ``NAME/labeled.txt`` (the
    first ``sizes[NAME]`` of ``train``), ``NAME/unlabeled.txt`` (the rest and ``extra_train``),
    ``val.txt``."""
    def line(i: str) -> str:
        if layout == "pairs":  # already an `image mask` line
            return f"{i}\n"
        if layout == "voc":
            return f"JPEGImages/{i}.jpg SegmentationClass/{i}.png\n"
        return f"leftImg8bit/{i}_leftImg8bit.png gtFine/{i}_gtFine_labelTrainIds.png\n"

    out = {"val.txt": "".join(map(line, val))}
    for name, n in sizes.items():
        out[f"{name}/labeled.txt"] = "".join(map(line, train[:n]))
        out[f"{name}/unlabeled.txt"] = "".join(map(line, list(train[n:]) + list(extra_train)))
    return out


def _write_images(root: Path, dataset: str, train: list[str], val: list[str], seed: int,
                  scale: float) -> None:
    """Rendered images and masks at ``scale`` times the real sizes: JPEG images (Cityscapes'
    frames PNG, rendered at a quarter size and enlarged), L masks (VOC's palette PNG)."""
    voc, jpeg, palette = dataset == "pascal", dataset != "cityscapes", voc_palette()
    for k, i in enumerate(train + val):
        sizes = SIZES[dataset]
        w, h = (round(n * scale) for n in sizes[k % len(sizes)])
        shrink = 1 if jpeg else 4
        image, mask = render(np.random.default_rng(seed + k), h // shrink, w // shrink,
                             NUM_CLASSES[dataset])
        img = Image.fromarray(image).resize((w, h), Image.BILINEAR)
        m = Image.fromarray(mask).resize((w, h), Image.NEAREST)
        img_rel, mask_rel = unimatch_lists(LAYOUT[dataset], [], [i], {})["val.txt"].split()
        for rel in (img_rel, mask_rel):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
        # PNG at a fast zlib level: a 2048x1024 frame in ~0.1 s instead of ~0.6 s
        img.save(root / img_rel, **({"quality": 90} if jpeg else {"compress_level": 1}))
        if voc:
            m.putpalette(palette)  # L -> P with the indices kept, as VOC's masks
        m.save(root / mask_rel, compress_level=1)
    if voc:
        sets = root / "ImageSets" / "Segmentation"
        sets.mkdir(parents=True, exist_ok=True)
        for name, part in (("train", train), ("val", val), ("train_aug", train)):
            (sets / f"{name}.txt").write_text("".join(f"{i}\n" for i in part))


def fabricate_dataset(dataset: str, root: str | Path, labeled: int, unlabeled: int, val: int,
                      seed: int = 0, scale: float = 1.0) -> Path:
    """``root`` holding a ``dataset`` (a key of NUM_CLASSES) of ``labeled + unlabeled``
    training and ``val`` validation images at ``scale`` times the real sizes, every cell
    listing the first ``labeled`` as labeled. An earlier fabrication is reused (same
    arguments) or replaced; a non-empty folder without the marker is refused (ConfigError)."""
    if dataset not in NUM_CLASSES:
        raise ValueError(f"dataset must be one of {', '.join(NUM_CLASSES)}, got {dataset!r}")
    if min(labeled, unlabeled, val) < 1:
        raise ValueError("need at least one labeled, one unlabeled and one val image")
    root = Path(root)
    params = {"dataset": dataset, "labeled": labeled, "unlabeled": unlabeled, "val": val,
              "seed": seed, "scale": scale, "format": 1}
    if _reusable(root, root / MARKER, params):
        return root
    if dataset == "pascal":
        train, val_ids = voc_ids(labeled + unlabeled), voc_ids(val, start=100_000)
    elif dataset in PAIRED:
        train, val_ids = (paired_lines(dataset, pool, n) for pool, n in
                          (("train", labeled + unlabeled), ("val", val)))
    else:
        cities = CITYSCAPES_CITIES
        train, val_ids = (cityscapes_ids(s, cities[s], -(-n // len(cities[s])))[:n]
                          for s, n in (("train", labeled + unlabeled), ("val", val)))
    _write_images(root, dataset, train, val_ids, seed, scale)
    lists = unimatch_lists(LAYOUT[dataset], train, val_ids,
                           {name: labeled for name in SPLITS[dataset]})
    for rel, text in lists.items():
        path = root / "splits" / dataset / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    atomic_write_json(root / MARKER, params)
    return root


def _reusable(path: Path, marker: Path, params: dict) -> bool:
    """True if ``path`` holds a fabrication with ``params``; an older one is removed, anything
    else there refused (ConfigError)."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return False
    if not marker.is_file():
        raise ConfigError(f"{path} exists and was not fabricated by mlcl (no {marker.name}); "
                          f"choose another folder or --out, or remove it")
    with contextlib.suppress(ValueError):
        if json.loads(marker.read_text()) == params:
            return True
    if path.is_dir():
        shutil.rmtree(path)  # an older fabrication of ours, with other settings
    return False


def weights_name(backbone: str, width: int) -> str:
    """File name of a fabricated checkpoint, e.g. ``resnet50_deepstem-w64.pth``,
    ``dinov2_s.pth`` (a ViT has no width)."""
    return f"{backbone}.pth" if backbone in DINOV2 else f"{backbone}-w{width}.pth"


def backbone_of(backbone: str, width: int = 64) -> nn.Module:
    """The module ``model.backbone`` names as the model holds it (random init): a ResNet of
    mlcl.model.BACKBONES, or DINOv2's timm ViT."""
    if backbone in DINOV2:
        return DPT(ModelConfig(backbone=backbone, feature_channels=1), 1).backbone
    return build_backbone(backbone, width)


def fabricate_backbone(path: str | Path, backbone: str, width: int = 64, seed: int = 0) -> Path:
    """A checkpoint with the keys and shapes of ``backbone``'s pretrained file, random values:
    UniMatch's ``resnet50.pth`` / ``resnet101.pth`` (ImageNet, with ``fc``), or the official
    DINOv2 file (``dinov2_vits14_pretrain.pth``: timm's names, with ``mask_token`` (1, D));
    reused when its marker matches."""
    path = Path(path)
    marker = path.with_name(path.name + ".fabricated.json")
    params = {"backbone": backbone, "width": width, "seed": seed}
    if _reusable(path, marker, params):
        return path
    torch.manual_seed(seed)
    net = backbone_of(backbone, width)  # random weights (timm's or torchvision's init)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    if backbone in DINOV2:  # DINOv2's masked-modelling token (unused for segmentation)
        state["mask_token"] = torch.randn(1, net.embed_dim)
    else:
        for k, v in state.items():  # batch norm (1-dim): random affine and statistics too
            if v.dim() == 1:
                positive = k.endswith(("weight", "running_var"))
                state[k] = torch.rand_like(v) + 0.5 if positive else 0.1 * torch.randn_like(v)
        state["fc.weight"] = 0.01 * torch.randn(IMAGENET_CLASSES, net.out_channels)
        state["fc.bias"] = torch.zeros(IMAGENET_CLASSES)
    atomic_torch_save(path, state)
    atomic_write_json(marker, params)
    return path

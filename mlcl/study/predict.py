"""Loading trained weights, and `python -m mlcl predict`: palette PNG masks (``a.jpg`` ->
``a.jpg.png``) and ``legend.png`` / ``.txt`` in an OutputFolder; unreadable, unsupported or
oversized files are named and skipped, large images predicted in overlapping tiles."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mlcl.augment import normalize, to_tv
from mlcl.config import Config, config_from_dict, fill_defaults, parse_overrides, set_key
from mlcl.data.classes import check_classes, default_class_names
from mlcl.data.datasets import to_rgb
from mlcl.data.palette import colourise, palette_for
from mlcl.data.splits import IMAGE_SUFFIXES
from mlcl.evaluate import predict_logits, sliding_window_logits
from mlcl.folders import OutputFolder
from mlcl.model import build_model

MAX_PIXELS = 25_000_000  # images above this are refused (the class scores alone take K*4*N bytes)
TILE = 1024  # images above TILE*TILE pixels are predicted in windows of this size


def legend(names: list[str], pal: np.ndarray) -> tuple[Image.Image, str]:
    """The class colours ``pal`` (palette_for's) as a picture and as text
    ('index<TAB>name<TAB>r,g,b' per line)."""
    row = 18
    img = Image.new("RGB", (220, row * len(names) + 4), "white")
    draw = ImageDraw.Draw(img)
    for i, name in enumerate(names):
        top = 2 + i * row
        draw.rectangle([4, top, 4 + row - 4, top + row - 4], fill=tuple(int(c) for c in pal[i]),
                       outline="black")
        draw.text((row + 8, top + 2), f"{i} {name}", fill="black")
    text = "".join(f"{i}\t{n}\t{','.join(str(int(c)) for c in pal[i])}\n"
                   for i, n in enumerate(names))
    return img, text


def checkpoint_file(path: str | Path) -> Path:
    """``path``, or a run folder's ``best.pt``; a FileNotFoundError saying what is missing."""
    path = Path(path)
    if path.is_dir() and not (path / "best.pt").is_file():
        raise FileNotFoundError(f"run folder {path} has no best.pt (training writes it at "
                                "the first validation); give a .pt file with --checkpoint")
    path = path / "best.pt" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (training writes best.pt "
                                "and last.pt into its output_dir)")
    return path


def read_checkpoint(path: Path) -> dict:
    """The dict of a weights file written by training, or a ValueError naming the file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"checkpoint {path} cannot be read as weights "
                         f"({e.__class__.__name__}): give a best.pt / last.pt written by "
                         "training") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"checkpoint {path} is not an mlcl weights file (no 'model'/'config')")
    return ckpt


def load_weights(path: str | Path, overrides: list[str] | None = None, use_data: bool = False):
    """:func:`model_from_checkpoint` of a ``best.pt``/``last.pt`` or run folder (its best.pt)."""
    path = checkpoint_file(path)
    return model_from_checkpoint(read_checkpoint(path), path, overrides, use_data)


def model_from_checkpoint(ckpt: dict, path: Path, overrides: list[str] | None = None,
                          use_data: bool = False):
    """(model in eval mode, cfg, class names) from ``ckpt`` read from ``path``: its config
    with ``overrides`` on top; a class count that differs between the checkpoint, the config
    and (``use_data``) the data's classes.txt is an error naming all three."""
    cfg = config_from_dict(ckpt["config"])
    for key, value in parse_overrides(overrides).items():
        set_key(cfg, key, value)
    fill_defaults(cfg)
    state = ckpt["model"]
    classes = state["classifier.weight"].shape[0] if "classifier.weight" in state \
        else len(ckpt.get("class_names") or []) or cfg.data.num_classes
    check_classes(cfg, f"checkpoint {path}", classes, use_data)
    cfg.model.pretrained = False  # the checkpoint provides every weight
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg, ckpt.get("class_names") or default_class_names(classes)


def list_images(images: str | Path, recursive: bool = False
                ) -> tuple[Path, list[Path], list[Path]]:
    """(base folder, sorted image files, the other files) of an image file or folder
    (``recursive``)."""
    images = Path(images)
    if images.is_file():
        if images.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"--images {images} is not an image ({', '.join(IMAGE_SUFFIXES)})")
        return images.parent, [images], []
    if not images.is_dir():
        raise FileNotFoundError(f"--images {images} does not exist")
    files = sorted(p for p in (images.rglob("*") if recursive else images.iterdir())
                   if p.is_file())
    found = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        more = "" if recursive else " (sub-folders are read with --recursive)"
        raise ValueError(f"--images {images} holds no images ({', '.join(IMAGE_SUFFIXES)})"
                         f"{more}")
    return images, found, [p for p in files if p not in set(found)]


def read_image(path: Path, max_pixels: int) -> Image.Image:
    """The RGB image, or a ValueError naming the file (unreadable, or over ``max_pixels``)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(f"image {path} is {w}x{h} = {w * h:,} pixels, over the limit of "
                                 f"{max_pixels:,} (--max-pixels)")
            return to_rgb(im)
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {path} is too large to open ({e})") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path} ({e})") from None


@torch.no_grad()
def predict_image(model, cfg: Config, rgb: Image.Image, tile: int = TILE) -> np.ndarray:
    """(H, W) uint8 class indices; images over ``tile``^2 pixels in overlapping tiles."""
    x = normalize(to_tv(rgb)[0], cfg.data.aug)[None]
    if rgb.width * rgb.height > tile * tile:
        scores = sliding_window_logits(model, x, cfg.data.num_classes, tile, max(tile * 2 // 3, 1))
    else:
        scores = predict_logits(model, x, cfg)
    return scores.argmax(1)[0].numpy().astype(np.uint8)


@dataclass
class Prediction:
    written: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # one message per skipped image


def predict_images(model, cfg: Config, names: list[str], images: str | Path, out: str | Path,
                   overlay: bool = False, alpha: float = 0.5, recursive: bool = False,
                   max_pixels: int = MAX_PIXELS, tile: int = TILE) -> Prediction:
    """``<name>.png`` masks (and ``<name>.overlay.jpg`` blends) of ``images`` (a file or
    folder) and the legend into ``out``; skipped images on stderr and in ``failed``."""
    base, files, others = list_images(images, recursive)
    folder = OutputFolder(out, "--out", tuple(files))
    result = Prediction()
    for path in others:
        result.failed.append(f"{path} is not an image mlcl reads ({' '.join(IMAGE_SUFFIXES)})")
        print(f"skipped: {result.failed[-1]}", file=sys.stderr, flush=True)
    pal = palette_for(cfg.data.dataset, cfg.data.root)
    for path in files:
        try:
            rgb = read_image(path, max_pixels)
        except ValueError as e:
            print(f"skipped: {e}", file=sys.stderr, flush=True)
            result.failed.append(str(e))
            continue
        mask = colourise(predict_image(model, cfg, rgb, tile), cfg.data.dataset, cfg.data.root)
        rel = path.relative_to(base)
        result.written.append(folder.write(f"{rel}.png", lambda p: mask.save(p, format="PNG")))
        if overlay:
            blend = Image.blend(rgb, mask.convert("RGB"), alpha)
            result.written.append(folder.write(
                f"{rel}.overlay.jpg", lambda p: blend.save(p, format="JPEG", quality=90)))
    if result.written:
        picture, text = legend(names, pal)
        result.written.append(folder.write("legend.png", lambda p: picture.save(p, "PNG")))
        result.written.append(folder.write("legend.txt", lambda p: p.write_text(text)))
    return result


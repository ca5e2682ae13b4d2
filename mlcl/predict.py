"""Loading trained weights, and writing predictions for a folder of images as palette PNGs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mlcl.config import Config, ConfigError, config_from_dict, parse_overrides, set_key, resolve
from mlcl.files import atomic_write

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Cityscapes' 19 trainId colours (from the dataset's label definitions).
CITYSCAPES_COLOURS = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32)]


def palette_for(dataset: str) -> np.ndarray:
    """(256, 3) uint8 colours: the VOC colour map, with Cityscapes' trainId colours first."""
    from mlcl.data.synthetic import voc_palette

    pal = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    if dataset == "cityscapes":
        pal[: len(CITYSCAPES_COLOURS)] = CITYSCAPES_COLOURS
    return pal


def colourise(mask: np.ndarray, dataset: str) -> Image.Image:
    """(H, W) class indices -> palette ('P' mode) image; 255 keeps the VOC border colour."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(palette_for(dataset).reshape(-1).tolist())
    return img


def load_weights(path: str | Path, overrides: list[str] | None = None):
    """(model, cfg, class_names) from a ``best.pt``/``last.pt`` written by training. The
    checkpoint's config is the base; ``overrides`` (key=value) go on top. A class count that
    differs between the checkpoint and the config is an error."""
    from mlcl.model import build_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (training writes best.pt "
                                "and last.pt into its output_dir)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"checkpoint {path} cannot be read ({e.__class__.__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"checkpoint {path} is not an mlcl weights file (no 'model'/'config')")
    cfg = config_from_dict(ckpt["config"])
    for key, value in parse_overrides(overrides).items():
        set_key(cfg, key, value)
    resolve(cfg)
    classes = ckpt["model"]["classifier.weight"].shape[0] if "classifier.weight" in ckpt["model"] \
        else len(ckpt.get("class_names") or [])
    if classes and classes != cfg.data.num_classes:
        raise ConfigError(f"checkpoint {path} predicts {classes} classes but config key "
                          f"'data.num_classes' is {cfg.data.num_classes}")
    cfg.model.pretrained = False  # the checkpoint provides every weight
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"], strict=True)
    model.eval()
    return model, cfg, ckpt.get("class_names") or []


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


@torch.no_grad()
def predict_folder(model, cfg: Config, images: str | Path, out: str | Path,
                   overlay: bool = False, alpha: float = 0.5) -> list[Path]:
    """Predict every image in ``images``; write ``<stem>.png`` palette masks (and
    ``<stem>_overlay.jpg`` blends when asked) into ``out``."""
    from mlcl.evaluate import predict_logits

    mean = torch.tensor(cfg.data.aug.mean).view(3, 1, 1)
    std = torch.tensor(cfg.data.aug.std).view(3, 1, 1)
    written = []
    out = Path(out)
    for path in list_images(images):
        try:
            rgb = Image.open(path).convert("RGB")
        except OSError as e:
            raise ValueError(f"cannot read image {path} ({e})") from e
        x = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float().div(255)
        x = ((x - mean) / std).unsqueeze(0)
        pred = predict_logits(model, x, cfg).argmax(1)[0].numpy().astype(np.uint8)
        mask = colourise(pred, cfg.data.dataset)
        target = out / f"{path.stem}.png"
        written.append(atomic_write(target, lambda p: mask.save(p, format="PNG")))
        if overlay:
            blend = Image.blend(rgb, mask.convert("RGB"), alpha)
            written.append(atomic_write(out / f"{path.stem}_overlay.jpg",
                                        lambda p: blend.save(p, format="JPEG", quality=90)))
    return written

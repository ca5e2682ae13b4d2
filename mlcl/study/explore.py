"""Inside trained checkpoints, for the notebooks: predictions, SAI's perturbations, pixel
features and prototypes, by the core's own functions in eval mode; what is computed here is
for display only (PCA colours, 2-D embeddings, compactness)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import default_collate

from mlcl import losses, released
from mlcl.config import Config
from mlcl.data.datasets import UnlabeledDataset, ValDataset
from mlcl.engine import make_accelerator
from mlcl.evaluate import evaluate, predict_logits
from mlcl.methods import mix_source, paste
from mlcl.model import upsample
from mlcl.prototypes import initialised
from mlcl.study.predict import checkpoint_file, model_from_checkpoint, read_checkpoint
from mlcl.study.registry import fix_data_root, resolve

@dataclass
class Checkpoint:
    """A loaded best.pt / last.pt: the model (eval mode), its config, classes and bank."""

    model: Any  # DeepLabV3Plus in eval mode
    cfg: Config
    class_names: list[str]
    bank: Tensor | None  # (K, C) prototypes of an MLCL run, None otherwise
    epoch: int | None
    miou: float | None
    path: Path
    method: str  # cfg.method
    run_name: str  # the run it belongs to: its output folder's name
    synthetic: bool  # trained on the synthetic shapes data


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def load_checkpoint(path: str | Path, overrides: list[str] | None = None,
                    device: str | torch.device | None = None) -> Checkpoint:
    """A checkpoint or run folder (its best.pt), the model on ``device`` (default: a GPU)."""
    path = checkpoint_file(resolve(path))
    raw = read_checkpoint(path)
    model, cfg, names = model_from_checkpoint(raw, path, overrides)
    model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bank = (raw.get("bank") or {}).get("protos")
    return Checkpoint(model.eval(), fix_data_root(cfg), names, bank, raw.get("epoch"),
                      raw.get("miou"), path, cfg.method, path.resolve().parent.name,
                      cfg.data.dataset == "synthetic")


def evaluate_checkpoint(ck: Checkpoint) -> dict[str, Any]:
    """mIoU of the checkpoint on its validation split (mlcl.evaluate, one process)."""
    acc = make_accelerator(ck.cfg)
    home = device_of(ck.model)
    model = ck.model.to(acc.device)
    result = evaluate(model, ValDataset(ck.cfg, ck.cfg.split_path("val_split")), ck.cfg, acc)
    ck.model = model.to(home)
    return {"miou": result["miou"], "iou": dict(zip(ck.class_names, result["iou"])),
            "num_images": result["num_images"], "checkpoint": str(ck.path)}


def denormalise(x: Tensor, cfg: Config) -> np.ndarray:
    """A normalised (3, H, W) image -> uint8 (H, W, 3)."""
    mean = torch.tensor(cfg.data.aug.mean).view(3, 1, 1)
    std = torch.tensor(cfg.data.aug.std).view(3, 1, 1)
    img = (x.detach().cpu().float() * std + mean).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def spread_indices(total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(total)`` (deterministic)."""
    n = max(1, min(n, total))
    return sorted({int(i) for i in np.linspace(0, total - 1, n)})


@torch.no_grad()
def predict_val(checkpoints: dict[str, Checkpoint], num_images: int = 4) -> dict[str, Any]:
    """The same validation images (the first checkpoint's data) through each checkpoint:
    {'images': [uint8 (H, W, 3)], 'targets': [(H, W)], 'preds': {label: [(H, W)]}, 'ids',
    'dataset', 'class_names'}."""
    first = next(iter(checkpoints.values()))
    ds = ValDataset(first.cfg, first.cfg.split_path("val_split"))
    idx = spread_indices(len(ds), num_images)
    items = [ds[i] for i in idx]
    preds = {}
    for label, ck in checkpoints.items():
        ck.model.eval()
        dev = device_of(ck.model)
        preds[label] = [predict_logits(ck.model, it["x"][None].to(dev), ck.cfg).argmax(1)[0]
                        .cpu().numpy() for it in items]
    return {"images": [denormalise(it["x"], first.cfg) for it in items],
            "targets": [it["y"].numpy() for it in items], "preds": preds,
            "ids": [it["id"] for it in items], "dataset": first.cfg.data.dataset,
            "class_names": first.class_names}


def unlabeled_batch(cfg: Config, num_images: int = 4, seed: int = 0) -> dict[str, Any]:
    """``num_images`` unlabeled training samples collated with their training views ('w',
    's1', 's2' (B, 3, S, S), 'ignore', 'box1', 'box2' (B, S, S)), drawn from ``seed``."""
    ds = UnlabeledDataset(cfg, cfg.split_path("unlabeled_split"))
    random.seed(seed)
    torch.manual_seed(seed)
    return default_collate([ds[i] for i in spread_indices(len(ds), num_images)])


@torch.no_grad()
def sai_views(model, batch: dict[str, Any], cfg: Config, double_transform: bool = False,
              seed: int = 0, cutmix: bool = False) -> dict[str, Tensor]:
    """What SAI does to ``batch`` (an :func:`unlabeled_batch`), on the CPU: 'w', 's'
    (B, 3, S, S) the views; 'f_w', 'f_s', 'f_mk', 'f_ne' (B, C, h, w) the features;
    'attention', 'keep' (B, h, w); 'p_w', 'p_s', 'p_m', 'p_n' (B, K, S, S) probabilities; per
    image 'v', 'mask_ratio', 'amplitude', 'dropped', 'mse_m', 'mse_n'. ``double_transform``:
    the release's mask ratio; ``cutmix``: both views mixed as in training; draws from
    ``seed``."""
    m = cfg.mlcl
    dev = device_of(model)
    w, s = batch["w"].to(dev), batch["s1"].to(dev)
    if cutmix:
        mix = mix_source({"u": batch})
        box = batch["box1"].to(dev)
        w, s = paste(box, mix["w"].to(dev), w), paste(box, mix["s1"].to(dev), s)
    model.eval()
    f_w, f_s = model.encode(w), model.encode(s)  # (B, C, h, w)
    v = losses.per_image_similarity(f_w, f_s)  # (B,)
    g = torch.Generator(device=dev).manual_seed(seed)
    ratio = (released.sai_mask_ratio_twice if double_transform else losses.sai_mask_ratio)(
        v, m.kappa)
    f_mk, keep = losses.sai_mask(f_s, ratio, m.mask_jitter, generator=g)
    f_ne = losses.sai_noise(f_s, v, m.kappa, generator=g)
    size = w.shape[-2:]
    prob = {name: upsample(model.decode(f), size).softmax(1)
            for name, f in (("p_w", f_w), ("p_s", f_s), ("p_m", f_mk), ("p_n", f_ne))}

    def per_image(p: Tensor) -> Tensor:  # (B,) L_m or L_n of each image
        return torch.stack([losses.sai_mse(p[i:i + 1], prob["p_w"][i:i + 1])
                            for i in range(p.shape[0])])

    out = {"w": w, "s": s, "v": v, "f_w": f_w, "f_s": f_s, "f_mk": f_mk, "f_ne": f_ne,
           "mask_ratio": ratio, "amplitude": losses.sai_amplitude(v, m.kappa),
           "attention": f_s.float().mean(1),  # A_i of losses.sai_mask: the channel mean
           "keep": keep, "dropped": 1.0 - keep.float().flatten(1).mean(1),
           "mse_m": per_image(prob["p_m"]), "mse_n": per_image(prob["p_n"]), **prob}
    return {k: t.cpu() for k, t in out.items()}


def head(views: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    """The first ``n`` images of :func:`sai_views`."""
    return {k: v[:n] for k, v in views.items()}


def pca_rgb(maps: list[Tensor]) -> list[np.ndarray]:
    """Feature maps (C, h, w) -> RGB (h, w, 3) in [0, 1] from one 3-component PCA shared by
    all maps (comparable colours), each scaled by its 1st-99th percentiles."""
    rows = torch.cat([f.detach().float().flatten(1).t() for f in maps])  # (sum hw, C)
    mu = rows.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(rows - mu, full_matrices=False)
    proj = (rows - mu) @ vh[:3].t()  # (N, 3)
    lo, hi = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)
    proj = ((proj - lo) / (hi - lo).clamp(min=1e-8)).clamp(0, 1)
    parts = proj.split([f.shape[1] * f.shape[2] for f in maps])
    return [p.reshape(f.shape[1], f.shape[2], 3).numpy() for f, p in zip(maps, parts)]


@dataclass
class FeatureSet:
    """Pixel features of one checkpoint on validation images, with its prototypes."""

    label: str
    method: str
    feats: np.ndarray  # (N, C) at feature resolution
    labels: np.ndarray  # (N,) ground-truth class (nearest-resized; ignore dropped)
    protos: np.ndarray  # (K, C); NaN rows where a class has no prototype
    proto_source: str  # "memory bank" or "class means"
    class_means: np.ndarray  # (K, C) mean feature per ground-truth class (NaN if absent)
    class_names: list[str]


@torch.no_grad()
def feature_set(label: str, ck: Checkpoint, num_images: int = 16, max_pixels: int = 2000,
                seed: int = 0) -> FeatureSet:
    """Features and classes of validation pixels (``max_pixels`` / K per class), with the
    prototypes of ``ck`` (its memory bank, else the class means)."""
    cfg = ck.cfg
    ds = ValDataset(cfg, cfg.split_path("val_split"))
    feats, labels = [], []
    dev = device_of(ck.model.eval())
    for i in spread_indices(len(ds), num_images):
        item = ds[i]
        f = ck.model.encode(item["x"][None].to(dev)).float().cpu()  # (1, C, h, w)
        y = F.interpolate(item["y"][None, None].float(), size=f.shape[-2:], mode="nearest")
        y = y.long().flatten()
        keep = y != cfg.data.ignore_index
        feats.append(f[0].flatten(1).t()[keep])
        labels.append(y[keep])
    feats, labels = torch.cat(feats).numpy(), torch.cat(labels).numpy()
    rng = np.random.default_rng(seed)
    cap = max(1, max_pixels // cfg.data.num_classes)
    chosen = [rng.permutation(np.flatnonzero(labels == k))[:cap]
              for k in range(cfg.data.num_classes)]
    idx = np.sort(np.concatenate(chosen))
    feats, labels = feats[idx], labels[idx]
    means = class_means(feats, labels, cfg.data.num_classes)
    if ck.bank is not None and bool(initialised(ck.bank).any()):
        protos = ck.bank.double().numpy().copy()
        protos[~initialised(ck.bank).numpy()] = np.nan
        source = "memory bank"
    else:
        protos, source = means.copy(), "class means"
    return FeatureSet(label, ck.method, feats, labels, protos, source, means, ck.class_names)


def class_means(feats: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, C) mean feature of each class (NaN rows for absent classes)."""
    out = np.full((num_classes, feats.shape[1]), np.nan, dtype=np.float64)
    for k in range(num_classes):
        if (labels == k).any():
            out[k] = feats[labels == k].mean(0)
    return out


def unit_rows(a: np.ndarray) -> np.ndarray:
    """The rows of ``a`` (N, C) scaled to unit length."""
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), losses.COS_EPS)


def compactness(feats: np.ndarray, labels: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """(K,) per class k the mean cosine of its features to prototype k (NaN: none)."""
    fn, pn = unit_rows(feats), unit_rows(protos)
    return np.array([float((fn[labels == c] @ pn[c]).mean())
                     if (labels == c).any() and np.isfinite(protos[c]).all() else np.nan
                     for c in range(protos.shape[0])])


def embed_2d(feats: np.ndarray, protos: np.ndarray, method: str = "pca", seed: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2), (K, 2) embeddings of unit pixel features and prototypes: PCA fitted on the
    pixels, or t-SNE of both (NaN rows for missing prototypes)."""
    ok = np.isfinite(protos).all(1)
    x, p = unit_rows(feats.astype(np.float64)), unit_rows(protos[ok].astype(np.float64))
    proto_xy = np.full((protos.shape[0], 2), np.nan)
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed).fit(x)
        xy = pca.transform(x)
        if ok.any():
            proto_xy[ok] = pca.transform(p)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        both = np.concatenate([x, p])
        perplexity = float(min(30.0, max(2.0, (len(both) - 1) / 3)))
        emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                   metric="cosine").fit_transform(both)
        xy = emb[:len(x)]
        proto_xy[ok] = emb[len(x):]
    else:
        raise ValueError(f"embedding method must be 'pca' or 'tsne', got {method!r}")
    return xy, proto_xy

"""Evaluation: confusion matrix -> mIoU, whole or sliding window, each image on one process."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from mlcl.loaders import worker_init


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int,
                     ignore_index: int = 255) -> Tensor:
    """(K, K) counts of (target, pred) class pairs, rows = ground truth; ignore_index dropped."""
    valid = target != ignore_index
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_from_confusion(cm: Tensor) -> tuple[float, list[float]]:
    """(mIoU, per-class IoU = TP / (TP + FP + FN)); NaN (not in the mean) for an absent class."""
    cm = cm.double()
    tp = cm.diag()
    iou = tp / (cm.sum(0) + cm.sum(1) - tp)  # 0 / 0: NaN for a class neither seen nor predicted
    return float(torch.nanmean(iou)), iou.tolist()


def sliding_window_logits(model, x: Tensor, num_classes: int, window: int, stride: int) -> Tensor:
    """(B, K, H, W) probabilities: the mean softmax over windows of size ``window`` moved by
    ``stride``, the last of a row or column at the border; a smaller image is zero-padded."""
    b, _, h, w = x.shape
    x = F.pad(x, (0, max(window - w, 0), 0, max(window - h, 0)))  # zeros up to the window
    hh, ww = x.shape[-2:]
    probs = x.new_zeros(b, num_classes, hh, ww, dtype=torch.float32)
    count = x.new_zeros(1, 1, hh, ww, dtype=torch.float32)
    rows = max(math.ceil((hh - window) / stride), 0) + 1
    cols = max(math.ceil((ww - window) / stride), 0) + 1
    for r in range(rows):
        for c in range(cols):
            top, left = min(r * stride, hh - window), min(c * stride, ww - window)
            box = (slice(None), slice(None), slice(top, top + window), slice(left, left + window))
            probs[box] += model(x[box]).float().softmax(1)
            count[box] += 1
    return (probs / count)[:, :, :h, :w]


def predict_logits(model, x: Tensor, cfg) -> Tensor:
    """Class scores (B, K, H, W) for a whole image in the configured eval mode."""
    if cfg.eval.mode == "sliding":
        window = cfg.eval.crop_size or cfg.data.crop_size
        stride = max(int(window * cfg.eval.stride_ratio), 1)
        return sliding_window_logits(model, x, cfg.data.num_classes, window, stride)
    return model(x)


@torch.no_grad()
def evaluate(model, dataset, cfg, accelerator) -> dict[str, Any]:
    """{'miou', 'iou', 'confusion', 'num_images'} of ``model`` on ``dataset``, all processes."""
    was_training = model.training
    model.eval()
    part = Subset(dataset, range(accelerator.process_index, len(dataset),
                                 accelerator.num_processes))  # each image on one process
    loader = DataLoader(part, batch_size=1, shuffle=False, num_workers=cfg.data.num_workers,
                        worker_init_fn=worker_init(cfg.data.num_workers))
    k = cfg.data.num_classes
    cm = torch.zeros(k, k, dtype=torch.long, device=accelerator.device)
    n = torch.zeros((), dtype=torch.long, device=accelerator.device)
    for batch in loader:
        x, y = batch["x"].to(accelerator.device), batch["y"].to(accelerator.device)
        with accelerator.autocast():
            pred = predict_logits(model, x, cfg).argmax(1)
        cm += confusion_matrix(pred, y, k, cfg.data.ignore_index)
        n += x.shape[0]
    cm, n = accelerator.reduce(cm, reduction="sum"), accelerator.reduce(n, reduction="sum")
    model.train(was_training)
    miou, iou = iou_from_confusion(cm.cpu())
    return {"miou": miou * 100, "iou": [v * 100 for v in iou], "confusion": cm.cpu().tolist(),
            "num_images": int(n)}

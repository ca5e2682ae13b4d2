"""The class-prototype memory bank of FKA (METHOD.md section 2, "Prototype memory bank").

``PrototypeBank`` is an ``nn.Module`` whose (K, C) buffer ``protos`` is part of its
``state_dict``, so checkpoints carry it (the released code kept it outside the model and never
saved it, item 10). The update is vectorised (per-class sums and counts with ``index_add``) and
synchronised: the sums and counts are summed over processes before the update, so every
process applies the identical update computed from the global batch and the bank stays
identical everywhere. (The released ``prote.py`` instead updates each process's bank from its
local batch and then averages the banks; with one process the two are the same.)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class PrototypeBank(nn.Module):
    """rho (K, C): one prototype per class, all zeros until the class is first seen."""

    def __init__(self, num_classes: int, channels: int, momentum: float = 0.99,
                 conf_thresh: float = 0.95):
        super().__init__()
        self.num_classes = num_classes
        self.channels = channels
        self.momentum = momentum
        self.conf_thresh = conf_thresh
        self.register_buffer("protos", torch.zeros(num_classes, channels))

    @property
    def initialised(self) -> Tensor:
        """(K,) bool: classes whose prototype is no longer all zeros."""
        return self.protos.ne(0).any(dim=1)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, channels={self.channels}, "
                f"momentum={self.momentum}, conf_thresh={self.conf_thresh}")

    @torch.no_grad()
    def class_sums(self, feats: Tensor, labels: Tensor, conf: Tensor, valid: Tensor
                   ) -> tuple[Tensor, Tensor]:
        """Per-class sums (K, C) and counts (K,) of the features with conf > conf_thresh and
        valid. feats (N, C) or (B, C, h, w); labels, conf, valid (N,) or (B, h, w)."""
        if feats.dim() == 4:
            feats = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        feats = feats.detach().to(self.protos.dtype)
        sel = (conf.reshape(-1) > self.conf_thresh) & valid.reshape(-1).bool()
        lab = torch.where(sel, labels.reshape(-1).long(), torch.zeros_like(labels.reshape(-1)
                                                                           ).long())
        lab = lab.clamp(0, self.num_classes - 1)
        w = sel.to(feats.dtype)
        sums = torch.zeros_like(self.protos).index_add_(0, lab, feats * w.unsqueeze(1))
        counts = torch.zeros(self.num_classes, device=feats.device,
                             dtype=feats.dtype).index_add_(0, lab, w)
        return sums, counts

    @torch.no_grad()
    def update(self, feats: Tensor, labels: Tensor, conf: Tensor, valid: Tensor, *,
               early_stop: bool = False) -> None:
        """One EMA step from the weak features of this step (global batch over processes).

        For each class k with at least one feature of label k, conf > conf_thresh and valid
        (anywhere in the global batch): mean_k = their mean; if rho_k is still all zeros,
        rho_k <- mean_k, else rho_k <- m rho_k + (1 - m) mean_k. Other classes are unchanged.

        ``early_stop`` (released item 6, ``prote.py: update_memory``): the classes are visited
        in ascending order with a flag that is set when a class is initialised and never reset
        within the call; once set, the EMA update of every later (already initialised) class
        is skipped. Later classes that are still all zeros are still initialised, and the flag
        does not persist to the next step (it is re-created on every call).
        """
        sums, counts = self.class_sums(feats, labels, conf, valid)
        try:
            from accelerate.utils import reduce
        except ImportError:  # pragma: no cover - accelerate is a dependency
            reduce = None
        if reduce is not None:
            packed = reduce(torch.cat([sums, counts.unsqueeze(1)], dim=1), reduction="sum")
            sums, counts = packed[:, :-1], packed[:, -1]
        present = counts > 0
        mean = sums / counts.clamp(min=1).unsqueeze(1)
        zero = self.protos.eq(0).all(dim=1)
        init = present & zero
        ema = present & ~zero
        if early_stop:
            # an earlier class (lower index) was initialised in this call -> skip the EMA
            earlier_init = (torch.cumsum(init.long(), 0) - init.long()) > 0
            ema = ema & ~earlier_init
        m = self.momentum
        new = torch.where(init.unsqueeze(1), mean, self.protos)
        new = torch.where(ema.unsqueeze(1), m * self.protos + (1.0 - m) * mean, new)
        self.protos.copy_(new)

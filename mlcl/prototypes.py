"""The class-prototype memory bank of FKA (METHOD.md section 2, "Prototype memory bank").

``PrototypeBank`` is an ``nn.Module`` whose (K, C) buffer ``protos`` is part of its
``state_dict``, so checkpoints carry it (the released code kept it outside the model and never
saved it, item 10). The update is vectorised (per-class sums and counts as one-hot matrix
products) and synchronised: the sums and counts are summed over processes before the update,
so every process applies the identical update computed from the global batch and the bank
stays identical everywhere. (The released ``prote.py`` instead updates each process's bank from its
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
        valid. feats (B, C, h, w) or rows (N, C); labels, conf, valid (B, h, w) or (N,).

        A one-hot matrix product in the channel-first layout (the features are never permuted
        to rows, which would copy the whole map)."""
        if feats.dim() == 4:
            maps = feats.reshape(feats.shape[0], feats.shape[1], -1)  # (B, C, P)
        else:
            maps = feats.t().unsqueeze(0)  # (1, C, N)
        maps = maps.detach().to(self.protos.dtype)
        B, P = maps.shape[0], maps.shape[2]
        sel = (conf.reshape(B, P) > self.conf_thresh) & valid.reshape(B, P).bool()
        classes = torch.arange(self.num_classes, device=maps.device).view(1, -1, 1)
        onehot = ((labels.reshape(B, 1, P).long() == classes) & sel.unsqueeze(1)
                  ).to(maps.dtype)  # (B, K, P)
        sums = torch.bmm(onehot, maps.transpose(1, 2)).sum(0)  # (K, C)
        counts = onehot.sum(dim=(0, 2))
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

"""FKA's class-prototype memory bank (docs/method.md); the release's: mlcl.released.ReleasedBank."""
from __future__ import annotations

import torch
from accelerate.utils import reduce
from torch import Tensor, nn


def initialised(protos: Tensor) -> Tensor:
    """(K,) bool: the classes whose prototype in ``protos`` (K, C) is no longer all zeros."""
    return protos.ne(0).any(dim=1)


class PrototypeBank(nn.Module):
    """rho (K, C): a prototype per class, zeros until first seen; a buffer, so checkpointed."""

    def __init__(self, num_classes: int, channels: int, momentum: float = 0.99,
                 conf_thresh: float = 0.95):
        super().__init__()
        self.num_classes, self.momentum, self.conf_thresh = num_classes, momentum, conf_thresh
        self.register_buffer("protos", torch.zeros(num_classes, channels))

    @torch.no_grad()
    def class_sums(self, feats: Tensor, labels: Tensor, conf: Tensor, valid: Tensor
                   ) -> tuple[Tensor, Tensor]:
        """Per-class sums (K, C) and counts (K,) of the features with conf > conf_thresh and
        valid. feats (B, C, h, w) or rows (N, C); labels, conf, valid (B, h, w) or (N,)."""
        maps = feats.flatten(2) if feats.dim() == 4 else feats.t().unsqueeze(0)  # (B|1, C, P)
        maps = maps.detach().to(self.protos.dtype)
        B, P = maps.shape[0], maps.shape[2]
        sel = (conf.reshape(B, P) > self.conf_thresh) & valid.reshape(B, P).bool()
        classes = torch.arange(self.num_classes, device=maps.device).view(1, -1, 1)
        onehot = ((labels.reshape(B, 1, P).long() == classes) & sel.unsqueeze(1)
                  ).to(maps.dtype)  # (B, K, P)
        return torch.bmm(onehot, maps.transpose(1, 2)).sum(0), onehot.sum(dim=(0, 2))

    @torch.no_grad()
    def stepped(self, sums: Tensor, counts: Tensor) -> Tensor:
        """The bank (K, C) after one EMA step (not stored) from sums (K, C) and counts (K,): for
        counts_k > 0, rho_k <- mean_k if rho_k is all zeros, else m rho_k + (1 - m) mean_k."""
        present = counts > 0
        mean = sums / counts.clamp(min=1).unsqueeze(1)
        seen, m = initialised(self.protos), self.momentum
        new = torch.where((present & ~seen).unsqueeze(1), mean, self.protos)
        return torch.where((present & seen).unsqueeze(1), m * self.protos + (1.0 - m) * mean, new)

    @torch.no_grad()
    def update(self, feats: Tensor, labels: Tensor, conf: Tensor, valid: Tensor) -> None:
        """:meth:`stepped` in place from :meth:`class_sums` summed over processes (one bank)."""
        sums, counts = self.class_sums(feats, labels, conf, valid)
        packed = reduce(torch.cat([sums, counts.unsqueeze(1)], dim=1), reduction="sum")
        self.protos.copy_(self.stepped(packed[:, :-1], packed[:, -1]))

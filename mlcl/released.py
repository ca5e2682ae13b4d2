"""Every place where the authors' release (github.com/MKSAQW/MCCL) computes something other
than the paper's equations, each behind the switch its docstring names (docs/method.md, "Paper
versus release"). :func:`mlcl.methods.mlcl_parts` is the one place that picks these instead of
the paper's functions in :mod:`mlcl.losses`, :mod:`mlcl.prototypes` and :mod:`mlcl.methods`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mlcl import losses, prototypes


def sai_mask_ratio_twice(v: Tensor, kappa: float) -> Tensor:
    """r_i = 1 - kappa (a_i + 1) with a_i = kappa (v_i + 1): the release's noise loop overwrites
    v with a_i before the masking loop transforms it again (``mlcl.double_transform``)."""
    return losses.sai_mask_ratio(losses.sai_amplitude(v, kappa), kappa)


def valid_bilinear(ignore: Tensor, size: tuple[int, int], ignore_index: int = 255) -> Tensor:
    """(B, h, w) bool, True = valid: the ignore map (B, H, W) resized as released
    (``mlcl.bilinear_ignore``): bilinearly, truncated to integers; exact ignore_index stays."""
    x = F.interpolate(ignore.unsqueeze(0).float(), size=size, mode="bilinear",
                      align_corners=True).squeeze(0)
    return x.long() != ignore_index


def position_pairing(has_a: Tensor, has_c: Tensor) -> tuple[Tensor, Tensor]:
    """(partner, paired) (K,): the i-th class with anchors meets the candidates of the i-th
    class with candidates (``mlcl.pair_by_position``); has_a, has_c (K,) bool."""
    K = has_a.shape[0]
    ks = torch.arange(K, device=has_a.device)
    pos = torch.cumsum(has_a.long(), 0) - 1  # position of class k in the anchor list
    order = torch.sort((~has_c).long() * K + ks).indices  # the candidate list, then the rest
    return order[pos.clamp(0, K - 1)], has_a & (pos < has_c.sum())


def loss_dt(f_w: Tensor, conf_w: Tensor, label_w: Tensor, valid_w: Tensor,
            f_s: Tensor, valid_s: Tensor, protos: Tensor, *, conf_thresh: float = 0.95,
            num_anchors: int = 16, num_candidates: int = 256, pair_by_position: bool = False,
            duplicate_top_anchor: bool = False, normalise_by_candidates: bool = False,
            keep_uninitialised: bool = False) -> Tensor:
    """L_dt as released, arguments as :func:`mlcl.losses.loss_dt`, with the switches
    ``pair_by_position`` (:func:`position_pairing`), ``duplicate_top_anchor`` (anchors [t1, t1,
    t2, ..., t(m-1)]), ``normalise_by_candidates`` (1 - sum m(a) / sum |S_k|) and
    ``keep_uninitialised`` (``mlcl.dt_uninitialised``: all-zero prototypes take part)."""
    with torch.autocast(f_s.device.type, enabled=False):
        fw, fs = f_w.detach().flatten(2).float(), f_s.flatten(2).float()
        protos = protos.detach().float()
        classes = prototypes.initialised(protos) | keep_uninitialised  # True: every class
        a_idx, a_ok, c_idx, c_ok = losses.dt_select(
            fw, fs.detach(), conf_w, label_w, valid_w, valid_s, protos, classes, conf_thresh,
            num_anchors, num_candidates)
        if duplicate_top_anchor:  # the valid slots come first, so a_ok stays as it is
            a_idx = torch.cat([a_idx[:, :1], a_idx[:, :-1]], dim=1)
        has_a, has_c = a_ok.any(1), c_ok.any(1)
        partner, paired = (position_pairing(has_a, has_c) if pair_by_position
                           else (torch.arange(len(protos), device=fw.device), has_a & has_c))
        a_ok = a_ok & paired.unsqueeze(1)
        best = losses.dt_best_match(losses.unit_features(fw, a_idx), fs, c_idx[partner],
                                    c_ok[partner])  # against the partner class's candidates
        den = (c_ok.sum(1)[partner] * paired).sum() if normalise_by_candidates else a_ok.sum()
        return losses.dt_mean(best, a_ok, den)


class ReleasedBank(prototypes.PrototypeBank):
    """The bank with the release's update (``mlcl.bank_early_stop``, ``mlcl.bank_local_update``);
    the same state as :class:`mlcl.prototypes.PrototypeBank`."""

    def __init__(self, num_classes: int, channels: int, momentum: float = 0.99,
                 conf_thresh: float = 0.95, *, early_stop: bool = False,
                 average_banks: bool = False):
        super().__init__(num_classes, channels, momentum, conf_thresh)
        self.early_stop, self.average_banks = early_stop, average_banks

    @torch.no_grad()
    def stepped(self, sums: Tensor, counts: Tensor) -> Tensor:
        """The paper's step; with ``early_stop``, once a class is initialised in this step the
        EMA of every higher-index class is skipped (all-zero ones are still initialised)."""
        new = super().stepped(sums, counts)
        if not self.early_stop:
            return new
        init = ((counts > 0) & ~prototypes.initialised(self.protos)).long()
        skip = (init == 0) & ((torch.cumsum(init, 0) - init) > 0)
        return torch.where(skip.unsqueeze(1), self.protos, new)

    @torch.no_grad()
    def update(self, feats: Tensor, labels: Tensor, conf: Tensor, valid: Tensor) -> None:
        """The paper's update, or with ``average_banks`` each process steps its bank from its
        local batch and the banks are then averaged (the same with one process)."""
        if not self.average_banks:
            return super().update(feats, labels, conf, valid)
        sums, counts = self.class_sums(feats, labels, conf, valid)
        self.protos.copy_(prototypes.reduce(self.stepped(sums, counts), reduction="mean"))


def separate_passes(model, w1: Tensor, w2: Tensor, u: dict[str, Tensor], *unused
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, None]:
    """:func:`mlcl.methods.joint_passes` as released (``mlcl.released_passes``): a train-mode
    pass with graph over each of w1, w2, u_w and the un-mixed s1 (no CutMix box to skip: None)."""
    f1 = model(w1, return_features=True).features.detach()
    f2 = model(w2, return_features=True).features.detach()
    out_w = model(u["w"], return_features=True)
    f_s1 = model(u["s1"], return_features=True).features
    return f1, f2, out_w.features, out_w.feature_logits, f_s1, None

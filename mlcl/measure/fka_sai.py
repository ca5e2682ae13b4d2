"""The released FKA / SAI algorithm re-created for timing, and the inputs it and the
project's MLCL part receive."""
from __future__ import annotations

import random
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlcl import methods
from mlcl.config import Config
from mlcl.prototypes import PrototypeBank
from mlcl.released import valid_bilinear


class Decoder(nn.Module):
    """A 1x1 classifier, the identity on the first K channels: :func:`fka_inputs`' weak
    features decode to their pseudo-labels."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.classifier = nn.Conv2d(channels, classes, 1)
        with torch.no_grad():
            self.classifier.weight.zero_()
            self.classifier.bias.zero_()
            self.classifier.weight[:, :classes, 0, 0] = torch.eye(classes)

    def decode(self, f: Tensor) -> Tensor:
        return self.classifier(f)


class FkaCase(NamedTuple):
    """The MLCL part's inputs ``x``; what the release reads besides: weak logits (B, K, h, w),
    probabilities of u_w and of the partner (B, K, H, W), CutMix boxes (B, H, W)."""

    x: methods.MLCLInputs
    logits_w: Tensor
    prob_w: Tensor
    prob_mix: Tensor
    box1: Tensor
    box2: Tensor


def fka_inputs(B: int, C: int, h: int, K: int, device: torch.device, seed: int) -> FkaCase:
    """What the MLCL part of a step receives (C >= K): features at h x h, the ignore map,
    boxes and SAI's targets at H = 4 (h - 1) + 1 (81 -> 321); the weak features decode to
    VOC-like pseudo-labels (~60% background, two object classes in blobs, about half the
    pixels above 0.95 confidence)."""
    g = torch.Generator().manual_seed(seed)
    H = 4 * (h - 1) + 1
    cells = torch.rand(B, 1, 6, 6, generator=g)
    objects = torch.randint(1, K, (B, 2, 1, 1), generator=g)
    label = torch.where(cells < 0.6, 0, torch.where(cells < 0.8, objects[:, :1], objects[:, 1:]))
    label = F.interpolate(label.float(), size=(h, h), mode="nearest").long().squeeze(1)
    margin = 2 + 8 * torch.rand(B, 1, h, h, generator=g)
    logits = torch.randn(B, K, h, h, generator=g) + margin * F.one_hot(label, K).permute(
        0, 3, 1, 2)
    ignore = torch.zeros(B, H, H, dtype=torch.long)
    ignore[:, -H // 8:] = 255
    box = torch.zeros(2, B, H, H, dtype=torch.bool)
    box[:, :, H // 4:H // 2, H // 3:2 * H // 3] = True
    f_w = torch.randn(B, C, h, h, generator=g)
    f_w[:, :K] = logits
    f1, f2, s1, s2 = (f_w + 0.5 * torch.randn(B, C, h, h, generator=g) for _ in range(4))
    prob_w = F.interpolate(logits, size=(H, H), mode="bilinear", align_corners=True).softmax(1)
    prob_mix = prob_w.roll(1, 0)
    f_s1, f_s2 = s1.to(device).requires_grad_(), s2.to(device).requires_grad_()
    # the strong pass's logits decode(F_s) (identity classifier: F_s's first K channels),
    # leaves like F_s: the backward of that pass is UniMatch's
    l_s1, l_s2 = (s[:, :K].detach().clone().to(device).requires_grad_() for s in (s1, s2))
    on = [t.to(device) for t in (f_w, f1, f2, box, ignore, prob_w, prob_mix, logits)]
    target = methods.paste(on[3], on[6], on[5]).flatten(0, 1)  # (2B, K, H, W)
    x = methods.MLCLInputs(f_w=on[0], logits_w=on[7], f1=on[1], f2=on[2], f_s1=f_s1,
                           f_s2=f_s2, logits_s1=l_s1, logits_s2=l_s2, f_dt=f_s1,
                           dt_box=on[3][0], ignore=on[4], sai_target=target)
    return FkaCase(x, on[7], on[5], on[6], on[3][0], on[3][1])


def project_part(case: FkaCase, bank: PrototypeBank, cfg: Config, decoder: Decoder,
                 whole: bool) -> Tensor:
    """The project's MLCL part as the step calls it, forward, backward and bank update: the
    prototype branch (L_dt), or with ``whole`` all of it (SAI weight beta); the loss."""
    parts = methods.mlcl_parts(cfg)
    if whole:
        loss = methods.mlcl_losses(decoder, case.x, bank, cfg, cfg.mlcl.beta, parts)[0]
    else:
        loss = methods.prototype_branch(case.x, bank, cfg, parts)
    loss.backward()
    return loss.detach()


def sai_floor(case: FkaCase):
    """The floor of the MLCL part: per perturbed map (masked and noised, of s1 and of s2) one
    softmax over input-resolution logits and its MSE to SAI's target; nothing else (no
    decode, upsampling, backward, FKA or L_dt). A function to time."""
    logits = torch.randn_like(case.x.sai_target)  # (2B, K, H, W): s1's and s2's maps

    def floor() -> Tensor:
        return sum(F.mse_loss(logits.softmax(1), case.x.sai_target) for _ in ("mask", "noise"))
    return floor


class Released:
    """The released FKA (``prote.py``) / SAI (``MCCL.py``) algorithm, for timing only: its
    row-at-a-time selection, per-image perturbation loops and four separate decodes, with
    the paper variant's arithmetic (tests/test_measure.py checks L_dt and the bank agree;
    docs/performance.md)."""

    def __init__(self, bank: Tensor, kappa: float = 0.15, conf: float = 0.95,
                 anchors: int = 16, candidates: int = 256, momentum: float = 0.99):
        self.bank = bank.clone()  # (K, C)
        self.kappa, self.conf, self.momentum = kappa, conf, momentum
        self.anchors, self.candidates = anchors, candidates

    @staticmethod
    def _rows_and_ignore(f: Tensor, ignore: Tensor) -> tuple[Tensor, Tensor]:
        rows = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        return rows, valid_bilinear(ignore, f.shape[-2:]).reshape(-1)

    def _per_class(self, f, label, ignore, conf, n: int, most_similar: bool):
        """{class: its n rows most (least) similar to the prototype, picked one at a time}."""
        rows, valid = self._rows_and_ignore(f, ignore)
        lab, out = label.reshape(-1), {}
        for k in lab.unique():
            keep = (lab == k) & valid
            feats = rows[keep & (conf.reshape(-1) > self.conf) if conf is not None else keep]
            if feats.shape[0] == 0:
                continue
            proto = self.bank[int(k)].unsqueeze(0).repeat(feats.shape[0], 1)
            order = torch.sort(F.cosine_similarity(proto, feats, dim=1, eps=1e-6)).indices
            pos = (lambda i: -1 - i) if most_similar else (lambda i: i)
            picked = feats[order][pos(0)].unsqueeze(0)
            for i in range(1, min(n, feats.shape[0])):  # one row at a time, re-indexing
                picked = torch.cat((picked, feats[order][pos(i)].unsqueeze(0)), dim=0)
            out[int(k)] = picked
        return out

    @staticmethod
    def dt_loss(anchors: dict[int, Tensor], cands: dict[int, Tensor]) -> Tensor:
        total, count = 0, 0
        for k, a in anchors.items():
            if k in cands:
                cos = F.normalize(a.detach(), dim=1) @ F.normalize(cands[k], dim=1).t()
                total = total + cos.max(dim=1).values.sum()
                count += a.shape[0]
        return 1 - total / count if count else torch.zeros(())

    @torch.no_grad()
    def update(self, f_w, label, conf, ignore) -> None:
        rows, valid = self._rows_and_ignore(f_w, ignore)
        lab, cf = label.reshape(-1), conf.reshape(-1)
        for k in lab.unique():
            feats = rows[(lab == k) & valid & (cf > self.conf)]
            if feats.shape[0] == 0:
                continue
            if bool((self.bank[k] == 0).all()):
                self.bank[k] = feats.mean(0)
            else:
                self.bank[k] = self.momentum * self.bank[k] + (1 - self.momentum) * feats.mean(0)

    def dt(self, x: methods.MLCLInputs, label: Tensor, conf: Tensor) -> Tensor:
        """L_dt of the weak features x.f_w against the strong x.f_s1."""
        return self.dt_loss(self._per_class(x.f_w, label, x.ignore, conf, self.anchors, True),
                            self._per_class(x.f_s1, label, x.ignore, None, self.candidates,
                                            False))

    def proto(self, case: FkaCase) -> None:
        x = case.x
        conf, label = case.logits_w.softmax(1).max(1)
        self.dt(x, label, conf).backward()
        self.update(x.f_w, label, conf, x.ignore)

    def _perturbed(self, f: Tensor, v: Tensor) -> list[Tensor]:
        """The noised and the masked map, written image by image into zero buffers."""
        noised, masked = torch.zeros_like(f), torch.zeros_like(f)
        for i in range(f.shape[0]):
            a = float((v[i].detach() + 1) * self.kappa)
            noised[i] = f[i] * torch.empty(f.shape[1:], device=f.device).uniform_(-a, a) + f[i]
            r, att = 1 - a, f[i].mean(0, keepdim=True)
            top = att.view(-1).max(0, keepdim=True)[0]
            masked[i] = f[i] * (att < top * random.uniform(r - 0.1, r + 0.1)).float()
        return [noised, masked]

    def whole(self, case: FkaCase, decoder, cfg) -> None:
        x, m, size = case.x, cfg.mlcl, case.prob_w.shape[-2:]
        p2p, sims = [], []
        for f, fs in ((x.f1, x.f_s1), (x.f2, x.f_s2)):
            p2p.append(1 - F.cosine_similarity(f.detach(), fs, dim=1, eps=1e-6).mean())
            sims.append(F.cosine_similarity(f.detach(), fs, dim=1, eps=1e-6)
                        .reshape(f.shape[0], -1).mean(1))
        conf, label = case.logits_w.softmax(1).max(1)
        dt, sai = self.dt(x, label, conf), 0
        for fs, v, box in ((x.f_s1, sims[0], case.box1), (x.f_s2, sims[1], case.box2)):
            target = case.prob_w.clone()
            b = box.unsqueeze(1).repeat(1, target.shape[1], 1, 1)
            target[b] = case.prob_mix[b]
            for perturbed in self._perturbed(fs, v):
                logits = F.interpolate(decoder.decode(perturbed), size=size, mode="bilinear",
                                       align_corners=True)
                sai = sai + F.mse_loss(logits.softmax(1), target) / 2
        (m.alpha * (p2p[0] + p2p[1]) / 2 + m.omega * dt + m.beta * sai).backward()
        self.update(x.f_w, label, conf, x.ignore)

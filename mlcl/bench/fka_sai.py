"""The ``fka_sai`` section: the MLCL-specific computation alone, given features, as the
training step runs it (``methods.prototype_branch`` / ``methods.mlcl_losses``) against
:class:`Released`, a re-creation of the released algorithm, for the prototype branch and for
the whole of FKA + SAI."""
from __future__ import annotations

import argparse
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlcl import methods
from mlcl.bench.timing import Clock, interleaved, lap_stats
from mlcl.config import Config, load_config
from mlcl.methods import MLCLInputs
from mlcl.prototypes import PrototypeBank


class Decoder(nn.Module):
    """The 1x1 classifier alone, with the model's ``decode`` API."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.classifier = nn.Conv2d(channels, classes, 1)

    def decode(self, f: Tensor) -> Tensor:
        return self.classifier(f)


def fka_inputs(B: int, C: int, h: int, K: int, device: torch.device, seed: int) -> MLCLInputs:
    """What the MLCL part of a default step receives: weak / CutMixed-weak / strong features at
    h x h, the weak logits there, the ignore map, CutMix boxes and the weak and partner
    probabilities at the input resolution H = 4 (h - 1) + 1 (81 -> 321). The weak
    pseudo-labels are VOC-like: ~60% background, two object classes per image in blobs, about
    half the pixels above the 0.95 confidence. L_dt pulls the CutMixed s1 outside box1."""
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
    feat = lambda: torch.randn(B, C, h, h, generator=g)  # noqa: E731
    f_w = feat()
    prob_w = F.interpolate(logits, size=(H, H), mode="bilinear", align_corners=True).softmax(1)
    f1, f2, s1, s2 = f_w + 0.5 * feat(), f_w + 0.5 * feat(), f_w + 0.5 * feat(), f_w + 0.5 * feat()
    on = lambda t: t.to(device)  # noqa: E731
    f_s1, f_s2 = on(s1).requires_grad_(), on(s2).requires_grad_()
    return MLCLInputs(f_w=on(f_w), logits_w=on(logits), f1=on(f1), f2=on(f2), f_s1=f_s1,
                      f_s2=f_s2, f_dt=f_s1, dt_box=on(box[0]), ignore=on(ignore),
                      ignore_mix=on(ignore.roll(1, 0)), box1=on(box[0]), box2=on(box[1]),
                      prob_w=on(prob_w), prob_mix=on(prob_w.roll(1, 0)))


def vectorised_proto(x: MLCLInputs, bank: PrototypeBank, cfg: Config) -> Tensor:
    """L_dt forward + backward and the bank update, as the training step runs them."""
    dt = methods.prototype_branch(x, bank, cfg)
    dt.backward()
    return dt.detach()


def vectorised_whole(x: MLCLInputs, bank: PrototypeBank, decoder, cfg: Config) -> Tensor:
    """p2p + v, L_dt, SAI (L_m, L_n on s1 and s2) at the end of the ramp-up (w = beta),
    backward, bank update: ``methods.mlcl_losses``, as the training step calls it."""
    loss, _ = methods.mlcl_losses(decoder, x, bank, cfg, cfg.mlcl.beta)
    loss.backward()
    return loss.detach()


class Released:
    """A re-creation of the released FKA / SAI algorithm, for timing only. It measures the
    algorithm, not its quirks: anchors are the true top 16, anchors and candidates pair by
    class, L_dt is the mean over anchors, every class of the bank is updated (the paper
    variant, which tests/test_bench.py checks it agrees with); the ignore map is resized
    bilinearly as released.

    Prototype branch (``prote.py``): for every class present, the rows of the class are
    picked from the (B*h*w, C) feature rows with a boolean mask, sorted by cosine to the
    prototype, and the anchors (16) / candidates (256) are taken one row at a time from the
    re-indexed class features and concatenated; the loss loops over the classes; the bank
    update loops over the classes. SAI (``MCCL.py``): per image a Python loop draws the noise
    and the masking threshold and writes the perturbed map into a zero buffer; each of the
    four perturbed maps is decoded, upsampled and compared separately; targets are CutMixed
    by boolean-mask assignment."""

    def __init__(self, bank: Tensor, kappa: float = 0.15, conf: float = 0.95,
                 anchors: int = 16, candidates: int = 256, momentum: float = 0.99):
        self.bank = bank.clone()  # (K, C)
        self.kappa, self.conf, self.momentum = kappa, conf, momentum
        self.anchors, self.candidates = anchors, candidates

    @staticmethod
    def _rows_and_ignore(f: Tensor, ignore: Tensor) -> tuple[Tensor, Tensor]:
        B, C, h, w = f.shape
        ig = F.interpolate(ignore.unsqueeze(0).float(), size=(h, w), mode="bilinear",
                           align_corners=True).squeeze(0).long()
        return f.permute(0, 2, 3, 1).contiguous().view(B * h * w, C), ig.reshape(-1)

    def _pick(self, rows: Tensor, keep: Tensor, k: int, n: int, most_similar: bool):
        feats = rows[keep]
        if feats.shape[0] == 0:
            return None
        proto = self.bank[k].unsqueeze(0).repeat(feats.shape[0], 1)
        order = torch.sort(F.cosine_similarity(proto, feats, dim=1, eps=1e-6)).indices
        pos = (lambda i: -1 - i) if most_similar else (lambda i: i)
        picked = feats[order][pos(0)].unsqueeze(0)
        for i in range(1, min(n, feats.shape[0])):  # one row at a time, re-indexing the class
            picked = torch.cat((picked, feats[order][pos(i)].unsqueeze(0)), dim=0)
        return picked

    def anchors_of(self, f_w, label, conf, ignore) -> dict[int, Tensor]:
        rows, ig = self._rows_and_ignore(f_w, ignore)
        lab, cf = label.reshape(-1), conf.reshape(-1)
        out = {}
        for k in lab.unique():
            got = self._pick(rows, (lab == k) & (ig != 255) & (cf > self.conf), int(k),
                             self.anchors, most_similar=True)
            if got is not None:
                out[int(k)] = got
        return out

    def candidates_of(self, f_s, label, ignore) -> dict[int, Tensor]:
        rows, ig = self._rows_and_ignore(f_s, ignore)
        lab = label.reshape(-1)
        out = {}
        for k in lab.unique():
            got = self._pick(rows, (lab == k) & (ig != 255), int(k), self.candidates,
                             most_similar=False)
            if got is not None:
                out[int(k)] = got
        return out

    @staticmethod
    def dt_loss(anchors: dict[int, Tensor], cands: dict[int, Tensor]) -> Tensor:
        total, count = 0, 0
        for k, a in anchors.items():
            if k not in cands:
                continue
            cos = F.normalize(a.detach(), dim=1) @ F.normalize(cands[k], dim=1).t()
            total = total + cos.max(dim=1).values.sum()
            count += a.shape[0]
        return 1 - total / count if count else torch.zeros(())

    @torch.no_grad()
    def update(self, f_w, label, conf, ignore) -> None:
        rows, ig = self._rows_and_ignore(f_w, ignore)
        lab, cf = label.reshape(-1), conf.reshape(-1)
        for k in lab.unique():
            feats = rows[(lab == k) & (ig != 255) & (cf > self.conf)]
            if feats.shape[0] == 0:
                continue
            if bool((self.bank[k] == 0).all()):
                self.bank[k] = feats.mean(0)
            else:
                self.bank[k] = self.momentum * self.bank[k] + (1 - self.momentum) * feats.mean(0)

    def dt(self, x, label: Tensor, conf: Tensor) -> Tensor:
        """L_dt of the weak features x.f_w against the strong x.f_s1."""
        return self.dt_loss(self.anchors_of(x.f_w, label, conf, x.ignore),
                            self.candidates_of(x.f_s1, label, x.ignore))

    def proto(self, x) -> None:
        conf, label = x.logits_w.softmax(1).max(1)
        self.dt(x, label, conf).backward()
        self.update(x.f_w, label, conf, x.ignore)

    def _target(self, box: Tensor, x) -> Tensor:
        t = x.prob_w.clone()
        b = box.unsqueeze(1).repeat(1, t.shape[1], 1, 1)
        t[b] = x.prob_mix[b]
        return t

    def _noise(self, f: Tensor, v: Tensor) -> Tensor:
        out = torch.zeros_like(f)
        for i in range(f.shape[0]):
            a = float((v[i].detach() + 1) * self.kappa)
            eps = torch.empty(f.shape[1:], device=f.device).uniform_(-a, a)
            out[i] = f[i] * eps + f[i]
        return out

    def _mask(self, f: Tensor, v: Tensor) -> Tensor:
        out = torch.zeros_like(f)
        for i in range(f.shape[0]):
            r = 1 - float((v[i].detach() + 1) * self.kappa)
            att = f[i].mean(0, keepdim=True)
            top = att.view(-1).max(0, keepdim=True)[0]
            keep = (att < top * random.uniform(r - 0.1, r + 0.1)).float()
            out[i] = f[i] * keep
        return out

    def whole(self, x, decoder, cfg) -> None:
        m = cfg.mlcl
        size = x.prob_w.shape[-2:]
        p2p, sims = [], []
        for f, fs in ((x.f1, x.f_s1), (x.f2, x.f_s2)):
            p2p.append(1 - F.cosine_similarity(f.detach(), fs, dim=1, eps=1e-6).mean())
            sims.append(F.cosine_similarity(f.detach(), fs, dim=1, eps=1e-6)
                        .reshape(f.shape[0], -1).mean(1))
        conf, label = x.logits_w.softmax(1).max(1)
        dt = self.dt(x, label, conf)
        sai = 0
        for fs, v, box in ((x.f_s1, sims[0], x.box1), (x.f_s2, sims[1], x.box2)):
            target = self._target(box, x)
            for perturbed in (self._noise(fs, v), self._mask(fs, v)):
                logits = F.interpolate(decoder.decode(perturbed), size=size, mode="bilinear",
                                       align_corners=True)
                sai = sai + F.mse_loss(logits.softmax(1), target) / 2
        total = m.alpha * (p2p[0] + p2p[1]) / 2 + m.omega * dt + m.beta * sai
        total.backward()
        self.update(x.f_w, label, conf, x.ignore)


def bench_fka_sai(a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    B, C, h, K = a.fka_batch, a.fka_channels, a.fka_size, a.fka_classes
    cfg = load_config(None, ["method=mlcl", f"data.num_classes={K}",
                             f"model.feature_channels={C}"])
    m = cfg.mlcl
    x = fka_inputs(B, C, h, K, device, a.seed)
    decoder = Decoder(C, K).to(device)
    bank = PrototypeBank(K, C, momentum=m.bank_momentum, conf_thresh=m.bank_conf).to(device)
    torch.manual_seed(a.seed)
    bank.protos.copy_(torch.randn(K, C))  # every class initialised: the steady state
    released = Released(bank.protos, m.kappa, m.bank_conf, m.num_anchors, m.num_candidates,
                        m.bank_momentum)

    def timed(fn):
        def run():
            for t in (x.f_s1, x.f_s2, *decoder.parameters()):
                t.grad = None
            clock = Clock(device)
            clock.mark()
            fn()
            clock.mark()
            return {"wall": clock.laps()[0], "cpu": clock.cpu_total()}
        return run

    jobs = {
        "proto_vectorised": timed(lambda: vectorised_proto(x, bank, cfg)),
        "proto_released": timed(lambda: released.proto(x)),
        "whole_vectorised": timed(lambda: vectorised_whole(x, bank, decoder, cfg)),
        "whole_released": timed(lambda: released.whole(x, decoder, cfg)),
    }
    plan = {k: (a.fka_released_warmup, a.fka_released_repeats) if k.endswith("released")
            else (a.warmup, a.fka_repeats) for k in jobs}
    times = interleaved(jobs, plan)
    return {"settings": {"batch": B, "channels": C, "feature_size": [h, h],
                         "input_size": [4 * (h - 1) + 1] * 2, "classes": K,
                         "repeats": a.fka_repeats, "released_repeats": a.fka_released_repeats,
                         "forward_and_backward": True},
            **{k: lap_stats(v, a.clock) for k, v in times.items()}}


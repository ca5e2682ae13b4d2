"""Losses of UniMatch and MLCL as pure functions of tensors (METHOD.md sections 1-3).

Every function is vectorised over images, pixels and classes and never waits on the device:
no value-dependent shapes, no tensor-to-Python conversions; selections use fixed-size
``topk`` with ``-inf`` masking and validity masks instead. Shapes: ``B`` images, ``K``
classes, ``C`` feature channels, ``H x W`` input resolution, ``h x w`` feature resolution,
``N = B*h*w`` feature rows.

The ``released`` variant's quirks (METHOD.md, "Where the released code and the paper
differ") are plain boolean arguments here; the step passes ``cfg.mlcl.<quirk>``. The released
code is ``MLCL.py`` and ``prote.py`` of github.com/MKSAQW/MCCL.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# The released code measures cosines with nn.CosineSimilarity(eps=1e-6).
COS_EPS = 1e-6


# --------------------------------------------------------------------------- UniMatch
def ce_loss(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """L_x: cross-entropy of labeled predictions.

    logits (B, K, H, W), target (B, H, W) long. Mean over pixels whose target is not
    ``ignore_index`` (0, not NaN, when every pixel is ignored).
    """
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return ce / (target != ignore_index).sum().clamp(min=1)


def ohem_ce_loss(logits: Tensor, target: Tensor, ignore_index: int = 255,
                 thresh: float = 0.7, min_kept: int = 200_000) -> Tensor:
    """L_x with online hard example mining (UniMatch's ``ProbOhemCrossEntropy2d``, Cityscapes).

    logits (B, K, H, W), target (B, H, W). p = softmax probability of the true class. Keeps
    the non-ignored pixels with p <= max(thresh, the min_kept-th smallest p), i.e. the pixels
    below ``thresh`` but at least ``min_kept`` of them; when fewer than ``min_kept`` pixels
    are labeled (or min_kept <= 0), all of them. Mean CE over the kept pixels (0 when none).
    """
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target))
    logp = F.log_softmax(logits.float(), dim=1)
    nll = -logp.gather(1, t.unsqueeze(1)).squeeze(1)  # (B, H, W)
    with torch.no_grad():
        p = logits.detach().float().softmax(1).gather(1, t.unsqueeze(1)).squeeze(1)
        p = p.masked_fill(~valid, 1.0)  # ignored pixels never count as hard
        k = min(p.numel(), int(min_kept))
        if k <= 0:  # UniMatch applies no mining at all without min_kept
            kept = valid
        else:
            kth = p.flatten().kthvalue(k).values
            threshold = torch.clamp(kth, min=thresh)  # max(thresh, k-th smallest p)
            kept = valid & (p <= threshold)
            kept = torch.where(valid.sum() < min_kept, valid, kept)
    return (nll * kept).sum() / kept.sum().clamp(min=1)


def pseudo_label_ce(logits: Tensor, pseudo: Tensor, conf: Tensor, ignore: Tensor,
                    tau: float, ignore_index: int = 255) -> Tensor:
    """L_s1 / L_s2 / L_fp: cross-entropy against (CutMixed) pseudo-labels.

    logits (B, K, H, W); pseudo (B, H, W) long; conf (B, H, W) confidences; ignore (B, H, W)
    with ``ignore_index`` on padding. Sum of CE over pixels with conf >= tau and not ignored,
    divided by the number of non-ignored pixels (not the number of confident ones), as in
    UniMatch. 0 when every pixel is ignored.
    """
    valid = ignore != ignore_index
    ce = F.cross_entropy(logits.float(), pseudo.long(), ignore_index=ignore_index,
                         reduction="none")
    mask = (conf >= tau) & valid
    return (ce * mask).sum() / valid.sum().clamp(min=1)


def apply_cutmix(box: Tensor, mix: Tensor, own: Tensor) -> Tensor:
    """CutMix a target: ``mix`` inside the box (B, H, W), ``own`` elsewhere. ``own``/``mix``
    are (B, H, W) (pseudo-label, confidence, ignore) or (B, K, H, W) (probabilities)."""
    box = box.bool()
    if own.dim() == 4:
        box = box.unsqueeze(1)
    return torch.where(box, mix, own)


def cutmix_targets(box: Tensor, own: tuple[Tensor, ...], mix: tuple[Tensor, ...]
                   ) -> tuple[Tensor, ...]:
    """:func:`apply_cutmix` over matching tuples, e.g. (pseudo, conf, ignore, probs) of the
    batch and of the CutMix source: the targets of a strong view CutMixed with ``box``."""
    return tuple(apply_cutmix(box, m, o) for o, m in zip(own, mix))


def resize_ignore(ignore: Tensor, size: tuple[int, int], bilinear: bool = False,
                  ignore_index: int = 255) -> Tensor:
    """The ignore map (B, H, W) at feature resolution ``size`` as a validity mask (B, h, w).

    ``bilinear=False`` (paper): nearest resize, a pixel is valid where its nearest source
    pixel is not ``ignore_index``. ``bilinear=True`` (released item 7, ``prote.py``): the
    batch is treated as channels of one image, resized bilinearly with align_corners=True
    and truncated to integers, so only pixels whose interpolated value is exactly
    ``ignore_index`` stay ignored; the border of every padded region becomes valid.
    """
    if bilinear:
        x = F.interpolate(ignore.unsqueeze(0).float(), size=size, mode="bilinear",
                          align_corners=True).squeeze(0)
        return x.long() != ignore_index
    x = F.interpolate(ignore.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1)
    return x != ignore_index


# --------------------------------------------------------------------------- FKA
def _maps(f: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C, h*w); rows (N, C) -> (1, C, N) (views, no copy). Row n of the
    flattened batch is pixel n % (h*w) of image n // (h*w). The channel-first layout is kept
    on purpose: permuting 256-channel maps to rows costs more than the whole loss."""
    if f.dim() == 4:
        return f.reshape(f.shape[0], f.shape[1], -1)
    return f.t().unsqueeze(0)


def _channel_cos(a: Tensor, b: Tensor) -> Tensor:
    """Per-pixel cosine over channels of (B, C, h, w) maps -> (B, h, w), each norm clamped at
    COS_EPS (the value of F.cosine_similarity at about half its cost; ``a`` is used as is)."""
    dot = (a * b).sum(1)
    na = a.detach().norm(dim=1).clamp(min=COS_EPS)
    return dot / (na * b.norm(dim=1).clamp(min=COS_EPS))


def p2p_loss(f_w: Tensor, f_s: Tensor) -> Tensor:
    """L_p2p (point-to-point alignment): mean over B*h*w pixels of 1 - cos(F_1, F_s1), the
    cosine taken over channels. f_w (B, C, h, w) is the weak (CutMixed like ``f_s``) view and
    is detached here; f_s (B, C, h, w) receives the gradient."""
    return 1.0 - _channel_cos(f_w.detach().float(), f_s.float()).mean()


@torch.no_grad()
def per_image_similarity(f_w: Tensor, f_s: Tensor) -> Tensor:
    """v_i of SAI: per image, the mean over pixels of cos(F_1,i, F_s1,i). (B, C, h, w) x 2 ->
    (B,) in [-1, 1], without gradient."""
    return _channel_cos(f_w.float(), f_s.float()).flatten(1).mean(1)


def p2p_and_similarity(f_w: Tensor, f_s: Tensor) -> tuple[Tensor, Tensor]:
    """(:func:`p2p_loss`, :func:`per_image_similarity`) from one cosine map: the MLCL step
    needs both for every strong view, and the cosine over 256 channels is the costly part."""
    cos = _channel_cos(f_w.detach().float(), f_s.float())  # (B, h, w)
    return 1.0 - cos.mean(), cos.detach().flatten(1).mean(1)


def _cos_to_protos(maps: Tensor, protos: Tensor) -> Tensor:
    """(B, C, P) x (K, C) -> (B, K, P) cosines (norms clamped at COS_EPS like
    nn.CosineSimilarity)."""
    pn = protos / protos.norm(dim=1, keepdim=True).clamp(min=COS_EPS)
    return (pn @ maps) / maps.norm(dim=1, keepdim=True).clamp(min=COS_EPS)


def _topk_per_class(score: Tensor, eligible: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per class, the flat indices n = b*P + p of the (at most) ``k`` eligible pixels with the
    highest score.

    score, eligible (B, K, P) (eligible only for the pixel's own class) -> idx (K, k) long,
    ok (K, k) bool (False on padding slots, which hold arbitrary indices). Sorted by
    decreasing score.
    """
    K = score.shape[1]
    masked = score.masked_fill(~eligible, float("-inf")).transpose(0, 1).reshape(K, -1)
    k = min(k, masked.shape[1])
    vals, idx = masked.topk(k, dim=1, largest=True, sorted=True)
    return idx, vals > float("-inf")


def _gather(maps: Tensor, idx: Tensor) -> Tensor:
    """maps (B, C, P), flat pixel indices idx (K, k) -> their feature vectors (K, k, C)."""
    P = maps.shape[2]
    return maps[idx // P, :, idx % P]


def dt_loss(f_w: Tensor, conf_w: Tensor, label_w: Tensor, valid_w: Tensor,
            f_s: Tensor, valid_s: Tensor, protos: Tensor, *,
            conf_thresh: float = 0.95, num_anchors: int = 16, num_candidates: int = 256,
            pair_by_position: bool = False, duplicate_top_anchor: bool = False,
            normalise_by_candidates: bool = False) -> Tensor:
    """L_dt (prototype-based intra-class compactness of FKA).

    f_w (B, C, h, w) weak features (detached here); conf_w, label_w (B, h, w) the weak
    pseudo-label confidence and class at feature resolution; valid_w (B, h, w) bool (not
    ignored); f_s (B, C, h, w) strong features (receive the gradient); valid_s (B, h, w) bool;
    protos (K, C) the memory bank (read only). For each class k:

    - anchors A_k: the (at most) ``num_anchors`` weak features with label k, conf >
      ``conf_thresh`` and valid, of highest cosine to rho_k;
    - candidates S_k: the (at most) ``num_candidates`` valid strong features whose weak label
      is k (no confidence filter), of lowest cosine to rho_k;
    - for every anchor, m(a) = max_{s in S_k} cos(a, s).

    Paper: mean over all anchors (all classes) of 1 - m(a). Released quirks:
    ``pair_by_position`` (item 3): the anchor list holds the classes (ascending) that have
    anchors, the candidate list the classes that have candidates; the i-th anchor group is
    matched with the i-th candidate group, whatever its class; ``duplicate_top_anchor``
    (item 4): the anchors are [top1, top1, top2, ..., top(m-1)], m = min(num_anchors, n_k);
    ``normalise_by_candidates`` (item 5): 1 - (sum of m(a)) / (sum of |S| over the paired
    candidate groups). Returns a 0-dim tensor; 0 when no class has anchors.

    In the released step (``MLCL.py``) f_w is a train-mode pass over u_w, label_w/conf_w come
    from that pass's logits before upsampling (feature resolution), f_s is a pass over the
    un-mixed s1, valid_w = valid_s = the ignore map resized bilinearly (``resize_ignore``),
    and the loss reads the bank before the step's ``update``.
    """
    K = protos.shape[0]
    dev = f_s.device
    # fp32 inside; any device that is not CUDA (CPU, or 'meta' when counting FLOPs) is CPU's
    with torch.autocast("cuda" if dev.type == "cuda" else "cpu", enabled=False):
        fw = _maps(f_w.detach()).float()  # (B, C, P)
        fs = _maps(f_s).float()
        B, P = fw.shape[0], fw.shape[2]
        own = label_w.reshape(B, 1, P).long() == torch.arange(K, device=dev).view(1, K, 1)
        protos = protos.detach().float()

        # ---- selection (no gradient): fixed-size per-class top-k with -inf masking
        with torch.no_grad():
            conf_ok = (conf_w.reshape(B, 1, P) > conf_thresh) & valid_w.reshape(B, 1, P)
            elig_c = own & valid_s.reshape(B, 1, P)
            a_idx, a_ok = _topk_per_class(_cos_to_protos(fw, protos), own & conf_ok,
                                          num_anchors)
            c_idx, c_ok = _topk_per_class(-_cos_to_protos(fs.detach(), protos), elig_c,
                                          num_candidates)
            n_a = a_ok.sum(1)  # (K,) = min(num_anchors, n_k)
            if duplicate_top_anchor:  # [t1, t1, t2, ..., t(m-1)]: the top one twice
                a_idx = torch.cat([a_idx[:, :1], a_idx[:, :-1]], dim=1)
                a_ok = torch.arange(a_idx.shape[1], device=dev) < n_a.unsqueeze(1)
            n_c = c_ok.sum(1)  # (K,)
            has_a, has_c = n_a > 0, n_c > 0
            if pair_by_position:
                # position of class k in the anchor list -> class at that position of the
                # candidate list (classes with candidates first, ascending)
                pos = torch.cumsum(has_a.long(), 0) - 1
                order = torch.sort((~has_c).long() * K + torch.arange(K, device=dev)).indices
                partner = order[pos.clamp(0, K - 1)]
                paired = has_a & (pos < has_c.sum())
            else:
                partner = torch.arange(K, device=dev)
                paired = has_a & has_c
            a_ok = a_ok & paired.unsqueeze(1)

        # ---- loss: anchors detached, candidates carry the gradient
        anchors = F.normalize(_gather(fw, a_idx), dim=2)  # (K, A, C)
        cands = F.normalize(_gather(fs, c_idx), dim=2)[partner]  # (K, S, C), partner's
        cos = torch.bmm(anchors, cands.transpose(1, 2))  # (K, A, S)
        cos = cos.masked_fill(~c_ok[partner].unsqueeze(1), float("-inf"))
        best = cos.amax(dim=2)  # (K, A)
        total = torch.where(a_ok, best, torch.zeros_like(best)).sum()
        if normalise_by_candidates:
            den = torch.where(paired, n_c[partner], torch.zeros_like(n_c)).sum()
        else:
            den = a_ok.sum()
        loss = 1.0 - total / den.clamp(min=1)
        return torch.where(den > 0, loss, torch.zeros_like(loss))


# --------------------------------------------------------------------------- SAI
def sai_amplitude(v: Tensor, kappa: float) -> Tensor:
    """a_i = kappa (v_i + 1), the noise amplitude of image i (in [0, 2 kappa])."""
    return kappa * (v + 1.0)


def sai_mask_ratio(v: Tensor, kappa: float, double_transform: bool = False) -> Tensor:
    """r_i = 1 - kappa (v_i + 1), the centre of the masking threshold. With
    ``double_transform`` (released item 2) the transform is applied to a_i = kappa (v_i + 1)
    again: r_i = 1 - kappa (a_i + 1), in [1 - kappa(1 + 2 kappa), 1 - kappa]
    ([0.805, 0.85] for kappa = 0.15)."""
    s = sai_amplitude(v, kappa)
    if double_transform:
        s = sai_amplitude(s, kappa)
    return 1.0 - s


def sai_noise(f: Tensor, v: Tensor, kappa: float, generator: torch.Generator | None = None
              ) -> Tensor:
    """F_ne (SAI noise injection) = F + F * eps, eps ~ U(-a_i, a_i) elementwise over (C, h, w)
    with a_i = kappa (v_i + 1). f (B, C, h, w) keeps its gradient; v (B,) is used detached.
    Draws one ``torch.rand(f.shape)`` from ``generator``."""
    a = sai_amplitude(v.detach().to(f.dtype), kappa).view(-1, 1, 1, 1)
    u = torch.rand(f.shape, generator=generator, device=f.device, dtype=f.dtype)
    # F + F*eps = F * (1 + eps), 1 + eps = (1 - a) + 2a u: one pass to build, one multiply
    return f * torch.addcmul(1.0 - a, u, 2.0 * a)


def sai_mask(f: Tensor, v: Tensor, kappa: float, jitter: float = 0.1,
             double_transform: bool = False, generator: torch.Generator | None = None
             ) -> tuple[Tensor, Tensor]:
    """F_mk (SAI self-adaptive masking) and its keep mask.

    f (B, C, h, w), v (B,) (detached). Attention A_i = channel mean of f_i (h, w);
    r_i = :func:`sai_mask_ratio`; t_i ~ U(r_i - jitter, r_i + jitter) (one
    ``torch.rand(B)`` from ``generator``); keep (B, h, w) bool = A_i < t_i max(A_i), so the
    highest activations are dropped; F_mk = f * keep (gradient flows through the kept
    positions). Note: the released ``MLCL.py`` only transforms twice when its noise branch
    (F-Noise) ran first and overwrote v in place; with the mask branch alone it uses r_i.
    """
    B = f.shape[0]
    r = sai_mask_ratio(v.detach().float(), kappa, double_transform)
    u = torch.rand(B, generator=generator, device=f.device, dtype=torch.float32)
    t = r + (2.0 * u - 1.0) * jitter
    with torch.no_grad():
        att = f.detach().float().mean(1)  # (B, h, w)
        top = att.flatten(1).amax(1)
        keep = att < (top * t).view(B, 1, 1)
    return f * keep.unsqueeze(1).to(f.dtype), keep


def sai_mse(prob: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """L_m / L_n: MSE between the decoder's probabilities on a perturbed map (upsampled to
    the input size) and the weak view's CutMixed probabilities.

    prob, target (B, K, H, W) (target detached by the caller). Mean over all B*K*H*W
    elements, padding included (item 8, both variants). ``valid`` (B, H, W) bool, for the
    ablation only: mean over the K values of the valid pixels.
    """
    if valid is None:
        return F.mse_loss(prob.float(), target.float(), reduction="mean")
    sq = (prob.float() - target.float()) ** 2
    m = valid.unsqueeze(1).to(sq.dtype)
    return (sq * m).sum() / (m.sum() * prob.shape[1]).clamp(min=1)


class _UpsampledSoftmaxMSE(torch.autograd.Function):
    """mean((softmax(upsample(z)) - target)^2), a chunk of images at a time; each chunk's
    gradient is taken (by autograd, through the same ops) while its probabilities are at
    hand, so nothing at the input resolution outlives its chunk (see sai_upsampled_mse)."""

    @staticmethod
    def forward(ctx, z: Tensor, target: Tensor, chunk: int) -> Tensor:
        size, n = tuple(target.shape[-2:]), target.numel()
        want_grad = ctx.needs_input_grad[0]
        total = z.new_zeros((), dtype=torch.float64)
        grads = []
        for i in range(0, z.shape[0], chunk):
            with torch.enable_grad():
                zc = z[i:i + chunk].detach().requires_grad_(want_grad)
                # model.upsample (bilinear, align_corners=True), then the softmax in fp32
                p = F.interpolate(zc, size=size, mode="bilinear", align_corners=True)
                p = p.float().softmax(1)
                part = F.mse_loss(p, target[i:i + chunk].float(), reduction="sum") / n
            if want_grad:
                grads.append(torch.autograd.grad(part, zc)[0])
            total += part.detach().double()
        if want_grad:
            ctx.save_for_backward(torch.cat(grads))
        return total.float()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (dz,) = ctx.saved_tensors  # d loss / d z, taken in the forward
        return dz * grad.to(dz.dtype), None, None


def sai_upsampled_mse(logits: Tensor, target: Tensor, chunk: int | None = None) -> Tensor:
    """L_m / L_n from the decoder's logits at feature resolution: the value of
    ``sai_mse(upsample(logits, target's size).float().softmax(1), target)`` (bilinear,
    align_corners=True, as model.upsample) and its gradient for ``logits``, at lower cost.

    logits (N, K, h, w); target (N, K, H, W) (detached). The probabilities at the input
    resolution are the bulk of the SAI memory traffic; here they are computed ``chunk``
    images at a time (default: 1 on CPU, where a chunk then stays in cache; all at once on
    GPU), and each chunk's gradient for ``logits`` (autograd through the same upsample,
    softmax and MSE) is taken at once, so the backward keeps only a logits-sized tensor.
    """
    if chunk is None:
        chunk = 1 if logits.device.type == "cpu" else logits.shape[0]
    return _UpsampledSoftmaxMSE.apply(logits, target.detach(), max(1, int(chunk)))


def sai_weight(it: int, total_iters: int, beta: float, k: float = 5.0) -> float:
    """w(t) = beta r(t)^2 with r(t) = exp(-k (1 - t/T)^2), t = min(it, T) the global
    iteration, T = total_iters (beta when T = 0). A host float from ints."""
    if total_iters <= 0:
        return float(beta)
    t = min(max(it, 0), total_iters)
    r = math.exp(-k * (1.0 - t / total_iters) ** 2)
    return float(beta * r * r)

"""Losses of UniMatch and MLCL as pure functions of tensors (docs/method.md, "One training
step"; how the vectorised forms are derived: docs/method.md, "Implementation notes").

Shapes: ``B`` images, ``K`` classes, ``C`` feature channels, ``H x W`` input resolution,
``h x w`` feature resolution, ``N = B*h*w`` feature rows. Nothing here waits on the device (no
value-dependent shapes, no tensor-to-Python conversions). The released code's quirks are plain
boolean arguments; the step passes ``cfg.mlcl.<switch>`` (docs/method.md, "Paper versus
release").
"""
from __future__ import annotations

import math
from typing import NamedTuple

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
    the non-ignored pixels with p <= max(thresh, the min_kept-th smallest p); all of them when
    fewer than ``min_kept`` pixels are labeled (or min_kept <= 0). Mean CE over the kept
    pixels (0 when none).
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

    logits (B, K, H, W); pseudo (B, H, W) long; conf (B, H, W); ignore (B, H, W) with
    ``ignore_index`` on padding. Sum of CE over pixels with conf >= tau and not ignored,
    divided by the number of non-ignored pixels (UniMatch's normalisation); 0 when every
    pixel is ignored.
    """
    valid = ignore != ignore_index
    ce = F.cross_entropy(logits.float(), pseudo.long(), ignore_index=ignore_index,
                         reduction="none")
    mask = (conf >= tau) & valid
    return (ce * mask).sum() / valid.sum().clamp(min=1)


# --------------------------------------------------------------------------- resolution
def feature_pixel_index(n_in: int, n_out: int, device: torch.device | None = None) -> Tensor:
    """(n_out,) long: the input pixel under each of ``n_out`` feature positions along an axis
    of ``n_in`` pixels, as the model's upsampling (bilinear, align_corners=True) places them:
    round(i (n_in - 1) / (n_out - 1)), halves rounded up; 0 when n_out = 1."""
    i = torch.arange(n_out, device=device)
    if n_out == 1:
        return i
    return (2 * i * (n_in - 1) + (n_out - 1)) // (2 * (n_out - 1))


def at_feature_pixels(t: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W) -> (B, h, w), ``size`` = (h, w): the value of ``t`` at the input pixel under
    each feature position (:func:`feature_pixel_index`); any dtype."""
    rows = feature_pixel_index(t.shape[-2], size[0], t.device)
    cols = feature_pixel_index(t.shape[-1], size[1], t.device)
    return t.index_select(-2, rows).index_select(-1, cols)


def resize_ignore(ignore: Tensor, size: tuple[int, int], bilinear: bool = False,
                  ignore_index: int = 255) -> Tensor:
    """The ignore map (B, H, W) at feature resolution ``size`` as a validity mask (B, h, w) bool.

    ``bilinear=False`` (paper): valid where the pixel under the feature position
    (:func:`at_feature_pixels`) is not ``ignore_index``. ``bilinear=True`` (switch
    ``mlcl.bilinear_ignore``, released): the batch resized as the channels of one image,
    bilinearly with align_corners=True, truncated to integers; only exact ``ignore_index``
    values stay ignored. Both agree where (H - 1) / (h - 1) is an integer (321 -> 81).
    """
    if bilinear:
        x = F.interpolate(ignore.unsqueeze(0).float(), size=size, mode="bilinear",
                          align_corners=True).squeeze(0)
        return x.long() != ignore_index
    return at_feature_pixels(ignore, size) != ignore_index


# --------------------------------------------------------------------------- FKA
def _maps(f: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C, h*w); rows (N, C) -> (1, C, N); views, no copy. Pixel p of
    image b is flat index b*h*w + p."""
    if f.dim() == 4:
        return f.reshape(f.shape[0], f.shape[1], -1)
    return f.t().unsqueeze(0)


def _channel_cos(a: Tensor, b: Tensor) -> Tensor:
    """Per-pixel cosine over channels of (B, C, h, w) maps -> (B, h, w), each norm clamped at
    COS_EPS; ``a`` is treated as a constant."""
    dot = (a * b).sum(1)
    na = a.detach().norm(dim=1).clamp(min=COS_EPS)
    return dot / (na * b.norm(dim=1).clamp(min=COS_EPS))


def p2p_loss(f_w: Tensor, f_s: Tensor) -> Tensor:
    """L_p2p (point-to-point alignment of FKA): mean over B*h*w pixels of 1 - cos(F_1, F_s1).

    f_w (B, C, h, w) the weak view CutMixed like ``f_s`` (detached here); f_s (B, C, h, w)
    receives the gradient. 0-dim."""
    return 1.0 - _channel_cos(f_w.detach().float(), f_s.float()).mean()


@torch.no_grad()
def per_image_similarity(f_w: Tensor, f_s: Tensor) -> Tensor:
    """v of SAI: (B, C, h, w) x 2 -> (B,), per image the mean over pixels of cos(F_1, F_s1);
    no gradient."""
    return _channel_cos(f_w.float(), f_s.float()).flatten(1).mean(1)


def p2p_and_similarity(f_w: Tensor, f_s: Tensor) -> tuple[Tensor, Tensor]:
    """(:func:`p2p_loss`, :func:`per_image_similarity`) from one cosine map (the costly part)."""
    cos = _channel_cos(f_w.detach().float(), f_s.float())  # (B, h, w)
    return 1.0 - cos.mean(), cos.detach().flatten(1).mean(1)


def _cos_to_protos(maps: Tensor, protos: Tensor) -> Tensor:
    """(B, C, P) x (K, C) -> (B, K, P) cosines, norms clamped at COS_EPS."""
    pn = protos / protos.norm(dim=1, keepdim=True).clamp(min=COS_EPS)
    return (pn @ maps) / maps.norm(dim=1, keepdim=True).clamp(min=COS_EPS)


def _topk_per_class(score: Tensor, eligible: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """score, eligible (B, K, P) -> per class the flat indices b*P + p of the (at most) ``k``
    eligible pixels of highest score, sorted: idx (K, k) long, ok (K, k) bool (False on
    padding slots, whose indices are arbitrary)."""
    K = score.shape[1]
    masked = score.masked_fill(~eligible, float("-inf")).transpose(0, 1).reshape(K, -1)
    k = min(k, masked.shape[1])
    vals, idx = masked.topk(k, dim=1, largest=True, sorted=True)
    return idx, vals > float("-inf")


def _gather(maps: Tensor, idx: Tensor) -> Tensor:
    """maps (B, C, P), flat pixel indices idx (K, k) -> their feature vectors (K, k, C)."""
    P = maps.shape[2]
    return maps[idx // P, :, idx % P]


class DtSelection(NamedTuple):
    """Which features L_dt compares: anchors a_idx/a_ok (K, A), candidates c_idx/c_ok (K, S),
    partner (K,) the class whose candidates class k's anchors meet, paired (K,) bool."""

    a_idx: Tensor
    a_ok: Tensor
    c_idx: Tensor
    c_ok: Tensor
    partner: Tensor
    paired: Tensor


def _pairing(has_a: Tensor, has_c: Tensor, by_position: bool) -> tuple[Tensor, Tensor]:
    """(partner, paired) (K,) from which classes have anchors / candidates. By class, or
    (``by_position``) the i-th class with anchors meets the i-th class with candidates."""
    K = has_a.shape[0]
    ks = torch.arange(K, device=has_a.device)
    if not by_position:
        return ks, has_a & has_c
    pos = torch.cumsum(has_a.long(), 0) - 1  # position of class k in the anchor list
    order = torch.sort((~has_c).long() * K + ks).indices  # the candidate list, then the rest
    return order[pos.clamp(0, K - 1)], has_a & (pos < has_c.sum())


@torch.no_grad()
def dt_selection(fw: Tensor, fs: Tensor, conf_w: Tensor, label_w: Tensor, valid_w: Tensor,
                 valid_s: Tensor, protos: Tensor, *, conf_thresh: float, num_anchors: int,
                 num_candidates: int, pair_by_position: bool, duplicate_top_anchor: bool,
                 keep_uninitialised: bool) -> DtSelection:
    """The anchors and candidates of :func:`dt_loss`; fw, fs (B, C, P) float, the masks
    (B, h, w) with h*w = P, protos (K, C) float."""
    B, P, K = fw.shape[0], fw.shape[2], protos.shape[0]
    own = label_w.reshape(B, 1, P).long() == torch.arange(K, device=fw.device).view(1, K, 1)
    if not keep_uninitialised:  # classes whose prototype is still all zeros sit out
        own = own & protos.ne(0).any(1).view(1, K, 1)
    conf_ok = (conf_w.reshape(B, 1, P) > conf_thresh) & valid_w.reshape(B, 1, P)
    a_idx, a_ok = _topk_per_class(_cos_to_protos(fw, protos), own & conf_ok, num_anchors)
    c_idx, c_ok = _topk_per_class(-_cos_to_protos(fs, protos), own & valid_s.reshape(B, 1, P),
                                  num_candidates)
    if duplicate_top_anchor:  # [t1, t1, t2, ..., t(m-1)]: the top one twice
        n_a = a_ok.sum(1, keepdim=True)
        a_idx = torch.cat([a_idx[:, :1], a_idx[:, :-1]], dim=1)
        a_ok = torch.arange(a_idx.shape[1], device=fw.device) < n_a
    partner, paired = _pairing(a_ok.any(1), c_ok.any(1), pair_by_position)
    return DtSelection(a_idx, a_ok & paired.unsqueeze(1), c_idx, c_ok, partner, paired)


def dt_loss(f_w: Tensor, conf_w: Tensor, label_w: Tensor, valid_w: Tensor,
            f_s: Tensor, valid_s: Tensor, protos: Tensor, *,
            conf_thresh: float = 0.95, num_anchors: int = 16, num_candidates: int = 256,
            pair_by_position: bool = False, duplicate_top_anchor: bool = False,
            normalise_by_candidates: bool = False, keep_uninitialised: bool = False) -> Tensor:
    """L_dt (prototype-based intra-class compactness of FKA), 0-dim.

    f_w (B, C, h, w) weak features (detached here); conf_w, label_w (B, h, w) the weak
    confidence and class at feature resolution; valid_w (B, h, w) bool; f_s (B, C, h, w)
    strong features (receive the gradient); valid_s (B, h, w) bool; protos (K, C) the bank
    (read only). Per class k: anchors = the ``num_anchors`` valid weak features of label k
    with conf > ``conf_thresh`` closest to rho_k; candidates = the ``num_candidates`` valid
    strong features of weak label k farthest from rho_k; m(a) = max over candidates of
    cos(a, s). Paper: mean over all anchors of 1 - m(a); 0 when no class has both.

    Released quirks (docs/method.md, "Paper versus release"): ``pair_by_position``,
    ``duplicate_top_anchor``, ``normalise_by_candidates`` (1 - sum m(a) / sum |S|),
    ``keep_uninitialised`` (classes whose prototype is all zeros take part).
    """
    # autocast knows cuda and cpu only (the FLOP counter runs the step on 'meta')
    with torch.autocast("cuda" if f_s.device.type == "cuda" else "cpu", enabled=False):
        fw, fs = _maps(f_w.detach()).float(), _maps(f_s).float()  # (B, C, P)
        sel = dt_selection(fw, fs.detach(), conf_w, label_w, valid_w, valid_s,
                           protos.detach().float(), conf_thresh=conf_thresh,
                           num_anchors=num_anchors, num_candidates=num_candidates,
                           pair_by_position=pair_by_position,
                           duplicate_top_anchor=duplicate_top_anchor,
                           keep_uninitialised=keep_uninitialised)
        anchors = F.normalize(_gather(fw, sel.a_idx), dim=2)  # (K, A, C), detached
        cands = F.normalize(_gather(fs, sel.c_idx), dim=2)[sel.partner]  # (K, S, C)
        cos = torch.bmm(anchors, cands.transpose(1, 2))  # (K, A, S)
        cos = cos.masked_fill(~sel.c_ok[sel.partner].unsqueeze(1), float("-inf"))
        best = cos.amax(dim=2)  # (K, A)
        total = torch.where(sel.a_ok, best, torch.zeros_like(best)).sum()
        if normalise_by_candidates:
            n_c = sel.c_ok.sum(1)[sel.partner]
            den = torch.where(sel.paired, n_c, torch.zeros_like(n_c)).sum()
        else:
            den = sel.a_ok.sum()
        loss = 1.0 - total / den.clamp(min=1)
        return torch.where(den > 0, loss, torch.zeros_like(loss))


# --------------------------------------------------------------------------- SAI
def sai_amplitude(v: Tensor, kappa: float) -> Tensor:
    """a_i = kappa (v_i + 1), the noise amplitude of image i (in [0, 2 kappa])."""
    return kappa * (v + 1.0)


def sai_mask_ratio(v: Tensor, kappa: float, double_transform: bool = False) -> Tensor:
    """r_i = 1 - kappa (v_i + 1), the centre of the masking threshold; with
    ``double_transform`` (switch ``mlcl.double_transform``, released) r_i = 1 - kappa (a_i + 1)
    with a_i = kappa (v_i + 1)."""
    s = sai_amplitude(v, kappa)
    if double_transform:
        s = sai_amplitude(s, kappa)
    return 1.0 - s


def sai_noise(f: Tensor, v: Tensor, kappa: float, generator: torch.Generator | None = None
              ) -> Tensor:
    """F_ne (SAI noise injection) = F + F * eps, eps ~ U(-a_i, a_i) elementwise over (C, h, w),
    a_i = kappa (v_i + 1). f (B, C, h, w) keeps its gradient; v (B,) is used detached. Draws
    one ``torch.rand(f.shape)`` from ``generator``."""
    a = sai_amplitude(v.detach().to(f.dtype), kappa).view(-1, 1, 1, 1)
    u = torch.rand(f.shape, generator=generator, device=f.device, dtype=f.dtype)
    return f * torch.addcmul(1.0 - a, u, 2.0 * a)  # F (1 + eps), 1 + eps = (1 - a) + 2a u


def sai_mask(f: Tensor, v: Tensor, kappa: float, jitter: float = 0.1,
             double_transform: bool = False, generator: torch.Generator | None = None
             ) -> tuple[Tensor, Tensor]:
    """(F_mk, keep) of SAI self-adaptive masking.

    f (B, C, h, w), v (B,) (detached). Attention A_i = channel mean of f_i; r_i =
    :func:`sai_mask_ratio`; t_i ~ U(r_i - jitter, r_i + jitter) (one ``torch.rand(B)`` from
    ``generator``); keep (B, h, w) bool = A_i < t_i max(A_i), so the highest activations are
    dropped; F_mk = f * keep (the gradient flows through the kept positions).
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
    """L_m / L_n: MSE between the decoder's probabilities on a perturbed map (upsampled to the
    input size) and the weak view's CutMixed probabilities.

    prob, target (B, K, H, W) (target detached by the caller). Mean over all B*K*H*W
    elements, padding included (both variants). ``valid`` (B, H, W) bool (switch
    ``mlcl.sai_ignore_mask``, an ablation): mean over the K values of the valid pixels.
    """
    if valid is None:
        return F.mse_loss(prob.float(), target.float(), reduction="mean")
    sq = (prob.float() - target.float()) ** 2
    m = valid.unsqueeze(1).to(sq.dtype)
    return (sq * m).sum() / (m.sum() * prob.shape[1]).clamp(min=1)


class _UpsampledSoftmaxMSE(torch.autograd.Function):
    """mean((softmax(upsample(z)) - target)^2), ``chunk`` images at a time, each chunk's
    gradient for z taken in the forward (docs/method.md, "Implementation notes")."""

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
    """L_m / L_n from the decoder's logits at feature resolution: the value and gradient of
    ``sai_mse(upsample(logits, target's size).float().softmax(1), target)`` without keeping any
    input-resolution tensor for the backward.

    logits (N, K, h, w); target (N, K, H, W) (detached). ``chunk`` images at a time (default:
    1 on CPU, all on GPU). 0-dim float32.
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

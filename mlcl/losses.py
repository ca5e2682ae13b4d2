"""The paper's losses as pure functions of tensors, one per term (docs/method.md, "Equations
and functions"); the release's deviations build on them in :mod:`mlcl.released`. Shapes: ``B``
images, ``K`` classes, ``C`` feature channels, ``H x W`` input and ``h x w`` feature resolution.
Nothing here waits on the device (docs/method.md, "No waiting on the device")."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mlcl.prototypes import initialised

# The released code measures cosines with nn.CosineSimilarity(eps=1e-6).
COS_EPS = 1e-6
SAI_RAMP_K = 5.0  # k of the SAI ramp-up r(t) = exp(-k (1 - t/T)^2), the release's


# --------------------------------------------------------------------------- UniMatch
def ce_loss(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """L_x: cross-entropy of labeled predictions, logits (B, K, H, W), target (B, H, W) long;
    the mean over pixels whose target is not ``ignore_index`` (0 when every pixel is)."""
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return ce / (target != ignore_index).sum().clamp(min=1)


def ohem_ce_loss(logits: Tensor, target: Tensor, ignore_index: int = 255,
                 thresh: float = 0.7, min_kept: int = 200_000) -> Tensor:
    """L_x with online hard example mining (UniMatch's ``ProbOhemCrossEntropy2d``, Cityscapes):
    logits (B, K, H, W), target (B, H, W); with p the softmax probability of the true class,
    the mean CE over the non-ignored pixels with p <= max(thresh, the min_kept-th smallest p);
    over all of them when fewer than ``min_kept`` are labeled (or min_kept <= 0)."""
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
    """L_s1 / L_s2 / L_fp: cross-entropy against (CutMixed) pseudo-labels. logits (B, K, H, W);
    pseudo, conf, ignore (B, H, W). The sum of CE over pixels with conf >= tau and not
    ``ignore_index``, over the number of non-ignored pixels (UniMatch's normalisation)."""
    valid = ignore != ignore_index
    ce = F.cross_entropy(logits.float(), pseudo.long(), ignore_index=ignore_index, reduction="none")
    mask = (conf >= tau) & valid
    return (ce * mask).sum() / valid.sum().clamp(min=1)


# --------------------------------------------------------------------------- resolution
def feature_pixel_index(n_in: int, n_out: int, device: torch.device | None = None) -> Tensor:
    """(n_out,) long: the input pixel under each of ``n_out`` feature positions along an axis
    of ``n_in`` pixels as the model's upsampling places them (docs/method.md, "Ignore map and
    CutMix box at feature resolution")."""
    i = torch.arange(n_out, device=device)
    if n_out == 1:
        return i
    return (2 * i * (n_in - 1) + (n_out - 1)) // (2 * (n_out - 1))


def at_feature_pixels(t: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W) -> (B, h, w) = ``size``: ``t`` at the input pixel under each feature position."""
    rows = feature_pixel_index(t.shape[-2], size[0], t.device)
    cols = feature_pixel_index(t.shape[-1], size[1], t.device)
    return t.index_select(-2, rows).index_select(-1, cols)


def valid_at_features(ignore: Tensor, size: tuple[int, int], ignore_index: int = 255) -> Tensor:
    """(B, h, w) bool at feature resolution ``size``: the ignore map (B, H, W) at the pixel
    under each feature position (:func:`at_feature_pixels`) is not ``ignore_index``."""
    return at_feature_pixels(ignore, size) != ignore_index


# --------------------------------------------------------------------------- FKA
def channel_dot(x: Tensor, y: Tensor) -> Tensor:
    """(B, C, *S) x 2 -> (B, *S): the dot product over the channels at every position, one
    image at a time (no temporary of the maps' size)."""
    out = x.new_empty(x.shape[:1] + x.shape[2:])
    for i in range(x.shape[0]):
        torch.linalg.vecdot(x[i], y[i], dim=0, out=out[i])
    return out


class _MeanCosine(torch.autograd.Function):
    """1 - mean cos(a, b) over the positions of a, b (B, C, *S), norms clamped at COS_EPS,
    with the gradient for b alone, written image by image; also returns the cosines."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor):
        na, nb = channel_dot(a, a).sqrt_(), channel_dot(b, b).sqrt_()
        cos = channel_dot(a, b) / (na.clamp(min=COS_EPS) * nb.clamp(min=COS_EPS))
        ctx.save_for_backward(a, b, na, nb, cos)
        ctx.mark_non_differentiable(cos)
        return 1.0 - cos.mean(), cos

    @staticmethod
    def backward(ctx, grad: Tensor, _):
        a, b, na, nb, cos = ctx.saved_tensors
        g = -grad / cos.numel()  # d loss / d cos at every position
        # d cos / d b = a / (|a| |b|) - cos b / |b|^2 (the second term only where |b| > eps)
        along_a = (g / (na.clamp(min=COS_EPS) * nb.clamp(min=COS_EPS))).unsqueeze(1)
        along_b = torch.where(nb > COS_EPS, -g * cos / (nb * nb).clamp(min=COS_EPS ** 2), 0.0)
        along_b, db = along_b.unsqueeze(1), torch.empty_like(b)
        for i in range(b.shape[0]):
            torch.mul(b[i], along_b[i], out=db[i]).addcmul_(a[i], along_a[i])
        return None, db


def loss_p2p(f_mix: Tensor, f_s: Tensor) -> tuple[Tensor, Tensor]:
    """(L_p2p, v): FKA's point-to-point alignment and SAI's per-image similarity from one
    cosine map. f_mix (B, C, h, w) the weak view CutMixed like ``f_s`` (F_1, detached here);
    f_s (B, C, h, w) gets the gradient. L_p2p (0-dim) = the mean over B*h*w pixels of
    1 - cos(F_1, F_s1); v (B,) = per image the mean cosine, without gradient."""
    loss, cos = _MeanCosine.apply(f_mix.detach().float(), f_s.float())
    return loss, cos.flatten(1).mean(1)


@torch.no_grad()
def per_image_similarity(f_mix: Tensor, f_s: Tensor) -> Tensor:
    """v of SAI alone (:func:`loss_p2p`): (B, C, h, w) x 2 -> (B,)."""
    return loss_p2p(f_mix, f_s)[1]


def _cos_to_protos(maps: Tensor, protos: Tensor) -> Tensor:
    """(B, C, P) x (K, C) -> (B, K, P) cosines, norms clamped at COS_EPS."""
    pn = protos / protos.norm(dim=1, keepdim=True).clamp(min=COS_EPS)
    dots = torch.bmm(pn.expand(maps.shape[0], -1, -1), maps)  # on the CPU faster than pn @ maps
    return dots / channel_dot(maps, maps).sqrt_().clamp_(min=COS_EPS).unsqueeze(1)


def _topk_per_class(score: Tensor, eligible: Tensor, k: int, largest: bool = True
                    ) -> tuple[Tensor, Tensor]:
    """score, eligible (B, K, P) -> per class the flat indices b*P + p of the (at most) ``k``
    eligible pixels of highest (``largest``, else lowest) score, sorted: idx (K, k), and ok
    (K, k), False on the padding slots (last, arbitrary indices)."""
    K, never = score.shape[1], float("-inf") if largest else float("inf")
    masked = score.masked_fill(~eligible, never).transpose(0, 1).reshape(K, -1)
    k = min(k, masked.shape[1])
    vals, idx = masked.topk(k, dim=1, largest=largest, sorted=True)
    return idx, vals != never


def unit_features(maps: Tensor, idx: Tensor) -> Tensor:
    """maps (B, C, P), flat pixel indices idx (K, k) -> their unit feature vectors (K, k, C)."""
    P = maps.shape[2]
    return F.normalize(maps[idx // P, :, idx % P], dim=2)


@torch.no_grad()
def dt_select(fw: Tensor, fs: Tensor, conf_w: Tensor, label_w: Tensor, valid_w: Tensor,
              valid_s: Tensor, protos: Tensor, classes: Tensor, conf_thresh: float,
              num_anchors: int, num_candidates: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The anchors and candidates of L_dt: (a_idx, a_ok) (K, A) and (c_idx, c_ok) (K, S), flat
    pixel indices and validity (:func:`_topk_per_class`). fw, fs (B, C, P) float; conf_w,
    label_w, valid_w, valid_s (B, h, w), h*w = P; protos (K, C) float; classes (K,) bool, the
    classes that take part. Anchors A_k: the ``num_anchors`` valid weak features of weak label k
    with conf > ``conf_thresh`` closest to rho_k; candidates S_k: the ``num_candidates`` valid
    strong features of weak label k farthest from rho_k."""
    B, P, K = fw.shape[0], fw.shape[2], protos.shape[0]
    own = label_w.reshape(B, 1, P).long() == torch.arange(K, device=fw.device).view(1, K, 1)
    own = own & classes.view(1, K, 1)
    conf_ok = (conf_w.reshape(B, 1, P) > conf_thresh) & valid_w.reshape(B, 1, P)
    a_idx, a_ok = _topk_per_class(_cos_to_protos(fw, protos), own & conf_ok, num_anchors)
    c_idx, c_ok = _topk_per_class(_cos_to_protos(fs, protos), own & valid_s.reshape(B, 1, P),
                                  num_candidates, largest=False)
    return a_idx, a_ok, c_idx, c_ok


def dt_best_match(anchors: Tensor, fs: Tensor, c_idx: Tensor, c_ok: Tensor) -> Tensor:
    """m(a) (K, A): each anchor's largest cosine to a valid candidate of its row; anchors
    (K, A, C) unit vectors, the candidates the pixels ``c_idx`` (K, S) of fs (B, C, P), valid
    where c_ok (K, S). The best candidate is chosen without gradient and its cosine taken again
    with it: the gradient of a max reaches its argmax alone, so only K*A candidates are
    gathered with gradient."""
    with torch.no_grad():
        cos = torch.bmm(anchors, unit_features(fs, c_idx).transpose(1, 2))  # (K, A, S)
        best = cos.masked_fill(~c_ok.unsqueeze(1), float("-inf")).argmax(dim=2)  # (K, A)
    return (anchors * unit_features(fs, c_idx.gather(1, best))).sum(2)


def dt_mean(best: Tensor, a_ok: Tensor, den: Tensor) -> Tensor:
    """1 - (sum of ``best`` (K, A) over the anchors ``a_ok``) / ``den``; 0 when den = 0."""
    total = torch.where(a_ok, best, torch.zeros_like(best)).sum()
    loss = 1.0 - total / den.clamp(min=1)
    return torch.where(den > 0, loss, torch.zeros_like(loss))


def loss_dt(f_w: Tensor, conf_w: Tensor, label_w: Tensor, valid_w: Tensor,
            f_s: Tensor, valid_s: Tensor, protos: Tensor, *, conf_thresh: float = 0.95,
            num_anchors: int = 16, num_candidates: int = 256) -> Tensor:
    """L_dt (FKA's prototype-based intra-class compactness), 0-dim, in fp32: the mean over all
    anchors of 1 - m(a), m(a) = max over the candidates of its class of cos(a, s); 0 when no
    class has both (:func:`dt_select`, among the classes whose prototype is initialised).
    f_w, f_s (B, C, h, w) weak (detached here) and strong features (with gradient); conf_w,
    label_w, valid_w, valid_s (B, h, w) at feature resolution; protos (K, C) the bank (read)."""
    with torch.autocast(f_s.device.type, enabled=False):
        fw, fs = f_w.detach().flatten(2).float(), f_s.flatten(2).float()  # (B, C, P)
        protos = protos.detach().float()
        a_idx, a_ok, c_idx, c_ok = dt_select(
            fw, fs.detach(), conf_w, label_w, valid_w, valid_s, protos, initialised(protos),
            conf_thresh, num_anchors, num_candidates)
        a_ok = a_ok & c_ok.any(1, keepdim=True)  # classes with anchors and candidates
        best = dt_best_match(unit_features(fw, a_idx), fs, c_idx, c_ok)
        return dt_mean(best, a_ok, a_ok.sum())


# --------------------------------------------------------------------------- SAI
def sai_amplitude(v: Tensor, kappa: float) -> Tensor:
    """a_i = kappa (v_i + 1), the noise amplitude of image i (in [0, 2 kappa])."""
    return kappa * (v + 1.0)


def sai_mask_ratio(v: Tensor, kappa: float) -> Tensor:
    """r_i = 1 - kappa (v_i + 1), the centre of the masking threshold of image i."""
    return 1.0 - sai_amplitude(v, kappa)


def sai_noise(f: Tensor, v: Tensor, kappa: float, generator: torch.Generator | None = None
              ) -> Tensor:
    """F_ne (SAI noise injection) = F + F * eps, eps ~ U(-a_i, a_i) elementwise (one
    ``torch.rand(f.shape)`` from ``generator``); f (B, C, h, w) keeps its gradient, v (B,)."""
    a = sai_amplitude(v.detach().to(f.dtype), kappa).view(-1, 1, 1, 1)
    u = torch.rand(f.shape, generator=generator, device=f.device, dtype=f.dtype)
    # F (1 + eps), 1 + eps = (1 - a) + 2a u written over the draws: one map fewer
    return f * torch.addcmul(1.0 - a, u, 2.0 * a, out=u)


def sai_keep(f: Tensor, ratio: Tensor, jitter: float = 0.1,
             generator: torch.Generator | None = None) -> Tensor:
    """keep (B, h, w) bool of SAI self-adaptive masking, no gradient. f (B, C, h, w); ratio (B,)
    the threshold centres r_i (:func:`sai_mask_ratio`). A_i = channel mean of f_i; t_i ~
    U(r_i - jitter, r_i + jitter) (one ``torch.rand(B)`` from ``generator``); keep = A_i <
    t_i max(A_i), dropping the highest activations."""
    B = f.shape[0]
    u = torch.rand(B, generator=generator, device=f.device, dtype=torch.float32)
    t = ratio.detach().float() + (2.0 * u - 1.0) * jitter
    with torch.no_grad():
        att = f.detach().float().mean(1)  # (B, h, w)
        top = att.flatten(1).amax(1)
        return att < (top * t).view(B, 1, 1)


def sai_mask(f: Tensor, ratio: Tensor, jitter: float = 0.1,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(F_mk, keep) of SAI self-adaptive masking: F_mk = f * keep (:func:`sai_keep`)."""
    keep = sai_keep(f, ratio, jitter, generator)
    return f * keep.unsqueeze(1).to(f.dtype), keep


def masked_logits(logits: Tensor, keep: Tensor, offset: Tensor) -> Tensor:
    """decode(F_mk) from decode(F) without decoding F_mk, for a decoder that is affine at each
    position (a 1x1 conv): ``logits`` (B, K, h, w) = decode(F) where ``keep`` (B, h, w), else
    ``offset`` (1, K, 1, 1) = decode of a zero feature (the classifier's bias)."""
    return torch.where(keep.unsqueeze(1), logits, offset.to(logits.dtype))


def sai_mse(prob: Tensor, target: Tensor) -> Tensor:
    """L_m / L_n at the input resolution: the mean over all B*K*H*W elements of the squared
    difference of prob and target (B, K, H, W); :func:`loss_sai` computes it from logits."""
    return F.mse_loss(prob.float(), target.float(), reduction="mean")


def stretch_adjoint(g: Tensor, n: int, dim: int) -> Tensor:
    """The gradient along ``dim`` of align-corners linear interpolation from ``n`` points to
    g.shape[dim] = (n - 1) f + 1, f an integer: point j collects the points j f + d, |d| < f,
    weighted 1 - |d| / f (a tent of stride f)."""
    g = g.movedim(dim, -1)
    f = (g.shape[-1] - 1) // (n - 1)
    out = g[..., ::f].clone()  # d = 0
    for d in range(1, f):
        between = g[..., d::f]  # the points between j and j + 1
        out[..., :-1].add_(between, alpha=1.0 - d / f)
        out[..., 1:].add_(between, alpha=d / f)
    return out.movedim(-1, dim)


def upsample_grad(g: Tensor, size: tuple[int, int]) -> Tensor | None:
    """The gradient for z (..., h, w) = ``size`` of align-corners bilinear upsampling of z to
    g's (H, W), one axis at a time (:func:`stretch_adjoint`), where H - 1 and W - 1 are whole
    multiples of h - 1 and w - 1 (else None). On the CPU 5x faster than autograd's kernel,
    and deterministic on CUDA."""
    (h, w), (H, W) = size, g.shape[-2:]
    if min(h, w) < 2 or H < h or W < w or (H - 1) % (h - 1) or (W - 1) % (w - 1):
        return None
    return stretch_adjoint(stretch_adjoint(g, h, -2), w, -1)  # rows first: whole rows added


class _UpsampledSoftmaxMSE(torch.autograd.Function):
    """mean((softmax(upsample(z)) - target)^2), ``chunk`` images at a time, each chunk's
    gradient for z taken in the forward, in autograd's order: the softmax's by autograd's
    backward kernel, the upsampling's by :func:`upsample_grad` (or autograd's kernel where it
    does not apply; docs/method.md, "Implementation notes"); the input-resolution maps live in
    four buffers of ``chunk`` images that every chunk reuses."""

    @staticmethod
    def forward(ctx, z: Tensor, target: Tensor, chunk: int) -> Tensor:
        size, n, aten = list(target.shape[-2:]), target.numel(), torch.ops.aten
        # d loss / d (p - t) = 2 (p - t) / n: autograd's 1 / n, doubled as mse_loss's backward
        scale = 2.0 * (torch.ones((), dtype=torch.float32, device=z.device) / n)
        total = z.new_zeros((), dtype=torch.float64)
        shape = (min(chunk, z.shape[0]), z.shape[1], *size)
        up = z.new_empty(shape)
        p, d, g = (z.new_empty(shape, dtype=torch.float32) for _ in range(3))
        dz = torch.empty_like(z) if ctx.needs_input_grad[0] else None
        for i in range(0, z.shape[0], chunk):
            zc = z[i:i + chunk]
            u, q, e, h = (t[:zc.shape[0]] for t in (up, p, d, g))
            aten.upsample_bilinear2d.out(zc, size, True, None, None, out=u)  # model.upsample
            torch.softmax(u, 1, dtype=torch.float32, out=q)  # as the model's logits, in fp32
            torch.sub(q, target[i:i + chunk], out=e)
            total += (torch.mul(e, e, out=h).sum() / n).double()  # mse_loss(q, t, "sum") / n
            if dz is not None:
                aten._softmax_backward_data.out(e.mul_(scale), q, 1, q.dtype, grad_input=h)
                grad = upsample_grad(h, zc.shape[-2:])
                if grad is not None:
                    dz[i:i + chunk].copy_(grad)
                else:
                    aten.upsample_bilinear2d_backward.grad_input(
                        h.to(u.dtype), size, list(zc.shape), True, None, None,
                        grad_input=dz[i:i + chunk])
        if dz is not None:
            ctx.save_for_backward(dz)
        return total.float()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (dz,) = ctx.saved_tensors  # d loss / d z, taken in the forward
        return dz * grad.to(dz.dtype), None, None


def loss_sai(logits: Tensor, target: Tensor, chunk: int | None = None) -> Tensor:
    """L_m / L_n of SAI, 0-dim float32, from the decoder's logits (N, K, h, w): the value and
    gradient of ``sai_mse(upsample(logits).float().softmax(1), target)``, target (N, K, H, W),
    ``chunk`` images at a time (default: 1 on CPU, all on GPU), no input-resolution tensor kept."""
    if chunk is None:
        chunk = 1 if logits.device.type == "cpu" else logits.shape[0]
    return _UpsampledSoftmaxMSE.apply(logits, target.detach(), max(1, int(chunk)))


def sai_weight(it: int, total_iters: int, beta: float) -> float:
    """w(t) = beta r(t)^2, r(t) = exp(-k (1 - t/T)^2), k = SAI_RAMP_K, t = min(it, T) the global
    iteration, T = total_iters (beta when T = 0); a host float."""
    if total_iters <= 0:
        return float(beta)
    t = min(max(it, 0), total_iters)
    r = math.exp(-SAI_RAMP_K * (1.0 - t / total_iters) ** 2)
    return float(beta * r * r)

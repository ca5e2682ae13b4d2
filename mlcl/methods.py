"""One step function per method: ``step(model, batch, ctx) -> {'loss': total, <named terms>}``.

Vocabulary (UniMatch's): ``x``/``y`` labeled images and masks; ``u`` the unlabeled batch with
views ``w`` (weak), ``s1``/``s2`` (two independent strong views), ``ignore`` (255 where the
crop was padded) and CutMix boxes ``box1``/``box2``; ``mix`` the CutMix source batch (the
unlabeled batch rolled by one image, or an independently shuffled loader); ``fp`` the
feature-perturbation branch.

Forward passes (image-batches through the backbone) per step:

    supervised            1   x
    unimatch              5   mix_w (eval, no grad) | x, u_w (+fp copy of c1/c4) | s1, s2
    mlcl (default)        7   unimatch's 5 + the CutMixed weak views w1, w2 under no_grad
    mlcl (released)       9   7 train-mode passes: mix_w | x, u_w | s1, s2 | w1 | w2 | u_w | s1

In the default MLCL step F_1/F_2 (features of the weak images CutMixed like s1/s2) are only
ever used detached, so they come from one no-grad pass; F_w is the clean branch of the
cat(x, u_w) pass UniMatch already runs; F_s is the CutMixed strong features F_s1 outside the
box (inside it the pixels belong to the mix partner). ``mlcl.released_passes=true`` runs the
released structure instead (separate train-mode passes with graphs; batch-norm statistics
differ accordingly).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mlcl import losses
from mlcl.config import Config


@dataclass
class StepContext:
    cfg: Config
    bank: Any
    accelerator: Any
    total_iters: int
    iters_per_epoch: int
    iteration: int = 0
    epoch: int = 0


def make_bank(cfg: Config):
    """The prototype memory bank for MLCL (None for the other methods)."""
    if cfg.method != "mlcl":
        return None
    from mlcl.prototypes import PrototypeBank

    return PrototypeBank(cfg.data.num_classes, cfg.model.feature_channels,
                         momentum=cfg.mlcl.bank_momentum, conf_thresh=cfg.mlcl.bank_conf)


def labeled_loss(logits: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """L_x: CE with ignore, or OHEM CE (Cityscapes)."""
    if cfg.train.loss == "ohem":
        return losses.ohem_ce_loss(logits, y, cfg.data.ignore_index, cfg.train.ohem_thresh,
                                   cfg.train.ohem_min_kept)
    return losses.ce_loss(logits, y, cfg.data.ignore_index)


# --------------------------------------------------------------------------- supervised
def step_supervised(model, batch: dict[str, Any], ctx: StepContext) -> dict[str, Tensor]:
    x, y = batch["x"]["x"], batch["x"]["y"]
    loss = labeled_loss(model(x), y, ctx.cfg)
    return {"loss": loss, "x": loss.detach()}


# --------------------------------------------------------------------------- unimatch
def mix_source(batch: dict[str, Any]) -> dict[str, Tensor]:
    """The CutMix partner of every unlabeled image: a different image (the batch rolled by
    one), or the independently shuffled 'mix' loader's batch when configured."""
    if "mix" in batch:
        return batch["mix"]
    u = batch["u"]
    return {k: v.roll(1, dims=0) for k, v in u.items() if torch.is_tensor(v)}


def paste(box: Tensor, inside: Tensor, outside: Tensor) -> Tensor:
    """CutMix: ``inside`` where box (B, H, W) is set, ``outside`` elsewhere. Works for
    (B, H, W) and (B, C, H, W) tensors."""
    if inside.dim() == 4:
        box = box.unsqueeze(1)
    return torch.where(box, inside, outside)


@dataclass
class UniMatchPasses:
    """What the UniMatch passes computed; the MLCL step reuses it."""

    terms: dict[str, Tensor]
    total: Tensor
    out_xw: Any  # SegOutput of the cat(x, u_w) pass (clean + fp)
    out_s: Any  # SegOutput of the cat(s1, s2) pass
    prob_w: Tensor  # (B, K, H, W) softmax of u_w (train mode, detached)
    prob_mix: Tensor  # (B, K, H, W) softmax of the mix source (eval mode)
    targets: list[tuple[Tensor, Tensor, Tensor]]  # per strong view: (label, conf, ignore)
    boxes: list[Tensor]
    mix: dict[str, Tensor]
    batch_ignore: Tensor  # (B, H, W) u's ignore map
    n_x: int


def unimatch_passes(model, batch: dict[str, Any], ctx: StepContext) -> UniMatchPasses:
    cfg = ctx.cfg
    x, y = batch["x"]["x"], batch["x"]["y"]
    u = batch["u"]
    mix = mix_source(batch)
    boxes = [u["box1"], u["box2"]]

    # 1. pseudo-labels of the mix source: eval mode, no gradient
    model.eval()
    with torch.no_grad():
        prob_mix = model(mix["w"]).softmax(1)
    model.train()
    conf_mix, label_mix = prob_mix.max(1)

    # 2. CutMix the strong views with the partner's strong views
    s1 = paste(boxes[0], mix["s1"], u["s1"])
    s2 = paste(boxes[1], mix["s2"], u["s2"])

    # 3. cat(x, u_w) with the feature-perturbation branch (train mode)
    n_x = x.shape[0]
    out_xw = model(torch.cat([x, u["w"]]), fp=True, return_features=True)
    pred_x, pred_w = out_xw.logits[:n_x], out_xw.logits[n_x:]
    pred_fp = out_xw.logits_fp[n_x:]
    prob_w = pred_w.detach().softmax(1)
    conf_w, label_w = prob_w.max(1)

    # 4. cat(s1, s2)
    out_s = model(torch.cat([s1, s2]), return_features=True)
    pred_s1, pred_s2 = out_s.logits.chunk(2)

    # 5. losses; targets of s_i: u_w's pseudo-labels with box_i taken from the mix source
    ig = cfg.data.ignore_index
    targets = []
    for box in boxes:
        targets.append((paste(box, label_mix, label_w), paste(box, conf_mix, conf_w),
                        paste(box, mix["ignore"], u["ignore"])))
    tau = cfg.train.conf_thresh
    loss_x = labeled_loss(pred_x, y, cfg)
    loss_s1 = losses.pseudo_label_ce(pred_s1, *targets[0], tau, ig)
    loss_s2 = losses.pseudo_label_ce(pred_s2, *targets[1], tau, ig)
    loss_fp = losses.pseudo_label_ce(pred_fp, label_w, conf_w, u["ignore"], tau, ig)
    w = cfg.unimatch
    total = w.scale * (w.w_x * loss_x + w.w_s1 * loss_s1 + w.w_s2 * loss_s2 + w.w_fp * loss_fp)
    valid = u["ignore"] != ig
    conf_ratio = ((conf_w >= tau) & valid).sum() / valid.sum().clamp(min=1)
    terms = {"x": loss_x.detach(), "s": (loss_s1.detach() + loss_s2.detach()) / 2,
             "fp": loss_fp.detach(), "conf_ratio": conf_ratio.detach().float()}
    return UniMatchPasses(terms=terms, total=total, out_xw=out_xw, out_s=out_s, prob_w=prob_w,
                          prob_mix=prob_mix, targets=targets, boxes=boxes, mix=mix,
                          batch_ignore=u["ignore"], n_x=n_x)


def step_unimatch(model, batch: dict[str, Any], ctx: StepContext) -> dict[str, Tensor]:
    p = unimatch_passes(model, batch, ctx)
    return {"loss": p.total, **p.terms}


# --------------------------------------------------------------------------- mlcl
def weak_at_feature_resolution(logits_w_feat: Tensor) -> tuple[Tensor, Tensor]:
    """(conf, label) of u_w at feature resolution from the classifier's logits there."""
    conf, label = logits_w_feat.detach().float().softmax(1).max(1)
    return conf, label


def downsample_box(box: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(box.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1).bool()


def step_mlcl(model, batch: dict[str, Any], ctx: StepContext) -> dict[str, Tensor]:
    cfg, m = ctx.cfg, ctx.cfg.mlcl
    net = ctx.accelerator.unwrap_model(model) if ctx.accelerator is not None else model
    p = unimatch_passes(model, batch, ctx)
    u, mix, (box1, box2) = batch["u"], p.mix, p.boxes
    f_s1, f_s2 = p.out_s.features.chunk(2)  # (B, C, h, w), CutMixed strong views, with grad

    # F_1 / F_2: the weak images CutMixed like s1 / s2 -- used only detached
    w1, w2 = paste(box1, mix["w"], u["w"]), paste(box2, mix["w"], u["w"])
    if m.released_passes:  # separate train-mode passes whose graphs are never used
        f1 = model(w1, return_features=True).features.detach()
        f2 = model(w2, return_features=True).features.detach()
        f_w = model(u["w"], return_features=True).features
        f_s_dt = model(u["s1"], return_features=True).features  # un-mixed s1
    else:
        with torch.no_grad():  # train mode, as the released passes (BN batch statistics)
            f1, f2 = model(torch.cat([w1, w2]), return_features=True).features.chunk(2)
        f_w = p.out_xw.features[p.n_x:]  # clean branch of the cat(x, u_w) pass
        f_s_dt = f_s1  # outside box1 the CutMixed s1 is the strong view of u_w
    f_w = f_w.detach()
    size = tuple(f_w.shape[-2:])

    # weak pseudo-labels at feature resolution and the ignore map resized there
    conf_f, label_f = weak_at_feature_resolution(net.decode(f_w))
    valid_w = losses.resize_ignore(u["ignore"], size, bilinear=m.bilinear_ignore,
                                   ignore_index=cfg.data.ignore_index)
    valid_s = valid_w if m.released_passes else valid_w & ~downsample_box(box1, size)

    zero = f_s1.new_zeros(())
    # FKA: point-to-point alignment and prototype compactness (train the encoder); the same
    # cosine map gives SAI's per-image similarity v
    p2p1, v1 = losses.p2p_and_similarity(f1, f_s1)
    p2p2, v2 = losses.p2p_and_similarity(f2, f_s2)
    p2p = (p2p1 + p2p2) / 2  # logged even when switched off
    dt = losses.dt_loss(f_w, conf_f, label_f, valid_w, f_s_dt, valid_s, ctx.bank.protos,
                        conf_thresh=m.bank_conf, num_anchors=m.num_anchors,
                        num_candidates=m.num_candidates, pair_by_position=m.pair_by_position,
                        duplicate_top_anchor=m.duplicate_top_anchor,
                        normalise_by_candidates=m.normalise_by_candidates) if m.use_dt else zero

    # SAI: perturb the strong features by how well the views already agree (train the decoder)
    sai_w = 0.0 if ctx.epoch < m.warmup_epochs else losses.sai_weight(
        ctx.iteration, ctx.total_iters, m.beta, m.rampup_k)
    loss_mask, loss_noise = zero, zero
    if sai_w > 0 and (m.use_mask or m.use_noise):
        loss_mask, loss_noise = sai_losses(net, p, [(f_s1, v1, box1), (f_s2, v2, box2)], cfg)

    alpha = m.alpha if m.use_p2p else 0.0
    total = p.total + alpha * p2p + m.omega * dt + sai_w * (loss_mask + loss_noise)
    ctx.bank.update(f_w, label_f, conf_f, valid_w, early_stop=m.bank_early_stop)
    return {"loss": total, **p.terms, "p2p": p2p.detach(), "dt": dt.detach(),
            "mask": loss_mask.detach(), "noise": loss_noise.detach(),
            "sai_w": torch.tensor(sai_w, device=f_s1.device), "sim_v": torch.cat([v1, v2]).mean()}


def sai_losses(net, p: UniMatchPasses, branches, cfg: Config) -> tuple[Tensor, Tensor]:
    """L_m and L_n, each averaged over the s1 and s2 branches: the masked / noised strong
    features are decoded by the classifier alone, upsampled to the input size and pulled
    (MSE) towards the weak probabilities CutMixed with the partner's (eval-mode) ones.

    The cost is at the input resolution (B*K*H*W values per map), so nothing that size is
    concatenated or chunked (a chunk's backward concatenates the gradients again): each
    perturbed map is decoded on its own (its K-channel logits, not its C-channel features,
    are concatenated), and each kind (mask, noise) is upsampled, soft-maxed and compared for
    all branches at once against one CutMixed target (losses.sai_upsampled_mse, which does it
    image by image on CPU and keeps no full-resolution tensor for the backward). With
    equal-size branches the mean over all of them is the mean of the per-branch means.
    Random draws keep their order (per branch: the mask threshold, then the noise)."""
    from mlcl.model import upsample

    m = cfg.mlcl
    # released item 2: the second transform of v happens only where the noise branch ran
    double = m.double_transform and m.use_noise
    logits: dict[str, list[Tensor]] = {"mask": [], "noise": []}
    for f_s, v, _ in branches:
        if m.use_mask:
            f_mk = losses.sai_mask(f_s, v, m.kappa, m.mask_jitter, double)[0]
            logits["mask"].append(net.decode(f_mk))  # (B, K, h, w)
        if m.use_noise:
            logits["noise"].append(net.decode(losses.sai_noise(f_s, v, m.kappa)))
    n = len(branches)
    boxes = torch.stack([box for _, _, box in branches]).bool()  # (n, B, H, W)
    # the CutMixed targets of all branches: (n, B, K, H, W) -> (n*B, K, H, W)
    target = torch.where(boxes.unsqueeze(2), p.prob_mix, p.prob_w).flatten(0, 1)
    valid = None
    if m.sai_ignore_mask:  # ablation: (n, B, H, W)
        valid = torch.where(boxes, p.mix["ignore"], p.batch_ignore) != cfg.data.ignore_index
    zero = target.new_zeros((), dtype=torch.float32)
    out = []
    for kind in ("mask", "noise"):
        if not logits[kind]:
            out.append(zero)
            continue
        if valid is None:  # = sai_mse(upsample(logits).float().softmax(1), target)
            out.append(losses.sai_upsampled_mse(torch.cat(logits[kind]), target))
            continue
        # per-branch means over different pixel counts, then their mean
        prob = upsample(torch.cat(logits[kind]), p.prob_w.shape[-2:]).float().softmax(1)
        out.append(sum(losses.sai_mse(q, t, ok) for q, t, ok in
                       zip(prob.chunk(n), target.chunk(n), valid)) / n)
    return out[0], out[1]


STEPS: dict[str, Callable[..., dict[str, Tensor]]] = {
    "supervised": step_supervised,
    "unimatch": step_unimatch,
    "mlcl": step_mlcl,
}

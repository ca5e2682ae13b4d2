"""One step function per method, ``step(model, batch, ctx) -> {'loss': total, <named terms>}``
(docs/method.md, "One training step"). UniMatch's names: ``x``/``y`` labeled images and masks;
``u`` the unlabeled batch, views ``w`` (weak) and ``s1``/``s2`` (strong), ``ignore`` (255 on
padding), CutMix boxes ``box1``/``box2``; ``mix`` the CutMix partner; ``fp`` UniMatch's
feature perturbation (Dropout2d); ``teacher`` UniMatch V2's EMA of the model."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from mlcl import losses, released
from mlcl.config import Config, uses_teacher
from mlcl.prototypes import PrototypeBank


@dataclass
class StepContext:
    """What a step function needs besides the model and the batch; the loop advances
    ``iteration`` (global, from 0) and ``epoch``."""

    cfg: Config
    bank: Any
    accelerator: Any
    total_iters: int
    iteration: int = 0
    epoch: int = 0
    teacher: Any = None  # the EMA teacher (unimatch_v2, mlcl on it), else None


class Teacher(torch.nn.Module):
    """UniMatch V2's teacher: an exponential moving average of the model's parameters and
    floating-point buffers (others copied), ratio min(1 - 1/(t + 1), ema_max) after step t
    (from 0: the first step copies the model); always in eval mode, never trained."""

    def __init__(self, model: torch.nn.Module, ema_max: float):
        super().__init__()
        self.net, self.ema_max = copy.deepcopy(model).eval().requires_grad_(False), ema_max

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, iteration: int) -> None:
        """Move towards ``model`` (the unwrapped student) after step ``iteration``."""
        ratio = min(1 - 1 / (iteration + 1), self.ema_max)
        for t, s in zip(self.net.parameters(), model.parameters()):
            t.mul_(ratio).add_(s.detach(), alpha=1 - ratio)
        for t, s in zip(self.net.buffers(), model.buffers()):
            if t.is_floating_point():
                t.mul_(ratio).add_(s, alpha=1 - ratio)
            else:
                t.copy_(s)


def make_teacher(cfg: Config, model: torch.nn.Module) -> Teacher | None:
    """The EMA teacher of ``model`` (unwrapped) when the method has one, else None."""
    return Teacher(model, cfg.model.ema_max) if uses_teacher(cfg) else None


class MLCLParts(NamedTuple):
    """The implementation of each part of the MLCL step that the release computes otherwise."""

    passes: Callable  # (model, w1, w2, u, UniMatchPasses, F_s1)
    #                   -> (F_1, F_2, F_w, decode(F_w), f_dt, box)
    valid_at_features: Callable  # (ignore (B, H, W), (h, w), ignore_index) -> (B, h, w) bool
    loss_dt: Callable  # as losses.loss_dt
    mask_ratio: Callable  # (v (B,), kappa) -> r (B,)
    bank: Callable  # (K, C, momentum, conf_thresh) -> PrototypeBank


def mlcl_parts(cfg: Config) -> MLCLParts:
    """The one place where the configuration chooses between the paper's implementation of each
    part and the release's (:mod:`mlcl.released`; docs/method.md, "Paper versus release")."""
    m = cfg.mlcl
    dt_quirks = {"pair_by_position": m.pair_by_position, "keep_uninitialised": m.dt_uninitialised,
                 "duplicate_top_anchor": m.duplicate_top_anchor,
                 "normalise_by_candidates": m.normalise_by_candidates}
    bank_quirks = {"early_stop": m.bank_early_stop, "average_banks": m.bank_local_update}
    return MLCLParts(
        passes=(released.separate_passes if m.released_passes
                else mixed_passes if m.weak_features == "mixed" else joint_passes),
        valid_at_features=(released.valid_bilinear if m.bilinear_ignore
                           else losses.valid_at_features),
        loss_dt=(partial(released.loss_dt, **dt_quirks) if any(dt_quirks.values())
                 else losses.loss_dt),
        # the release transforms v twice only because its noise loop runs first
        mask_ratio=(released.sai_mask_ratio_twice if m.double_transform and m.use_noise
                    else losses.sai_mask_ratio),
        bank=(partial(released.ReleasedBank, **bank_quirks) if any(bank_quirks.values())
              else PrototypeBank))


def make_bank(cfg: Config) -> PrototypeBank | None:
    """The prototype memory bank for MLCL (None for the other methods)."""
    if cfg.method != "mlcl":
        return None
    return mlcl_parts(cfg).bank(cfg.data.num_classes, cfg.model.feature_channels,
                                momentum=cfg.mlcl.bank_momentum, conf_thresh=cfg.mlcl.bank_conf)


def labeled_loss(logits: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """L_x: CE with ignore, or OHEM CE (Cityscapes)."""
    if cfg.train.loss == "ohem":
        return losses.ohem_ce_loss(logits, y, cfg.data.ignore_index, cfg.train.ohem_thresh,
                                   cfg.train.ohem_min_kept)
    return losses.ce_loss(logits, y, cfg.data.ignore_index)


# --------------------------------------------------------------------------- supervised
def step_supervised(model, batch: dict[str, Any], ctx: StepContext) -> dict[str, Tensor]:
    """L_x on the labeled batch (docs/method.md, "Supervised"): {'loss', 'x'}."""
    loss = labeled_loss(model(batch["x"]["x"]), batch["x"]["y"], ctx.cfg)
    return {"loss": loss, "x": loss.detach()}


# --------------------------------------------------------------------------- unimatch
def mix_source(batch: dict[str, Any], how: str = "roll") -> dict[str, Tensor]:
    """The CutMix partner of every unlabeled image (``train.mix_partner``): the batch rolled by
    one (``roll``) or reversed (``flip``, UniMatch V2's), else the 'mix' loader's batch: an
    independently shuffled one (``loader``) or a second, independently augmented view of the
    same images (``same``)."""
    if "mix" in batch:
        return batch["mix"]
    return {k: in_batch_partner(v, how) for k, v in batch["u"].items() if torch.is_tensor(v)}


def in_batch_partner(t: Tensor, how: str) -> Tensor:
    """``t`` (B, ...) reordered so that row i holds image i's CutMix partner (roll or flip)."""
    return t.flip(0) if how == "flip" else t.roll(1, dims=0)


def paste(box: Tensor, inside: Tensor, outside: Tensor) -> Tensor:
    """CutMix: ``inside`` where ``box`` is set, ``outside`` elsewhere. inside, outside (B, H, W)
    or (B, K, H, W); box (B, H, W) bool, or (n, B, H, W) for n boxes (the result: a leading n)."""
    if inside.dim() == 4:
        box = box.unsqueeze(-3)
    return torch.where(box, inside, outside)


@dataclass
class UniMatchPasses:
    """What the UniMatch passes computed; the MLCL step reuses it."""

    terms: dict[str, Tensor]  # detached terms for logging
    total: Tensor  # 0-dim: (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2, with gradient
    out_xw: Any  # SegOutput of the cat(x, u_w) pass (clean + fp)
    out_s: Any  # SegOutput of the cat(s1, s2) pass
    prob_w: Tensor | None  # (B, K, H, W) softmax of u_w (train mode, detached); V2: the weak
    #                       side's (None without MLCL)
    prob_mix: Tensor | None  # (B, K, H, W) softmax of the mix source (eval mode)
    f_mix: Tensor | None  # (B, C, h, w) features of the mix source (the same pass)
    boxes: list[Tensor]  # box1, box2 (B, H, W) bool
    mix: dict[str, Tensor]  # the CutMix partner batch (mix_source)
    n_x: int  # labeled images at the front of the cat(x, u_w) pass


def unimatch_passes(model, batch: dict[str, Any], ctx: StepContext) -> UniMatchPasses:
    """UniMatch's passes and losses (docs/method.md, "UniMatch"). batch: {'x': {'x', 'y'},
    'u': {'w', 's1', 's2', 'ignore', 'box1', 'box2'}, optionally 'mix'}; 5 image-batches."""
    cfg = ctx.cfg
    x, y, u = batch["x"]["x"], batch["x"]["y"], batch["u"]
    mix, boxes = mix_source(batch, cfg.train.mix_partner), [u["box1"], u["box2"]]

    # 1. pseudo-labels of the mix source: eval mode, no gradient
    model.eval()
    with torch.no_grad():
        out_mix = model(mix["w"], return_features=True)
    model.train()
    prob_mix = out_mix.logits.softmax(1)
    conf_mix, label_mix = prob_mix.max(1)

    # 2. CutMix the strong views with the partner's strong views
    s1, s2 = paste(boxes[0], mix["s1"], u["s1"]), paste(boxes[1], mix["s2"], u["s2"])

    # 3. cat(x, u_w) with the feature-perturbation branch (train mode)
    n_x = x.shape[0]
    out_xw = model(torch.cat([x, u["w"]]), fp=True, return_features=True)
    pred_x, pred_w, pred_fp = out_xw.logits[:n_x], out_xw.logits[n_x:], out_xw.logits_fp[n_x:]
    prob_w = pred_w.detach().softmax(1)
    conf_w, label_w = prob_w.max(1)

    # 4. cat(s1, s2)
    out_s = model(torch.cat([s1, s2]), return_features=True)
    pred_s1, pred_s2 = out_s.logits.chunk(2)

    # 5. losses; targets of s_i: u_w's pseudo-labels with box_i taken from the mix source
    ig = cfg.data.ignore_index
    targets = [(paste(b, label_mix, label_w), paste(b, conf_mix, conf_w),
                paste(b, mix["ignore"], u["ignore"])) for b in boxes]
    tau = cfg.train.conf_thresh
    loss_x = labeled_loss(pred_x, y, cfg)
    loss_s1 = losses.pseudo_label_ce(pred_s1, *targets[0], tau, ig)
    loss_s2 = losses.pseudo_label_ce(pred_s2, *targets[1], tau, ig)
    loss_fp = losses.pseudo_label_ce(pred_fp, label_w, conf_w, u["ignore"], tau, ig)
    total = (loss_x + 0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_fp) / 2
    valid = u["ignore"] != ig
    conf_ratio = ((conf_w >= tau) & valid).sum() / valid.sum().clamp(min=1)
    terms = {"x": loss_x.detach(), "s": (loss_s1.detach() + loss_s2.detach()) / 2,
             "fp": loss_fp.detach(), "conf_ratio": conf_ratio.detach().float()}
    return UniMatchPasses(terms=terms, total=total, out_xw=out_xw, out_s=out_s, prob_w=prob_w,
                          prob_mix=prob_mix, f_mix=out_mix.features, boxes=boxes, mix=mix, n_x=n_x)


def step_unimatch(model, batch: dict[str, Any], ctx: StepContext) -> dict[str, Tensor]:
    """UniMatch's step: {'loss', 'x', 's', 'fp', 'conf_ratio'}."""
    p = unimatch_passes(model, batch, ctx)
    return {"loss": p.total, **p.terms}


# --------------------------------------------------------------------------- unimatch v2
def unimatch_v2_passes(model, batch: dict[str, Any], ctx: StepContext,
                       weak: str | None = None) -> UniMatchPasses:
    """UniMatch V2's passes and losses (docs/method.md, "UniMatch V2"): the teacher's
    pseudo-labels of u_w; the model on x, then on cat(s1, s2) CutMixed within the batch with
    Complementary Dropout; (L_x + (L_s1 + L_s2) / 2) / 2. ``weak`` (MLCL's weak side):
    "teacher" or "student" fill out_xw, prob_w, prob_mix and f_mix from that network's pass
    over u_w (the student's: no_grad, train mode); None leaves them None."""
    cfg, teacher = ctx.cfg, ctx.teacher
    x, y, u = batch["x"]["x"], batch["x"]["y"], batch["u"]
    how, boxes = cfg.train.mix_partner, [u["box1"], u["box2"]]
    mix = mix_source(batch, how)
    with torch.no_grad():
        out_w = teacher(u["w"], return_features=weak == "teacher")  # logits alone without MLCL
        out_weak = model(u["w"], return_features=True) if weak == "student" else out_w
    prob_w = (out_w.logits if weak == "teacher" else out_w).softmax(1)
    conf_w, label_w = prob_w.max(1)  # (B, H, W)
    s1, s2 = paste(boxes[0], mix["s1"], u["s1"]), paste(boxes[1], mix["s2"], u["s2"])
    pred_x = model(x)
    out_s = model(torch.cat([s1, s2]), comp_drop=True, return_features=True)
    pred_s1, pred_s2 = out_s.logits.chunk(2)

    ig, tau = cfg.data.ignore_index, cfg.train.conf_thresh
    label_p, conf_p = in_batch_partner(label_w, how), in_batch_partner(conf_w, how)
    targets = [(paste(b, label_p, label_w), paste(b, conf_p, conf_w),
                paste(b, mix["ignore"], u["ignore"])) for b in boxes]
    loss_x = labeled_loss(pred_x, y, cfg)
    loss_s = (losses.pseudo_label_ce(pred_s1, *targets[0], tau, ig)
              + losses.pseudo_label_ce(pred_s2, *targets[1], tau, ig)) / 2
    valid = u["ignore"] != ig
    conf_ratio = ((conf_w >= tau) & valid).sum() / valid.sum().clamp(min=1)
    terms = {"x": loss_x.detach(), "s": loss_s.detach(), "conf_ratio": conf_ratio.float()}
    prob_weak = f_mix = None
    if weak is not None:
        prob_weak = prob_w if weak == "teacher" else out_weak.logits.softmax(1)
        f_mix = in_batch_partner(out_weak.features, how)
    return UniMatchPasses(
        terms=terms, total=(loss_x + loss_s) / 2, out_xw=out_weak, out_s=out_s, prob_w=prob_weak,
        prob_mix=None if weak is None else in_batch_partner(prob_weak, how), f_mix=f_mix,
        boxes=boxes, mix=mix, n_x=0)


def step_unimatch_v2(model, batch: dict[str, Any], ctx: StepContext) -> dict[str, Tensor]:
    """UniMatch V2's step: {'loss', 'x', 's', 'conf_ratio'}; the loop then updates the teacher."""
    p = unimatch_v2_passes(model, batch, ctx)
    return {"loss": p.total, **p.terms}


# --------------------------------------------------------------------------- mlcl
@dataclass
class MLCLInputs:
    """What the MLCL part of a step reads (shapes as in :mod:`mlcl.losses`)."""

    f_w: Tensor  # (B, C, h, w) F_w: features of u_w, detached
    logits_w: Tensor  # (B, K, h, w) decode(F_w) from the same pass, detached
    f1: Tensor  # (B, C, h, w) F_1: the weak images CutMixed like s1, detached
    f2: Tensor  # (B, C, h, w) F_2: likewise for s2
    f_s1: Tensor  # (B, C, h, w) F_s1: features of the CutMixed s1, with gradient
    f_s2: Tensor  # (B, C, h, w) F_s2
    logits_s1: Tensor  # (B, K, h, w) decode(F_s1) from the strong pass, with gradient
    logits_s2: Tensor  # (B, K, h, w) decode(F_s2)
    f_dt: Tensor  # (B, C, h, w) the strong features L_dt pulls, with gradient
    dt_box: Tensor | None  # (B, H, W) bool: where f_dt shows the partner (skipped), or None
    ignore: Tensor  # (B, H, W) u's ignore map
    sai_target: Tensor  # (2B, K, H, W) SAI's targets of s1 then s2: u_w's probabilities
    #                     (train mode) with the box taken from the partner's (eval mode)


def weak_of(p: UniMatchPasses) -> tuple[Tensor, Tensor]:
    """(F_w, decode(F_w)) of u_w from the pass that labelled it."""
    return p.out_xw.features[p.n_x:], p.out_xw.feature_logits[p.n_x:]


def joint_passes(model, w1: Tensor, w2: Tensor, u: dict[str, Tensor], p: UniMatchPasses,
                 f_s1: Tensor) -> tuple[Tensor, ...]:
    """(F_1, F_2, F_w, decode(F_w), the strong features of L_dt, their CutMix box): F_1 and
    F_2 from one pass over cat(w1, w2) under no_grad, F_w and its logits from the clean u_w
    half of UniMatch's cat(x, u_w) pass, L_dt on F_s1 outside box1 (docs/method.md, "Forward
    passes")."""
    with torch.no_grad():  # train mode, as the released passes (BN batch statistics)
        f1, f2 = model(torch.cat([w1, w2]), return_features=True).features.chunk(2)
    return f1, f2, *weak_of(p), f_s1, p.boxes[0]


def mixed_passes(model, w1: Tensor, w2: Tensor, u: dict[str, Tensor], p: UniMatchPasses,
                 f_s1: Tensor) -> tuple[Tensor, ...]:
    """As :func:`joint_passes` without its pass (``mlcl.weak_features=mixed``): F_1, F_2 are
    F_w and the mix source's features (from its pseudo-label pass) CutMixed at feature
    resolution with b1, b2 at the pixel under each feature position (docs/method.md,
    "Weak features without a pass"). w1, w2 are not read."""
    f_w, logits_w = weak_of(p)
    boxes = losses.at_feature_pixels(torch.stack(p.boxes), tuple(f_w.shape[-2:]))
    f1, f2 = paste(boxes, p.f_mix, f_w.detach())
    return f1, f2, f_w, logits_w, f_s1, p.boxes[0]


def mlcl_inputs(model, p: UniMatchPasses, u: dict[str, Tensor], passes: Callable
                ) -> MLCLInputs:
    """The MLCL inputs on top of UniMatch's passes; ``passes`` is :func:`joint_passes` or the
    release's (:attr:`MLCLParts.passes`)."""
    box1, box2 = p.boxes
    f_s1, f_s2 = p.out_s.features.chunk(2)
    logits_s1, logits_s2 = p.out_s.feature_logits.chunk(2)
    w1, w2 = paste(box1, p.mix["w"], u["w"]), paste(box2, p.mix["w"], u["w"])
    f1, f2, f_w, logits_w, f_dt, dt_box = passes(model, w1, w2, u, p, f_s1)
    target = paste(torch.stack(p.boxes).bool(), p.prob_mix, p.prob_w).flatten(0, 1)
    return MLCLInputs(f_w=f_w.detach(), logits_w=logits_w.detach(), f1=f1, f2=f2, f_s1=f_s1,
                      f_s2=f_s2, logits_s1=logits_s1, logits_s2=logits_s2, f_dt=f_dt,
                      dt_box=dt_box, ignore=u["ignore"], sai_target=target)


def prototype_branch(x: MLCLInputs, bank: PrototypeBank, cfg: Config, parts: MLCLParts
                     ) -> Tensor:
    """L_dt against the bank as it stands (0-dim; 0 with ``mlcl.use_dt`` off), then the bank's
    EMA update from this step's weak features and their pseudo-labels at feature resolution
    (docs/method.md, "Prototype memory bank")."""
    m, size = cfg.mlcl, tuple(x.f_w.shape[-2:])
    with torch.no_grad():
        conf, label = x.logits_w.float().softmax(1).max(1)  # (B, h, w)
    valid_w = parts.valid_at_features(x.ignore, size, cfg.data.ignore_index)
    valid_s = valid_w if x.dt_box is None else valid_w & ~losses.at_feature_pixels(x.dt_box, size)
    dt = x.f_dt.new_zeros(())
    if m.use_dt:
        dt = parts.loss_dt(x.f_w, conf, label, valid_w, x.f_dt, valid_s, bank.protos,
                           conf_thresh=m.bank_conf, num_anchors=m.num_anchors,
                           num_candidates=m.num_candidates)
    bank.update(x.f_w, label, conf, valid_w)
    return dt


def sai_losses(net, branches: list[tuple[Tensor, Tensor, Tensor]], target: Tensor,
               cfg: Config, mask_ratio: Callable) -> tuple[Tensor, Tensor]:
    """(L_m, L_n) of SAI over the strong branches (0-dim each): per branch (f_s (B, C, h, w)
    and its logits decode(f_s) (B, K, h, w), both with gradient, v (B,)) the masked then the
    noised map (random draws in that order), the masked map's logits taken from decode(f_s)
    (:func:`losses.masked_logits`), the noised map through ``net.decode``; compared with
    target (n*B, K, H, W) by :func:`losses.loss_sai`."""
    m, f0 = cfg.mlcl, branches[0][0]
    # decode(0), the classifier's bias: the logits of every masked position
    offset = net.decode(f0.new_zeros(1, f0.shape[1], 1, 1)) if m.use_mask else None
    logits: dict[str, list[Tensor]] = {"mask": [], "noise": []}
    for f_s, logits_s, v in branches:
        if m.use_mask:
            keep = losses.sai_keep(f_s, mask_ratio(v, m.kappa), m.mask_jitter)
            logits["mask"].append(losses.masked_logits(logits_s, keep, offset))
        if m.use_noise:
            logits["noise"].append(net.decode(losses.sai_noise(f_s, v, m.kappa)))
    zero = target.new_zeros((), dtype=torch.float32)
    l_m, l_n = (losses.loss_sai(torch.cat(z), target) if z else zero for z in logits.values())
    return l_m, l_n


def mlcl_losses(net, x: MLCLInputs, bank: PrototypeBank, cfg: Config, sai_w: float,
                parts: MLCLParts) -> tuple[Tensor, dict[str, Tensor]]:
    """The MLCL part of the loss, alpha L_p2p + omega L_dt + w(t) (L_m + L_n) (0-dim), and its
    terms (detached), for the weight ``sai_w`` = w(t); updates the bank. ``net`` needs only
    ``decode`` (the 1x1 classifier)."""
    m = cfg.mlcl
    # FKA (trains the encoder); the same cosine map gives SAI's per-image similarity v
    p2p1, v1 = losses.loss_p2p(x.f1, x.f_s1)
    p2p2, v2 = losses.loss_p2p(x.f2, x.f_s2)
    p2p = (p2p1 + p2p2) / 2  # logged even when switched off
    dt = prototype_branch(x, bank, cfg, parts)
    # SAI: perturb the strong features by how well the views already agree
    l_m = l_n = x.f_s1.new_zeros(())
    if sai_w > 0 and (m.use_mask or m.use_noise):
        branches = [(x.f_s1, x.logits_s1, v1), (x.f_s2, x.logits_s2, v2)]
        l_m, l_n = sai_losses(net, branches, x.sai_target, cfg, parts.mask_ratio)
    alpha = m.alpha if m.use_p2p else 0.0
    loss = alpha * p2p + m.omega * dt + sai_w * (l_m + l_n)
    # w(t) logged as a fill on the device: a copy from the host would wait for the device
    weight = p2p.new_full((), sai_w, dtype=torch.float32)
    return loss, {"p2p": p2p.detach(), "dt": dt.detach(), "mask": l_m.detach(),
                  "noise": l_n.detach(), "sai_w": weight, "sim_v": torch.cat([v1, v2]).mean()}


def step_mlcl(model, batch: dict[str, Any], ctx: StepContext) -> dict[str, Tensor]:
    """UniMatch's (or UniMatch V2's, ``mlcl.base``) step plus FKA and SAI (docs/method.md,
    "MLCL"); on V2 the weak side (F_w, F_1, F_2, SAI's targets, the bank's labels) is the
    teacher's or, ``mlcl.targets=student``, the model's in a no_grad pass."""
    cfg, m = ctx.cfg, ctx.cfg.mlcl
    parts = mlcl_parts(cfg)
    net = ctx.accelerator.unwrap_model(model) if ctx.accelerator is not None else model
    if m.base == "unimatch_v2":
        p = unimatch_v2_passes(model, batch, ctx, weak=m.targets)
        weak = model if m.targets == "student" else ctx.teacher
    else:
        p, weak = unimatch_passes(model, batch, ctx), model
    x = mlcl_inputs(weak, p, batch["u"], parts.passes)
    total, base_terms = p.total, p.terms
    del p  # UniMatch's input-resolution logits and probabilities: freed before SAI runs
    sai_w = 0.0 if ctx.epoch < m.warmup_epochs else losses.sai_weight(
        ctx.iteration, ctx.total_iters, m.beta)
    loss, terms = mlcl_losses(net, x, ctx.bank, cfg, sai_w, parts)
    return {"loss": total + loss, **base_terms, **terms}


STEPS: dict[str, Callable[..., dict[str, Tensor]]] = {
    "supervised": step_supervised, "unimatch": step_unimatch, "unimatch_v2": step_unimatch_v2,
    "mlcl": step_mlcl}

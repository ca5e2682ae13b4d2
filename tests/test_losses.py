"""mlcl.losses (the paper) and mlcl.released (the release's quirks) against the slow references
in tests/reference.py, plus the properties (docs/method.md, "Paper versus release")."""
from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mlcl import losses as L
from mlcl import released as R
from reference import (ref_ce, ref_dt, ref_ohem, ref_p2p, ref_pseudo_label_ce,
                       ref_resize_ignore_paper, ref_resize_ignore_released, ref_sai_mse,
                       ref_sai_weight, ref_similarity)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- UniMatch losses
@pytest.mark.parametrize("K,B,H,W", [(3, 2, 5, 4), (21, 1, 6, 6), (7, 3, 3, 5)])
def test_ce_and_pseudo_label_ce_match_reference(K, B, H, W):
    g = _gen(K)
    logits = torch.randn(B, K, H, W, generator=g)
    target = torch.randint(0, K, (B, H, W), generator=g)
    target[torch.rand(B, H, W, generator=g) < 0.2] = 255
    assert L.ce_loss(logits, target, 255).item() == pytest.approx(ref_ce(logits, target), rel=1e-5)
    assert L.ce_loss(logits, target, 255).item() == pytest.approx(
        F.cross_entropy(logits, target, ignore_index=255).item(), rel=1e-5)

    pseudo = torch.randint(0, K, (B, H, W), generator=g)
    conf = torch.rand(B, H, W, generator=g)
    ignore = torch.where(torch.rand(B, H, W, generator=g) < 0.3, 255, 0)
    for tau in (0.0, 0.5, 0.95):
        got = L.pseudo_label_ce(logits, pseudo, conf, ignore, tau, 255)
        assert got.item() == pytest.approx(
            ref_pseudo_label_ce(logits, pseudo, conf, ignore, tau), rel=1e-5, abs=1e-7)


def test_pseudo_label_ce_divides_by_non_ignored_not_confident():
    logits = torch.zeros(1, 2, 1, 4)  # CE = log 2 everywhere
    pseudo = torch.zeros(1, 1, 4, dtype=torch.long)
    conf = torch.tensor([[[1.0, 1.0, 0.1, 0.1]]])
    ignore = torch.tensor([[[0, 0, 0, 255]]])
    got = L.pseudo_label_ce(logits, pseudo, conf, ignore, 0.95, 255)
    assert got.item() == pytest.approx(2 * math.log(2) / 3)
    all_ignored = torch.full_like(ignore, 255)
    assert L.pseudo_label_ce(logits, pseudo, conf, all_ignored, 0.95, 255).item() == 0.0


@pytest.mark.parametrize("thresh,min_kept", [(0.7, 5), (0.7, 40), (0.3, 1), (0.9, 1000), (0.5, 0)])
def test_ohem_matches_unimatch_reference(thresh, min_kept):
    g = _gen(min_kept)
    logits = 2 * torch.randn(2, 4, 6, 5, generator=g)
    target = torch.randint(0, 4, (2, 6, 5), generator=g)
    target[torch.rand(2, 6, 5, generator=g) < 0.15] = 255
    got = L.ohem_ce_loss(logits, target, 255, thresh, min_kept)
    assert got.item() == pytest.approx(ref_ohem(logits, target, 255, thresh, min_kept), rel=1e-5)


# --------------------------------------------------------------------------- p2p and v
@pytest.mark.parametrize("B,C,h,w", [(2, 4, 3, 3), (1, 16, 5, 2)])
def test_p2p_and_similarity_match_reference(B, C, h, w):
    g = _gen(C)
    f_w, f_s = torch.randn(B, C, h, w, generator=g), torch.randn(B, C, h, w, generator=g)
    assert torch.allclose(L.per_image_similarity(f_w, f_s), ref_similarity(f_w, f_s), atol=1e-6)
    loss, v = L.loss_p2p(f_w, f_s)
    assert loss.item() == pytest.approx(ref_p2p(f_w, f_s), rel=1e-5)
    assert torch.allclose(v, ref_similarity(f_w, f_s), atol=1e-6) and not v.requires_grad


def test_p2p_zero_for_identical_and_gradient_only_to_strong():
    g = _gen(1)
    f = torch.randn(2, 8, 4, 4, generator=g)
    assert abs(L.loss_p2p(f, f.clone())[0].item()) < 1e-6
    f_w = torch.randn(2, 8, 4, 4, generator=g, requires_grad=True)
    f_s = torch.randn(2, 8, 4, 4, generator=g, requires_grad=True)
    L.loss_p2p(f_w, f_s)[0].backward()
    assert f_w.grad is None and f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert not L.per_image_similarity(f_w, f_s).requires_grad


def test_p2p_gradient_is_autograd_through_the_plain_cosine():
    """loss_p2p's own backward gives the gradient autograd takes through the plain per-pixel
    cosine in float64 (norms clamped at COS_EPS), a zero strong and a zero weak vector included;
    channel_dot is the channel sum of the product."""
    g = _gen(3)
    f_w, f_s = torch.randn(2, 6, 3, 4, generator=g), torch.randn(2, 6, 3, 4, generator=g)
    f_s[0, :, 1, 2] = 0
    f_w[1, :, 0, 0] = 0
    torch.testing.assert_close(L.channel_dot(f_w, f_s), (f_w * f_s).sum(1))
    a, b = f_w.double(), f_s.double().requires_grad_()
    eps = L.COS_EPS
    cos = (a * b).sum(1) / (a.norm(dim=1).clamp(min=eps) * b.norm(dim=1).clamp(min=eps))
    (1 - cos.mean()).backward()
    x = f_s.clone().requires_grad_()
    loss, v = L.loss_p2p(f_w, x)
    loss.backward()
    assert loss.item() == pytest.approx(1 - cos.mean().item(), rel=1e-6)
    torch.testing.assert_close(x.grad, b.grad.float(), rtol=1e-5, atol=1e-7)
    assert x.grad[0, :, 1, 2].abs().sum() > 0  # through the dot product, as autograd


# --------------------------------------------------------------------------- L_dt
def _dt_inputs(K, B, C, h, w, seed, zero_protos=()):
    g = _gen(seed)
    f_w = torch.randn(B, C, h, w, generator=g)
    f_s = torch.randn(B, C, h, w, generator=g, requires_grad=True)
    label = torch.randint(0, K, (B, h, w), generator=g)
    conf = 0.9 + 0.1 * torch.rand(B, h, w, generator=g)  # about half above 0.95
    valid_w = torch.rand(B, h, w, generator=g) > 0.15
    valid_s = valid_w & (torch.rand(B, h, w, generator=g) > 0.1)
    protos = torch.randn(K, C, generator=g)
    for k in zero_protos:
        protos[k] = 0
    return f_w, conf, label, valid_w, f_s, valid_s, protos


QUIRKS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("K,B,C,h,w,na,nc", [(3, 2, 8, 4, 4, 4, 6), (5, 2, 6, 5, 3, 16, 256),
                                              (21, 2, 8, 6, 6, 3, 5), (12, 1, 4, 7, 5, 2, 3)])
@pytest.mark.parametrize("pair,dup,norm", QUIRKS)
def test_dt_loss_matches_reference(K, B, C, h, w, na, nc, pair, dup, norm):
    f_w, conf, label, valid_w, f_s, valid_s, protos = _dt_inputs(K, B, C, h, w, K * 7 + h)
    kw = dict(conf_thresh=0.95, num_anchors=na, num_candidates=nc, pair_by_position=pair,
              duplicate_top_anchor=dup, normalise_by_candidates=norm)
    got = R.loss_dt(f_w, conf, label, valid_w, f_s, valid_s, protos, **kw)
    assert got.requires_grad
    (g_got,) = torch.autograd.grad(got, f_s)
    want = ref_dt(f_w, conf, label, valid_w, f_s, valid_s, protos, **kw)
    assert got.item() == pytest.approx(float(want.detach()), abs=1e-5)
    if want.requires_grad:
        (g_want,) = torch.autograd.grad(want, f_s)
        assert torch.allclose(g_got, g_want, atol=1e-6)
    else:
        assert g_got.abs().sum() == 0


@pytest.mark.parametrize("K,B,C,h,w", [(3, 2, 8, 4, 4), (12, 1, 4, 7, 5)])
def test_released_dt_loss_without_quirks_is_the_paper_bit_for_bit(K, B, C, h, w):
    f_w, conf, label, valid_w, f_s, valid_s, protos = _dt_inputs(K, B, C, h, w, K,
                                                                  zero_protos=(1,))
    paper = L.loss_dt(f_w, conf, label, valid_w, f_s, valid_s, protos, num_anchors=3)
    same = R.loss_dt(f_w, conf, label, valid_w, f_s, valid_s, protos, num_anchors=3)
    assert torch.equal(paper, same)
    assert torch.equal(*(torch.autograd.grad(x, f_s)[0] for x in (paper, same)))


def test_dt_loss_gradients_reach_only_strong_features():
    f_w, conf, label, valid_w, f_s, valid_s, protos = _dt_inputs(4, 2, 8, 5, 5, 3)
    f_w.requires_grad_(True)
    bank = torch.nn.Parameter(protos, requires_grad=True)
    loss = L.loss_dt(f_w, conf, label, valid_w, f_s, valid_s, bank)
    loss.backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_w.grad is None and bank.grad is None


def test_dt_loss_zero_when_no_class_qualifies():
    f_w, conf, label, valid_w, f_s, valid_s, protos = _dt_inputs(4, 1, 8, 3, 3, 5)
    for norm in (False, True):
        loss = R.loss_dt(f_w, conf * 0, label, valid_w, f_s, valid_s, protos,
                         normalise_by_candidates=norm)
        assert loss.item() == 0.0 and loss.dim() == 0
    # an all-zero bank: no class takes part (paper), or an arbitrary selection (released)
    zeros = torch.zeros_like(protos)
    assert L.loss_dt(f_w, conf, label, valid_w, f_s, valid_s, zeros).item() == 0.0
    loss = R.loss_dt(f_w, conf, label, valid_w, f_s, valid_s, zeros, keep_uninitialised=True)
    assert torch.isfinite(loss) and loss.item() != 0.0


@pytest.mark.parametrize("K,B,C,h,w", [(4, 1, 5, 4, 4), (5, 2, 4, 3, 2)])
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("pair", [False, True])
def test_dt_loss_uninitialised_classes_match_reference(K, B, C, h, w, keep, pair):
    """Switch mlcl.dt_uninitialised: classes whose prototype is still all zeros sit out of
    L_dt (paper) or take part (released, keep=True). With fewer pixels than 16 anchors /
    256 candidates every eligible feature is selected, so the released selection among equal
    (zero) cosines is not arbitrary here and can be compared."""
    f_w, conf, label, valid_w, f_s, valid_s, protos = _dt_inputs(K, B, C, h, w, 40 + K,
                                                                  zero_protos=(0, 2))
    assert B * h * w <= 16 and {0, 2} <= set(label.unique().tolist())
    conf = torch.ones_like(conf)  # every valid weak feature is eligible as an anchor
    kw = dict(pair_by_position=pair, keep_uninitialised=keep)
    got = R.loss_dt(f_w, conf, label, valid_w, f_s, valid_s, protos, **kw)
    want = ref_dt(f_w, conf, label, valid_w, f_s, valid_s, protos, **kw)
    assert got.item() == pytest.approx(float(want.detach()), abs=1e-5)
    (g_got,) = torch.autograd.grad(got, f_s)
    (g_want,) = torch.autograd.grad(want, f_s)
    assert torch.allclose(g_got, g_want, atol=1e-6)
    other = R.loss_dt(f_w, conf, label, valid_w, f_s, valid_s, protos,
                      **{**kw, "keep_uninitialised": not keep})
    assert abs(other.item() - got.item()) > 1e-4  # the switch matters on these inputs


def _onehot_features(classes, C, hw):
    """(1, C, 1, hw) features whose column i points along axis classes[i]."""
    f = torch.zeros(1, C, 1, hw)
    for i, c in enumerate(classes):
        f[0, c, 0, i] = 1.0
    return f


def test_quirk3_pair_by_position_mixes_classes():
    # class 0 present but never confident: the anchor list is [1, 2], the candidate list
    # [0, 1, 2]; by position, the anchors of class 1 meet the candidates of class 0.
    classes = [0, 0, 1, 1, 2, 2]
    f = _onehot_features(classes, 3, 6)
    label = torch.tensor(classes).view(1, 1, 6)
    conf = torch.tensor([0.5, 0.5, 1.0, 1.0, 1.0, 1.0]).view(1, 1, 6)
    valid = torch.ones(1, 1, 6, dtype=torch.bool)
    protos = torch.eye(3)
    f_s = f.clone().requires_grad_(True)
    paper = L.loss_dt(f, conf, label, valid, f_s, valid, protos)
    released = R.loss_dt(f, conf, label, valid, f_s, valid, protos, pair_by_position=True)
    assert paper.item() == pytest.approx(0.0, abs=1e-6)  # each anchor finds its own class
    assert released.item() == pytest.approx(1.0, abs=1e-6)  # orthogonal classes paired


def test_quirk4_duplicate_top_anchor():
    # 3 confident weak features of one class with cos to rho = 0.9 > 0.5 > 0.1 and one
    # candidate s; num_anchors = 3: paper uses t1, t2, t3, released t1, t1, t2.
    C = 4
    rho = torch.tensor([1.0, 0, 0, 0])
    def at(c):  # unit vector with cos c to rho, rest along axis 1
        return torch.tensor([c, math.sqrt(1 - c * c), 0, 0])
    f_w = torch.stack([at(0.1), at(0.9), at(0.5)], 1).view(1, C, 1, 3)
    s = at(0.9)  # the one candidate direction: cos(t_i, s) known below
    f_s = torch.stack([s, s, s], 1).view(1, C, 1, 3).requires_grad_(True)
    label = torch.zeros(1, 1, 3, dtype=torch.long)
    conf = torch.ones(1, 1, 3)
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    protos = rho.view(1, C)
    cs = {c: float(at(c) @ at(0.9)) for c in (0.1, 0.5, 0.9)}
    paper = L.loss_dt(f_w, conf, label, valid, f_s, valid, protos, num_anchors=3)
    released = R.loss_dt(f_w, conf, label, valid, f_s, valid, protos, num_anchors=3,
                         duplicate_top_anchor=True)
    assert paper.item() == pytest.approx(1 - (cs[0.9] + cs[0.5] + cs[0.1]) / 3, abs=1e-6)
    assert released.item() == pytest.approx(1 - (2 * cs[0.9] + cs[0.5]) / 3, abs=1e-6)


def test_quirk5_normalise_by_candidates():
    # 2 anchors, 4 candidates, all identical: every max cosine is 1.
    f = torch.ones(1, 3, 1, 4)
    label = torch.zeros(1, 1, 4, dtype=torch.long)
    conf = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 4)
    valid = torch.ones(1, 1, 4, dtype=torch.bool)
    protos = torch.ones(2, 3)
    f_s = f.clone().requires_grad_(True)
    paper = L.loss_dt(f, conf, label, valid, f_s, valid, protos)
    released = R.loss_dt(f, conf, label, valid, f_s, valid, protos, normalise_by_candidates=True)
    assert paper.item() == pytest.approx(0.0, abs=1e-6)
    assert released.item() == pytest.approx(1 - 2 / 4, abs=1e-6)


# --------------------------------------------------------------------------- ignore resize
def test_quirk7_bilinear_ignore_keeps_only_exact_255():
    # (4, 4) -> (3, 3), align_corners: rows sit at 0, 1.5, 3; the paper samples rows 0, 2, 3.
    ign = torch.zeros(1, 4, 4, dtype=torch.long)
    ign[:, 2] = 255  # one padded row
    paper = L.valid_at_features(ign, (3, 3))
    bil = R.valid_bilinear(ign, (3, 3))
    assert (~paper[0, 1]).all() and paper[0, 0].all() and paper[0, 2].all()
    assert bil.all()  # bilinear: 127.5 and 0 -> nothing ignored
    ign[:, 1] = 255  # rows 1 and 2 padded: row 1.5 interpolates to exactly 255
    bil = R.valid_bilinear(ign, (3, 3))
    assert (~bil[0, 1]).all() and bil[0, 0].all() and bil[0, 2].all()
    g = _gen(2)
    ign = torch.where(torch.rand(3, 11, 9, generator=g) < 0.4, 255, 0)
    assert torch.equal(R.valid_bilinear(ign, (4, 3)),
                       ref_resize_ignore_released(ign, (4, 3)))


@pytest.mark.parametrize("H,W,h,w", [(11, 9, 4, 3), (32, 32, 8, 8), (33, 20, 9, 6),
                                     (5, 7, 1, 2), (64, 48, 16, 12)])
def test_paper_ignore_samples_the_pixel_under_each_feature(H, W, h, w):
    """The paper variant's ignore map at feature resolution against a per-pixel loop that
    takes round(i (H - 1) / (h - 1)) in exact fractions."""
    ign = torch.where(torch.rand(2, H, W, generator=_gen(H * W)) < 0.4, 255, 0)
    assert torch.equal(L.valid_at_features(ign, (h, w)), ref_resize_ignore_paper(ign, (h, w)))


@pytest.mark.parametrize("crop,feat", [(321, 81), (801, 201)])
def test_both_ignore_resizes_are_the_stride4_subsample_at_the_released_crops(crop, feat):
    ign = torch.where(torch.rand(2, crop, crop, generator=_gen(crop)) < 0.5, 255, 0)
    want = ign[:, ::4, ::4] != 255
    assert want.shape[-1] == feat
    for resize in (L.valid_at_features, R.valid_bilinear):
        assert torch.equal(resize(ign, (feat, feat)), want)


def test_where_the_resizes_differ_bilinear_unignores_the_padded_border():
    # crop 32 -> 8: feature row i sits at input row i*31/7 (row 6 at 26.57). The crop is
    # padded from input row 27 (and column 27) on.
    ign = torch.zeros(2, 32, 32, dtype=torch.long)
    ign[:, 27:] = 255
    ign[:, :, 27:] = 255
    paper = L.valid_at_features(ign, (8, 8))
    released = R.valid_bilinear(ign, (8, 8))
    assert torch.equal(paper, ref_resize_ignore_paper(ign, (8, 8)))
    assert (~paper[:, 6:]).all() and (~paper[:, :, 6:]).all() and paper[:, :6, :6].all()
    # released: the border row/column (between a valid and a padded pixel) is valid again
    assert released[:, 6, :6].all() and released[:, :6, 6].all()
    assert (~released[:, 7]).all() and (~released[:, :, 7]).all()
    # F.interpolate(mode="nearest") samples input row floor(6*32/8) = 24: valid, off by 3
    nearest = F.interpolate(ign.unsqueeze(1).float(), size=(8, 8), mode="nearest")[:, 0]
    assert (nearest[:, 6, :6] != 255).all()


# --------------------------------------------------------------------------- SAI
def test_sai_noise_bounds_and_amplitude():
    g = _gen(3)
    f = torch.randn(4, 8, 5, 5, generator=g)
    v = torch.tensor([-1.0, -0.2, 0.4, 1.0])
    out = L.sai_noise(f, v, 0.15, generator=_gen(9))
    a = 0.15 * (v + 1)
    assert torch.all((out - f).abs() <= a.view(-1, 1, 1, 1) * f.abs() + 1e-6)
    ratio = ((out - f) / f).abs().flatten(1).amax(1)
    assert torch.all(ratio[1:] > ratio[:-1])  # larger v, larger amplitude
    assert torch.allclose(ratio, a, atol=0.02)  # close to the bound with 200 draws
    assert torch.equal(out[0], f[0])  # v = -1: no noise


def test_sai_mask_zeroes_exactly_above_threshold():
    g = _gen(4)
    f = torch.rand(3, 6, 7, 7, generator=g)
    v = torch.tensor([-0.5, 0.3, 0.9])
    for ratio in (L.sai_mask_ratio, R.sai_mask_ratio_twice):
        r = ratio(v, 0.15)
        out, keep = L.sai_mask(f, r, 0.1, generator=_gen(11))
        u = torch.rand(3, generator=_gen(11))  # the same draw
        t = r + (2 * u - 1) * 0.1
        for b in range(3):
            att = f[b].mean(0)
            want_keep = att < t[b] * att.max()
            assert torch.equal(keep[b], want_keep)
            assert torch.equal(out[b], f[b] * want_keep)
        assert (~keep).any() and keep.any()


@pytest.mark.parametrize("backbone", ["resnet18", "dinov2_s"])
def test_masked_logits_are_the_decode_of_the_masked_features(backbone):
    """decode(F * keep) = masked_logits(decode(F), keep, decode(0)) for both decoders (the 1x1
    classifier, affine at each position), bias included: SAI's masked map needs no decode."""
    from mlcl.config import load_config
    from mlcl.model import build_model
    cfg = load_config("synthetic", [f"model.backbone={backbone}"])
    net = build_model(cfg)
    torch.nn.init.normal_(net.classifier.bias)
    g = _gen(4)
    f = torch.randn(2, cfg.model.feature_channels, 5, 6, generator=g)
    keep = torch.rand(2, 5, 6, generator=g) > 0.4
    offset = net.decode(f.new_zeros(1, f.shape[1], 1, 1))
    torch.testing.assert_close(L.masked_logits(net.decode(f), keep, offset),
                               net.decode(f * keep.unsqueeze(1)), rtol=1e-5, atol=1e-6)


def test_sai_mask_ratio_monotone_and_double_transform_range():
    v = torch.linspace(-1, 1, 21)
    r = L.sai_mask_ratio(v, 0.15)
    assert torch.all(r[1:] < r[:-1])  # larger v, lower threshold
    assert r.max().item() == pytest.approx(1.0) and r.min().item() == pytest.approx(0.7)
    r2 = R.sai_mask_ratio_twice(v, 0.15)
    assert r2.min().item() == pytest.approx(0.805) and r2.max().item() == pytest.approx(0.85)
    assert torch.all((r2 >= 0.805 - 1e-6) & (r2 <= 0.85 + 1e-6))
    # larger v keeps fewer positions (jitter 0)
    g = _gen(5)
    f = torch.rand(1, 4, 9, 9, generator=g).expand(2, 4, 9, 9)
    _, keep = L.sai_mask(f, L.sai_mask_ratio(torch.tensor([-0.8, 0.8]), 0.15), 0.0)
    assert keep[1].sum() < keep[0].sum()


def test_sai_gradients_flow_to_strong_features_only():
    f = torch.rand(2, 4, 5, 5, requires_grad=True)
    v = torch.tensor([0.1, 0.7], requires_grad=True)
    ne = L.sai_noise(f, v, 0.15)
    mk, keep = L.sai_mask(f, L.sai_mask_ratio(v, 0.15), 0.1)
    (ne.sum() + mk.sum()).backward()
    assert f.grad is not None and v.grad is None
    assert not keep.requires_grad


@pytest.mark.parametrize("B,K,H,W", [(2, 3, 4, 5), (1, 21, 3, 3)])
def test_sai_mse_matches_reference(B, K, H, W):
    g = _gen(K)
    p = torch.randn(B, K, H, W, generator=g).softmax(1)
    t = torch.randn(B, K, H, W, generator=g).softmax(1)
    assert L.sai_mse(p, t).item() == pytest.approx(ref_sai_mse(p, t), rel=1e-5)
    assert L.sai_mse(p, t).item() == pytest.approx(F.mse_loss(p, t).item(), rel=1e-6)


def test_sai_weight():
    for it, T in [(0, 100), (50, 100), (100, 100), (130, 100), (7, 40)]:
        assert L.sai_weight(it, T, 0.01) == pytest.approx(ref_sai_weight(it, T, 0.01, 5.0))
    assert L.sai_weight(0, 100, 0.01) == pytest.approx(0.01 * math.exp(-10))  # 4.5e-7
    assert L.sai_weight(100, 100, 0.01) == pytest.approx(0.01)


# --------------------------------------------------------------------------- no host sync
def test_no_host_synchronisation_in_sources():
    banned = [r"\.item\(", r"\.tolist\(", r"nonzero", r"torch\.unique", r"\.cpu\(", r"\.numpy\("]
    for name in ("losses.py", "prototypes.py", "released.py"):
        text = (ROOT / "mlcl" / name).read_text()
        for pat in banned:
            assert not re.search(pat, text), f"mlcl/{name} contains {pat}"

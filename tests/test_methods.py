"""The step functions: pass counts, gradients, the bank, and that a few steps on one fixed
tiny batch lower the loss."""
from __future__ import annotations

import dataclasses
import math
import weakref

import pytest
import torch
from torch.utils.data import DataLoader

from mlcl import losses, methods, released
from mlcl.config import RELEASED_QUIRKS, ConfigError, load_config
from mlcl.data.datasets import build_datasets
from mlcl.methods import STEPS, StepContext, make_bank, paste
from mlcl.model import build_model
from mlcl.prototypes import PrototypeBank, initialised


def setup(synth_root, method, *extra, batch=4):
    cfg = load_config("synthetic", [f"data.root={synth_root}", "data.crop_size=32", "split=1_8",
                                    "data.num_workers=0", "model.width=16", f"method={method}",
                                    f"train.batch_size={batch}", *extra])
    torch.manual_seed(0)
    sets = build_datasets(cfg, with_unlabeled=True)
    batch_x = next(iter(DataLoader(sets["labeled"], batch_size=batch, shuffle=False)))
    batch_u = next(iter(DataLoader(sets["unlabeled"], batch_size=batch, shuffle=False)))
    # make sure the CutMix boxes are not empty, so the mixing paths run
    for k in ("box1", "box2"):
        batch_u[k][:, 4:20, 6:22] = True
    batch_d = {"x": batch_x, "u": batch_u}
    model = build_model(cfg)
    bank = make_bank(cfg)
    ctx = StepContext(cfg=cfg, bank=bank, accelerator=None, total_iters=10,
                      iteration=9)  # late in the schedule: the SAI weight is at its largest
    return cfg, model, bank, batch_d, ctx


class ImageCounter:
    """Counts images through the backbone (forward hook on the ResNet trunk)."""

    def __init__(self, model):
        self.images = 0
        model.backbone.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        self.images += inputs[0].shape[0]


@pytest.mark.parametrize("method, extra, image_batches", [
    ("supervised", (), 1),
    ("unimatch", (), 5),
    ("mlcl", (), 7),
    ("mlcl", ("mlcl.released_passes=true",), 9),
    ("mlcl", ("mlcl.weak_features=mixed",), 5),
])
def test_image_batches_through_the_backbone(synth_root, method, extra, image_batches):
    cfg, model, bank, batch, ctx = setup(synth_root, method, *extra)
    counter = ImageCounter(model)
    STEPS[method](model, batch, ctx)
    assert counter.images == image_batches * cfg.train.batch_size


def test_mlcl_terms_gradients_and_bank(synth_root):
    cfg, model, bank, batch, ctx = setup(synth_root, "mlcl", "mlcl.bank_conf=0.0")
    terms = STEPS["mlcl"](model, batch, ctx)
    for k in ("loss", "x", "s", "fp", "p2p", "dt", "mask", "noise", "sai_w", "sim_v",
              "conf_ratio"):
        assert k in terms and torch.isfinite(terms[k]), k
    assert terms["mask"] > 0 and terms["noise"] > 0 and terms["sai_w"] > 0
    assert -1 <= terms["sim_v"] <= 1
    # the step updated the bank (threshold 0 so every class present qualifies) without grad
    assert initialised(bank.protos).any() and not bank.protos.requires_grad
    terms["loss"].backward()
    assert bank.protos.grad is None
    assert model.backbone.conv1.weight.grad is not None
    assert model.classifier.weight.grad.abs().sum() > 0


def test_sai_and_fka_switches(synth_root):
    """Each component switched off drops exactly its term from the total."""
    cfg, model, bank, batch, ctx = setup(synth_root, "mlcl", "mlcl.use_mask=false",
                                         "mlcl.use_noise=false", "mlcl.use_dt=false")
    terms = STEPS["mlcl"](model, batch, ctx)
    assert terms["mask"] == 0 and terms["noise"] == 0 and terms["dt"] == 0


def test_released_variant_step_runs(synth_root):
    cfg, model, bank, batch, ctx = setup(synth_root, "mlcl", "mlcl.variant=released",
                                         "mlcl.bank_conf=0.0")
    assert cfg.mlcl.alpha == 0.0
    terms = STEPS["mlcl"](model, batch, ctx)
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()


@pytest.mark.parametrize("method", ["supervised", "unimatch", "mlcl"])
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(synth_root, method):
    cfg, model, bank, batch, ctx = setup(synth_root, method)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        torch.manual_seed(0)  # the same SAI noise / masks / dropout every step
        terms = STEPS[method](model, batch, ctx)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(float(terms["loss"].detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_mixed_weak_features_are_the_passes_features_cutmixed_at_feature_pixels(synth_root):
    """mlcl.weak_features=mixed: F_1 (F_2) at feature position (i, j) is the partner's feature
    when the image pixel under (i, j) lies in box1 (box2), else u_w's; a loop over positions
    with the nearest pixel to i * (H - 1) / (h - 1) (the model's bilinear upsampling,
    align_corners) checks the vectorised paste."""
    cfg, model, bank, batch, ctx = setup(synth_root, "mlcl", "mlcl.weak_features=mixed")
    u = batch["u"]
    u["box1"].zero_()
    u["box1"][0, 3:17, 5:30] = True  # edges between feature positions
    u["box1"][2, :, 31] = True  # one column: the last feature column only
    p = methods.unimatch_passes(model, batch, ctx)
    f1, f2, f_w, logits_w, f_dt, dt_box = methods.mixed_passes(model, None, None, u, p, None)
    assert torch.allclose(logits_w, model.decode(f_w), atol=1e-6)  # the pass's own logits
    own, partner = p.out_xw.features[p.n_x:], p.f_mix
    (B, C, h, w), (H, W) = own.shape, u["box1"].shape[-2:]
    for b in range(B):
        for i in range(h):
            for j in range(w):
                r = math.floor(i * (H - 1) / (h - 1) + 0.5)
                c = math.floor(j * (W - 1) / (w - 1) + 0.5)
                for f, box in ((f1, u["box1"]), (f2, u["box2"])):
                    src = partner if box[b, r, c] else own
                    assert torch.equal(f[b, :, i, j], src[b, :, i, j]), (b, i, j)
    assert not f1.requires_grad and f_w.requires_grad and dt_box is u["box1"]
    assert f1[2, :, :, -1].equal(partner[2, :, :, -1])
    assert f1[2, :, :, :-1].equal(own[2, :, :, :-1])
    with pytest.raises(ConfigError, match="mlcl.weak_features"):
        load_config(None, ["method=mlcl", "mlcl.weak_features=mixed",
                           "mlcl.released_passes=true"])


def test_paste_is_cutmix_for_every_shape_it_takes():
    g = torch.Generator().manual_seed(0)
    box = torch.rand(2, 4, 5, generator=g) < 0.5  # (B, H, W)
    boxes = torch.rand(3, 2, 4, 5, generator=g) < 0.5  # (n, B, H, W)
    a, b = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    pa, pb = torch.randn(2, 6, 4, 5, generator=g), torch.randn(2, 6, 4, 5, generator=g)
    got, got_p = paste(box, a, b), paste(box, pa, pb)
    got_n, got_np = paste(boxes, a, b), paste(boxes, pa, pb)
    assert got_np.shape == (3, 2, 6, 4, 5)
    for i in range(2):
        for y in range(4):
            for x in range(5):
                inside = bool(box[i, y, x])
                assert got[i, y, x] == (a if inside else b)[i, y, x]
                assert torch.equal(got_p[i, :, y, x], (pa if inside else pb)[i, :, y, x])
                for n in range(3):
                    inside = bool(boxes[n, i, y, x])
                    assert got_n[n, i, y, x] == (a if inside else b)[i, y, x]
                    assert torch.equal(got_np[n, i, :, y, x], (pa if inside else pb)[i, :, y, x])


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_variant_sets_every_released_switch_unless_given(variant):
    cfg = load_config(None, ["method=mlcl", f"mlcl.variant={variant}"])
    assert {"dt_uninitialised", "bank_local_update", "bilinear_ignore"} <= set(RELEASED_QUIRKS)
    for quirk in RELEASED_QUIRKS:
        assert getattr(cfg.mlcl, quirk) is (variant == "released"), quirk
    flipped = load_config(None, ["method=mlcl", f"mlcl.variant={variant}",
                                 f"mlcl.dt_uninitialised={variant == 'paper'}",
                                 f"mlcl.bank_local_update={variant == 'paper'}"])
    assert flipped.mlcl.dt_uninitialised is flipped.mlcl.bank_local_update is (variant == "paper")


def test_mlcl_parts_pick_the_paper_or_each_released_quirk():
    """methods.mlcl_parts is where the switches choose: the paper's functions by default, the
    release's for each switch that is on."""
    paper = methods.mlcl_parts(load_config(None, ["method=mlcl"]))
    assert paper == (methods.joint_passes, losses.valid_at_features, losses.loss_dt,
                     losses.sai_mask_ratio, PrototypeBank)
    rel = methods.mlcl_parts(load_config(None, ["method=mlcl", "mlcl.variant=released",
                                                "mlcl.released_passes=true"]))
    assert rel.passes is released.separate_passes and rel.valid_at_features is (
        released.valid_bilinear) and rel.mask_ratio is released.sai_mask_ratio_twice
    assert rel.loss_dt.func is released.loss_dt and all(rel.loss_dt.keywords.values())
    assert rel.bank.func is released.ReleasedBank and all(rel.bank.keywords.values())
    one = methods.mlcl_parts(load_config(None, ["method=mlcl", "mlcl.pair_by_position=true",
                                                "mlcl.double_transform=true",
                                                "mlcl.use_noise=false"]))
    assert one.loss_dt.keywords == {"pair_by_position": True, "duplicate_top_anchor": False,
                                    "normalise_by_candidates": False,
                                    "keep_uninitialised": False}
    assert one.mask_ratio is losses.sai_mask_ratio  # the double transform needs the noise
    assert one.bank is PrototypeBank and one.passes is methods.joint_passes
    mixed = load_config(None, ["method=mlcl", "mlcl.weak_features=mixed"])
    assert methods.mlcl_parts(mixed).passes is methods.mixed_passes


@pytest.mark.parametrize("extra", [(), ("mlcl.weak_features=mixed",)])
def test_unimatchs_input_resolution_maps_are_freed_before_sai(synth_root, monkeypatch, extra):
    """Memory: when SAI runs (where the MLCL step's forward peaks), UniMatch's logits and
    probabilities at the input resolution are no longer held."""
    cfg, model, bank, batch, ctx = setup(synth_root, "mlcl", *extra)
    passes, sai = methods.unimatch_passes, methods.sai_losses
    refs, alive = [], []

    def spy_passes(*a):
        p = passes(*a)
        refs.extend(weakref.ref(t) for t in (p.out_xw.logits, p.out_xw.logits_fp,
                                              p.out_s.logits, p.prob_w, p.prob_mix))
        return p

    def spy_sai(*a):
        alive.extend(r() is not None for r in refs)
        return sai(*a)

    monkeypatch.setattr(methods, "unimatch_passes", spy_passes)
    monkeypatch.setattr(methods, "sai_losses", spy_sai)
    STEPS["mlcl"](model, batch, ctx)
    assert len(alive) == 5 and not any(alive)


@pytest.mark.parametrize("extra", [(), ("mlcl.variant=released",),
                                   ("mlcl.weak_features=mixed",)])
def test_the_mlcl_part_replayed_from_its_inputs_gives_the_step(synth_root, monkeypatch, extra):
    """methods.mlcl_losses and methods.prototype_branch, replayed on the inputs a real
    step_mlcl built (same bank, same random state), give exactly the step's MLCL part: its
    loss beyond UniMatch's, its L_dt and the bank afterwards (what a benchmark driving these
    functions from outside measures)."""
    cfg, model, bank, batch, ctx = setup(synth_root, "mlcl", "mlcl.bank_conf=0.0", *extra)
    bank.protos.normal_()
    bank.protos[1] = 0  # one class not seen yet
    ctx.iteration = ctx.total_iters  # w(t) = beta
    seen = {}
    passes, part = methods.unimatch_passes, methods.mlcl_losses

    def spy_passes(*a):
        seen["p"] = passes(*a)
        return seen["p"]

    def spy_part(net, x, bank, cfg, sai_w, parts, *rest):
        seen.update(x=x, protos=bank.protos.clone(), rng=torch.get_rng_state(), sai_w=sai_w)
        return part(net, x, bank, cfg, sai_w, parts, *rest)

    monkeypatch.setattr(methods, "unimatch_passes", spy_passes)
    monkeypatch.setattr(methods, "mlcl_losses", spy_part)
    terms = STEPS["mlcl"](model, batch, ctx)
    monkeypatch.undo()
    assert seen["sai_w"] == cfg.mlcl.beta and terms["mask"] > 0 and terms["dt"] > 0
    leaves: dict[int, torch.Tensor] = {}  # the step's graph cut (f_dt may be f_s1 itself)
    x = dataclasses.replace(seen["x"], **{
        f.name: leaves.setdefault(id(t), t.detach().requires_grad_())
        for f in dataclasses.fields(seen["x"])
        if (t := getattr(seen["x"], f.name)) is not None and t.requires_grad})
    parts = methods.mlcl_parts(cfg)
    replays = [make_bank(cfg) for _ in range(2)]
    for r in replays:
        r.protos.copy_(seen["protos"])
    dt = methods.prototype_branch(x, replays[0], cfg, parts)
    torch.set_rng_state(seen["rng"])
    whole, _ = methods.mlcl_losses(model, x, replays[1], cfg, cfg.mlcl.beta, parts)
    whole.backward()
    assert torch.equal(dt.detach(), terms["dt"])
    assert torch.allclose(seen["p"].total.detach() + whole.detach(), terms["loss"].detach(),
                          rtol=1e-6)
    for r in replays:
        assert torch.equal(r.protos, bank.protos)

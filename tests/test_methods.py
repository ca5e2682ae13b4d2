"""The step functions: pass counts, gradients, the bank, and that a few steps on one fixed
tiny batch lower the loss."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from mlcl.config import load_config
from mlcl.data.datasets import build_datasets
from mlcl.methods import STEPS, StepContext, make_bank
from mlcl.model import build_model


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
    ctx = StepContext(cfg=cfg, bank=bank, accelerator=None, total_iters=10, iters_per_epoch=10,
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
    assert bank.initialised.any() and not bank.protos.requires_grad
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

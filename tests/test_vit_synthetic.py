"""The from-scratch ViT of the synthetic study (model.backbone=vit_w64d4p8, preset
synthetic_vit, grid vit; docs/synthetic_study.md, "A ViT on the synthetic set"): DPT reads
its patch size, DINOv2 keeps patch 14, no weights exist for it, the grid is the three methods
at 1/16 over three seeds (CPU, seconds)."""
from __future__ import annotations

import pytest
import torch

from mlcl import model as M
from mlcl.config import ConfigError, load_config
from mlcl.study.grids import build_grid

torch.set_num_threads(1)


def net(backbone: str) -> M.DPT:
    torch.manual_seed(0)
    cfg = load_config("synthetic_vit", [f"model.backbone={backbone}"])
    return M.build_model(cfg).eval()


@pytest.mark.parametrize("size, tokens", [(64, 8), (60, 8), (72, 9), (100, 13)])
def test_scratch_vit_reads_patch_8(size, tokens):
    """A 64 px crop gives 8x8 tokens; other sizes round to the nearest multiple of 8; F is at
    8x the token grid (full resolution for a multiple of 8), the logits at the input's."""
    model = net("vit_w64d4p8")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        levels = model.levels(x)
        out = model(x, return_features=True)
    assert [tuple(t.shape) for t in levels] == [(2, 64, tokens, tokens)] * 4
    assert tuple(out.features.shape) == (2, 32, 8 * tokens, 8 * tokens)
    assert tuple(out.logits.shape) == (2, 7, size, size)
    assert model.backbone.pos_embed.shape == (1, 1 + 64, 64)  # the 8x8 grid, a class token


def test_dinov2_keeps_patch_14():
    """UniMatch V2's encoder is unchanged: a 64 px crop is resized to 70 (5x5 tokens)."""
    model = net("dinov2_s")
    with torch.no_grad():
        levels = model.levels(torch.randn(1, 3, 64, 64))
    assert [tuple(t.shape) for t in levels] == [(1, 384, 5, 5)] * 4
    assert model.backbone.patch_embed.patch_size == (14, 14)


def test_scratch_vit_has_no_released_weights():
    cfg = load_config("synthetic_vit", ["model.pretrained=true"])
    with pytest.raises(ConfigError, match="'model.pretrained'.*vit_w64d4p8.*from scratch"):
        M.build_model(cfg)


def test_vit_grid_is_three_methods_three_seeds_at_1_16():
    runs = build_grid("vit")
    assert [(r.method, r.seed) for r in runs] == [
        (m, s) for s in (0, 1, 2) for m in ("supervised", "unimatch_v2", "mlcl")]
    for r in runs:
        cfg = load_config(r.preset, r.config_overrides())
        assert (cfg.split, cfg.model.backbone, cfg.model.pretrained) == ("1_16", "vit_w64d4p8",
                                                                         False)
        assert (cfg.train.lr, cfg.train.lr_multi, cfg.train.conf_thresh) == (1e-3, 1.0, 0.95)
        assert cfg.model.ema_max == 0.99
        if r.method == "mlcl":
            assert cfg.mlcl.base == "unimatch_v2" and cfg.train.mix_partner == "flip"

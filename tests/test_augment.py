"""Paired augmentations (mlcl.augment)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from mlcl import augment
from mlcl.config import AugmentConfig

IGNORE = 255


def _blocks(h=48, w=64, block=8, seed=0):
    """An image whose red channel encodes the mask's class in each block (30 c + 20), so a
    mask derived from the image lets us check that both moved together."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 7, (h // block, w // block))
    mask = np.kron(cls, np.ones((block, block), dtype=np.int64)).astype(np.uint8)
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = 30 * mask + 20
    rgb[..., 1] = rng.integers(0, 255)
    return Image.fromarray(rgb), mask


def _unnormalize(x, aug):
    mean = torch.tensor(aug.mean)[:, None, None]
    std = torch.tensor(aug.std)[:, None, None]
    return (x * std + mean) * 255


def test_image_and_mask_move_together():
    aug = AugmentConfig(hflip_p=0.5, scale_range=[0.5, 2.0])
    image, mask = _blocks()
    rng = random.Random(0)
    checked = 0
    for _ in range(30):
        x, y = augment.labeled_views(image, mask, 40, aug, IGNORE, rng)
        assert set(y.unique().tolist()) <= set(range(7)) | {IGNORE}  # NEAREST: no new values
        red = _unnormalize(x, aug)[0]
        # pixels whose 5x5 neighbourhood is one class: away from bilinear blending
        yp = torch.nn.functional.pad(y[None, None].float(), (2, 2, 2, 2), value=-1)
        win = yp.unfold(2, 5, 1).unfold(3, 5, 1)[0, 0]  # (H, W, 5, 5)
        inner = (win == y[..., None, None].float()).all(-1).all(-1) & (y != IGNORE)
        expected = 30 * y[inner].float() + 20
        assert (red[inner] - expected).abs().max() < 8
        checked += int(inner.sum())
    assert checked > 1000


def test_hflip_and_identity_geometry_follow_config():
    image, mask = _blocks(32, 32)
    base = AugmentConfig(scale_range=[1.0, 1.0], hflip_p=0.0)
    x0, y0 = augment.labeled_views(image, mask, 32, base, IGNORE, random.Random(0))
    assert torch.equal(y0, torch.from_numpy(mask).long())
    flip = AugmentConfig(scale_range=[1.0, 1.0], hflip_p=1.0)
    x1, y1 = augment.labeled_views(image, mask, 32, flip, IGNORE, random.Random(0))
    assert torch.equal(y1, y0.flip(-1)) and torch.allclose(x1, x0.flip(-1))


def test_rescale_long_side_in_range():
    img = augment.to_tv(Image.new("RGB", (40, 20)))
    rng = random.Random(1)
    for _ in range(20):
        i, m = augment.rescale(*img, [0.5, 2.0], rng)
        h, w = i.shape[-2:]
        assert 20 <= w <= 80 and abs(h - w / 2) <= 1 and m.shape[-2:] == (h, w)


def test_padding_fill_labeled_and_unlabeled():
    aug = AugmentConfig(scale_range=[1.0, 1.0], hflip_p=0.0)
    image, mask = _blocks(16, 24)
    x, y = augment.labeled_views(image, mask, 32, aug, IGNORE, random.Random(0))
    assert (y[16:] == IGNORE).all() and (y[:, 24:] == IGNORE).all()
    assert (y[:16, :24] != IGNORE).all()
    black = (-torch.tensor(aug.mean) / torch.tensor(aug.std))[:, None]
    assert torch.allclose(x[:, 16:].reshape(3, -1), black.expand(3, 16 * 32), atol=1e-5)

    u = augment.unlabeled_views(image, 32, aug, IGNORE, random.Random(0))
    pad = torch.ones(32, 32, dtype=torch.bool)
    pad[:16, :24] = False
    assert (u["ignore"][pad] == IGNORE).all() and (u["ignore"][~pad] == 0).all()
    assert u["ignore"].dtype == torch.long


def test_unlabeled_pad_value_is_254_before_ignore_map():
    img, m = augment.to_tv(Image.new("RGB", (10, 10)))
    _, mp = augment.pad_crop(img, m, 16, augment.UNLABELED_PAD, random.Random(0))
    assert set(mp.unique().tolist()) == {0, 254}


def test_strong_views_share_geometry_but_differ():
    image, _ = _blocks(48, 48)
    plain = AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    u = augment.unlabeled_views(image, 32, plain, IGNORE, random.Random(5))
    # with every strong op off, the strong views are the weak view: the geometry is shared
    assert torch.equal(u["s1"], u["w"]) and torch.equal(u["s2"], u["w"])

    strong = AugmentConfig(jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)
    u = augment.unlabeled_views(image, 32, strong, IGNORE, random.Random(5))
    assert not torch.allclose(u["s1"], u["w"]) and not torch.allclose(u["s1"], u["s2"])
    # jitter is per pixel-colour: where the weak view is constant, so is each strong view
    same = (u["w"][:, :, 1:] == u["w"][:, :, :-1]).all(0)
    for k in ("s1", "s2"):
        assert (u[k][:, :, 1:] == u[k][:, :, :-1]).all(0)[same].float().mean() > 0.99


def test_strong_ops_each_apply():
    img = augment.to_tv(_blocks(32, 32)[0])[0]
    gray = augment.strong(img, AugmentConfig(jitter_p=0, grayscale_p=1, blur_p=0))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    blur = augment.strong(img, AugmentConfig(jitter_p=0, grayscale_p=0, blur_p=1,
                                             blur_sigma=[2.0, 2.0]))
    assert blur.dtype == torch.uint8 and (blur.float() - img.float()).abs().mean() > 1
    none = augment.strong(img, AugmentConfig(jitter_p=0, grayscale_p=0, blur_p=0))
    assert torch.equal(none, img.as_subclass(torch.Tensor))


def test_hue_zero_keeps_hue():
    # the synthetic preset sets hue 0: jitter then must not rotate hues
    img = augment.to_tv(Image.new("RGB", (8, 8), (200, 30, 30)))[0]
    aug = AugmentConfig(jitter_p=1, hue=0.0, brightness=0.0, contrast=0.0, saturation=0.0,
                        grayscale_p=0, blur_p=0)
    assert torch.equal(augment.strong(img, aug), img.as_subclass(torch.Tensor))


def test_cutmix_box_area_ratio_and_probability():
    rng = random.Random(0)
    area, ratio = [0.02, 0.4], [0.3, 1 / 0.3]
    assert not augment.cutmix_box(64, 0.0, area, ratio, rng).any()
    n_empty = 0
    for _ in range(200):
        box = augment.cutmix_box(64, 0.5, area, ratio, rng)
        assert box.shape == (64, 64) and box.dtype == torch.bool
        if not box.any():
            n_empty += 1
            continue
        rows, cols = box.any(1).nonzero()[:, 0], box.any(0).nonzero()[:, 0]
        h, w = len(rows), len(cols)
        assert int(box.sum()) == h * w  # one solid rectangle
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w
        slack = (h + w + 1) / 64 ** 2  # int() truncation of both sides
        assert area[0] - slack <= h * w / 64 ** 2 <= area[1]
    assert 60 < n_empty < 140


def test_cutmix_box_non_square():
    box = augment.cutmix_box((20, 40), 1.0, [0.3, 0.3], [1.0, 1.0], random.Random(0))
    assert box.shape == (20, 40) and abs(int(box.sum()) - 240) <= 30


def test_same_seed_same_views():
    image, mask = _blocks()
    aug = AugmentConfig()
    a = augment.unlabeled_views(image, 32, aug, IGNORE, random.Random(7))
    b = augment.unlabeled_views(image, 32, aug, IGNORE, random.Random(7))
    assert all(torch.equal(a[k], b[k]) for k in a)
    random.seed(7)
    c = augment.labeled_views(image, mask, 32, aug, IGNORE)
    random.seed(7)
    d = augment.labeled_views(image, mask, 32, aug, IGNORE)
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])


@pytest.mark.parametrize("size", [(20, 30), (64, 48)])
def test_val_view_whole_image(size):
    w, h = size
    image = Image.new("RGB", (w, h), (10, 20, 30))
    x, y = augment.val_view(image, np.zeros((h, w), np.uint8), AugmentConfig())
    assert x.shape == (3, h, w) and y.shape == (h, w) and y.dtype == torch.long

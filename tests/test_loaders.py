"""Training loaders: a sample's augmentation is a pure function of its key (seed, epoch,
index, stream), so loader workers and mid-epoch skips cannot change a batch; the CutMix
partner loaders of train.mix_partner."""
from __future__ import annotations

import random

import pytest
import torch
from accelerate import Accelerator

from mlcl.config import load_config
from mlcl.data.datasets import build_datasets
from mlcl.loaders import (DrawSampler, derive_seed, epoch_batches, make_loader,
                          prepare_loaders, train_loaders)


@pytest.fixture
def sets(synth_cfg):
    return build_datasets(synth_cfg, with_unlabeled=True)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_a_sample_is_a_pure_function_of_its_key(sets):
    u = sets["unlabeled"]
    random.seed(1)
    first = u[(3, 12345)]
    random.seed(2)  # the global generators play no part
    torch.manual_seed(2)
    assert same(first, u[(3, 12345)])
    assert not torch.equal(first["s1"], u[(3, 54321)]["s1"])


def test_draw_sampler_orders_and_seeds_by_epoch():
    s = DrawSampler(10, order_seed=7, draw_seed_base=8)
    first = list(s)
    assert sorted(i for i, _ in first) == list(range(10)) and first == list(s)
    s.set_epoch(1)
    assert list(s) != first
    assert [d for i, d in first] == [derive_seed(8, 0, i) for i, _ in first]
    assert list(DrawSampler(5, 7, 8, shuffle=False)) == [(i, derive_seed(8, 0, i))
                                                          for i in range(5)]


def test_loader_workers_do_not_change_the_batches(synth_cfg, sets):
    batches = {}
    for workers in (0, 2):
        synth_cfg.data.num_workers = workers
        loader = make_loader(sets["labeled"], synth_cfg, seed=3, stream=4)
        loader.draw_sampler.set_epoch(1)
        batches[workers] = [b for _, b in zip(range(3), loader)]
    assert all(same(a, b) for a, b in zip(batches[0], batches[2]))


def test_skipping_batches_resumes_the_epoch_where_it_stood(synth_cfg, sets):
    acc = Accelerator(cpu=True)
    loaders = prepare_loaders({"x": make_loader(sets["labeled"], synth_cfg, seed=1)}, acc)
    whole = [b["x"]["id"] for b in epoch_batches(loaders, 2, 0, acc)]
    rest = [b["x"]["id"] for b in epoch_batches(loaders, 2, 2, acc)]
    assert len(whole) == 5 and rest == whole[2:]  # 42 samples in batches of 8


@pytest.mark.parametrize("partner", ["same", "loader", "roll"])
def test_mix_partner_loaders(synth_root, partner):
    cfg = load_config("synthetic", [f"data.root={synth_root}", "data.crop_size=32",
                                    "split=1_8", "data.num_workers=0", "method=unimatch",
                                    "train.batch_size=4", f"train.mix_partner={partner}"])
    sets = build_datasets(cfg, with_unlabeled=True)
    loaders = train_loaders(sets, cfg)
    if partner == "roll":  # the step rolls the unlabeled batch instead
        assert set(loaders) == {"x", "u"}
        return
    for loader in loaders.values():
        loader.draw_sampler.set_epoch(1)
    pairs = list(zip(loaders["u"], loaders["mix"]))
    assert len(pairs) == 10
    same_ids = [u["id"] == mix["id"] for u, mix in pairs]
    if partner == "same":  # the same raw image, seen through a second augmentation
        assert all(same_ids)
        for u, mix in pairs:
            for i in range(len(u["id"])):
                assert not torch.equal(u["s1"][i], mix["s1"][i])
    else:  # an independently shuffled loader
        assert not all(same_ids)

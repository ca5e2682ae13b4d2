"""mlcl.prototypes.PrototypeBank: EMA update against the released loop (tests/reference.py),
absent classes, state_dict, and the early-stop quirk (METHOD.md item 6)."""
from __future__ import annotations

import pytest
import torch

from mlcl.prototypes import PrototypeBank
from reference import ref_bank_update

torch.set_num_threads(1)


def _batch(K, B, C, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, C, h, w, generator=g)
    labels = torch.randint(0, K, (B, h, w), generator=g)
    conf = 0.9 + 0.1 * torch.rand(B, h, w, generator=g)
    valid = torch.rand(B, h, w, generator=g) > 0.2
    return feats, labels, conf, valid


@pytest.mark.parametrize("K,B,C,h,w", [(3, 2, 4, 4, 4), (21, 2, 8, 5, 5), (7, 1, 6, 6, 3)])
@pytest.mark.parametrize("early_stop", [False, True])
def test_update_matches_released_loop(K, B, C, h, w, early_stop):
    bank = PrototypeBank(K, C, momentum=0.99, conf_thresh=0.95)
    g = torch.Generator().manual_seed(K)
    start = torch.randn(K, C, generator=g)
    start[torch.rand(K, generator=g) < 0.4] = 0  # some classes not yet initialised
    bank.protos.copy_(start)
    want = start
    for step in range(3):
        feats, labels, conf, valid = _batch(K, B, C, h, w, 100 * K + step)
        bank.update(feats, labels, conf, valid, early_stop=early_stop)
        want = ref_bank_update(want, feats, labels, conf, valid, 0.99, 0.95, early_stop)
        assert torch.allclose(bank.protos, want, atol=1e-6)


def test_update_accepts_rows():
    feats, labels, conf, valid = _batch(4, 2, 5, 3, 3, 0)
    a, b = PrototypeBank(4, 5), PrototypeBank(4, 5)
    a.update(feats, labels, conf, valid)
    b.update(feats.permute(0, 2, 3, 1).reshape(-1, 5), labels.reshape(-1), conf.reshape(-1),
             valid.reshape(-1))
    assert torch.equal(a.protos, b.protos)


def test_ema_formula_init_and_absent_class():
    bank = PrototypeBank(3, 2, momentum=0.9, conf_thresh=0.5)
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 1, 0])
    conf = torch.tensor([0.9, 0.9, 0.9, 0.4])  # the last one is not confident
    valid = torch.tensor([True, True, True, True])
    bank.update(feats, labels, conf, valid)
    assert torch.allclose(bank.protos, torch.tensor([[2.0, 0.0], [0.0, 5.0], [0.0, 0.0]]))
    assert bank.initialised.tolist() == [True, True, False]
    # second step: class 0 only -> EMA for 0; 1 absent keeps its prototype; 2 stays zero
    bank.update(torch.tensor([[4.0, 2.0]]), torch.tensor([0]), torch.tensor([1.0]),
                torch.tensor([True]))
    want0 = 0.9 * torch.tensor([2.0, 0.0]) + 0.1 * torch.tensor([4.0, 2.0])
    assert torch.allclose(bank.protos[0], want0)
    assert torch.equal(bank.protos[1], torch.tensor([0.0, 5.0]))
    assert torch.equal(bank.protos[2], torch.zeros(2))
    # invalid (ignored) features never count
    before = bank.protos.clone()
    bank.update(torch.tensor([[7.0, 7.0]]), torch.tensor([2]), torch.tensor([1.0]),
                torch.tensor([False]))
    assert torch.equal(bank.protos, before)


def test_quirk6_early_stop_leaves_later_classes_unupdated():
    # classes 0 and 2 initialised, 1 still zero; all three present in the step.
    start = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    feats = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 3.0], [2.0, 2.0]])
    labels = torch.tensor([0, 1, 2, 3])
    ones = torch.ones(4)
    valid = torch.ones(4, dtype=torch.bool)
    paper, released = PrototypeBank(4, 2, 0.5, 0.5), PrototypeBank(4, 2, 0.5, 0.5)
    paper.protos.copy_(start)
    released.protos.copy_(start)
    paper.update(feats, labels, ones, valid, early_stop=False)
    released.update(feats, labels, ones, valid, early_stop=True)
    want_paper = torch.tensor([[2.0, 0.0], [0.0, 4.0], [0.0, 2.0], [1.5, 1.5]])
    assert torch.allclose(paper.protos, want_paper)
    # released: 0 updated (before the initialisation), 1 initialised, 2 and 3 skipped
    assert torch.allclose(released.protos, torch.tensor([[2.0, 0.0], [0.0, 4.0], [0.0, 1.0],
                                                         [1.0, 1.0]]))
    # the flag does not persist: the next step updates every class again
    released.update(feats, labels, ones, valid, early_stop=True)
    assert torch.allclose(released.protos, torch.tensor([[2.5, 0.0], [0.0, 4.0], [0.0, 2.0],
                                                         [1.5, 1.5]]))


def test_state_dict_round_trip_and_no_grad():
    feats, labels, conf, valid = _batch(5, 2, 4, 3, 3, 1)
    feats.requires_grad_(True)
    bank = PrototypeBank(5, 4)
    bank.update(feats, labels, conf, valid)
    assert not bank.protos.requires_grad and feats.grad is None
    sd = bank.state_dict()
    assert set(sd) == {"protos"}
    other = PrototypeBank(5, 4)
    other.load_state_dict(sd)
    assert torch.equal(other.protos, bank.protos)
    assert list(bank.parameters()) == []

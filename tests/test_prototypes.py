"""mlcl.prototypes.PrototypeBank (the paper) and mlcl.released.ReleasedBank: EMA update against
the released loop (tests/reference.py), absent classes, state_dict, the early-stop quirk and the
update under several processes (docs/method.md, "Paper versus release")."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

import pytest
import torch

from mlcl.prototypes import PrototypeBank, initialised
from mlcl.released import ReleasedBank
from reference import ref_bank_processes, ref_bank_update
from two_process_bank import start_and_shards

ROOT = Path(__file__).resolve().parents[1]

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
    bank = ReleasedBank(K, C, momentum=0.99, conf_thresh=0.95, early_stop=early_stop)
    g = torch.Generator().manual_seed(K)
    start = torch.randn(K, C, generator=g)
    start[torch.rand(K, generator=g) < 0.4] = 0  # some classes not yet initialised
    bank.protos.copy_(start)
    want = start
    for step in range(3):
        feats, labels, conf, valid = _batch(K, B, C, h, w, 100 * K + step)
        bank.update(feats, labels, conf, valid)
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
    assert initialised(bank.protos).tolist() == [True, True, False]
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
    paper, released = PrototypeBank(4, 2, 0.5, 0.5), ReleasedBank(4, 2, 0.5, 0.5, early_stop=True)
    paper.protos.copy_(start)
    released.protos.copy_(start)
    paper.update(feats, labels, ones, valid)
    released.update(feats, labels, ones, valid)
    want_paper = torch.tensor([[2.0, 0.0], [0.0, 4.0], [0.0, 2.0], [1.5, 1.5]])
    assert torch.allclose(paper.protos, want_paper)
    # released: 0 updated (before the initialisation), 1 initialised, 2 and 3 skipped
    assert torch.allclose(released.protos, torch.tensor([[2.0, 0.0], [0.0, 4.0], [0.0, 1.0],
                                                         [1.0, 1.0]]))
    # the flag does not persist: the next step updates every class again
    released.update(feats, labels, ones, valid)
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


# --------------------------------------------------------------------------- several processes
class ThreadedAllReduce:
    """n threads standing for n processes: ``reduce`` is an all-reduce over them."""

    def __init__(self, n: int):
        self.n, self.slots = n, [None] * n
        self.barrier = threading.Barrier(n)
        self.rank = threading.local()

    def reduce(self, tensor, reduction="mean"):
        self.slots[self.rank.value] = tensor.clone()
        self.barrier.wait()
        total = torch.stack(self.slots).sum(0)
        self.barrier.wait()  # every thread has read the slots before any writes again
        return total / self.n if reduction == "mean" else total


def _update_on_processes(start, shards, **kw):
    """Each shard's update on its own thread ("process"); the banks afterwards."""
    group = ThreadedAllReduce(len(shards))
    banks = [ReleasedBank(start.shape[0], start.shape[1], 0.9, 0.95, **kw) for _ in shards]

    def run(r):
        group.rank.value = r
        banks[r].protos.copy_(start)
        banks[r].update(*shards[r])

    with mock.patch("mlcl.prototypes.reduce", group.reduce):
        threads = [threading.Thread(target=run, args=(r,)) for r in range(len(shards))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return [b.protos for b in banks]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("early_stop", [False, True])
@pytest.mark.parametrize("average", [False, True])
def test_update_on_several_processes_matches_reference(n, early_stop, average):
    """Switch mlcl.bank_local_update: summed class statistics (default) = prote.py's loop on
    the global batch; averaged banks (released) = the loop per process, then the mean."""
    start = torch.randn(6, 4, generator=torch.Generator().manual_seed(n))
    start[[1, 4]] = 0
    shards = [_batch(6, 2, 4, 3, 3, 10 * n + r) for r in range(n)]
    banks = _update_on_processes(start, shards, early_stop=early_stop, average_banks=average)
    want = ref_bank_processes(start, shards, 0.9, 0.95, early_stop, average)
    for bank in banks:
        assert torch.allclose(bank, want, atol=1e-6)


def test_averaged_banks_differ_from_summed_statistics():
    """A class first seen on one of two processes becomes mean/2 with averaged banks."""
    start, shards = start_and_shards(2)
    summed = _update_on_processes(start, shards)[0]
    averaged = _update_on_processes(start, shards, average_banks=True)[0]
    only_0 = shards[0][0][0, :, 0, :2].mean(1)  # class 3: two features on process 0 only
    assert torch.allclose(summed[3], only_0, atol=1e-6)
    assert torch.allclose(averaged[3], only_0 / 2, atol=1e-6)
    assert torch.equal(summed[4], start[4]) and torch.equal(averaged[4], start[4])  # absent


@pytest.mark.slow
def test_two_real_processes_over_gloo(tmp_path):
    """The same two updates in two real processes (torch.distributed over gloo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "two_process_bank.py"),
                               str(tmp_path)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]
    start, shards = start_and_shards(2)
    for average in (False, True):
        want = ref_bank_processes(start, shards, 0.9, 0.95, False, average)
        for r in range(2):
            got = torch.load(tmp_path / f"rank{r}-average{int(average)}.pt", weights_only=True)
            assert torch.allclose(got, want, atol=1e-6), (r, average)

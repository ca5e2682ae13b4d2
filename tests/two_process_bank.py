"""Run by tests/test_prototypes.py as two processes (RANK 0/1 over gloo): each updates a
PrototypeBank from its own shard, in both synchronisation forms, and saves the banks."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import PartialState

from mlcl.released import ReleasedBank

K, C = 5, 3


def start_and_shards(n: int):
    """A bank with classes 0 and 3 still all zeros, and n shards of (feats, labels, conf,
    valid) with classes 0-2 anywhere and class 3 in the first two pixels of shard 0 only."""
    g = torch.Generator().manual_seed(7)
    start = torch.randn(K, C, generator=g)
    start[[0, 3]] = 0
    shards = []
    for r in range(n):
        feats = torch.randn(1, C, 3, 4, generator=g)
        labels = torch.randint(0, 3, (1, 3, 4), generator=g)
        conf = 0.9 + 0.1 * torch.rand(1, 3, 4, generator=g)
        valid = torch.rand(1, 3, 4, generator=g) > 0.1
        if r == 0:
            labels[0, 0, :2], conf[0, 0, :2], valid[0, 0, :2] = 3, 1.0, True
        shards.append((feats, labels, conf, valid))
    return start, shards


def main(out: Path) -> None:
    state = PartialState(cpu=True)
    start, shards = start_and_shards(state.num_processes)
    for average in (False, True):
        bank = ReleasedBank(K, C, momentum=0.9, conf_thresh=0.95, average_banks=average)
        bank.protos.copy_(start)
        bank.update(*shards[state.process_index])
        torch.save(bank.protos, out / f"rank{state.process_index}-average{int(average)}.pt")
    # leave together and tear the group down: a process exiting while the other still talks
    # to the store can abort in gloo's threads ("terminate called without an active exception")
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

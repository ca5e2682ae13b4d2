"""Training loaders whose every random draw is a pure function of (seed, epoch, sample,
stream), so that workers, processes and resumes cannot change a batch (docs/clusters.md)."""
from __future__ import annotations

import atexit
import gc
import signal
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from mlcl.config import Config

STREAMS = {"x": 1, "u": 2, "mix": 3}  # labeled, unlabeled, CutMix partner: draws and orders


def derive_seed(*parts: int) -> int:
    """A 63-bit seed, a pure function of the integers ``parts`` (mixed by SeedSequence)."""
    words = np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class DrawSampler(Sampler):
    """Keys ``(index, derive_seed(draw_seed_base, epoch, index))`` of the epoch set, in the
    order of a randperm seeded by derive_seed(order_seed, epoch) (``shuffle``) or 0..n-1."""

    def __init__(self, n: int, order_seed: int, draw_seed_base: int, shuffle: bool = True):
        self.n, self.order_seed, self.draw_seed_base = n, order_seed, draw_seed_base
        self.shuffle, self.epoch = shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = range(self.n)
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.order_seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        for i in order:
            yield i, derive_seed(self.draw_seed_base, self.epoch, i)

    def __len__(self) -> int:
        return self.n


def ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave SIGINT / SIGTERM (sent to the whole group) to the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_loader_workers() -> None:
    """Shut down the workers of every loader iterator still alive (at exit: otherwise those
    of one an error left referenced ignore multiprocessing's SIGTERM, which waits for ever)."""
    for obj in gc.get_objects():
        # type(), not isinstance(), which asks lazy modules for __class__ (and warns)
        if type(obj) is _MultiProcessingDataLoaderIter:
            obj._shutdown_workers()  # a no-op for an iterator already shut down


def worker_init(workers: int) -> Callable[[int], None] | None:
    """The ``worker_init_fn`` of a loader with ``workers`` workers (None for none)."""
    if workers == 0:
        return None
    atexit.unregister(stop_loader_workers)  # once, and last registered: run before the
    atexit.register(stop_loader_workers)    # handlers of multiprocessing and torch
    return ignore_stop_signals


def make_loader(dataset: Dataset, cfg: Config, *, shuffle: bool = True, seed: int,
                stream: int | None = None) -> DataLoader:
    """A training DataLoader (full batches) sampled by a :class:`DrawSampler` (order ``seed``,
    draws ``stream``, default ``seed``); its own generator spares the global torch RNG."""
    workers = cfg.data.num_workers
    sampler = DrawSampler(len(dataset), seed, seed if stream is None else stream, shuffle)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True,
                        num_workers=workers, worker_init_fn=worker_init(workers),
                        pin_memory=torch.cuda.is_available() and not cfg.train.cpu
                        and cfg.data.pin_memory,
                        persistent_workers=workers > 0 and cfg.data.persistent_workers,
                        generator=torch.Generator().manual_seed(seed))
    loader.draw_sampler = sampler  # reachable after accelerate wraps the loader
    return loader


def train_loaders(sets: dict[str, Dataset], cfg: Config) -> dict[str, DataLoader]:
    """'x' (labeled) and, semi-supervised, 'u' and the CutMix partner 'mix' (mix_partner=same:
    in the order of u, each image mixed with a second view; loader: its own; roll: none)."""
    def loader(split: str, name: str, order: str) -> DataLoader:
        return make_loader(sets[split], cfg, seed=derive_seed(cfg.seed, 0, STREAMS[order]),
                           stream=derive_seed(cfg.seed, 1, STREAMS[name]))

    loaders = {"x": loader("labeled", "x", "x")}
    if cfg.method != "supervised":
        loaders["u"] = loader("unlabeled", "u", "u")
        partner = cfg.train.mix_partner
        if partner in ("loader", "same"):
            loaders["mix"] = loader("unlabeled", "mix", "u" if partner == "same" else "mix")
    return loaders


def prepare_loaders(loaders: dict[str, DataLoader], accelerator) -> dict[str, Any]:
    """accelerate-prepared loaders (every N-th batch to each process) with their draw_sampler."""
    prepared = {name: accelerator.prepare(loader) for name, loader in loaders.items()}
    for name, loader in prepared.items():
        loader.draw_sampler = loaders[name].draw_sampler
    return prepared


def epoch_batches(loaders: dict[str, Any], epoch: int, skip: int, accelerator) -> Iterator[dict]:
    """Batches ``{name: batch}`` of ``epoch`` from its ``skip``-th step on (per process)."""
    iters = []
    for loader in loaders.values():
        loader.draw_sampler.set_epoch(epoch)
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)
        loader.set_epoch(epoch)  # keeps accelerate's own epoch counter in step
        iters.append(iter(loader))
    for batches in zip(*iters):  # until the shortest loader ends
        yield dict(zip(loaders, batches))

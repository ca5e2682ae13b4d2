"""The ``pipeline`` section: unlabeled samples per second through one loader worker."""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from typing import Any

import torch

from mlcl.config import load_config
from mlcl.data.datasets import UnlabeledDataset
from mlcl.study.synthetic import make_synthetic
from mlcl.loaders import make_loader


def bench_pipeline(a: argparse.Namespace) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        with tempfile.TemporaryDirectory(prefix="mlcl-bench-") as tmp:
            t0 = time.perf_counter()
            root = make_synthetic(tmp, num_train=a.pipeline_images, num_val=1,
                                  size=a.pipeline_image_size, classes=a.classes, seed=a.seed)
            written_s = time.perf_counter() - t0
            cfg = load_config(None, [f"data.root={root}", f"data.crop_size={a.pipeline_crop}",
                                     f"data.num_classes={a.classes}", "data.num_workers=0",
                                     "data.unlabeled_split=splits/train.txt",
                                     f"train.batch_size={a.pipeline_batch}", "train.cpu=true"])
            ds = UnlabeledDataset(cfg, cfg.split_path("unlabeled_split"))
            loader = make_loader(ds, cfg, shuffle=True, seed=a.seed)
            random.seed(a.seed)
            it = iter(loader)
            next(it)  # warm-up: first reads, imports
            n, t0 = 0, time.perf_counter()
            for epoch in range(a.pipeline_epochs):
                for batch in (it if epoch == 0 else loader):
                    n += batch["w"].shape[0]
            dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    rate = n / dt if n else float("nan")
    return {"samples_per_s": rate, "samples": n, "seconds": dt, "crop": a.pipeline_crop,
            "batch": a.pipeline_batch, "image_size": [a.pipeline_image_size] * 2,
            "images_written_s": written_s, "min_step_s_one_worker": a.pipeline_batch / rate,
            "what": "one in-process DataLoader (= one worker): JPEG decode, 3 views, ignore map, "
                    "2 CutMix boxes, collate; synthetic JPEGs (quality 95)"}


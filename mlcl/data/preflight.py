"""Pre-flight (docs/bad_input.md): every file a run will read is opened before its first
step; samples that passed are cached (``paths.cache_dir()/preflight``)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

from accelerate.utils import gather_object
from PIL import Image

from mlcl import paths
from mlcl.config import Config
from mlcl.data.datasets import load_mask
from mlcl.data.splits import DataError
from mlcl.files import atomic_write_json

Item = tuple[Path, Optional[Path]]  # (image, mask or None when the mask is not read)


def check_item(item: Item, num_classes: int, ignore_index: int) -> Optional[str]:
    """The problem with one sample, or None: its image decodes, its mask passes load_mask."""
    image, mask = item
    try:
        with Image.open(image) as im:
            size = im.size
            if im.format == "JPEG":
                im.draft("RGB", (max(size[0] // 8, 1), max(size[1] // 8, 1)))
            im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"cannot read image {image}: {e}"
    try:
        if mask is not None:
            load_mask(mask, num_classes, ignore_index, (image, size))
    except DataError as e:
        return str(e)
    return None


def cache_file(root: str | Path) -> Path:
    """Where the keys of a data root's samples that passed are kept (a JSON file)."""
    digest = hashlib.sha1(str(Path(root).expanduser().resolve()).encode()).hexdigest()
    return paths.cache_dir() / "preflight" / f"{digest[:16]}.json"


def cached(path: Path) -> set[str]:
    try:
        return set(json.loads(path.read_text())["passed"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def check(cfg: Config, sets: dict, accelerator=None, log: Callable[[str], None] = print) -> None:
    """Check this process's share of the samples of ``sets`` (a collective): one DataError,
    the same on every process, naming the first bad file and the number of problems."""
    rank, world = 0, 1
    if accelerator is not None:
        log, rank, world = accelerator.print, accelerator.process_index, accelerator.num_processes
    started = time.time()
    items = list({(s.image, None if name == "unlabeled" else s.mask): None
                  for name, ds in sets.items() for s in ds.samples})[rank::world]
    count, first, checked = share_problems(cfg, items, log)
    if world > 1:  # every process learns every process's problems
        shares = gather_object([(count, first)])
        count = sum(c for c, _ in shares)
        first = next((f for _, f in shares if f is not None), None)
    if count == 1:
        raise DataError(f"data pre-flight: {first}")
    if count:
        files = {name: str(ds.split_file) for name, ds in sets.items()}
        images_only = f" --unlabeled {files.pop('unlabeled')}" if "unlabeled" in files else ""
        splits = " ".join(sorted(set(files.values())))
        d = cfg.data
        raise DataError(f"data pre-flight: {count} bad samples, the first: {first} (all of "
                        f"them: python -m mlcl data verify --root {d.root} --layout {d.layout} "
                        f"--num-classes {d.num_classes} --ignore-index {d.ignore_index} "
                        f"--splits {splits}{images_only})")
    if checked:
        log(f"pre-flight: {len(items)} samples OK ({time.time() - started:.1f} s)")


def share_problems(cfg: Config, items: list[Item], log: Callable[[str], None]
                   ) -> tuple[int, Optional[str], int]:
    """(number of problems, the first or None, samples decoded) among ``items``: those the
    cache does not know (by K, ignore index, path, size, mtime) are decoded in threads."""
    d, cache = cfg.data, cache_file(cfg.data.root)
    known = cached(cache)
    try:
        keys = ["\n".join([f"{d.num_classes}|{d.ignore_index}"] + [
            f"{p}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in item if p is not None])
            for item in items]
    except OSError as e:  # a file vanished since the split was read
        return 1, str(e), 0
    todo = [(item, k) for item, k in zip(items, keys) if k not in known]
    if todo:
        log(f"pre-flight: checking {len(todo)} of {len(items)} samples "
            f"({len(items) - len(todo)} known good)")
    workers = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        found = list(pool.map(lambda t: check_item(t[0], d.num_classes, d.ignore_index), todo))
    passed = {k for (_, k), problem in zip(todo, found) if problem is None}
    if passed:  # merged with other processes' writes; failing only costs time
        with contextlib.suppress(OSError):
            atomic_write_json(cache, {"passed": sorted(cached(cache) | known | passed)})
    problems = [p for p in found if p is not None]
    return len(problems), (problems[0] if problems else None), len(todo)

"""Check a prepared dataset against its split files, naming every missing or bad file.

For each split file: its line count; that every listed image and mask exists; that the
image decodes in full (a truncated JPEG fails); that image and mask have the same size; that
the mask is single-channel with values in {0..K-1, 255} (``--no-values``: sizes only, no
decoding).
Lines are resolved the way the loaders resolve them (:mod:`mlcl.data.splits`: an id, or an
``image mask`` pair relative to the root); unlike the loaders, which stop at the first bad
line, every problem is collected. Each distinct file is checked once however many lists
name it.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from mlcl.data.classes import data_classes
from mlcl.data.preflight import decode_image
from mlcl.data.splits import DataError, parse_split
from mlcl.prepare.download import Log, say

IGNORE = 255
DEFAULT_CLASSES = {"voc": 21, "cityscapes": 19}


@dataclass
class SplitReport:
    """The result for one split file: its sample count and every problem found."""

    path: Path
    count: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    """The result for a dataset: one SplitReport per split file checked."""

    root: Path
    splits: list[SplitReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.splits) and not any(s.problems for s in self.splits)

    def lines(self, max_per_split: int = 20) -> list[str]:
        """The report as printed: a line per split, its first problems, then OK / FAILED."""
        out = [f"dataset {self.root}"]
        for s in self.splits:
            rel = s.path.relative_to(self.root) if s.path.is_relative_to(self.root) else s.path
            state = "OK" if not s.problems else f"{len(s.problems)} problem(s)"
            out.append(f"  {rel}: {s.count} samples, {state}")
            out += [f"    {p}" for p in s.problems[:max_per_split]]
            if len(s.problems) > max_per_split:
                out.append(f"    ... and {len(s.problems) - max_per_split} more")
        out.append("OK" if self.ok else "FAILED")
        return out


Entry = tuple[int, Path, Path]  # (line number, image, mask)


def parse_lines(path: Path, root: Path, layout: str) -> tuple[list[Entry], list[str]]:
    """(line number, image, mask) per entry of a split file, and the malformed lines."""
    entries, bad = parse_split(path, layout)
    return ([(lineno, root / image, root / mask) for lineno, _, image, mask in entries],
            [f"line {lineno}: {msg}" for lineno, msg in bad])


def check_pair(image: Path, mask: Path, num_classes: int, values: bool = True) -> list[str]:
    """Problems with one image/mask pair (empty when fine)."""
    problems = []
    if not image.is_file():
        problems.append(f"missing image {image}")
    if not mask.is_file():
        problems.append(f"missing mask {mask}")
    if problems:
        return problems
    if values:  # decode the whole image: a truncated file fails here, not in training
        try:
            decode_image(image)
        except DataError as e:
            return [str(e)]
    try:
        with Image.open(image) as im:
            isize = im.size
        with Image.open(mask) as m:
            msize = m.size
            arr = np.asarray(m) if values else None
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        return [f"unreadable {image.name} / {mask.name}: {type(e).__name__}: {e}"]
    if isize != msize:
        problems.append(f"size mismatch: image {image} is {isize[0]}x{isize[1]}, "
                        f"mask {mask} is {msize[0]}x{msize[1]}")
    if arr is not None:
        if arr.ndim != 2:
            problems.append(f"mask {mask} is not single-channel (shape {arr.shape})")
        else:
            found = np.unique(arr)
            bad = [int(v) for v in found if v >= num_classes and v != IGNORE]
            if bad:
                problems.append(f"mask {mask} has labels {bad} outside 0..{num_classes - 1} "
                                f"and {IGNORE}")
    return problems


def _resolve(p: Path, root: Path) -> Path:
    """A split file given relative to the data root (as in the config), else to the cwd."""
    return p if p.is_absolute() or not (root / p).is_file() else root / p


def default_splits(root: Path) -> list[Path]:
    return sorted(p for p in (root / "splits").rglob("*.txt")) if (root / "splits").is_dir() else []


def verify_dataset(root: str | Path, layout: str, splits: Optional[list[str | Path]] = None,
                   num_classes: Optional[int] = None, values: bool = True, workers: int = 4,
                   log: Log = say) -> Report:
    """Check ``splits`` (default: every ``*.txt`` under ``root/splits``) of the dataset, with
    ``num_classes`` classes (default: the root's classes.txt, else 21 for voc and 19 for
    cityscapes)."""
    root = Path(root)
    found = data_classes(root) if root.is_dir() else None
    k = num_classes or (len(found[1]) if found else DEFAULT_CLASSES[layout])
    report = Report(root)
    if not root.is_dir():
        report.splits.append(SplitReport(root, problems=[f"data root {root} does not exist"]))
        return report
    files = [_resolve(Path(s), root) for s in splits] if splits else default_splits(root)
    if not files:
        report.splits.append(SplitReport(root / "splits", problems=[
            f"no split files under {root / 'splits'}; pass --splits FILE ..."]))
        return report
    parsed = _parse_all(files, root, layout, report)
    pairs = sorted({(img, m) for entries in parsed.values() for _, img, m in entries})
    log(f"[verify] {root}: {len(files)} split files, {len(pairs)} distinct image/mask pairs")
    results = _check_pairs(pairs, k, values, workers, log)
    for sr in report.splits:
        for lineno, img, m in parsed.get(sr.path, []):
            sr.problems += [f"line {lineno}: {p}" for p in results[(img, m)]]
    return report


def _parse_all(files: list[Path], root: Path, layout: str, report: Report
               ) -> dict[Path, list[Entry]]:
    """Entries per readable split file; a SplitReport per file (count, malformed lines) is
    appended to ``report``."""
    parsed = {}
    for f in files:
        sr = SplitReport(f)
        report.splits.append(sr)
        if not f.is_file():
            sr.problems.append(f"split file {f} does not exist")
            continue
        entries, bad = parse_lines(f, root, layout)
        sr.count, sr.problems = len(entries), bad
        if not entries and not bad:
            sr.problems.append("lists no samples")
        parsed[f] = entries
    return parsed


def _check_pairs(pairs: list[tuple[Path, Path]], num_classes: int, values: bool, workers: int,
                 log: Log) -> dict[tuple[Path, Path], list[str]]:
    """:func:`check_pair` of every pair on ``workers`` threads (decoding releases the GIL);
    a progress line every tenth (at least every 500 pairs)."""
    done, step, lock = [0], max(len(pairs) // 10, 500), threading.Lock()

    def check(pair: tuple[Path, Path]) -> list[str]:
        problems = check_pair(*pair, num_classes, values)
        with lock:
            done[0] += 1
            if done[0] % step == 0:
                log(f"  checked {done[0]}/{len(pairs)}")
        return problems

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return dict(zip(pairs, pool.map(check, pairs)))

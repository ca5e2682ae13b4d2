"""Check a prepared dataset against its split files, naming every missing or bad file: lines
read as the loaders read them, each distinct pair checked once by training's pre-flight
(``values=False``: header sizes only); unlike the loaders, every problem is collected. An
unlabeled split (named ``unlabeled*.txt``, or listed as such) is read as training reads
data.unlabeled_split: its images only."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image

from mlcl.config import DataConfig
from mlcl.data.classes import CLASSES_FILE, HOW_TO_WRITE, data_classes
from mlcl.data.preflight import check_item
from mlcl.data.splits import DataError, parse_split
from mlcl.prepare.download import Log, say

IGNORE = DataConfig().ignore_index


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
            out.append(f"  {rel}: {s.count} samples, "
                       + (f"{len(s.problems)} problem(s)" if s.problems else "OK"))
            out += [f"    {p}" for p in s.problems[:max_per_split]]
            if len(s.problems) > max_per_split:
                out.append(f"    ... and {len(s.problems) - max_per_split} more")
        out.append("OK" if self.ok else "FAILED")
        return out


def check_pair(image: Path, mask: Optional[Path], num_classes: int, values: bool = True,
               ignore_index: int = IGNORE) -> list[str]:
    """Problems with one image/mask pair (empty when fine; a mask of None: the image only):
    the missing files, else the pre-flight's problem (``values``) or a header size mismatch."""
    problems = [f"missing {what} {p}" for what, p in (("image", image), ("mask", mask))
                if p is not None and not p.is_file()]
    if problems:
        return problems
    if values:
        problem = check_item((image, mask), num_classes, ignore_index)
        return [problem] if problem else []
    sizes = {}
    for what, path in (("image", image), ("mask", mask or image)):
        try:
            with Image.open(path) as im:  # the header only: nothing decoded
                sizes[what] = im.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return [f"cannot read {what} {path}: {e}"]
    if sizes["image"] != sizes["mask"]:
        (iw, ih), (mw, mh) = sizes["image"], sizes["mask"]
        return [f"mask {mask} is {mw}x{mh} but image {image} is {iw}x{ih}"]
    return []


def verify_dataset(root: str | Path, layout: str, splits: Optional[list[str | Path]] = None,
                   num_classes: Optional[int] = None, values: bool = True, workers: int = 4,
                   log: Log = say, ignore_index: int = IGNORE,
                   unlabeled: Optional[list[str | Path]] = None) -> Report:
    """Check ``splits`` (default: ``root/splits/**/*.txt``) and the ``unlabeled`` split files
    with ``num_classes`` classes (default: the root's classes.txt, else 21 for voc, 19 for
    cityscapes; the folder layout needs the file)."""
    root = Path(root)
    report = Report(root)
    if not root.is_dir():
        report.splits.append(SplitReport(root, problems=[f"data root {root} does not exist"]))
        return report
    classes = data_classes(root)
    if not (num_classes or classes) and layout == "folder":
        raise DataError(f"{root / CLASSES_FILE} does not exist: the folder layout names its "
                        f"classes there, {HOW_TO_WRITE}")
    k = num_classes or (len(classes[1]) if classes else {"voc": 21, "cityscapes": 19}[layout])
    # a split file given relative to the data root (as in the config), else to the cwd
    files, unlabeled = ([p if p.is_absolute() or not (root / p).is_file() else root / p
                         for p in map(Path, given)] for given in (splits or [], unlabeled or []))
    files = list(dict.fromkeys((files if splits else sorted((root / "splits").rglob("*.txt")))
                               + unlabeled))
    images_only = set(unlabeled) | {f for f in files if f.name.startswith("unlabeled")}
    if not files:
        report.splits.append(SplitReport(root / "splits", problems=[
            f"no split files under {root / 'splits'}; pass --splits FILE ..."]))
        return report
    parsed = {}  # readable split file -> its (line number, image, mask) entries
    for f in files:
        report.splits.append(sr := SplitReport(f))
        if not f.is_file():
            sr.problems.append(f"split file {f} does not exist")
            continue
        entries, bad = parse_split(f, layout)
        parsed[f] = [(lineno, root / image, None if f in images_only else root / mask)
                     for lineno, _, image, mask in entries]
        sr.count, sr.problems = len(entries), [f"line {n}: {msg}" for n, msg in bad]
        if not entries and not bad:
            sr.problems.append("lists no samples")
    pairs = sorted({(img, m) for entries in parsed.values() for _, img, m in entries},
                   key=str)
    log(f"[verify] {root}: {len(files)} split files, {len(pairs)} distinct image/mask pairs")
    results = _check_pairs(pairs, (k, values, ignore_index), workers, log)
    for sr in report.splits:
        for lineno, img, m in parsed.get(sr.path, []):
            sr.problems += [f"line {lineno}: {p}" for p in results[(img, m)]]
    return report


def _check_pairs(pairs: list[tuple[Path, Optional[Path]]], rules: tuple[int, bool, int],
                 workers: int, log: Log) -> dict[tuple[Path, Optional[Path]], list[str]]:
    """:func:`check_pair` of every pair with ``rules`` (num_classes, values, ignore_index) on
    ``workers`` threads (decoding releases the GIL), saying every tenth (>= 500) done."""
    results, step = {}, max(len(pairs) // 10, 500)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        checked = pool.map(lambda pair: check_pair(*pair, *rules), pairs)
        for n, (pair, problems) in enumerate(zip(pairs, checked), 1):
            results[pair] = problems
            if n % step == 0:
                log(f"  checked {n}/{len(pairs)}")
    return results

"""ADE20K (SceneParsing's ADEChallengeData2016) in the layout UniMatch V2's lists name
(docs/real_data.md): ``images/{training,validation}/*.jpg``, ``annotations/...`` with the 150
classes as 0..149 and ADE's 0 ("other") as 255, the ignored label; ``classes.txt``."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from mlcl.files import atomic_write
from mlcl.prepare.download import Log, PrepareError, Steps, check_counts, fetch, say
from mlcl.prepare.split_lists import STANDARD_POOLS, paired_samples
from mlcl.prepare.voc import Resource

ARCHIVES = (Resource("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
                     "ADEChallengeData2016.zip", "7328b3957e407ddae1d3cbf487f149ef"),)
IGNORE = 255
_MEMBER = re.compile(r"^(?:\./)?ADEChallengeData2016/((images|annotations)/"
                     r"(?:training|validation)/[^/]+\.(?:jpg|png)|objectInfo150\.txt)$")


def write_masks(jobs: dict[Path, Callable[[], np.ndarray]], what: str, log: Log = say) -> dict:
    """Each ``dest: make`` of ``jobs`` as a grayscale PNG (atomically, so an interrupted run
    resumes), a mask already there kept; the counts written and kept."""
    made = {"written": 0, "kept": 0}
    for k, (dest, make) in enumerate(jobs.items(), 1):
        if dest.is_file():
            made["kept"] += 1
        else:
            img = Image.fromarray(make().astype(np.uint8))  # 2-D uint8: mode L
            atomic_write(dest, lambda p: img.save(p, format="PNG"))
            made["written"] += 1
        if k % 2000 == 0:
            log(f"  {what}: {k}/{len(jobs)}")
    log(f"[ok] {what}: {made['written']} written, {made['kept']} already there")
    return made


def shifted(path: Path) -> np.ndarray:
    """ADE's mask at ``path`` (0 other, 1..150 the classes) as 0..149 with 0 -> IGNORE."""
    with Image.open(path) as im:
        a = np.asarray(im, dtype=np.int32)
    return np.where(a == 0, IGNORE, a - 1)


def class_names(info: Path) -> list[str]:
    """The 150 names of objectInfo150.txt (``Idx Ratio Train Val Name``), each its first
    synonym (``building, edifice`` -> ``building``), in index order."""
    rows = [ln.split(None, 4) for ln in info.read_text().splitlines()[1:] if ln.strip()]
    names = [r[-1].split(";")[0].split(",")[0].strip() for r in sorted(rows, key=lambda r:
                                                                         int(r[0]))]
    if len(names) != 150:
        raise PrepareError(f"{info} names {len(names)} classes, expected 150")
    return names


def prepare_ade20k(root: str | Path, downloads: Optional[str | Path] = None,
                   archives: tuple[Resource] = ARCHIVES, expected: Optional[dict[str, int]] = None,
                   force: bool = False, fetch_kw: Optional[dict] = None, log: Log = say) -> dict:
    """ADEChallengeData2016.zip downloaded (md5-checked) and extracted under ``root``, its
    annotations shifted (ignore 255), classes.txt; the counts, checked against ``expected``."""
    root = Path(root)
    downloads = Path(downloads) if downloads else root.parent / "downloads"
    expected = dict(STANDARD_POOLS["ade20k"] if expected is None else expected)
    steps, staging = Steps(root), root / ".staging"
    if force:
        steps.clear("ade20k", "ade20k-extract", "ade20k-masks")
    if (done := steps.get("ade20k")) and done.get("counts") == expected:
        log(f"[skip] ADE20K already prepared in {root}: {done['counts']}")
        return done["counts"]
    if not force and not steps.get("ade20k-extract") and (root / "annotations").exists():
        raise PrepareError(f"{root / 'annotations'} exists but this command did not write it "
                           f"(ADE's own 0..150 labels?): give an empty --root, or remove it")
    (ade,) = archives
    archive = fetch(ade.url, downloads / ade.filename, md5=ade.md5, **{"log": log,
                                                                       **(fetch_kw or {})})

    def select(name: str) -> Optional[str]:  # images into root, the rest staged
        m = _MEMBER.match(name)
        return m and (m.group(1) if m.group(2) == "images" else f".staging/{m.group(1)}")

    steps.extract_once("ade20k-extract", archive, root, select, log)
    if not steps.get("ade20k-masks"):
        raw = sorted((staging / "annotations").glob("*/*.png"))
        made = write_masks({root / p.relative_to(staging): (lambda p=p: shifted(p))
                            for p in raw}, "ADE20K masks (0 -> 255, k -> k-1)", log)
        names = class_names(staging / "objectInfo150.txt")
        (root / "classes.txt").write_text("".join(f"{n}\n" for n in names))
        steps.done("ade20k-masks", **made)
    return finish(root, "ade20k", "ADE20K", expected, log)


def finish(root: Path, dataset: str, what: str, expected: dict[str, int], log: Log = say) -> dict:
    """The last step of ADE20K's and COCO's preparation: the pools counted (every image with
    its mask) and checked against ``expected``, the staging folder removed; the counts."""
    counts = {pool: len(v) for pool, v in paired_samples(dataset, root).items()}
    check_counts(counts, expected, what)
    shutil.rmtree(root / ".staging", ignore_errors=True)
    Steps(root).done(dataset, counts=counts)
    log(f"[ok] {what} ready in {root}: {counts['train']} train, {counts['val']} val")
    return counts

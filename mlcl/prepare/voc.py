"""Pascal VOC 2012 + SBD in the layout UniMatch's split files name (docs/real_data.md):
``SegmentationClass`` the train_aug and val masks (VOC's fine one where there is one, else the
augmentation set's), ``SegmentationClassVOC`` VOC's as shipped, ``train_aug.txt``."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import scipy.io
from PIL import Image

from mlcl.data.palette import voc_palette
from mlcl.files import atomic_write
from mlcl.prepare.download import Log, PrepareError, Steps, check_counts, fetch, say
from mlcl.prepare.split_lists import STANDARD_POOLS


class Resource(NamedTuple):
    """An archive to download: where from, its name on disk and its md5."""

    url: str
    filename: str
    md5: str


VOC = Resource(
    url="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    filename="VOCtrainval_11-May-2012.tar", md5="6cd6e144f989b92b3379bac3b3de84fd")
SBD = Resource(
    url="https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
        "semantic_contours/benchmark.tgz",
    filename="benchmark.tgz", md5="82b4d87ceb2ed10f6038a1cba92111cb")
SEG_SETS = Path("ImageSets", "Segmentation")

_VOC_MEMBER = re.compile(r"^(?:\./)?VOCdevkit/VOC2012/"
                         r"(JPEGImages|SegmentationClass|ImageSets/Segmentation)/([^/]+)$")
_SBD_MEMBER = re.compile(
    r"^(?:\./)?benchmark_RELEASE/dataset/(cls/[^/]+\.mat|train\.txt|val\.txt)$")
_AUG_MEMBER = re.compile(r"(?:^|/)SegmentationClassAug/([^/]+\.png)$")


def read_ids(path: Path) -> list[str]:
    """The non-empty lines of an id list (ImageSets/Segmentation/*.txt, SBD's train/val)."""
    if not path.is_file():
        raise PrepareError(f"{path} is missing: the archive did not contain it")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def prepare_voc(root: str | Path, downloads: Optional[str | Path] = None, aug: str = "sbd",
                voc: Resource = VOC, sbd: Resource = SBD,
                expected: Optional[dict[str, int]] = None, keep_staging: bool = False,
                force: bool = False, fetch_kw: Optional[dict] = None, log: Log = say) -> dict:
    """VOC 2012 + ``aug`` (``"sbd"``, or a SegmentationClassAug folder or zip) under ``root``;
    the counts, checked against ``expected`` (default: the standard ones)."""
    root = Path(root)
    downloads = Path(downloads) if downloads else root.parent / "downloads"
    expected = dict(STANDARD_POOLS["pascal"] if expected is None else expected)
    fetch_kw = {"log": log, **(fetch_kw or {})}
    steps = Steps(root)
    if force:
        steps.clear("voc", "voc-extract", "sbd-extract", "aug-extract", "voc-masks")
    if (done := steps.get("voc")) and done.get("counts") == expected:
        log(f"[skip] VOC 2012 already prepared in {root}: {done['counts']}")
        return done["counts"]
    root.mkdir(parents=True, exist_ok=True)
    tar = fetch(voc.url, downloads / voc.filename, md5=voc.md5, **fetch_kw)
    train, val = extract_voc(tar, root, steps, log)
    staging = root / ".staging"
    if aug == "sbd":
        tgz = fetch(sbd.url, downloads / sbd.filename, md5=sbd.md5, **fetch_kw)
        source = sbd_source(tgz, staging, steps, log)
    else:
        source = aug_folder_source(aug, staging, steps, log)
    train_aug = sorted((set(train) | set(source)) - set(val))
    wanted = train_aug + sorted(set(val))
    build_masks(root, wanted, set(val), source, steps, log)
    (root / SEG_SETS / "train_aug.txt").write_text("".join(f"{i}\n" for i in train_aug))
    counts = {"train_aug": len(train_aug), "train": len(train), "val": len(val)}
    check_counts(counts, expected, "VOC 2012")
    n_masks = sum(1 for i in wanted if (root / "SegmentationClass" / f"{i}.png").is_file())
    if n_masks != len(wanted):
        raise PrepareError(f"SegmentationClass holds {n_masks} of {len(wanted)} masks; "
                           f"run again with --force to rebuild it")
    if staging.exists() and not keep_staging:
        shutil.rmtree(staging)
        steps.clear("sbd-extract", "aug-extract")
    steps.done("voc", counts=counts, aug=str(aug))
    log(f"[ok] VOC 2012 ready in {root}: {counts['train_aug']} train_aug, {counts['train']} "
        f"fine train, {counts['val']} val")
    return counts


def extract_voc(tar: Path, root: Path, steps: Steps, log: Log = say) -> tuple[list[str], list[str]]:
    """VOC trainval's images, fine masks and id lists into ``root``; the (train, val) ids."""
    steps.extract_once("voc-extract", tar, root, lambda name: (m := _VOC_MEMBER.match(name)) and (
        f"{m.group(1).replace('SegmentationClass', 'SegmentationClassVOC')}/{m.group(2)}"), log)
    return read_ids(root / SEG_SETS / "train.txt"), read_ids(root / SEG_SETS / "val.txt")


def sbd_source(tgz: Path, staging: Path, steps: Steps, log: Log = say) -> dict[str, Path]:
    """id -> mask of SBD's train and val lists (``cls/<id>.mat`` under ``staging/sbd``)."""
    sbd_dir = staging / "sbd"
    steps.extract_once("sbd-extract", tgz, sbd_dir,
                       lambda name: (m := _SBD_MEMBER.match(name)) and m.group(1), log)
    ids = read_ids(sbd_dir / "train.txt") + read_ids(sbd_dir / "val.txt")
    return {i: sbd_dir / "cls" / f"{i}.mat" for i in ids}


def aug_folder_source(aug: str, staging: Path, steps: Steps, log: Log = say) -> dict[str, Path]:
    """id -> mask of a SegmentationClassAug folder, or of a zip holding one (into staging)."""
    src = Path(aug).expanduser()
    if src.is_file():
        aug_dir = staging / "aug"
        steps.extract_once("aug-extract", src, aug_dir,
                           lambda name: (m := _AUG_MEMBER.search(name)) and m.group(1), log)
    elif src.is_dir():
        aug_dir = src
    else:
        raise PrepareError(f"--aug {aug}: give 'sbd', a SegmentationClassAug folder or a zip "
                           f"holding SegmentationClassAug/*.png")
    if not (masks := {p.stem: p for p in aug_dir.glob("*.png")}):
        raise PrepareError(f"{src}: no SegmentationClassAug/*.png masks found")
    return masks


def build_masks(root: Path, wanted: list[str], val: set[str], source: dict[str, Path],
                steps: Steps, log: Log = say) -> None:
    """``root/SegmentationClass/{id}.png`` for every id in ``wanted``: VOC's fine mask where
    there is one, else the augmentation set's (val ids must have a fine mask)."""
    if no_image := [i for i in wanted if not (root / "JPEGImages" / f"{i}.jpg").is_file()]:
        raise PrepareError(f"{len(no_image)} labelled ids have no JPEGImages/<id>.jpg "
                           f"(first: {', '.join(no_image[:5])}); is the VOC archive complete?")
    if steps.get("voc-masks"):
        log("[skip] SegmentationClass already built")
        return
    out, fine_dir = root / "SegmentationClass", root / "SegmentationClassVOC"
    out.mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    made = {"voc": 0, "aug": 0, "kept": 0}
    for k, i in enumerate(wanted, 1):
        made[_one_mask(i, out / f"{i}.png", fine_dir / f"{i}.png", i in val, source, palette)] += 1
        if k % 2000 == 0:
            log(f"  masks: {k}/{len(wanted)}")
    log(f"[ok] SegmentationClass: {made['voc']} VOC fine masks, {made['aug']} from the "
        f"augmentation set, {made['kept']} already there")
    steps.done("voc-masks", masks=len(wanted), **made)


def _one_mask(i: str, dst: Path, fine: Path, is_val: bool, source: dict[str, Path],
              palette: list[int]) -> str:
    """Write ``dst`` for id ``i``; return where it came from: "kept", "voc" or "aug"."""
    if dst.is_file():  # written atomically by an interrupted earlier run
        return "kept"
    if fine.is_file():
        atomic_write(dst, lambda p: shutil.copyfile(fine, p))
        return "voc"
    if is_val:
        raise PrepareError(f"val image {i} has no mask in {fine.parent}")
    src = source.get(i)
    if src is None or not src.is_file():
        raise PrepareError(f"{i}: no mask in {fine.parent} nor the augmentation set ({src})")
    if src.suffix == ".png":  # a SegmentationClassAug mask
        atomic_write(dst, lambda p: shutil.copyfile(src, p))
        return "aug"
    try:  # SBD's GTcls.Segmentation (class indices 0-20) as a VOC palette PNG
        mat = scipy.io.loadmat(src, squeeze_me=True, struct_as_record=False)
        img = Image.fromarray(np.asarray(mat["GTcls"].Segmentation, dtype=np.uint8))
    except Exception as e:  # noqa: BLE001 - any unreadable .mat is the same problem
        raise PrepareError(f"{src}: cannot read GTcls.Segmentation ({type(e).__name__}: {e})")
    img.putpalette(palette)
    atomic_write(dst, lambda p: img.save(p, format="PNG"))
    return "aug"

"""Pascal VOC 2012 with the SBD augmentation, in the layout UniMatch's split files name.

Result under ``root`` (e.g. data/VOC2012)::

    JPEGImages/{id}.jpg                 all 17,125 VOC 2012 trainval images
    SegmentationClass/{id}.png          the augmented label set: 10,582 train_aug + 1,449 val
                                        masks, palette PNGs (0-20, 255 = ignore)
    SegmentationClassVOC/{id}.png       VOC's own 2,913 fine masks, as shipped
    ImageSets/Segmentation/{train,val,trainval,train_aug}.txt   ids (1,464 / 1,449 / - / 10,582)
    splits/pascal/...                   written by the ``splits`` step (split_lists.py)

``train_aug`` = (VOC train ∪ SBD train ∪ SBD val) − VOC val. Where VOC has its own fine mask
(its 1,464 train and 1,449 val images) that mask is used; SBD's ``GTcls.Segmentation`` (or a
SegmentationClassAug folder you already have) fills the rest. That is how the usual
SegmentationClassAug was built and what UniMatch's ``SegmentationClass`` folder holds.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from mlcl.files import atomic_write
from mlcl.prepare.download import Log, PrepareError, Resource, Steps, extract, fetch, say

VOC = Resource(
    url="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    filename="VOCtrainval_11-May-2012.tar", md5="6cd6e144f989b92b3379bac3b3de84fd")
SBD = Resource(
    url="https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
        "semantic_contours/benchmark.tgz",
    filename="benchmark.tgz", md5="82b4d87ceb2ed10f6038a1cba92111cb")
COUNTS = {"train_aug": 10582, "train": 1464, "val": 1449}

_VOC_MEMBER = re.compile(
    r"^(?:\./)?VOCdevkit/VOC2012/"
    r"(JPEGImages|SegmentationClass|ImageSets/Segmentation)/([^/]+)$")
_SBD_MEMBER = re.compile(
    r"^(?:\./)?benchmark_RELEASE/dataset/(cls/[^/]+\.mat|train\.txt|val\.txt)$")
_AUG_MEMBER = re.compile(r"(?:^|/)SegmentationClassAug/([^/]+\.png)$")


def read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise PrepareError(f"{path} is missing: the archive did not contain it")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def sbd_mat_to_png(mat: Path, png: Path, palette: list[int]) -> None:
    """SBD's ``GTcls.Segmentation`` (class indices 0-20) as a VOC palette PNG."""
    import scipy.io

    try:
        seg = scipy.io.loadmat(mat, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
    except Exception as e:  # noqa: BLE001 - any unreadable .mat is the same problem
        raise PrepareError(f"{mat}: cannot read GTcls.Segmentation ({type(e).__name__}: {e})")
    img = Image.fromarray(np.asarray(seg, dtype=np.uint8))
    img.putpalette(palette)
    atomic_write(png, lambda p: img.save(p, format="PNG"))


def _check_counts(counts: dict[str, int], expected: dict[str, int], what: str) -> None:
    bad = [f"{k}: {counts.get(k)} (expected {v})" for k, v in expected.items()
           if counts.get(k) != v]
    if bad:
        raise PrepareError(f"{what} counts are wrong: {'; '.join(bad)}")


def prepare_voc(root: str | Path, downloads: Optional[str | Path] = None, aug: str = "sbd",
                voc: Resource = VOC, sbd: Resource = SBD,
                expected: Optional[dict[str, int]] = None, keep_staging: bool = False,
                force: bool = False, fetch_kw: Optional[dict] = None, log: Log = say) -> dict:
    """Download, extract and assemble VOC 2012 + augmentation under ``root``; return counts.

    ``aug`` is ``"sbd"`` (download SBD's benchmark.tgz and convert its .mat labels) or the
    path of a SegmentationClassAug folder or zip you already have. ``expected`` replaces the
    real counts (:data:`COUNTS`) for tests.
    """
    root = Path(root)
    downloads = Path(downloads) if downloads else root.parent / "downloads"
    expected = dict(COUNTS if expected is None else expected)
    fetch_kw = dict(fetch_kw or {})
    steps = Steps(root)
    if force:
        for s in ("voc", "voc-extract", "sbd-extract", "aug-extract", "voc-masks"):
            steps.clear(s)
    done = steps.get("voc")
    if done and done.get("counts") == expected:
        log(f"[skip] VOC 2012 already prepared in {root}: {done['counts']}")
        return done["counts"]
    root.mkdir(parents=True, exist_ok=True)
    from mlcl.data.synthetic import voc_palette

    # 1-2. VOC trainval: images, fine masks (kept as SegmentationClassVOC), segmentation lists
    tar = fetch(voc.url, downloads / voc.filename, md5=voc.md5, sha256=voc.sha256, log=log,
                **fetch_kw)
    if not steps.get("voc-extract"):
        def select_voc(name: str) -> Optional[str]:
            m = _VOC_MEMBER.match(name)
            if not m:
                return None
            folder = "SegmentationClassVOC" if m.group(1) == "SegmentationClass" else m.group(1)
            return f"{folder}/{m.group(2)}"

        n = extract(tar, root, select_voc, log)
        steps.done("voc-extract", archive=tar.name, files=n)
    else:
        log(f"[skip] {tar.name} already extracted")
    seg_sets = root / "ImageSets" / "Segmentation"
    train, val = read_ids(seg_sets / "train.txt"), read_ids(seg_sets / "val.txt")

    # 3. the augmentation source: SBD's .mat files, or a SegmentationClassAug folder / zip
    staging = root / ".staging"
    if aug == "sbd":
        tgz = fetch(sbd.url, downloads / sbd.filename, md5=sbd.md5, sha256=sbd.sha256, log=log,
                    **fetch_kw)
        sbd_dir = staging / "sbd"
        if not steps.get("sbd-extract"):
            n = extract(tgz, sbd_dir, lambda name: (m := _SBD_MEMBER.match(name)) and m.group(1),
                        log)
            steps.done("sbd-extract", archive=tgz.name, files=n)
        else:
            log(f"[skip] {tgz.name} already extracted")
        aug_ids = set(read_ids(sbd_dir / "train.txt")) | set(read_ids(sbd_dir / "val.txt"))

        def aug_source(i: str) -> Path:
            return sbd_dir / "cls" / f"{i}.mat"
    else:
        src = Path(aug).expanduser()
        if src.is_file():
            aug_dir = staging / "aug"
            if not steps.get("aug-extract"):
                n = extract(src, aug_dir,
                            lambda name: (m := _AUG_MEMBER.search(name)) and m.group(1), log)
                steps.done("aug-extract", archive=src.name, files=n)
        elif src.is_dir():
            aug_dir = src
        else:
            raise PrepareError(f"--aug {aug}: give 'sbd', a SegmentationClassAug folder or a zip "
                               f"holding SegmentationClassAug/*.png")
        aug_ids = {p.stem for p in aug_dir.glob("*.png")}
        if not aug_ids:
            raise PrepareError(f"{src}: no SegmentationClassAug/*.png masks found")

        def aug_source(i: str) -> Path:
            return aug_dir / f"{i}.png"

    # 4. the augmented label set
    val_set = set(val)
    train_aug = sorted((set(train) | aug_ids) - val_set)
    wanted = train_aug + sorted(val_set)
    no_image = [i for i in wanted if not (root / "JPEGImages" / f"{i}.jpg").is_file()]
    if no_image:
        raise PrepareError(f"{len(no_image)} labelled ids have no JPEGImages/<id>.jpg "
                           f"(first: {', '.join(no_image[:5])}); is the VOC archive complete?")
    out, fine_dir = root / "SegmentationClass", root / "SegmentationClassVOC"
    if not steps.get("voc-masks"):
        out.mkdir(parents=True, exist_ok=True)
        palette = voc_palette()
        made = {"voc": 0, "aug": 0, "kept": 0}
        for k, i in enumerate(wanted, 1):
            dst, fine = out / f"{i}.png", fine_dir / f"{i}.png"
            if dst.is_file():  # written atomically by an interrupted earlier run
                made["kept"] += 1
            elif fine.is_file():
                atomic_write(dst, lambda p: shutil.copyfile(fine, p))
                made["voc"] += 1
            elif i in val_set:
                raise PrepareError(f"val image {i} has no mask in {fine_dir}")
            else:
                src = aug_source(i)
                if not src.is_file():
                    raise PrepareError(f"{i}: listed by the augmentation set but {src} is missing")
                if src.suffix == ".mat":
                    sbd_mat_to_png(src, dst, palette)
                else:
                    atomic_write(dst, lambda p: shutil.copyfile(src, p))
                made["aug"] += 1
            if k % 2000 == 0:
                log(f"  masks: {k}/{len(wanted)}")
        log(f"[ok] SegmentationClass: {made['voc']} VOC fine masks, {made['aug']} from the "
            f"augmentation set, {made['kept']} already there")
        steps.done("voc-masks", masks=len(wanted), **made)
    else:
        log("[skip] SegmentationClass already built")
    (seg_sets / "train_aug.txt").write_text("".join(f"{i}\n" for i in train_aug))

    # 5. counts
    counts = {"train_aug": len(train_aug), "train": len(train), "val": len(val)}
    _check_counts(counts, expected, "VOC 2012")
    n_masks = sum(1 for i in wanted if (out / f"{i}.png").is_file())
    if n_masks != len(wanted):
        raise PrepareError(f"SegmentationClass holds {n_masks} of {len(wanted)} masks; "
                           f"run again with --force to rebuild it")
    if staging.exists() and not keep_staging:
        shutil.rmtree(staging)
        for s in ("sbd-extract", "aug-extract"):
            steps.clear(s)
    steps.done("voc", counts=counts, aug=str(aug))
    log(f"[ok] VOC 2012 ready in {root}: {counts['train_aug']} train_aug, {counts['train']} "
        f"fine train, {counts['val']} val")
    return counts

"""COCO 2017 as semantic segmentation in the layout UniMatch's lists name (docs/real_data.md):
``train2017/``, ``val2017/`` and ``masks/<id>.png`` (0 background, 1..80 the thing categories
in id order) painted from the instance annotations with pycocotools; ``classes.txt``."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from mlcl.prepare.ade20k import finish, write_masks
from mlcl.prepare.download import Log, PrepareError, Steps, fetch, say
from mlcl.prepare.split_lists import STANDARD_POOLS
from mlcl.prepare.voc import Resource

HOST = "http://images.cocodataset.org"
ARCHIVES = (Resource(f"{HOST}/zips/train2017.zip", "train2017.zip",
                     "cced6f7f71b7629ddf16f17bbcfab6b2"),
            Resource(f"{HOST}/zips/val2017.zip", "val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80"),
            Resource(f"{HOST}/annotations/annotations_trainval2017.zip",
                     "annotations_trainval2017.zip", "f4bbac642086de4f52a3fdda2de5fa2c"))
SPLITS = ("train2017", "val2017")
_MEMBER = re.compile(r"^(?:\./)?((?:train|val)2017/[^/]+\.jpg|"
                     r"annotations/instances_(?:train|val)2017\.json)$")


def category_classes(categories: list[dict]) -> dict[int, int]:
    """COCO category id -> class 1..80, in id order (the ids run 1..90 with gaps)."""
    return {c["id"]: k for k, c in enumerate(sorted(categories, key=lambda c: c["id"]), 1)}


def semantic_mask(coco, image_id: int, classes: dict[int, int]) -> np.ndarray:
    """(H, W) uint8 class map of one image of ``coco`` (a pycocotools COCO): 0 where no
    instance is, else its category's class; larger instances first, so a smaller one lying
    on a larger one keeps its pixels. Crowd regions count as their category."""
    info = coco.imgs[image_id]
    mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=lambda a: -a["area"])
    for ann in anns:
        mask[coco.annToMask(ann) > 0] = classes[ann["category_id"]]
    return mask


def make_masks(root: Path, split: str, log: Log = say) -> tuple[dict, list[str]]:
    """``root/masks/<id>.png`` of every image in ``split``'s instance file; (counts, the 80
    category names in class order)."""
    try:
        from pycocotools.coco import COCO  # only this step needs it
    except ImportError:
        raise PrepareError("COCO's masks need pycocotools: pip install -e '.[prepare]'") from None
    log(f"[masks] {split}: reading annotations/instances_{split}.json")
    coco = COCO(str(root / ".staging" / "annotations" / f"instances_{split}.json"))
    classes = category_classes(list(coco.cats.values()))
    jobs = {root / "masks" / f"{Path(coco.imgs[i]['file_name']).stem}.png":
            (lambda i=i: semantic_mask(coco, i, classes)) for i in sorted(coco.imgs)}
    names = [coco.cats[c]["name"] for c in sorted(classes, key=classes.get)]
    return write_masks(jobs, f"COCO {split} masks", log), names


def prepare_coco(root: str | Path, downloads: Optional[str | Path] = None,
                 archives: tuple[Resource, ...] = ARCHIVES,
                 expected: Optional[dict[str, int]] = None, force: bool = False,
                 fetch_kw: Optional[dict] = None, log: Log = say) -> dict:
    """The three 2017 zips downloaded (md5-checked), the images extracted under ``root``, a
    semantic mask per image, classes.txt; the counts, checked against ``expected``."""
    root = Path(root)
    downloads = Path(downloads) if downloads else root.parent / "downloads"
    expected = dict(STANDARD_POOLS["coco"] if expected is None else expected)
    steps = Steps(root)
    if force:
        steps.clear("coco", *(f"coco-extract-{r.filename}" for r in archives),
                    *(f"coco-masks-{s}" for s in SPLITS))
    if (done := steps.get("coco")) and done.get("counts") == expected:
        log(f"[skip] COCO already prepared in {root}: {done['counts']}")
        return done["counts"]
    extracted = [steps.get(f"coco-extract-{r.filename}") for r in archives]
    if not force and not any(extracted) and (root / "masks").exists():
        raise PrepareError(f"{root / 'masks'} exists but this command did not write it: give "
                           f"an empty --root, or remove it")
    kw = {"log": log, **(fetch_kw or {})}
    zips = [fetch(r.url, downloads / r.filename, md5=r.md5, **kw) for r in archives]

    def select(name: str) -> Optional[str]:  # images into root, the instance files staged
        m = _MEMBER.match(name)
        return m and (f".staging/{m.group(1)}" if m.group(1).endswith(".json") else m.group(1))

    for r, path in zip(archives, zips):
        steps.extract_once(f"coco-extract-{r.filename}", path, root, select, log)
    for split in SPLITS:
        if not steps.get(f"coco-masks-{split}"):
            made, names = make_masks(root, split, log)
            (root / "classes.txt").write_text("".join(f"{n}\n" for n in ["background", *names]))
            steps.done(f"coco-masks-{split}", **made)
    return finish(root, "coco", "COCO 2017", expected, log)

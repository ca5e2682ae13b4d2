"""COCO 2017 preparation end to end against tiny zips served on 127.0.0.1: the real download,
md5 checks, extraction, semantic masks painted from instance annotations by pycocotools,
classes.txt, split fetch and verify."""
from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from fakes import LocalServer
from mlcl.prepare import cli, coco
from mlcl.prepare.split_lists import SPLITS, UNIMATCH_COMMIT, UNIMATCH_REPO

pytest.importorskip("pycocotools")

W, H = 20, 16
IDS = {"train2017": [9, 25, 30], "val2017": [139, 285]}
EXPECT = "train=3,val=2"
# category ids with COCO's gaps: 1 -> class 1, 3 -> class 2, 90 -> class 3
CATEGORIES = [{"id": 90, "name": "toothbrush", "supercategory": "indoor"},
              {"id": 1, "name": "person", "supercategory": "person"},
              {"id": 3, "name": "car", "supercategory": "vehicle"}]


def box(x0, y0, x1, y1) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def instances(split: str) -> dict:
    """Image 0: a large person (ann first) with a small car on it and a crowd toothbrush; the
    other images: one car, or nothing (the third train image)."""
    ids = IDS[split]
    anns = [(ids[0], 1, box(0, 0, 14, 12), 0, 168.0), (ids[0], 3, box(4, 4, 8, 8), 0, 16.0),
            (ids[0], 90, box(16, 12, 20, 16), 1, 16.0), (ids[1], 3, box(2, 2, 6, 6), 0, 16.0)]
    return {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": W, "height": H}
                       for i in ids],
            "annotations": [{"id": k, "image_id": i, "category_id": c, "segmentation": s,
                             "iscrowd": crowd, "area": area, "bbox": [0, 0, 1, 1]}
                            for k, (i, c, s, crowd, area) in enumerate(anns, 1)],
            "categories": CATEGORIES}


def make_zips(folder) -> dict[str, bytes]:
    out = {}
    for split, ids in IDS.items():
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for i in ids:
                jpg = io.BytesIO()
                Image.new("RGB", (W, H), (i % 255, 80, 120)).save(jpg, "JPEG")
                zf.writestr(f"{split}/{i:012d}.jpg", jpg.getvalue())
        out[f"/zips/{split}.zip"] = buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split in IDS:
            zf.writestr(f"annotations/instances_{split}.json", json.dumps(instances(split)))
            zf.writestr(f"annotations/captions_{split}.json", "{}")
    out["/annotations/annotations_trainval2017.zip"] = buf.getvalue()
    return out


@pytest.fixture
def served(monkeypatch, tmp_path):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    zips = make_zips(tmp_path)

    def line(split, i):
        return f"{split}/{i:012d}.jpg masks/{i:012d}.png\n"

    train = IDS["train2017"]
    lists = {"val.txt": "".join(line("val2017", i) for i in IDS["val2017"])}
    for name, (_, d) in SPLITS["coco"].items():
        n = -(-len(train) // d)
        lists[f"{name}/labeled.txt"] = "".join(line("train2017", i) for i in train[:n])
        lists[f"{name}/unlabeled.txt"] = "".join(line("train2017", i) for i in train[n:])
    with LocalServer() as srv:
        for path, data in zips.items():
            srv.add(path, data)
        for rel, text in lists.items():
            srv.add(f"/{UNIMATCH_REPO}/{UNIMATCH_COMMIT}/splits/coco/{rel}", text.encode())
        md5 = ",".join(f"{p.rsplit('/', 1)[1]}={hashlib.md5(d).hexdigest()}"
                       for p, d in zips.items())
        yield srv, md5


def args(root, served, *extra):
    srv, md5 = served
    return ["coco", "--root", str(root), "--mirror", srv.url(), "--md5", md5, "--expect",
            EXPECT, "--split-base-url", srv.url(), "--backoff", "0", *extra]


def test_coco_end_to_end_then_a_second_run_is_a_noop(served, tmp_path, capsys):
    root = tmp_path / "coco"
    assert cli.main(args(root, served)) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "OK"
    first, second, empty = (np.asarray(Image.open(root / "masks" / f"{i:012d}.png"))
                            for i in IDS["train2017"])
    assert first.shape == (H, W) and first[1, 1] == 1  # the person
    assert first[5, 5] == 2, "the small car lies on the large person and keeps its pixels"
    assert first[14, 18] == 3  # the crowd toothbrush: category 90 -> class 3
    assert set(np.unique(first)) == {0, 1, 2, 3} and second[3, 3] == 2
    assert not empty.any(), "an image without instances is all background"
    assert (root / "masks" / f"{IDS['val2017'][0]:012d}.png").is_file()
    names = (root / "classes.txt").read_text().splitlines()
    assert names == ["background", "person", "car", "toothbrush"]
    assert not (root / ".staging").exists()
    srv, _ = served
    requests = len(srv.requests)
    assert cli.main(args(root, served)) == 0 and len(srv.requests) == requests
    assert "[skip] COCO already prepared" in capsys.readouterr().out


def test_coco_interrupted_while_painting_masks_resumes(served, tmp_path, capsys, monkeypatch):
    """Ctrl-C at val's second mask: exit 130; the next run keeps the masks written, paints the
    rest and downloads nothing again."""
    painted = []

    def interrupted(*a):
        if len(painted) == 4:  # 3 train masks, 1 val mask
            raise KeyboardInterrupt
        painted.append(a[1])
        return real(*a)

    real = coco.semantic_mask
    monkeypatch.setattr(coco, "semantic_mask", interrupted)
    root = tmp_path / "coco"
    assert cli.main(args(root, served)) == 130
    assert len(list((root / "masks").glob("*.png"))) == 4
    monkeypatch.setattr(coco, "semantic_mask", real)
    srv, _ = served
    requests = len(srv.requests)
    assert cli.main(args(root, served)) == 0
    out = capsys.readouterr().out
    assert "[ok] COCO val2017 masks: 1 written, 1 already there" in out
    assert len(list((root / "masks").glob("*.png"))) == 5
    assert not any("/zips/" in p for p in srv.paths_requested()[requests:])


def test_coco_wrong_counts_fail_naming_them(served, tmp_path, capsys):
    a = args(tmp_path / "coco", served)
    a[a.index("--expect") + 1] = "train=118287,val=5000"
    assert cli.main(a) == 1
    err = capsys.readouterr().err
    assert "train: 3 (expected 118287)" in err and "val: 2 (expected 5000)" in err

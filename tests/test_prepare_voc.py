"""VOC 2012 + SBD preparation end to end against fake archives served on 127.0.0.1: the real
download, checksum, extraction, .mat conversion, split fetch and verify code runs."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
import scipy.io
from PIL import Image

from mlcl.prepare import cli
from fakes import LocalServer, make_sbd_tgz, make_voc_tar, unimatch_lists, voc_ids
from mlcl.prepare.split_lists import SPLITS, UNIMATCH_COMMIT, UNIMATCH_REPO

TRAIN, VAL = voc_ids(4), voc_ids(3, start=4)
SBD_ONLY = voc_ids(5, year=2008)
SBD_TRAIN, SBD_VAL = TRAIN[:2] + SBD_ONLY[:3] + VAL[:1], SBD_ONLY[3:]  # SBD overlaps VOC val
TRAIN_AUG = sorted(set(TRAIN) | set(SBD_ONLY))
EXPECT = "train_aug=9,train=4,val=3"
ORIGINAL = ("92", "183", "366", "732", "1464")


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with LocalServer() as srv:
        yield srv


def serve_splits(srv: LocalServer) -> None:
    def size(name, pool):
        return -(-len(pool) // SPLITS["pascal"][name][1])

    lists = unimatch_lists("voc", TRAIN, VAL, {n: size(n, TRAIN) for n in ORIGINAL}, SBD_ONLY)
    lists.update(unimatch_lists("voc", TRAIN_AUG, VAL, {
        n: size(n, TRAIN_AUG) for n in SPLITS["pascal"] if n not in ORIGINAL}))
    for rel, text in lists.items():
        srv.add(f"/{UNIMATCH_REPO}/{UNIMATCH_COMMIT}/splits/pascal/{rel}", text.encode())


@pytest.fixture
def archives(server, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    voc = make_voc_tar(src / "voc.tar", TRAIN, VAL, extra=SBD_ONLY)
    sbd = make_sbd_tgz(src / "benchmark.tgz", SBD_TRAIN, SBD_VAL)
    out = {}
    for key, path in (("voc", voc), ("sbd", sbd)):
        data = path.read_bytes()
        out[key] = (server.add(f"/{path.name}", data), hashlib.md5(data).hexdigest(), path)
    serve_splits(server)
    return out


def voc_args(root, archives, server, *extra):
    (vurl, vmd5, _), (surl, smd5, _) = archives["voc"], archives["sbd"]
    return ["voc", "--root", str(root), "--downloads", str(root.parent / "downloads"),
            "--voc-url", vurl, "--voc-md5", vmd5, "--sbd-url", surl, "--sbd-md5", smd5,
            "--expect", EXPECT, "--split-base-url", server.url(), "--backoff", "0", *extra]


def test_voc_end_to_end_then_a_second_run_is_a_noop(server, archives, tmp_path, capsys):
    root = tmp_path / "VOC2012"
    assert cli.main(voc_args(root, archives, server)) == 0
    out = capsys.readouterr().out
    assert "OK" in out.splitlines()[-1]

    masks = sorted(p.stem for p in (root / "SegmentationClass").glob("*.png"))
    assert masks == sorted(TRAIN_AUG + VAL)
    assert (root / "ImageSets/Segmentation/train_aug.txt").read_text().split() == TRAIN_AUG
    # VOC's own fine masks win, byte for byte; SBD fills the rest from GTcls.Segmentation
    for i in TRAIN + VAL:
        assert ((root / "SegmentationClass" / f"{i}.png").read_bytes()
                == (root / "SegmentationClassVOC" / f"{i}.png").read_bytes())
    with tarfile.open(archives["sbd"][2]) as tar:
        for i in SBD_ONLY:
            mat = scipy.io.loadmat(io.BytesIO(tar.extractfile(
                f"benchmark_RELEASE/dataset/cls/{i}.mat").read()),
                squeeze_me=True, struct_as_record=False)
            png = Image.open(root / "SegmentationClass" / f"{i}.png")
            assert png.mode == "P"
            np.testing.assert_array_equal(np.asarray(png), mat["GTcls"].Segmentation)
    assert not (root / ".staging").exists()

    prov = json.loads((root / "splits/pascal/PROVENANCE.json").read_text())
    assert prov["standard"] is True and prov["commit"] == UNIMATCH_COMMIT
    assert set(prov["files"]) >= {"183/labeled.txt", "1_16/unlabeled.txt", "val.txt"}
    f = prov["files"]["183/labeled.txt"]
    assert UNIMATCH_COMMIT in f["url"] and len(f["sha256"]) == 64
    assert f["checksum"] == "recorded on first fetch" and f["fetched"]

    n = len(server.requests)
    assert cli.main(voc_args(root, archives, server)) == 0
    assert len(server.requests) == n, "a finished preparation must not touch the network"
    assert "[skip] VOC 2012 already prepared" in capsys.readouterr().out


def test_voc_from_a_segmentationclassaug_zip(server, archives, tmp_path):
    aug = tmp_path / "SegmentationClassAug.zip"
    with zipfile.ZipFile(aug, "w") as zf:
        for i in TRAIN_AUG:
            buf = io.BytesIO()
            Image.fromarray(np.full((24, 32), 7, np.uint8)).save(buf, "PNG")
            zf.writestr(f"SegmentationClassAug/{i}.png", buf.getvalue())
    root = tmp_path / "VOC2012"
    assert cli.main(voc_args(root, archives, server, "--aug", str(aug))) == 0
    assert "/benchmark.tgz" not in server.paths_requested()
    assert np.asarray(Image.open(root / "SegmentationClass" / f"{SBD_ONLY[0]}.png")).max() == 7
    assert len(list((root / "SegmentationClass").glob("*.png"))) == 12


def test_voc_wrong_counts_fail_clearly(server, archives, tmp_path, capsys):
    root = tmp_path / "VOC2012"
    args = voc_args(root, archives, server)
    args[args.index("--expect") + 1] = "train_aug=10582,train=1464,val=1449"
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "train_aug: 9 (expected 10582)" in err and "val: 3 (expected 1449)" in err


def test_voc_bad_archive_checksum_is_refused(server, archives, tmp_path, capsys):
    root = tmp_path / "VOC2012"
    args = voc_args(root, archives, server)
    args[args.index("--voc-md5") + 1] = "f" * 32
    assert cli.main(args) == 1
    assert "md5" in capsys.readouterr().err
    assert not list((tmp_path / "downloads").glob("VOCtrainval*"))

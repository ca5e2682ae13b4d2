"""ADE20K preparation end to end against a tiny ADEChallengeData2016.zip served on 127.0.0.1:
the real download, md5 check, extraction, label shift (0 -> 255, k -> k-1), classes.txt,
split fetch (UniMatch V2's repository) and verify."""
from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from fakes import LocalServer
from mlcl.prepare import cli
from mlcl.prepare.split_lists import NON_STANDARD, SOURCES, SPLITS, standard_size

TRAIN = [f"ADE_train_{k:08d}" for k in range(1, 5)]
VAL = [f"ADE_val_{k:08d}" for k in range(1, 3)]
EXPECT = "train=4,val=2"
NAMES = ["wall", "building", "sky"] + [f"thing{k}" for k in range(4, 151)]


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def raw_mask(k: int) -> np.ndarray:
    """ADE's own labels: 0 (other) in the top rows, then 1, 150 and k + 1."""
    a = np.zeros((12, 16), np.uint8)
    a[3:6], a[6:9], a[9:] = 1, 150, k + 1
    return a


def make_zip(path) -> None:
    info = "Idx\tRatio\tTrain\tVal\tName\n" + "".join(
        f"{k}\t0.01\t10\t1\t{n}{', synonym' * (k == 2)}\n" for k, n in enumerate(NAMES, 1))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ADEChallengeData2016/objectInfo150.txt", info)
        zf.writestr("ADEChallengeData2016/sceneCategories.txt", "unused\n")
        for k, (split, stem) in enumerate([("training", s) for s in TRAIN]
                                          + [("validation", s) for s in VAL]):
            buf = io.BytesIO()
            Image.new("RGB", (16, 12), (k * 40, 90, 160)).save(buf, "JPEG")
            zf.writestr(f"ADEChallengeData2016/images/{split}/{stem}.jpg", buf.getvalue())
            zf.writestr(f"ADEChallengeData2016/annotations/{split}/{stem}.png", png(raw_mask(k)))


@pytest.fixture
def served(monkeypatch, tmp_path):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    make_zip(tmp_path / "ade.zip")
    data = (tmp_path / "ade.zip").read_bytes()
    repo, commit = SOURCES["ade20k"]

    def line(split, stem):
        return f"images/{split}/{stem}.jpg annotations/{split}/{stem}.png\n"

    lists = {"val.txt": "".join(line("validation", s) for s in VAL)}
    for name, (_, d) in SPLITS["ade20k"].items():
        n = -(-len(TRAIN) // d)
        lists[f"{name}/labeled.txt"] = "".join(line("training", s) for s in TRAIN[:n])
        lists[f"{name}/unlabeled.txt"] = "".join(line("training", s) for s in TRAIN[n:])
    with LocalServer() as srv:
        srv.add("/places/ADEchallenge/ADEChallengeData2016.zip", data)
        for rel, text in lists.items():
            srv.add(f"/{repo}/{commit}/splits/ade20k/{rel}", text.encode())
        yield srv, hashlib.md5(data).hexdigest()


def args(root, served, *extra):
    srv, md5 = served
    return ["ade20k", "--root", str(root), "--mirror", srv.url(), "--md5",
            f"ADEChallengeData2016.zip={md5}", "--expect", EXPECT,
            "--split-base-url", srv.url(), "--backoff", "0", *extra]


def test_ade20k_end_to_end_then_a_second_run_is_a_noop(served, tmp_path, capsys):
    root = tmp_path / "ade20k"
    assert cli.main(args(root, served)) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "OK"
    for k, stem in enumerate(TRAIN):  # 0 (other) -> 255 ignored, k -> k - 1
        got = np.asarray(Image.open(root / "annotations" / "training" / f"{stem}.png"))
        want = np.where(raw_mask(k) == 0, 255, raw_mask(k).astype(int) - 1)
        np.testing.assert_array_equal(got, want)
    assert (root / "images" / "validation" / f"{VAL[0]}.jpg").is_file()
    names = (root / "classes.txt").read_text().splitlines()
    assert len(names) == 150 and names[:3] == ["wall", "building", "sky"]
    assert not (root / ".staging").exists()
    prov = json.loads((root / "splits" / "ade20k" / "PROVENANCE.json").read_text())
    assert (prov["repo"], prov["commit"]) == SOURCES["ade20k"] and prov["standard"] is True

    srv, _ = served
    n = len(srv.requests)
    assert cli.main(args(root, served)) == 0
    assert len(srv.requests) == n, "a finished preparation must not touch the network"
    assert "[skip] ADE20K already prepared" in capsys.readouterr().out


def test_ade20k_refuses_annotations_it_did_not_write(served, tmp_path, capsys):
    root = tmp_path / "ade20k"
    (root / "annotations" / "training").mkdir(parents=True)  # e.g. ADE unzipped by hand
    assert cli.main(args(root, served)) == 1
    err = capsys.readouterr().err
    assert str(root / "annotations") in err and "empty --root" in err


def test_ade20k_bad_md5_is_refused(served, tmp_path, capsys):
    a = args(tmp_path / "ade20k", served)
    a[a.index("--md5") + 1] = "ADEChallengeData2016.zip=" + "f" * 32
    assert cli.main(a) == 1
    assert "md5" in capsys.readouterr().err
    assert not list((tmp_path / "downloads").glob("ADEChallengeData2016.zip"))


def test_published_sizes_and_offline_stand_ins_of_ade20k_and_coco(served, tmp_path):
    """ADE20K's published sizes follow no divisor rule (631 = 1/32 of 20,210, not 632); COCO's
    are ⌈118,287 / d⌉. Offline, stand-ins of those sizes are drawn from the prepared images."""
    assert [standard_size("ade20k", n) for n in SPLITS["ade20k"]] == [
        316, 631, 1263, 2526, 5052, 10105]
    assert [standard_size("coco", n) for n in SPLITS["coco"]] == [232, 463, 925, 1849, 3697]
    root = tmp_path / "ade20k"
    assert cli.main(args(root, served, "--split-source", "none", "--no-verify")) == 0
    assert cli.main(["splits", "--dataset", "ade20k", "--root", str(root), "--split-source",
                     "generate", "--expect", EXPECT]) == 0
    lines = (root / "splits/ade20k/1_2/labeled.txt").read_text().splitlines()
    assert lines[0].startswith(NON_STANDARD) and len(lines) == 1 + 2
    assert all(ln.startswith("images/training/ADE_train_") for ln in lines[1:])

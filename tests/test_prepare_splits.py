"""Split lists: the standard sizes, fetch with recorded checksums, offline stand-ins."""
from __future__ import annotations

import json

import pytest

from mlcl.data.splits import read_split
from mlcl.study.synthetic import make_synthetic
from mlcl.prepare.download import ChecksumError, PrepareError, digests
from fakes import LocalServer, unimatch_lists
from mlcl.prepare import split_lists
from mlcl.prepare.split_lists import (KNOWN_BLOBS, NON_STANDARD, SPLITS, UNIMATCH_COMMIT,
                                      UNIMATCH_REPO, check_lists, fetch_splits, generate_splits,
                                      get_splits, split_files, standard_size)

STANDARD = {"pascal": {"92": 92, "183": 183, "366": 366, "732": 732, "1464": 1464,
                       "1_16": 662, "1_8": 1323, "1_4": 2646,
                       "u2pl_1_16": 662, "u2pl_1_8": 1323, "u2pl_1_4": 2646},
            "cityscapes": {"1_16": 186, "1_8": 372, "1_4": 744, "1_2": 1488}}


def quiet(msg):
    pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with LocalServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def synth_cs(tmp_path_factory):
    """A tiny Cityscapes-layout dataset (train 8, val 3)."""
    return make_synthetic(tmp_path_factory.mktemp("cs"), num_train=8, num_val=3, size=16,
                          layout="cityscapes")


def test_the_size_rule_gives_the_published_sizes():
    for dataset, sizes in STANDARD.items():
        assert set(sizes) == set(SPLITS[dataset])
        for name, n in sizes.items():
            assert standard_size(dataset, name) == n, (dataset, name)


def serve_cs(srv, root, sizes):
    train = sorted(p.relative_to(root / "leftImg8bit").as_posix().removesuffix("_leftImg8bit.png")
                   for p in (root / "leftImg8bit/train").glob("*/*.png"))
    val = sorted(p.relative_to(root / "leftImg8bit").as_posix().removesuffix("_leftImg8bit.png")
                 for p in (root / "leftImg8bit/val").glob("*/*.png"))
    for rel, text in unimatch_lists("cityscapes", train, val, sizes).items():
        srv.add(f"/{UNIMATCH_REPO}/{UNIMATCH_COMMIT}/splits/cityscapes/{rel}", text.encode())
    return train, val


def test_fetch_records_checksums_then_refuses_a_changed_file(server, synth_cs, tmp_path):
    sizes = {"1_16": 1, "1_8": 1, "1_4": 2, "1_2": 4}
    serve_cs(server, synth_cs, sizes)
    pools = {"train": 8, "val": 3}
    root = tmp_path / "root"
    out = fetch_splits("cityscapes", root, base_url=server.url(), pools=pools, log=quiet)
    prov = json.loads((out / "PROVENANCE.json").read_text())
    assert prov["standard"] and prov["commit"] == UNIMATCH_COMMIT and prov["repo"] == UNIMATCH_REPO
    assert prov["files"]["1_4/labeled.txt"]["lines"] == 2
    assert prov["labeled_counts"] == {"val": 3, **sizes}
    # the fetched lists resolve against the dataset they describe
    assert len(read_split(out / "1_2/labeled.txt", synth_cs, "cityscapes")) == 4

    # upstream content changes: the recorded sha256 refuses it, the bad file is removed
    key = f"/{UNIMATCH_REPO}/{UNIMATCH_COMMIT}/splits/cityscapes/1_4/labeled.txt"
    server.files[key] = server.files[key] + b"\n"
    (out / "1_4/labeled.txt").write_text("tampered\n")
    with pytest.raises(ChecksumError, match="sha256"):
        fetch_splits("cityscapes", root, base_url=server.url(), pools=pools, log=quiet)
    assert not (out / "1_4/labeled.txt").exists()


def test_every_standard_list_has_its_git_blob_id_pinned(tmp_path):
    for dataset in SPLITS:
        for rel in split_files(dataset):
            blob = KNOWN_BLOBS[f"{dataset}/{rel}"]
            assert len(blob) == 40 and int(blob, 16) >= 0, (dataset, rel)
    assert len(set(KNOWN_BLOBS.values())) == len(KNOWN_BLOBS)  # no file listed twice
    (tmp_path / "hello").write_bytes(b"hello\n")  # `git hash-object` of it, a known value
    assert digests(tmp_path / "hello", ("git_blob",))["git_blob"] == \
        "ce013625030ba8dba906f756967f9e9ca394464a"


def test_a_list_from_github_must_be_the_pinned_blob(server, synth_cs, tmp_path, monkeypatch):
    serve_cs(server, synth_cs, {"1_16": 1, "1_8": 1, "1_4": 2, "1_2": 4})
    monkeypatch.setattr(split_lists, "RAW_BASE", server.url())  # the server stands for GitHub
    prefix = f"/{UNIMATCH_REPO}/{UNIMATCH_COMMIT}/splits/"
    served = {k[len(prefix):]: v for k, v in server.files.items() if k.startswith(prefix)}
    blobs = {}
    for key, data in served.items():
        (tmp_path / "blob").write_bytes(data)
        blobs[key] = digests(tmp_path / "blob", ("git_blob",))["git_blob"]
    pools = {"train": 8, "val": 3}
    # one list differs from the pinned commit's: refused, deleted, named
    monkeypatch.setattr(split_lists, "KNOWN_BLOBS",
                        {**blobs, "cityscapes/1_4/labeled.txt": KNOWN_BLOBS[
                            "cityscapes/1_4/labeled.txt"]})
    with pytest.raises(ChecksumError, match="splits/cityscapes/1_4/labeled.txt .* git blob"):
        fetch_splits("cityscapes", tmp_path / "a", base_url=server.url(), pools=pools, log=quiet)
    assert not (tmp_path / "a/splits/cityscapes/1_4/labeled.txt").exists()
    # every list the pinned blob: accepted, and PROVENANCE says how it was checked
    monkeypatch.setattr(split_lists, "KNOWN_BLOBS", blobs)
    out = fetch_splits("cityscapes", tmp_path / "a", base_url=server.url(), pools=pools,
                       log=quiet)
    prov = json.loads((out / "PROVENANCE.json").read_text())
    assert {f["checksum"] for f in prov["files"].values()} == {"git blob id pinned in code"}


def test_fetched_lists_with_wrong_counts_are_rejected(server, synth_cs, tmp_path):
    serve_cs(server, synth_cs, {"1_16": 1, "1_8": 1, "1_4": 3, "1_2": 4})  # 1_4 should be 2
    with pytest.raises(PrepareError, match="1_4/labeled.txt has 3 lines, expected 2"):
        fetch_splits("cityscapes", tmp_path, base_url=server.url(),
                     pools={"train": 8, "val": 3}, log=quiet)


def test_generate_is_seeded_nested_and_marked(synth_cs, tmp_path):
    import shutil

    root = tmp_path / "cs"
    shutil.copytree(synth_cs, root)
    shutil.rmtree(root / "splits")
    out = generate_splits("cityscapes", root, seed=3, log=quiet)
    first = {p.name + str(p.parent.name): p.read_text() for p in out.rglob("*.txt")}
    generate_splits("cityscapes", root, seed=3, log=quiet)
    assert first == {p.name + str(p.parent.name): p.read_text() for p in out.rglob("*.txt")}
    lab = {n: {s.image for s in read_split(out / n / "labeled.txt", root, "cityscapes")}
           for n in SPLITS["cityscapes"]}
    assert [len(lab[n]) for n in ("1_16", "1_8", "1_4", "1_2")] == [1, 1, 2, 4]
    assert lab["1_16"] <= lab["1_8"] <= lab["1_4"] <= lab["1_2"]
    for f in out.rglob("*.txt"):
        assert f.read_text().startswith(NON_STANDARD)
    prov = json.loads((out / "PROVENANCE.json").read_text())
    assert prov["standard"] is False and "NON-STANDARD" in prov["source"]
    check_lists(out, "cityscapes", list(SPLITS["cityscapes"]), {"train": 8, "val": 3})
    # generated lists never silently replace standard ones, nor the other way round
    with pytest.raises(PrepareError, match="NON-STANDARD"):
        fetch_splits("cityscapes", root, base_url="http://127.0.0.1:9", log=quiet)


def test_auto_falls_back_to_generated_lists_when_offline(synth_cs, tmp_path):
    import shutil

    root = tmp_path / "cs"
    shutil.copytree(synth_cs, root)
    srv = LocalServer()  # nothing listens on its port once closed
    url = srv.url()
    srv.httpd.server_close()
    logs = []
    out = get_splits("cityscapes", root, mode="auto", base_url=url, log=logs.append,
                     fetch_kw={"retries": 1, "backoff": 0, "timeout": 2})
    assert any("NON-STANDARD" in m for m in logs)
    assert json.loads((out / "PROVENANCE.json").read_text())["standard"] is False


def test_generate_pascal_from_prepared_id_lists(tmp_path):
    root = tmp_path / "voc"
    sets = root / "ImageSets/Segmentation"
    sets.mkdir(parents=True)
    train = [f"2007_{i:06d}" for i in range(20)]
    extra = [f"2008_{i:06d}" for i in range(30)]
    val = [f"2009_{i:06d}" for i in range(5)]
    (sets / "train.txt").write_text("\n".join(train))
    (sets / "train_aug.txt").write_text("\n".join(train + extra))
    (sets / "val.txt").write_text("\n".join(val))
    out = generate_splits("pascal", root, log=quiet)
    pools = {"train": 20, "train_aug": 50, "val": 5}
    counts = check_lists(out, "pascal", list(SPLITS["pascal"]), pools)
    assert counts["92"] == 2 and counts["1464"] == 20 and counts["1_16"] == 4
    labeled = (out / "183/labeled.txt").read_text().splitlines()[1:]
    assert all(ln.split()[0].removeprefix("JPEGImages/").removesuffix(".jpg") in train
               for ln in labeled), "the original protocol draws from the 1,464 fine set"

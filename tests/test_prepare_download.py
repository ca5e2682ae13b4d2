"""mlcl.prepare.download: resumable, checksum-verified fetch and safe extraction, against a
loopback HTTP server started by the test."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile

import pytest

from mlcl.prepare.download import (ChecksumError, DownloadError, PrepareError, extract, fetch,
                                   marker_path)
from fakes import LocalServer

DATA = bytes(range(256)) * 4000  # ~1 MB: several CHUNKs
MD5 = hashlib.md5(DATA).hexdigest()
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with LocalServer() as srv:
        yield srv


def quiet(msg):  # collect nothing, print nothing
    pass


def test_fetch_verifies_and_a_second_run_is_a_noop(server, tmp_path):
    url = server.add("/f.bin", DATA)
    dest = fetch(url, tmp_path / "f.bin", md5=MD5, log=quiet, backoff=0)
    assert dest.read_bytes() == DATA
    info = json.loads(marker_path(dest).read_text())
    assert info["md5"] == MD5 and info["sha256"] == SHA and info["bytes"] == len(DATA)
    assert not (tmp_path / "f.bin.part").exists()
    n = len(server.requests)
    logs = []
    fetch(url, dest, md5=MD5, log=logs.append)
    assert len(server.requests) == n, "a verified file must not be fetched again"
    assert any("[skip]" in m for m in logs)


def test_resume_from_a_partial_file_uses_range(server, tmp_path):
    url = server.add("/f.bin", DATA)
    (tmp_path / "f.bin.part").write_bytes(DATA[:300_000])
    fetch(url, tmp_path / "f.bin", sha256=SHA, log=quiet, backoff=0)
    assert (tmp_path / "f.bin").read_bytes() == DATA
    (_, _, headers), = server.requests
    assert headers.get("Range") == "bytes=300000-"


def test_dropped_connection_is_resumed(server, tmp_path):
    url = server.add("/f.bin", DATA)
    server.truncate["/f.bin"] = 123_456  # first answer stops after 123,456 bytes
    fetch(url, tmp_path / "f.bin", md5=MD5, log=quiet, backoff=0)
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert len(server.requests) == 2
    assert server.requests[1][2].get("Range") == "bytes=123456-"


def test_complete_part_file_answered_416_is_verified(server, tmp_path):
    url = server.add("/f.bin", DATA)
    (tmp_path / "f.bin.part").write_bytes(DATA)
    fetch(url, tmp_path / "f.bin", md5=MD5, log=quiet, backoff=0)
    assert (tmp_path / "f.bin").read_bytes() == DATA


def test_wrong_checksum_is_refused_and_the_file_removed(server, tmp_path):
    url = server.add("/f.bin", DATA)
    with pytest.raises(ChecksumError, match="removed"):
        fetch(url, tmp_path / "f.bin", md5="0" * 32, log=quiet, backoff=0)
    assert not (tmp_path / "f.bin").exists()
    assert not (tmp_path / "f.bin.part").exists()
    assert not marker_path(tmp_path / "f.bin").exists()


def test_a_file_on_disk_with_a_bad_checksum_is_replaced(server, tmp_path):
    url = server.add("/f.bin", DATA)
    (tmp_path / "f.bin").write_bytes(b"corrupt")
    fetch(url, tmp_path / "f.bin", md5=MD5, log=quiet, backoff=0)
    assert (tmp_path / "f.bin").read_bytes() == DATA


def test_http_404_is_an_error_without_retries(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        fetch(server.url("/nope"), tmp_path / "x", log=quiet, backoff=0)
    assert len(server.requests) == 1


def test_unreachable_host_gives_up_after_the_retries(tmp_path):
    srv = LocalServer()  # bound, never started, then closed: nothing listens on the port
    url = srv.url("/f.bin")
    srv.httpd.server_close()
    with pytest.raises(DownloadError, match="gave up after 2 attempts"):
        fetch(url, tmp_path / "f.bin", retries=2, backoff=0, timeout=2, log=quiet)


def test_extract_selects_strips_and_refuses_traversal(tmp_path):
    tar_path = tmp_path / "a.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in (("top/keep/a.txt", b"a"), ("top/skip/b.txt", b"b")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    n = extract(tar_path, tmp_path / "out",
                lambda name: name.removeprefix("top/") if "/keep/" in name else None, quiet)
    assert n == 1 and (tmp_path / "out" / "keep" / "a.txt").read_bytes() == b"a"
    assert not (tmp_path / "out" / "skip").exists()

    zip_path = tmp_path / "evil.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("../evil.txt", "x")
    with pytest.raises(PrepareError, match="refusing"):
        extract(zip_path, tmp_path / "out", lambda name: name, quiet)
    assert not (tmp_path / "evil.txt").exists()

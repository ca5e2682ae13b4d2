"""Tiny stand-ins for the real archives, and a loopback HTTP server to serve them.

The real archives cannot be downloaded in tests (or CI), so the tests build archives with the
real folder structure and file naming (a few images each) and serve them from
:class:`LocalServer` on 127.0.0.1, so the real download, resume, checksum and extraction code
runs. Nothing here listens on anything but the loopback address.

    with LocalServer() as srv:
        srv.add("/voc.tar", make_voc_tar(tmp / "voc.tar", ...).read_bytes())
        fetch(srv.url("/voc.tar"), dest)
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

# ids and UniMatch-format lists are the package's (the rehearsal fabricates datasets with them)
from mlcl.measure.fabricate import cityscapes_ids, unimatch_lists, voc_ids  # noqa: F401

LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------- server
class LocalServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) serving in-memory files.

    ``add(path, data)`` serves bytes with ``Range: bytes=N-`` support (206 / 416);
    ``truncate[path] = n`` makes the next GET of ``path`` send only ``n`` body bytes and drop
    the connection; ``routes[path] = fn(handler, method, query, body)`` handles anything else.
    ``requests`` records (method, path, headers) of every request.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate: dict[str, int] = {}
        self.routes: dict[str, Callable] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self, method: str) -> None:
                with server._lock:
                    server.requests.append((method, self.path, dict(self.headers)))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                route = server.routes.get(parts.path)
                if route is not None:
                    route(self, method, parse_qs(parts.query, keep_blank_values=True), body)
                elif method == "GET" and parts.path in server.files:
                    server._send_file(self, parts.path)
                else:
                    self.send_bytes(404, b"not found")

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def send_bytes(self, code: int, data: bytes, headers: Optional[dict] = None) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: Optional[threading.Thread] = None

    def _send_file(self, h, path: str) -> None:
        data = self.files[path]
        rng = re.match(r"bytes=(\d+)-(\d*)$", h.headers.get("Range", ""))
        start, code, headers = 0, 200, {"Accept-Ranges": "bytes"}
        if rng:
            start = int(rng.group(1))
            end = int(rng.group(2)) if rng.group(2) else len(data) - 1
            if start >= len(data):
                h.send_bytes(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            code = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data = data[start:end + 1]
        with self._lock:
            cut = self.truncate.pop(path, None)
        if cut is None:
            h.send_bytes(code, data, headers)
            return
        h.send_response(code)  # promise the whole body, send part of it, hang up
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data[:cut])
        h.wfile.flush()
        h.close_connection = True

    def add(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.url(path)

    def url(self, path: str = "") -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    def paths_requested(self) -> list[str]:
        return [p for _, p, _ in self.requests]

    def start(self) -> "LocalServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_cityscapes(server: LocalServer, packages: dict[str, bytes], username: str,
                     password: str, md5s: Optional[dict[str, str]] = None) -> None:
    """Mimic the endpoints of www.cityscapes-dataset.com that cityscapesscripts' downloader
    uses: GET/POST /login (302 on the right credentials), /downloads/?list,
    /md5-sum/?packageID=N (``md5s`` overrides the true sums) and /file-handling/?packageID=N
    (with Range)."""
    md5s = md5s or {}
    ids = {name: str(i + 1) for i, name in enumerate(sorted(packages))}
    for name, data in packages.items():
        server.files[f"/pkg/{ids[name]}"] = data

    def login(h, method, query, body):
        if method == "GET":
            h.send_bytes(200, b"<form>login</form>")
            return
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if form.get("username") == username and form.get("password") == password:
            h.send_bytes(302, b"", {"Location": "/"})
        else:
            h.send_bytes(200, b"<form>wrong password</form>")

    def listing(h, method, query, body):
        h.send_bytes(200, json.dumps([
            {"name": n, "packageID": ids[n], "size": f"{max(len(d) / 1024, 0.1):.1f} KB",
             "thirdparty": "0"} for n, d in packages.items()]).encode(),
                     {"Content-Type": "application/json"})

    def md5(h, method, query, body):
        name = {v: k for k, v in ids.items()}[query["packageID"][0]]
        md5 = md5s.get(name) or hashlib.md5(packages[name]).hexdigest()
        h.send_bytes(200, f"{md5}  {name}\n".encode())

    def file(h, method, query, body):
        server._send_file(h, f"/pkg/{query['packageID'][0]}")

    server.routes.update({"/login": login, "/downloads/": listing, "/md5-sum/": md5,
                          "/file-handling/": file})


# --------------------------------------------------------------------------- archives
def _png(arr: np.ndarray, palette: Optional[list[int]] = None) -> bytes:
    img = Image.fromarray(arr)
    if palette is not None:
        img.putpalette(palette)  # L -> P, indices kept
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpg(h: int, w: int, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _labels(h: int, w: int, rng: np.random.Generator, classes: int, border: bool) -> np.ndarray:
    """Background with one rectangle of a random class; a 255 band around it if ``border``."""
    m = np.zeros((h, w), np.uint8)
    c = int(rng.integers(1, classes))
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    m[y0:y0 + h // 3, x0:x0 + w // 3] = c
    if border:
        m[max(y0 - 1, 0), x0:x0 + w // 3] = 255
    return m


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_voc_tar(path: str | Path, train: list[str], val: list[str], extra: list[str] = (),
                 size: tuple[int, int] = (24, 32), seed: int = 0) -> Path:
    """VOCtrainval-style tar: ``VOCdevkit/VOC2012/{JPEGImages, SegmentationClass,
    ImageSets/Segmentation, Annotations}``. ``extra`` ids get an image but no mask (the images
    that only SBD annotates)."""
    from mlcl.data.palette import voc_palette

    path, rng, (h, w) = Path(path), np.random.default_rng(seed), size
    base = "VOCdevkit/VOC2012"
    with tarfile.open(path, "w") as tar:
        for i in sorted(set(train) | set(val) | set(extra)):
            _add(tar, f"{base}/JPEGImages/{i}.jpg", _jpg(h, w, rng))
            _add(tar, f"{base}/Annotations/{i}.xml", b"<annotation/>")
        for i in sorted(set(train) | set(val)):
            _add(tar, f"{base}/SegmentationClass/{i}.png",
                 _png(_labels(h, w, rng, 21, border=True), voc_palette()))
        for name, ids in (("train", train), ("val", val), ("trainval", list(train) + list(val))):
            _add(tar, f"{base}/ImageSets/Segmentation/{name}.txt",
                 "".join(f"{i}\n" for i in ids).encode())
    return path


def make_sbd_tgz(path: str | Path, train: list[str], val: list[str],
                 size: tuple[int, int] = (24, 32), seed: int = 1) -> Path:
    """SBD-style ``benchmark.tgz``: ``benchmark_RELEASE/dataset/{cls/*.mat, img/*.jpg,
    train.txt, val.txt}``; each .mat holds a struct ``GTcls`` with ``Segmentation``."""
    import scipy.io

    path, rng, (h, w) = Path(path), np.random.default_rng(seed), size
    base = "benchmark_RELEASE/dataset"
    with tarfile.open(path, "w:gz") as tar:
        for i in sorted(set(train) | set(val)):
            seg = _labels(h, w, rng, 21, border=False)
            buf = io.BytesIO()
            present = np.unique(seg[seg > 0]).astype(np.uint8)
            scipy.io.savemat(buf, {"GTcls": {"Segmentation": seg, "CategoriesPresent": present}})
            _add(tar, f"{base}/cls/{i}.mat", buf.getvalue())
            _add(tar, f"{base}/img/{i}.jpg", _jpg(h, w, rng))
        _add(tar, f"{base}/train.txt", "".join(f"{i}\n" for i in train).encode())
        _add(tar, f"{base}/val.txt", "".join(f"{i}\n" for i in val).encode())
    return path


def make_cityscapes_zips(out_dir: str | Path, train: list[str], val: list[str],
                         test: list[str] = (), size: tuple[int, int] = (16, 32),
                         seed: int = 2) -> dict[str, Path]:
    """``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` with the real naming;
    the gtFine zip holds ``*_gtFine_polygons.json`` (what createTrainIdLabelImgs reads) and
    ``*_gtFine_labelIds.png``."""
    out_dir, rng, (h, w) = Path(out_dir), np.random.default_rng(seed), size
    out_dir.mkdir(parents=True, exist_ok=True)
    left, fine = out_dir / "leftImg8bit_trainvaltest.zip", out_dir / "gtFine_trainvaltest.zip"
    with zipfile.ZipFile(left, "w") as zl, zipfile.ZipFile(fine, "w") as zf:
        zl.writestr("README", "fake Cityscapes\n")
        zl.writestr("license.txt", "fake\n")
        zf.writestr("README", "fake Cityscapes\n")
        for sid in list(train) + list(val) + list(test):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
            zl.writestr(f"leftImg8bit/{sid}_leftImg8bit.png", buf.getvalue())
            split = sid.split("/", 1)[0]
            objects = [] if split == "test" else [
                {"label": "road", "polygon": [[0, h // 2], [w - 1, h // 2], [w - 1, h - 1],
                                              [0, h - 1]]},
                {"label": "sky", "polygon": [[0, 0], [w - 1, 0], [w - 1, 2], [0, 2]]},
                {"label": "car", "polygon": [[2, h // 2], [8, h // 2], [8, h - 3], [2, h - 3]]},
                {"label": "ego vehicle", "polygon": [[0, h - 2], [w - 1, h - 2], [w - 1, h - 1],
                                                     [0, h - 1]]},
            ]
            zf.writestr(f"gtFine/{sid}_gtFine_polygons.json",
                        json.dumps({"imgHeight": h, "imgWidth": w, "objects": objects}))
            zf.writestr(f"gtFine/{sid}_gtFine_labelIds.png", _png(np.zeros((h, w), np.uint8)))
    return {left.name: left, fine.name: fine}

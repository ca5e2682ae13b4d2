"""Cityscapes (fine) with trainId masks in the layout UniMatch's lists name (docs/real_data.md):
the two zips from ``--zips``, the downloads folder or cityscapesscripts' downloader (account
from the environment, never written or printed); masks by its createTrainIdLabelImgs."""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Optional
from unittest import mock

import requests
from requests.adapters import HTTPAdapter

from mlcl.prepare.download import (DownloadError, Log, PrepareError, Steps, check_counts, digests,
                                   mark_downloaded, marker_path, read_marker, say)
from mlcl.prepare.split_lists import STANDARD_POOLS

BASE_URL = "https://www.cityscapes-dataset.com"
PACKAGES = ("gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip")
USER_ENV, PASSWORD_ENV = "CITYSCAPES_USERNAME", "CITYSCAPES_PASSWORD"
_MEMBER = re.compile(r"^(?:\./)?((?:leftImg8bit|gtFine)/(train|val|test)/[^/]+/[^/]+)$")


def login(user: str, password: str, base_url: str = BASE_URL):
    """A requests session logged in as cityscapesscripts' downloader does, without its
    credentials file; requests for BASE_URL go to ``base_url`` (a mirror, a test server)."""
    session = requests.Session()
    base_url = base_url.rstrip("/")
    if base_url != BASE_URL:
        class Rebase(HTTPAdapter):
            def send(self, request, **kw):
                request.url = base_url + request.url[len(BASE_URL):]
                return super().send(request, **kw)

        session.mount(BASE_URL, Rebase())
    r = session.get(f"{BASE_URL}/login", allow_redirects=False)
    r.raise_for_status()
    r = session.post(f"{BASE_URL}/login", allow_redirects=False,
                     data={"username": user, "password": password, "submit": "Login"})
    r.raise_for_status()
    if r.status_code != 302:
        raise PrepareError(f"the Cityscapes server refused the login for the account in "
                           f"{USER_ENV}; check {USER_ENV} / {PASSWORD_ENV}")
    return session


def download(session, package: str, downloads: Path, log: Log = say) -> Path:
    """One package by cityscapesscripts, resuming a partial file (a complete one is a zip,
    taken by :func:`find_zips`) and checking the server's md5; a file that fails is removed."""
    from cityscapesscripts.download.downloader import download_packages

    dest = downloads / package
    log(f"[download] {package} from the Cityscapes server"
        f"{' (resuming)' if dest.is_file() else ''}")
    try:
        download_packages(session=session, package_names=[package],
                          destination_path=str(downloads), resume=dest.is_file())
    except Exception as e:
        if "MD5" in str(e) and dest.is_file():
            dest.unlink()
            raise DownloadError(f"{package}: md5 does not match the server's; the file was "
                                f"removed, run again to download it afresh") from None
        raise DownloadError(f"{package}: download failed ({type(e).__name__}: {e}); run again "
                            f"to resume") from e
    mark_downloaded(dest, **digests(dest, ("md5", "sha256")))
    log(f"[ok] {package}")
    return dest


def make_train_ids(root: Path, log: Log = say) -> None:
    """cityscapesscripts' createTrainIdLabelImgs over ``root/gtFine/*/*/*_polygons.json``."""
    from cityscapesscripts.preparation import createTrainIdLabelImgs

    log("[trainIds] cityscapesscripts createTrainIdLabelImgs (a few minutes on the real data)")
    try:  # it finds the data through CITYSCAPES_DATASET, set for the call only
        with mock.patch.dict(os.environ, {"CITYSCAPES_DATASET": str(root.resolve())}):
            createTrainIdLabelImgs.main()
    except SystemExit as e:
        raise PrepareError(f"createTrainIdLabelImgs failed (exit {e.code}): no "
                           f"gtFine/*/*/*_gtFine_polygons.json under {root}?") from None
    print(flush=True)  # its progress line ends without a newline


def count(root: Path) -> dict[str, int]:
    """Images per split that have a trainId mask; raises if any image lacks one."""
    counts = {}
    for split in ("train", "val"):
        images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        lacking = [p for p in images if not (
            root / "gtFine" / split / p.parent.name /
            p.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")).is_file()]
        if lacking:
            raise PrepareError(f"{len(lacking)} {split} images have no labelTrainIds mask "
                               f"(first: {lacking[0]})")
        counts[split] = len(images)
    return counts


def prepare_cityscapes(root: str | Path, downloads: Optional[str | Path] = None,
                       zips: Optional[str | Path] = None, base_url: str = BASE_URL,
                       with_test: bool = False, expected: Optional[dict[str, int]] = None,
                       force: bool = False, log: Log = say) -> dict:
    """Zips, extraction (test too ``with_test``), trainId masks; the counts, checked."""
    root = Path(root)
    downloads = Path(downloads) if downloads else root.parent / "downloads"
    expected = dict(STANDARD_POOLS["cityscapes"] if expected is None else expected)
    steps = Steps(root)
    if force:
        steps.clear("cityscapes", "trainids", *(f"extract-{p}" for p in PACKAGES))
    if (done := steps.get("cityscapes")) and done.get("counts") == expected:
        log(f"[skip] Cityscapes already prepared in {root}: {done['counts']}")
        return done["counts"]
    found = find_zips(zips, downloads)
    if missing := [p for p in PACKAGES if p not in found]:
        found.update(download_zips(missing, downloads, base_url, log))
    for p in found.values():
        if not zipfile.is_zipfile(p):
            raise PrepareError(f"{p} is not a complete zip file; delete it and run again")
    root.mkdir(parents=True, exist_ok=True)
    splits = ("train", "val", "test") if with_test else ("train", "val")

    def select(name: str) -> Optional[str]:
        m = _MEMBER.match(name)
        return m.group(1) if m and m.group(2) in splits else None

    for package, p in sorted(found.items()):
        if steps.extract_once(f"extract-{package}", p, root, select, log):
            steps.clear("trainids")  # new files: the trainId masks are due again
    if not steps.get("trainids"):
        make_train_ids(root, log)
        steps.done("trainids")
    else:
        log("[skip] labelTrainIds already made")
    counts = count(root)
    check_counts(counts, expected, "Cityscapes")
    steps.done("cityscapes", counts=counts)
    log(f"[ok] Cityscapes ready in {root}: {counts['train']} train, {counts['val']} val")
    return counts


def find_zips(zips: Optional[str | Path], downloads: Path) -> dict[str, Path]:
    """package name -> its zip in ``zips`` (any file) or ``downloads`` (one we downloaded, or
    a complete zip), for the packages found."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for folder in ([Path(zips)] if zips else []) + [downloads]:
            p = folder / package
            if p.is_file() and (folder != downloads or read_marker(marker_path(p))
                                or zipfile.is_zipfile(p)):
                found[package] = p
                break
    return found


def download_zips(packages: list[str], downloads: Path, base_url: str,
                  log: Log = say) -> dict[str, Path]:
    """package name -> its file, downloaded with the account in the environment."""
    user, password = os.environ.get(USER_ENV, ""), os.environ.get(PASSWORD_ENV, "")
    if not (user and password):
        missing = " and ".join(v for v in (USER_ENV, PASSWORD_ENV) if not os.environ.get(v))
        raise PrepareError(
            f"Cityscapes needs an account to download (register at "
            f"{BASE_URL}/register/). {missing} not set. Either export {USER_ENV} and "
            f"{PASSWORD_ENV} (they are read from the environment only, never stored), or "
            f"download {' and '.join(PACKAGES)} yourself and pass their folder with --zips DIR.")
    downloads.mkdir(parents=True, exist_ok=True)
    try:
        session = login(user, password, base_url)
        return {package: download(session, package, downloads, log) for package in packages}
    except requests.RequestException as e:
        raise DownloadError(f"Cityscapes server: {type(e).__name__}: {e}; run again to "
                            f"resume") from None

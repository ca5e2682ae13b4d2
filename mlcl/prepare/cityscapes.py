"""Cityscapes (fine annotations) with trainId masks, in the layout UniMatch's lists name.

Result under ``root`` (e.g. data/cityscapes)::

    leftImg8bit/{train,val}/{city}/{city}_{seq}_{frame}_leftImg8bit.png        2,975 + 500
    gtFine/{train,val}/{city}/{...}_gtFine_{polygons.json,labelIds.png,...}   as shipped
    gtFine/{train,val}/{city}/{...}_gtFine_labelTrainIds.png                  19 classes, 255
    splits/cityscapes/...                                                     (split_lists.py)

The two zips (``leftImg8bit_trainvaltest.zip`` 11 GB, ``gtFine_trainvaltest.zip`` 241 MB) are
taken from ``--zips DIR`` or the downloads folder when present; otherwise they are downloaded
with cityscapesscripts' downloader, which needs an account: the credentials are read from the
environment variables CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD and are never written to
disk or printed (cityscapesscripts' own ``csDownload`` would offer to store them in a file).
The trainId masks are made by cityscapesscripts' ``createTrainIdLabelImgs`` (which finds the
data through the CITYSCAPES_DATASET variable, set here for the duration of the call).
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Mapping, Optional

from mlcl.prepare.download import (DownloadError, Log, PrepareError, Steps, digests, extract,
                                   marker_path, now, read_marker, say, write_marker)

BASE_URL = "https://www.cityscapes-dataset.com"
PACKAGES = ("gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip")
COUNTS = {"train": 2975, "val": 500}
USER_ENV, PASSWORD_ENV = "CITYSCAPES_USERNAME", "CITYSCAPES_PASSWORD"
_MEMBER = re.compile(r"^(?:\./)?((?:leftImg8bit|gtFine)/(train|val|test)/[^/]+/[^/]+)$")


class CredentialsError(PrepareError):
    pass


def credentials(env: Mapping[str, str]) -> tuple[str, str]:
    """(username, password) from the environment, or a CredentialsError that says what to do."""
    user, password = env.get(USER_ENV, ""), env.get(PASSWORD_ENV, "")
    if user and password:
        return user, password
    missing = " and ".join(v for v, x in ((USER_ENV, user), (PASSWORD_ENV, password)) if not x)
    raise CredentialsError(
        f"Cityscapes needs an account to download (register at "
        f"{BASE_URL}/register/). {missing} not set. Either export {USER_ENV} and "
        f"{PASSWORD_ENV} (they are read from the environment only, never stored), or download "
        f"{' and '.join(PACKAGES)} yourself and pass their folder with --zips DIR.")


def _session(base_url: str):
    """A requests session; with a non-default ``base_url`` (a mirror, or a test server) every
    request for BASE_URL is sent there instead, so cityscapesscripts' code runs unchanged."""
    import requests
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    base_url = base_url.rstrip("/")
    if base_url != BASE_URL:
        class Rebase(HTTPAdapter):
            def send(self, request, **kw):
                request.url = base_url + request.url[len(BASE_URL):]
                return super().send(request, **kw)

        session.mount(BASE_URL, Rebase())
    return session


def login(user: str, password: str, base_url: str = BASE_URL):
    """Log in as cityscapesscripts' downloader does (a 302 answer means success), without
    its credentials file."""
    session = _session(base_url)
    r = session.get(f"{BASE_URL}/login", allow_redirects=False)
    r.raise_for_status()
    r = session.post(f"{BASE_URL}/login", allow_redirects=False,
                     data={"username": user, "password": password, "submit": "Login"})
    r.raise_for_status()
    if r.status_code != 302:
        raise CredentialsError(f"the Cityscapes server refused the login for the account in "
                               f"{USER_ENV}; check {USER_ENV} / {PASSWORD_ENV}")
    return session


def _server_md5(session, package: str) -> str:
    from cityscapesscripts.download.downloader import get_available_packages

    ids = {p["name"]: p["packageID"] for p in get_available_packages(session=session)}
    if package not in ids:
        raise DownloadError(f"the Cityscapes server does not offer {package} to this account")
    r = session.get(f"{BASE_URL}/md5-sum/?packageID={ids[package]}", allow_redirects=False)
    r.raise_for_status()
    return r.text.split()[0]


def download(session, package: str, downloads: Path, log: Log = say) -> Path:
    """One package via cityscapesscripts' ``download_packages`` (resumed if a partial file
    is there, md5-checked against the server's); a file that fails the check is removed."""
    from cityscapesscripts.download.downloader import download_packages

    dest = downloads / package
    if dest.is_file():  # partial, or complete without our marker: compare with the server
        md5 = _server_md5(session, package)
        if digests(dest, ("md5",))["md5"] == md5:
            log(f"[ok] {package}: present and matches the server's md5")
            write_marker(marker_path(dest), {"bytes": dest.stat().st_size, "md5": md5,
                                             "date": now()})
            return dest
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
    write_marker(marker_path(dest), {"bytes": dest.stat().st_size,
                                     **digests(dest, ("md5", "sha256")), "date": now()})
    log(f"[ok] {package}")
    return dest


def make_train_ids(root: Path, log: Log = say) -> None:
    """cityscapesscripts' createTrainIdLabelImgs over ``root/gtFine/*/*/*_polygons.json``."""
    from cityscapesscripts.preparation import createTrainIdLabelImgs

    log("[trainIds] cityscapesscripts createTrainIdLabelImgs (a few minutes on the real data)")
    old = os.environ.get("CITYSCAPES_DATASET")
    os.environ["CITYSCAPES_DATASET"] = str(root.resolve())
    try:
        createTrainIdLabelImgs.main()
    except SystemExit as e:
        raise PrepareError(f"createTrainIdLabelImgs failed (exit {e.code}): no "
                           f"gtFine/*/*/*_gtFine_polygons.json under {root}?") from None
    finally:
        if old is None:
            os.environ.pop("CITYSCAPES_DATASET", None)
        else:
            os.environ["CITYSCAPES_DATASET"] = old
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
                       env: Optional[Mapping[str, str]] = None, with_test: bool = False,
                       expected: Optional[dict[str, int]] = None, force: bool = False,
                       log: Log = say) -> dict:
    """Get the two zips, extract train/val (and test with ``with_test``), make trainId masks,
    check the counts (:data:`COUNTS`, or ``expected`` in tests); return the counts."""
    root = Path(root)
    downloads = Path(downloads) if downloads else root.parent / "downloads"
    expected = dict(COUNTS if expected is None else expected)
    env = os.environ if env is None else env
    steps = Steps(root)
    if force:
        for s in ("cityscapes", "trainids", *(f"extract-{p}" for p in PACKAGES)):
            steps.clear(s)
    done = steps.get("cityscapes")
    if done and done.get("counts") == expected:
        log(f"[skip] Cityscapes already prepared in {root}: {done['counts']}")
        return done["counts"]

    # 1. the zips: given, already downloaded, or fetched with the user's account
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for folder in ([Path(zips)] if zips else []) + [downloads]:
            p = folder / package
            if p.is_file() and (folder != downloads or read_marker(marker_path(p))
                                or zipfile.is_zipfile(p)):
                found[package] = p
                break
    missing = [p for p in PACKAGES if p not in found]
    if missing:
        user, password = credentials(env)  # before any network call
        downloads.mkdir(parents=True, exist_ok=True)
        import requests

        try:
            session = login(user, password, base_url)
            for package in missing:
                found[package] = download(session, package, downloads, log)
        except requests.RequestException as e:
            raise DownloadError(f"Cityscapes server: {type(e).__name__}: {e}; run again to "
                                f"resume") from None
    for package, p in found.items():
        if not zipfile.is_zipfile(p):
            raise PrepareError(f"{p} is not a complete zip file; delete it and run again")

    # 2. extract (train and val only, unless with_test)
    splits = ("train", "val", "test") if with_test else ("train", "val")
    root.mkdir(parents=True, exist_ok=True)
    for package, p in sorted(found.items()):
        step = f"extract-{package}"
        if steps.get(step):
            log(f"[skip] {package} already extracted")
            continue

        def select(name: str) -> Optional[str]:
            m = _MEMBER.match(name)
            return m.group(1) if m and m.group(2) in splits else None

        n = extract(p, root, select, log)
        steps.done(step, archive=str(p), files=n)
        steps.clear("trainids")

    # 3. trainId masks
    if not steps.get("trainids"):
        make_train_ids(root, log)
        steps.done("trainids")
    else:
        log("[skip] labelTrainIds already made")

    # 4. counts
    counts = count(root)
    bad = [f"{k}: {counts.get(k)} (expected {v})" for k, v in expected.items()
           if counts.get(k) != v]
    if bad:
        raise PrepareError(f"Cityscapes counts are wrong: {'; '.join(bad)}")
    steps.done("cityscapes", counts=counts)
    log(f"[ok] Cityscapes ready in {root}: {counts['train']} train, {counts['val']} val")
    return counts

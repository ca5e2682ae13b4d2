"""Idempotent, resumable, checksum-verified downloads (:func:`fetch`: ``dest.part`` resumed by
HTTP Range, ``dest.done`` once verified), safe extraction (:func:`extract`) and the ``.done``
markers of multi-file steps (:class:`Steps`)."""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import http.client
import json
import os
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

from mlcl.errors import MlclError
from mlcl.files import atomic_write_json

Log = Callable[[str], None]
CHUNK = 1 << 20
say: Log = functools.partial(print, flush=True)


class PrepareError(MlclError):
    """A preparation step failed (exit status 1); the message says what to do about it."""

    exit_code = 1


class DownloadError(PrepareError):
    """A download failed (a re-run resumes it)."""


class ChecksumError(DownloadError):
    """A file does not hash to what it must."""


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def human(n: float) -> str:
    """A byte count for messages: ``512 B``, ``1.5 MB``."""
    for unit in ("B", "KB", "MB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def digests(path: Path, algos: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Hex digests of ``path`` for each hashlib algorithm name or "git_blob" (the id git gives
    the content: sha1 of "blob SIZE\\0" + the bytes), in one read."""
    hs = {a: hashlib.new("sha1" if a == "git_blob" else a) for a in algos}
    if "git_blob" in hs:
        hs["git_blob"].update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            for h in hs.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hs.items()}


def marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".done")


def read_marker(path: Path) -> Optional[dict]:
    """The JSON at ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _checksum_problem(got: dict[str, str], md5: Optional[str], sha256: Optional[str],
                      sha256_prefix: Optional[str], git_blob: Optional[str]) -> str:
    """What in ``got`` (hex digests) differs from the expected ones; empty when nothing."""
    bad = [f"{algo.replace('_', ' ')} {got.get(algo)} (expected {want})" for algo, want in
           (("md5", md5), ("sha256", sha256), ("git_blob", git_blob))
           if want and got.get(algo) != want.lower()]
    if sha256_prefix and not got.get("sha256", "").startswith(sha256_prefix.lower()):
        bad.insert(0, f"sha256 {got.get('sha256')} (expected it to start with {sha256_prefix})")
    return "; ".join(bad)


def _check_digests(path: Path, expect: tuple) -> dict[str, str]:
    """Digests of ``path``; a ChecksumError unless they match ``expect`` (md5, sha256, prefix,
    git blob id)."""
    wanted = (("md5",) if expect[0] else ()) + (("git_blob",) if expect[3] else ())
    got = digests(path, ("sha256", *wanted))
    if problem := _checksum_problem(got, *expect):
        raise ChecksumError(problem)
    return got


def fetch(url: str, dest: str | Path, *, md5: Optional[str] = None,
          sha256: Optional[str] = None, sha256_prefix: Optional[str] = None,
          git_blob: Optional[str] = None, retries: int = 4, timeout: float = 60.0,
          backoff: float = 1.0, marker: bool = True, label: Optional[str] = None,
          log: Log = say) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify it, return ``dest``; none
    when ``dest.done`` (``marker=False``: ``dest``) verifies. A file failing its checksum is
    removed (:class:`ChecksumError`). ``label`` names the file in messages."""
    # not torch.hub's download_url_to_file nor pooch: they restart a 2 GB archive from byte 0
    # after a dropped connection
    dest, expect = Path(dest), (md5, sha256, sha256_prefix, git_blob)
    name = label or dest.name
    if _usable_as_is(url, dest, name, expect, marker, log):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _download_with_retries(url, part, name, retries, timeout, backoff, log)
    try:
        got = _check_digests(part, expect)
    except ChecksumError as e:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{name} from {url}: {e}; the file was removed, run again to "
                            f"download it afresh") from None
    os.replace(part, dest)
    if marker:
        mark_downloaded(dest, url=url, **got)
    log(f"[ok] {name}: {human(dest.stat().st_size)}, sha256 {got['sha256'][:16]}...")
    return dest


def mark_downloaded(dest: Path, **info) -> None:
    """Write ``dest.done``: ``info`` (url, digests) plus the file's size and today's date."""
    atomic_write_json(marker_path(dest), {**info, "bytes": dest.stat().st_size, "date": now()})


def _usable_as_is(url: str, dest: Path, name: str, expect: tuple, marker: bool, log: Log) -> bool:
    """True when ``dest`` needs no download: its marker, or the file itself (then adopted),
    verifies against ``expect`` (md5, sha256, sha256 prefix); a file that fails is removed."""
    if not dest.is_file():
        return False
    info = read_marker(marker_path(dest)) if marker else None
    if info and info.get("bytes") == dest.stat().st_size and not _checksum_problem(info, *expect):
        log(f"[skip] {name}: already downloaded and verified")
        return True
    if not marker and not any(expect):
        log(f"[skip] {name}: present (no checksum to compare)")
        return True
    try:
        got = _check_digests(dest, expect)
    except ChecksumError as e:
        log(f"[redo] {name}: the file on disk fails its checksum ({e}); downloading again")
        dest.unlink()
        return False
    if marker:
        mark_downloaded(dest, url=url, **got)
    log(f"[skip] {name}: present and verified")
    return True


def _download_with_retries(url: str, part: Path, name: str, retries: int, timeout: float,
                           backoff: float, log: Log) -> None:
    """Fill ``part`` with ``url`` in up to ``retries`` resuming attempts, ``backoff`` seconds
    doubling between them (a 4xx but 408/429 fails at once); else a DownloadError."""
    last_error: Optional[BaseException] = None
    for attempt in range(1, retries + 1):
        try:
            _download_once(url, part, name, timeout, log)
            return
        except urllib.error.HTTPError as e:
            if e.code == 416 and part.is_file() and part.stat().st_size:
                return  # nothing left to send: the .part is complete
            if 400 <= e.code < 500 and e.code not in (408, 429):
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
            last_error = e
        except (urllib.error.URLError, http.client.HTTPException, OSError, DownloadError) as e:
            last_error = e
        if attempt < retries:
            wait = backoff * min(2 ** (attempt - 1), 30)
            log(f"  {name}: attempt {attempt} failed ({last_error}); retrying in {wait:.0f} s")
            time.sleep(wait)
    have = part.stat().st_size if part.is_file() else 0
    raise DownloadError(f"{url}: gave up after {retries} attempts ({last_error}); "
                        f"run again to resume from {human(have)}")


def _download_once(url: str, part: Path, name: str, timeout: float, log: Log) -> None:
    """One request: the rest of ``url`` onto ``part`` (a 206), or all afresh; raises if short."""
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "mlcl-prepare/0.1 (+docs/real_data.md)"}
    if have:
        headers["Range"] = f"bytes={have}-"
        log(f"[resume] {name}: {human(have)} on disk, asking for the rest")
    else:
        log(f"[download] {name} <- {url}")
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                timeout=timeout) as resp:
        start = re.match(r"bytes\s+(\d+)-", resp.headers.get("Content-Range", ""))
        if have and resp.status == 206 and start and int(start.group(1)) != have:
            raise DownloadError(f"server resumed at byte {start.group(1)}, not {have}")
        if have and resp.status != 206:
            log(f"  {name}: the server ignored the Range request; starting over")
            have = 0
        size = re.match(r"bytes\s+\d+-\d+/(\d+)", resp.headers.get("Content-Range", ""))
        length = resp.headers.get("Content-Length", "")  # of the rest after a 206
        total = int(size.group(1)) if size else int(length) + (
            have if resp.status == 206 else 0) if length.isdigit() else None
        got, t0, last_t, last_pct = have, time.monotonic(), time.monotonic(), -10
        with open(part, "ab" if have else "wb") as out:
            while block := resp.read(CHUNK):  # a progress line every 10% or 30 s
                out.write(block)
                got += len(block)
                t = time.monotonic()
                pct = int(100 * got / total) if total else -1
                if (total and total > 4 * CHUNK and pct >= last_pct + 10) or t - last_t > 30:
                    speed = (got - have) / max(t - t0, 1e-6)
                    of = f" / {human(total)} ({pct}%)" if total else ""
                    log(f"  {name}: {human(got)}{of}, {human(speed)}/s")
                    last_t, last_pct = t, pct
        if total is not None and got < total:
            raise DownloadError(f"connection closed at {got} of {total} bytes")


def extract(archive: str | Path, dest: str | Path, select: Callable[[str], Optional[str]],
            log: Log = say) -> int:
    """Copy each file member of ``archive`` (tar, tar.gz or zip) whose name ``select`` maps
    to a relative path to ``dest/<that path>``; return the number of files written."""
    # not tarfile's extractall(filter="data"): it cannot select and rename in one streaming pass
    archive, dest = Path(archive), Path(dest)
    log(f"[extract] {archive.name} -> {dest}")
    count = 0
    for name, open_member in _members(archive):
        rel = select(name)
        parts = PurePosixPath(rel or "").parts
        if not parts:
            continue
        if parts[0] == "/" or ".." in parts:
            raise PrepareError(f"refusing to extract {rel!r}: absolute or outside the target")
        target = dest.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_member() as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
        count += 1
        if count % 2000 == 0:
            log(f"  {archive.name}: {count} files extracted")
    log(f"  {archive.name}: {count} files extracted")
    return count


def _members(archive: Path):
    """(name, opener) of each file member: a zip's (CRC-checked while read), or a tar's in one
    streaming pass (each opened before the next is read)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            yield from ((i.filename, functools.partial(zf.open, i))
                        for i in zf.infolist() if not i.is_dir())
        return
    try:
        tf = tarfile.open(archive, "r|*")
    except tarfile.TarError as e:
        raise PrepareError(f"{archive}: not a zip or tar archive ({e})") from e
    with tf:
        yield from ((m.name, functools.partial(tf.extractfile, m)) for m in tf if m.isfile())


class Steps:
    """``.done`` markers of multi-file steps, kept in ``root/.mlcl-prepare/<step>.done``."""

    def __init__(self, root: str | Path):
        self.dir = Path(root) / ".mlcl-prepare"

    def get(self, step: str) -> Optional[dict]:
        return read_marker(self.dir / f"{step}.done")

    def done(self, step: str, **info) -> None:
        atomic_write_json(self.dir / f"{step}.done", {"step": step, "date": now(), **info})

    def clear(self, *steps: str) -> None:
        for step in steps:
            (self.dir / f"{step}.done").unlink(missing_ok=True)

    def extract_once(self, step: str, archive: Path, dest: Path,
                     select: Callable[[str], Optional[str]], log: Log = say) -> bool:
        """:func:`extract` ``archive`` into ``dest`` unless ``step`` is done; True when it ran."""
        if self.get(step):
            log(f"[skip] {archive.name} already extracted")
            return False
        n = extract(archive, dest, select, log)
        self.done(step, archive=str(archive), files=n)
        return True


def check_counts(counts: dict[str, int], expected: dict[str, int], what: str) -> None:
    """Raise PrepareError naming every key of ``expected`` whose count in ``counts`` differs."""
    bad = [f"{k}: {counts.get(k)} (expected {v})" for k, v in expected.items()
           if counts.get(k) != v]
    if bad:
        raise PrepareError(f"{what} counts are wrong: {'; '.join(bad)}")

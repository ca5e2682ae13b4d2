"""Atomic file writes: a reader never sees a half-written result, config or checkpoint."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def current_umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore
    os.umask(mask)
    return mask


def plain_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.
    The file gets the mode a plain ``open(path, "w")`` would give (0666 less the umask),
    not mkstemp's private 0600, so collaborators can read results."""
    # tempfile + os.replace, no package: atomicwrites, the usual one, is archived and itself
    # points to os.replace.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, plain_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def temp_target(path: Path) -> Path:
    """The file an :func:`atomic_write` temporary ``.<name>.<random>.tmp`` was for (left
    behind when that write was interrupted), or ``path`` itself for any other name."""
    name = path.name
    if not (name.startswith(".") and name.endswith(".tmp")) or name.count(".") < 3:
        return path
    target = name[1:-len(".tmp")].rsplit(".", 1)[0]
    return path.with_name(target) if target else path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``text`` into ``path`` atomically; returns ``path``."""
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON (anything else as ``str``) into ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    """``torch.save(obj)`` at ``path`` atomically (a temporary file, then a rename)."""
    import torch  # here: config, progress, the registry and data preparation use this module

    return atomic_write(path, lambda p: torch.save(obj, p))


# --------------------------------------------------------------------------- output folders
class OutputFolder:
    """A folder that receives a command's results and never anything else's: a manifest
    (``.mlcl-written``, one relative path a line, appended before each file is written)
    lists what the command wrote there, so it may rewrite those files in a later run, and
    refuses a folder that holds any other file (the temporary file of an interrupted write
    of a listed file is its own, :func:`temp_target`). The folder is made at the first write, so
    a run that fails before leaves nothing behind.

        folder = OutputFolder(out, "--out")   # checks now, raises ValueError naming ``flag``
        folder.write("a.jpg.png", lambda p: mask.save(p, format="PNG"))
    """

    MANIFEST = ".mlcl-written"

    def __init__(self, path: str | Path, flag: str = "--out", inputs: tuple[Path, ...] = ()):
        self.path, self.flag = Path(path), flag
        self.manifest = self.path / self.MANIFEST
        self.listed = self._check(inputs)

    def _check(self, inputs: tuple[Path, ...]) -> set[str]:
        p, flag = self.path, self.flag
        if p.exists() and not p.is_dir():
            raise ValueError(f"{flag} {p} is a file: give a folder for the results")
        here = p.resolve()
        inside = [i for i in inputs if i.resolve().is_relative_to(here)]
        if inside:
            raise ValueError(f"{flag} {p} holds the inputs (e.g. {inside[0]}): give a folder "
                             "of its own, so that no input is overwritten")
        if not p.is_dir():
            check_creatable(p, flag)
            return set()
        listed = set(self.manifest.read_text().splitlines()) if self.manifest.is_file() else set()
        foreign = sorted(str(f.relative_to(p)) for f in p.rglob("*")
                         if not f.is_dir() and f != self.manifest
                         and str(f.relative_to(p)) not in listed
                         and str(temp_target(f).relative_to(p)) not in listed)
        if foreign:
            raise ValueError(f"{flag} {p} holds files this command did not write (e.g. "
                             f"{foreign[0]}): give an empty or new folder")
        why = place_problem(p)
        if why:
            raise ValueError(f"{flag} {why}: give a folder you can write to")
        return listed

    def make(self) -> None:
        """Create the folder (at the first write); a ValueError naming the flag if it cannot."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create {self.flag} {self.path} ({e.strerror}): give a "
                             "folder you can write to") from None

    def write(self, rel: str | Path, write: Callable[[Path], None]) -> Path:
        """Write ``self.path / rel`` atomically, recording it in the manifest first."""
        rel = str(rel)
        if rel not in self.listed:
            self.make()
            with open(self.manifest, "a") as fh:
                fh.write(rel + "\n")
            self.listed.add(rel)
        return atomic_write(self.path / rel, write)


def check_output_file(path: str | Path, flag: str, is_ours: Callable[[Path], bool]) -> Path:
    """``path`` as a Path if a result may be written there: its folder exists or can be made
    and is writable, and any file already there passes ``is_ours`` (was written by this
    command); otherwise a ValueError naming ``flag`` and the fix."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {p} is a folder: give a file name, e.g. {p / 'result.json'}")
    if p.exists() and not is_ours(p):
        raise ValueError(f"{flag} {p} exists and was not written by this command: give a "
                         "new file name")
    check_creatable(p, flag)
    return p


def check_creatable(path: Path, flag: str) -> None:
    """A ValueError naming ``flag`` unless a file or folder may be made at ``path``: its
    folder (or that folder's nearest existing ancestor) is a folder this process can write
    into (:func:`place_problem`)."""
    why = place_problem(path.parent)
    if why:
        raise ValueError(f"{flag} {path} cannot be made: {why}")


def nearest_existing(path: str | Path) -> Path:
    """``path`` if it exists, else its nearest existing ancestor: where ``mkdir -p`` would
    start, and the disk the path would be on."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def place_problem(path: str | Path) -> str | None:
    """None if ``path`` can be written or made: it, or if it does not exist its nearest
    existing ancestor, is a folder this process may write into and enter. Otherwise the
    reason, naming the culprit: ``"P is a file, not a folder"``, ``"P lies under the file
    F"`` or ``"F is not writable"``. The one walk-up check of every output place."""
    p = Path(path)
    existing = nearest_existing(p)
    if not existing.is_dir():
        return (f"{p} is a file, not a folder" if existing == p
                else f"{p} lies under the file {existing}")
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None

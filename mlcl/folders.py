"""Result folders and files of the commands that write beside the user's own files
(predict's masks, evaluate's --out): they rewrite only what they wrote themselves."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from mlcl.files import atomic_write, place_problem


def temp_target(path: Path) -> Path:
    """The file an :func:`atomic_write` temporary ``.<name>.<random>.tmp`` was for (left
    behind when that write was interrupted), or ``path`` itself for any other name."""
    name = path.name
    if not (name.startswith(".") and name.endswith(".tmp")) or name.count(".") < 3:
        return path
    target = name[1:-len(".tmp")].rsplit(".", 1)[0]
    return path.with_name(target) if target else path


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

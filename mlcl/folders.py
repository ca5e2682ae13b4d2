"""Result folders and files of predict and evaluate: they rewrite only what they wrote."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from mlcl.files import atomic_write, place_problem


def temp_target(path: Path) -> Path:
    """The file an interrupted atomic_write's ``.<name>.<random>.tmp`` was for, else ``path``."""
    m = re.fullmatch(r"\.(.+)\.[^.]*\.tmp", path.name)
    return path.with_name(m.group(1)) if m else path


class OutputFolder:
    """A folder for a command's results only, made at the first :meth:`write`: its manifest
    (``.mlcl-written``, appended before each write) lists what it may rewrite; any other file
    (or an ``inputs``) in it is a ValueError naming ``flag``, at construction."""

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
        if inside := [i for i in inputs if i.resolve().is_relative_to(here)]:
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
        if why := place_problem(p):
            raise ValueError(f"{flag} {why}: give a folder you can write to")
        return listed

    def write(self, rel: str | Path, write: Callable[[Path], None]) -> Path:
        """Write ``self.path / rel`` atomically, recording it in the manifest first."""
        rel = str(rel)
        if rel not in self.listed:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"cannot create {self.flag} {self.path} ({e.strerror}): give "
                                 "a folder you can write to") from None
            with open(self.manifest, "a") as fh:
                fh.write(rel + "\n")
            self.listed.add(rel)
        return atomic_write(self.path / rel, write)


def check_output_file(path: str | Path, flag: str, is_ours: Callable[[Path], bool]) -> Path:
    """``path`` when a result may be written there (a writable place; a file already there
    passes ``is_ours``), else a ValueError naming ``flag`` and the fix."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {p} is a folder: give a file name, e.g. {p / 'result.json'}")
    if p.exists() and not is_ours(p):
        raise ValueError(f"{flag} {p} exists and was not written by this command: give a "
                         "new file name")
    check_creatable(p, flag)
    return p


def check_creatable(path: Path, flag: str) -> None:
    """A ValueError naming ``flag`` unless ``path`` may be made (:func:`place_problem`)."""
    if why := place_problem(path.parent):
        raise ValueError(f"{flag} {path} cannot be made: {why}")

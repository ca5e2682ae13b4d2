"""Atomic file writes (a reader never sees a half-written file) and the check of an output place."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def plain_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0666 less the umask."""
    try:
        with open("/proc/self/status") as fh:
            mask = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)  # elsewhere: set and restore
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` on a temporary file beside ``path``, renamed there with :func:`plain_mode`."""
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


def nearest_existing(path: str | Path) -> Path:
    """``path`` if it exists, else its nearest existing ancestor (on the disk it would use)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def place_problem(path: str | Path) -> str | None:
    """None if ``path`` can be written or made (in its nearest existing folder), else why."""
    p = Path(path)
    existing = nearest_existing(p)
    if not existing.is_dir():
        return (f"{p} is a file, not a folder" if existing == p
                else f"{p} lies under the file {existing}")
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None

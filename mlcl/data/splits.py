"""Split files: a line is (a) an image id, resolved by the folder layout (:func:`paths_for_id`),
(b) ``image-path mask-path`` relative to the data root (UniMatch's and the release's), or (c)
an image path alone (its mask where the layout puts its id's); blank lines and ``#``
comments are skipped. Layouts: voc, cityscapes, folder (``images/``, ``masks/``; no ids:
docs/own_data.md)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple, Optional

from mlcl.errors import MlclError

LAYOUTS = ("voc", "cityscapes", "folder")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # what mlcl reads


def original_message(text: str) -> str:
    """The one-line message inside a DataLoader worker's re-raised error ("Caught X in
    DataLoader worker ... Original Traceback ...": its last line less the type), or ``text``."""
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    head, sep, rest = last.partition(": ")
    return rest if sep and re.fullmatch(r"[\w.]+", head) else last


class DataError(MlclError, ValueError):
    """Bad input data; the one-line message names the file at fault (also when torch
    re-creates it from a loader worker's traceback: the constructor keeps its last line)."""

    def __init__(self, message: str = ""):
        super().__init__(original_message(str(message)))


class Sample(NamedTuple):
    """One line of a split file, resolved: its id and the paths of image and mask."""

    id: str
    image: Path
    mask: Optional[Path]  # None where no mask is needed and none exists


MAKE_DATASET = {"pascal": "python -m mlcl data voc --root {root}",
                "cityscapes": "python -m mlcl data cityscapes --root {root}",
                "ade20k": "python -m mlcl data ade20k --root {root}",
                "coco": "python -m mlcl data coco --root {root}",
                "synthetic": "python -m mlcl synth --out {root}",
                "folder": "python -m mlcl data split --root {root} --labeled 1/8"}


def check_root(root: str | Path, dataset: str = "synthetic") -> Path:
    """``root`` as a Path, or a DataError naming the command that makes a ``dataset`` there."""
    if not str(root).strip():
        raise DataError("data.root is empty: set data.root=DIR (e.g. data.root=data/synthetic "
                        "after `python -m mlcl synth --out data/synthetic`)")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"data root {root} is a file, not a folder: set data.root to the "
                        "dataset's folder")
    if not root.is_dir():
        make = MAKE_DATASET.get(dataset)
        raise DataError(f"data root {root} does not exist: set data.root=... " + (
            f"or run `{make.format(root=root)}`" if make else "(your dataset's folder)"))
    return root


def paths_for_id(sample_id: str, layout: str) -> tuple[str, str]:
    """Image and mask paths (relative to the root) of an id in format (a) (in the folder
    layout, the mask of format (c))."""
    if layout == "folder":
        return f"images/{sample_id}", f"masks/{sample_id}.png"
    if layout == "voc":
        return f"JPEGImages/{sample_id}.jpg", f"SegmentationClass/{sample_id}.png"
    if layout == "cityscapes":
        return (f"leftImg8bit/{sample_id}_leftImg8bit.png",
                f"gtFine/{sample_id}_gtFine_labelTrainIds.png")
    raise DataError(f"unknown data layout {layout!r} (valid: {', '.join(LAYOUTS)})")


def id_for_path(image: str, layout: str) -> str:
    """The id of an image path (:func:`paths_for_id` inverted, else the file's stem)."""
    p, suffix = Path(image), "_leftImg8bit.png"
    if layout == "cityscapes" and "leftImg8bit" in p.parts[:-1] and p.name.endswith(suffix):
        return str(Path(*p.parts[p.parts.index("leftImg8bit") + 1:])).removesuffix(suffix)
    if layout == "folder" and p.parts[:1] == ("images",) and len(p.parts) > 1:
        return str(Path(*p.parts[1:]).with_suffix(""))
    return p.stem


def read_lines(path: str | Path) -> list[str]:
    """A text file's lines, a UTF-8 byte-order mark (as some editors write) dropped."""
    return Path(path).read_text(encoding="utf-8-sig").splitlines()


def parse_split(path: str | Path, layout: str
                ) -> tuple[list[tuple[int, str, str, str]], list[tuple[int, str]]]:
    """The entries (line number, id, image, mask relative to the data root) of a split file
    and its malformed lines (line number, message), without touching the data."""
    entries, bad = [], []
    for lineno, raw in enumerate(read_lines(path), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        tokens = line.split()
        if len(tokens) == 1 and Path(tokens[0]).suffix.lower() in IMAGE_SUFFIXES:  # (c)
            sample_id = id_for_path(tokens[0], layout)
            entries.append((lineno, sample_id, tokens[0], paths_for_id(sample_id, layout)[1]))
        elif len(tokens) == 2 or (len(tokens) == 1 and layout != "folder"):
            entries.append((lineno, id_for_path(tokens[0], layout), *tokens) if len(tokens) == 2
                           else (lineno, tokens[0], *paths_for_id(tokens[0], layout)))
        else:
            what = "an image path" if layout == "folder" else "an id, an image path"
            bad.append((lineno, f"expected {what} or 'image mask', got {line!r}"))
    return entries, bad


def read_split(path: str | Path, root: str | Path, layout: str,
               require_mask: bool = True) -> list[Sample]:
    """The samples listed in the split file ``path``, resolved under ``root``."""
    root = check_root(root)
    path = Path(path)
    if not path.is_file():
        make = MAKE_DATASET["folder"].format(root=root) if layout == "folder" else ""
        raise DataError(f"split file {path} does not exist" + (f": run `{make}`" if make else ""))
    entries, bad = parse_split(path, layout)
    if bad:
        raise DataError(f"{path}:{bad[0][0]}: {bad[0][1]}")
    samples = []
    for lineno, sample_id, image, mask in entries:
        image, mask = root / image, root / mask
        if not image.is_file():
            raise DataError(f"{path}:{lineno}: image {image} does not exist")
        if require_mask and not mask.is_file():
            raise DataError(f"{path}:{lineno}: mask {mask} does not exist")
        samples.append(Sample(sample_id, image, mask if mask.is_file() else None))
    if not samples:
        raise DataError(f"split file {path} lists no samples")
    return samples

"""``python -m mlcl data split``: labeled / unlabeled / val split files for one's own data in
the folder layout (docs/own_data.md): ``images/`` holds every image, ``masks/<id>.png`` the
masks of those that have one; images without a mask are unlabeled. Files it cannot use are
named; it never replaces a file it did not write."""
from __future__ import annotations

import math
import random
from fractions import Fraction
from pathlib import Path

from mlcl.data.classes import CLASSES_FILE, HOW_TO_WRITE
from mlcl.data.splits import IMAGE_SUFFIXES, DataError, id_for_path, parse_split, read_lines
from mlcl.files import atomic_write_text

HEADER = "# written by python -m mlcl data split"


def parse_amount(text: str) -> tuple[str, Fraction | int]:
    """(split name, amount) of ``--labeled``/``--val``: ``1/8`` -> ("1_8", 1/8), ``92`` ->
    ("92", 92); a ValueError (argparse's message) for anything else."""
    text = text.strip()
    try:
        value = Fraction(text) if "/" in text else int(text)
    except (ValueError, ZeroDivisionError):
        value = 0
    if not (0 < value <= 1 if isinstance(value, Fraction) else value >= 1):
        raise ValueError(f"expected a fraction like 1/8 or a count like 92, got {text!r}")
    return text.replace("/", "_"), value


def count_of(amount: Fraction | int, pool: int) -> int:
    """How many of ``pool`` items ``amount`` (a fraction, rounded up, or a count) means."""
    return math.ceil(pool * amount) if isinstance(amount, Fraction) else amount


def scan(root: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """({image path: mask path} of the images with a mask, the images without one, the
    skipped files and why), paths relative to ``root``."""
    if not (root / "images").is_dir():
        raise DataError(f"{root / 'images'} does not exist: put every image in ROOT/images/ "
                        "and the masks in ROOT/masks/ (docs/own_data.md)")
    labeled, unlabeled, skipped, seen = {}, [], [], {}
    for path in sorted(p for p in (root / "images").rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        sample_id = id_for_path(rel, "folder")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(f"{rel} (not an image mlcl reads: {' '.join(IMAGE_SUFFIXES)})")
        elif sample_id in seen:
            skipped.append(f"{rel} (the same id as {seen[sample_id]})")
        else:
            seen[sample_id] = rel
            mask = f"masks/{sample_id}.png"
            if (root / mask).is_file():
                labeled[rel] = mask
            else:
                unlabeled.append(rel)
    masks = root / "masks"
    for path in sorted(p for p in (masks.rglob("*") if masks.is_dir() else []) if p.is_file()):
        rel, stem = path.relative_to(masks).as_posix(), path.relative_to(masks).with_suffix("")
        if path.suffix != ".png":
            skipped.append(f"masks/{rel} (a mask is a PNG: masks/<image name>.png)")
        elif stem.as_posix() not in seen:
            skipped.append(f"masks/{rel} (no image images/{stem.as_posix()}.*)")
    return labeled, unlabeled, skipped


def check_writable(path: Path) -> None:
    """A DataError unless ``path`` is absent or a split file this command wrote."""
    if path.exists() and not (path.is_file() and read_lines(path)[:1]
                              and read_lines(path)[0].startswith(HEADER)):
        raise DataError(f"{path} exists and was not written by `python -m mlcl data split`: "
                        "move it away, or give another --name")


def write_list(path: Path, lines: list[str], command: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join([f"{HEADER} ({command})", *lines]) + "\n")


def read_val(path: Path) -> list[str]:
    """The image paths of an existing val split file (kept: every split shares one val set)."""
    entries, bad = parse_split(path, "folder")
    if bad:
        raise DataError(f"{path}:{bad[0][0]}: {bad[0][1]}")
    return [image for _, _, image, _ in entries]


def draw(pool: list[str], amount: Fraction | int, what: str, rng: random.Random) -> list[str]:
    """``amount`` of ``pool`` drawn with ``rng``, sorted; a DataError naming ``what``."""
    n = count_of(amount, len(pool))
    if n > len(pool):
        raise DataError(f"{what} {amount}: only {len(pool)} images with a mask are left to draw "
                        "from; give a smaller count or a fraction (e.g. 1/8)")
    return sorted(rng.sample(pool, n))


def make_splits(root: str | Path, labeled: str, seed: int = 0, val: str = "1/10",
                name: str = "", log=print) -> dict[str, Path]:
    """Write ``splits/<name>/labeled.txt`` and ``unlabeled.txt`` (``name``: ``labeled`` with
    "/" as "_") and, unless one exists (kept), ``splits/val.txt``; the paths by role."""
    root = Path(root).expanduser()
    default_name, amount = parse_amount(labeled)
    name = name or default_name
    files = {"labeled": root / "splits" / name / "labeled.txt",
             "unlabeled": root / "splits" / name / "unlabeled.txt", "val": root / "splits/val.txt"}
    for role in ("labeled", "unlabeled"):
        check_writable(files[role])
    masked, unmasked, skipped = scan(root)
    log(f"data split: {root}: {len(masked)} images with a mask, {len(unmasked)} without")
    for item in skipped:
        log(f"  skipped {item}")
    rng = random.Random(seed)
    pool = list(masked)
    kept_val = files["val"].is_file()
    val_images = (read_val(files["val"]) if kept_val
                  else draw(pool, parse_amount(val)[1], "--val", rng))
    pool = [p for p in pool if p not in set(val_images)]
    chosen = draw(pool, amount, "--labeled", rng)
    rest = sorted(set(pool) - set(chosen)) + unmasked
    command = f"--root {root} --labeled {labeled} --seed {seed}"
    write_list(files["labeled"], [f"{p} {masked[p]}" for p in chosen], command)
    write_list(files["unlabeled"], rest, command)
    if not kept_val:
        write_list(files["val"], [f"{p} {masked[p]}" for p in val_images], command)
    counts = {"labeled": len(chosen), "unlabeled": len(rest), "val": len(val_images)}
    for role, path in files.items():
        kept = " (kept: it exists; every split shares it)" if role == "val" and kept_val else ""
        log(f"wrote {path} ({counts[role]} images){kept}" if not kept else f"{path}{kept}")
    if not (root / CLASSES_FILE).is_file():
        log(f"next: write {root / CLASSES_FILE}, {HOW_TO_WRITE}")
    log(f"train: python -m mlcl train --config folder data.root={root} split={name} "
        "method=mlcl")
    return files

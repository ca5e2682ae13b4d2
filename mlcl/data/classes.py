"""The data decides the classes: a dataset's ``classes.txt`` (a line per class in index order:
``name`` or ``name r g b``) gives the class names, count and colours; a preset's are defaults
for data without one (the folder layout and the synthetic data must have one)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from mlcl.config import Config, ConfigError, check_relations, overridden_keys
from mlcl.data.splits import DataError, read_lines

CLASSES_FILE = "classes.txt"


HOW_TO_WRITE = ("one class a line in index order, background first: `name`, or `name r g b` "
                "for its colour (docs/own_data.md)")
NEEDS_CLASSES = {"folder": "the folder layout", "synthetic": "`python -m mlcl synth` data"}


def read_classes(path: Path) -> list[tuple[str, Optional[tuple[int, int, int]]]]:
    """(name, colour or None) per non-blank line of a classes.txt: ``name`` or ``name r g b``
    (a name may hold spaces); a DataError naming the line for a colour outside 0..255."""
    out = []
    for lineno, line in enumerate(read_lines(path), start=1):
        tokens = line.split()
        rgb = tokens[-3:] if len(tokens) > 3 and all(t.isdigit() for t in tokens[-3:]) else []
        if any(int(t) > 255 for t in rgb):
            raise DataError(f"{path}:{lineno}: colour {' '.join(rgb)} is not three values "
                            "0..255 (`name r g b`)")
        if tokens:
            out.append((" ".join(tokens[:len(tokens) - len(rgb)]), tuple(map(int, rgb)) or None))
    return out


def data_classes(root: str | Path) -> Optional[tuple[Path, list[str]]]:
    """(path, names) of ``root/classes.txt`` (blank lines skipped), or None without one."""
    path = Path(root).expanduser() / CLASSES_FILE
    if not str(root).strip() or not path.is_file():
        return None
    names = [name for name, _ in read_classes(path)]
    if len(names) < 2:
        raise DataError(f"{path} lists {len(names)} class(es): a segmentation dataset needs "
                        "at least 2 (one name a line, background first)")
    return path, names


def default_class_names(count: int) -> list[str]:
    """``class_0`` .. ``class_<count-1>``: the names of classes nothing names."""
    return [f"class_{i}" for i in range(count)]


def class_names(cfg: Config) -> list[str]:
    """cfg.data.class_names, else the data's classes.txt (checked), else default_class_names."""
    k = cfg.data.num_classes
    if cfg.data.class_names:
        return list(cfg.data.class_names)
    found = data_classes(cfg.data.root)
    if found and len(found[1]) != k:
        raise DataError(f"{found[0]} lists {len(found[1])} classes but data.num_classes={k}")
    return found[1] if found else default_class_names(k)


def reconcile_classes(cfg: Config, log: Callable[[str], None] = print) -> Config:
    """Give ``cfg`` the data's class count and names (in place; returns it): an override that
    disagrees is a ConfigError naming both, a preset value is replaced (with a note); data
    that must name its classes (NEEDS_CLASSES) and does not is a DataError."""
    found = data_classes(cfg.data.root)
    needs = NEEDS_CLASSES.get(cfg.data.layout) or NEEDS_CLASSES.get(cfg.data.dataset)
    root = str(cfg.data.root).strip()
    if found is None and needs and root and Path(root).expanduser().is_dir():
        raise DataError(f"{Path(root).expanduser() / CLASSES_FILE} does not exist: "
                        f"{needs} names its classes there, {HOW_TO_WRITE}")
    if found is None:
        return cfg
    path, names = found
    d, pinned = cfg.data, overridden_keys(cfg)
    keep_names = "data.class_names" in pinned and d.class_names
    given = {"data.num_classes": ("is", d.num_classes),
             "data.class_names": ("has", len(d.class_names or names))}
    for key, (verb, count) in given.items():
        if key in pinned and count != len(names):
            raise ConfigError(f"classes disagree: data {path} lists {len(names)} classes, "
                              f"config key '{key}' {verb} {count}: drop the override or point "
                              "data.root at the data you mean")
    if d.num_classes != len(names) and d.layout != "folder":  # there classes.txt is the source
        log(f"note: {len(names)} classes from {path} (the preset's data.num_classes was "
            f"{d.num_classes})")
    d.num_classes = len(names)
    d.class_names = list(d.class_names) if keep_names else names
    check_relations(cfg)
    return cfg


def check_classes(cfg: Config, source: str, count: int, use_data: bool = True) -> None:
    """A ConfigError naming all three unless the data's class count (with ``use_data``), the
    config's ``data.num_classes`` and ``count`` (what ``source`` predicts) are equal."""
    found = data_classes(cfg.data.root) if use_data else None
    if len({cfg.data.num_classes, count} | ({len(found[1])} if found else set())) == 1:
        return
    data = (f"data {found[0]} lists {len(found[1])}" if found else
            f"data {cfg.data.root or '(no data.root)'} has no {CLASSES_FILE}" if use_data
            else None)
    parts = [p for p in (data, f"config data.num_classes={cfg.data.num_classes}",
                         f"{source} predicts {count}") if p]
    raise ConfigError(f"classes disagree: {', '.join(parts)}; use the data and config the "
                      "checkpoint was trained with")

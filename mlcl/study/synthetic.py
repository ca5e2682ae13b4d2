"""A synthetic shapes dataset in VOC's or Cityscapes' layout (`python -m mlcl synth`; the
design: docs/synthetic_study.md, "The data"), 255 along object edges; the same arguments give
byte-identical files (one numpy Generator per image, seeded by (seed, split, index))."""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mlcl.data.palette import voc_palette
from mlcl.data.splits import paths_for_id

FAMILIES = ("disc", "rectangle", "triangle", "ring", "star", "cross")
TEXTURES = ("flat", "stripes", "checker", "spots", "gradient")
FRACTIONS = {"1_32": 32, "1_16": 16, "1_8": 8, "1_4": 4, "1_2": 2}
CITIES = {"train": ("aachen", "bochum", "bremen", "cologne"),
          "val": ("frankfurt", "lindau", "munster")}
IGNORE = 255

# Colour overlap between classes (docs/synthetic_study.md, "The data").
HUE_JITTER = 0.05  # sigma, as a fraction of the hue circle
RANDOM_COLOUR_P = 0.15
NUM_OBJECTS = (2, 5)  # per square of side `size`
RADIUS = (0.11, 0.30)  # of the image height, log-uniform
# thin shapes drawn larger so that every class covers a similar area
FAMILY_SCALE = {"triangle": 1.3, "star": 1.3}


def class_names(classes: int) -> list[str]:
    """background, then the shape families, cycled (disc_2, ...) when classes > 7."""
    n = len(FAMILIES)
    return ["background"] + [FAMILIES[c % n] + (f"_{c // n + 1}" if c >= n else "")
                             for c in range(classes - 1)]


def sample_id(split: str, i: int, layout: str) -> str:
    if layout == "cityscapes":
        cities = CITIES[split]
        city = cities[i % len(cities)]
        return f"{split}/{city}/{city}_{i // len(cities):06d}_000019"
    return f"{split}_{i:06d}"


def hsv_to_rgb(h, s, v) -> np.ndarray:
    """Broadcasting HSV -> RGB, all in [0, 1]; returns (..., 3)."""
    h, s, v = np.broadcast_arrays(np.asarray(h, float) % 1.0, np.asarray(s, float),
                                  np.asarray(v, float))
    h6 = h * 6.0
    i = np.floor(h6).astype(int) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


@functools.lru_cache(maxsize=32)
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation weights: coarse grid -> pixels."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, max(n_in - 2, 0))
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), np.minimum(lo + 1, n_in - 1)] += frac
    return m


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a random coarse grid, bilinearly upsampled."""
    gh, gw = cells, max(2, cells * w // h)
    grid = rng.uniform(-1, 1, (gh, gw))
    return _interp_matrix(h, gh) @ grid @ _interp_matrix(w, gw).T


def texture(kind: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A texture field in about [-1, 1] over the pixel grid (yy, xx)."""
    h, w = yy.shape
    if kind == "flat":
        return 0.25 * rng.uniform(-1, 1, (h, w))
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == "stripes":
        return np.sin(2 * np.pi * u / rng.uniform(3, 8) + rng.uniform(0, 2 * np.pi))
    if kind == "checker":
        cell = rng.uniform(2, 5)
        v = -xx * np.sin(angle) + yy * np.cos(angle)
        return np.where((np.floor(u / cell) + np.floor(v / cell)) % 2 == 0, 1.0, -1.0)
    if kind == "spots":
        return smooth_noise(rng, h, w, int(rng.integers(6, 12)))
    return (u - u.mean()) / max(float(np.ptp(u)), 1.0) * 2  # "gradient"


def shape_polygons(family: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Unit-radius outlines of a shape as (points (N, 2), fill) pairs, drawn in order."""
    def circle(r: float, n: int = 24, aspect: float = 1.0) -> np.ndarray:
        a = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return np.stack([r * np.cos(a), r * aspect * np.sin(a)], axis=1)

    if family == "disc":
        return [(circle(1.0, aspect=rng.uniform(0.85, 1.0)), 1)]
    if family == "rectangle":
        a, b = 1.0, rng.uniform(0.45, 0.9)
        return [(np.array([[-a, -b], [a, -b], [a, b], [-a, b]]), 1)]
    if family == "triangle":
        ang = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.normal(0, 6, 3))
        return [(np.stack([np.cos(ang), np.sin(ang)], axis=1), 1)]
    if family == "ring":
        return [(circle(1.0), 1), (circle(rng.uniform(0.45, 0.6)), 0)]
    if family == "star":
        a = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        return [(np.stack([r * np.cos(a), r * np.sin(a)], axis=1), 1)]
    t = rng.uniform(0.25, 0.35)  # "cross": arm half-width
    pts = [[t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1],
           [-t, 1], [-t, t], [-1, t], [-1, -t], [-t, -t], [-t, -1]]
    return [(np.array(pts, dtype=float), 1)]


def object_mask(family: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A rotated, scaled, placed shape as a bool (h, w) mask."""
    radius = h * np.exp(rng.uniform(*np.log(RADIUS))) * FAMILY_SCALE.get(family, 1.0)
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, fill in shape_polygons(family, rng):
        xy = pts @ rot.T * radius + (cx, cy)
        draw.polygon([tuple(p) for p in xy], fill=fill)
    return np.asarray(canvas, dtype=bool)


def edge_band(instance: np.ndarray) -> np.ndarray:
    """Pixels with an 8-neighbour of another ``instance`` id: a band about 2 px wide."""
    band = np.zeros(instance.shape, dtype=bool)
    h, w = instance.shape
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        here = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
        there = (slice(dy, h), slice(max(0, dx), w - max(0, -dx)))  # (y + dy, x + dx)
        diff = instance[here] != instance[there]
        band[here] |= diff
        band[there] |= diff
    return band


def render(rng: np.random.Generator, h: int, w: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 (h, w, 3) image and its uint8 (h, w) mask (255 on edges) from ``rng``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    img = _clutter(rng, _background(rng, yy, xx))
    label, instance = _objects(rng, img, yy, xx, classes)
    label[edge_band(instance)] = IGNORE
    img = img + rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A low-saturation colour with smooth hue / value variation and a texture; (h, w, 3)."""
    h, w = yy.shape
    hue = rng.uniform() + 0.06 * smooth_noise(rng, h, w, 4)
    sat = np.clip(rng.uniform(0.0, 0.35) + 0.1 * smooth_noise(rng, h, w, 3), 0, 1)
    val = rng.uniform(0.35, 0.8) + 0.12 * smooth_noise(rng, h, w, 5) \
        + 0.08 * texture(TEXTURES[rng.integers(len(TEXTURES))], rng, yy, xx)
    return hsv_to_rgb(hue, sat, np.clip(val, 0, 1))


def _clutter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """``img`` (h, w, 3) in [0, 1] with strokes and blobs of any colour, quantised to 8 bits."""
    h, w = img.shape[:2]
    canvas = Image.fromarray((img * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 9) * w // h)):
        colour = tuple(int(c) for c in 255 * hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 0.8),
                                                        rng.uniform(0.2, 1.0)))
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        if rng.uniform() < 0.5:
            ln = rng.uniform(0.05, 0.15) * h
            a = rng.uniform(0, 2 * np.pi)
            draw.line([(x0, y0), (x0 + ln * np.cos(a), y0 + ln * np.sin(a))], fill=colour)
        else:
            r = rng.uniform(0.5, 0.04 * h)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
    return np.asarray(canvas, dtype=float) / 255


def _objects(rng: np.random.Generator, img: np.ndarray, yy: np.ndarray, xx: np.ndarray,
             classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Paint occluding objects into ``img`` (in place); the uint8 class and int32 instance maps."""
    h, w = yy.shape
    label = np.zeros((h, w), dtype=np.uint8)
    instance = np.zeros((h, w), dtype=np.int32)
    lo, hi = NUM_OBJECTS
    for k in range(1, int(rng.integers(lo, hi + 1)) * max(1, w // h) + 1):
        c = int(rng.integers(1, classes))
        family = (c - 1) % len(FAMILIES)
        m = object_mask(FAMILIES[family], rng, h, w)
        if rng.uniform() < RANDOM_COLOUR_P:
            oh, os_, ov = rng.uniform(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0)
        else:
            oh = (c - 1) / (classes - 1) + rng.normal(0, HUE_JITTER)
            os_, ov = rng.uniform(0.55, 1.0), rng.uniform(0.5, 0.95)
        prior = np.full(len(TEXTURES), 0.3 / (len(TEXTURES) - 2))  # 0.5 own, 0.2 the next
        prior[family % len(TEXTURES)], prior[(family + 1) % len(TEXTURES)] = 0.5, 0.2
        kind = TEXTURES[rng.choice(len(TEXTURES), p=prior)]
        tex = texture(kind, rng, yy, xx)
        v = np.clip(ov + rng.uniform(0.1, 0.25) * tex, 0, 1)
        s = np.clip(os_ + 0.1 * tex, 0, 1)
        img[m] = hsv_to_rgb(oh, s[m], v[m])
        label[m], instance[m] = c, k
    return label, instance


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def make_synthetic(out: str | Path, num_train: int = 1000, num_val: int = 200, size: int = 64,
                   classes: int = 7, seed: int = 0, layout: str = "voc") -> Path:
    """``out``, with the dataset written into it (images, masks, classes.txt, splits/)."""
    if layout not in ("voc", "cityscapes"):
        raise ValueError(f"layout must be voc or cityscapes, got {layout!r}")
    if classes < 2:
        raise ValueError(f"classes counts the background and must be >= 2, got {classes}")
    if num_train < 1 or num_val < 1 or size < 16:
        raise ValueError("need num_train >= 1, num_val >= 1 and size >= 16")
    out, voc = Path(out), layout == "voc"
    h, w = size, (size if voc else 2 * size)
    palette = voc_palette()
    ids: dict[str, list[str]] = {}
    for split_no, (split, n) in enumerate((("train", num_train), ("val", num_val))):
        ids[split] = [sample_id(split, i, layout) for i in range(n)]
        for i, sid in enumerate(ids[split]):
            image, mask = render(np.random.default_rng([seed, split_no, i]), h, w, classes)
            image_rel, mask_rel = paths_for_id(sid, layout)
            for rel in (image_rel, mask_rel):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(out / image_rel, quality=95)  # PNG ignores quality
            m = Image.fromarray(mask)
            if voc:
                m.putpalette(palette)  # L -> P: VOC's palette PNGs
            m.save(out / mask_rel)
    _write_lists(out, ids, layout, classes, seed)
    return out


def _write_lists(out: Path, ids: dict[str, list[str]], layout: str, classes: int,
                 seed: int) -> None:
    """classes.txt, VOC's id lists and the split lists of every fraction in FRACTIONS."""
    def pairs(sids: list[str]) -> list[str]:
        return [" ".join(paths_for_id(s, layout)) for s in sids]

    _write_lines(out / "classes.txt", class_names(classes))
    if layout == "voc":
        for split in ids:
            _write_lines(out / "ImageSets" / "Segmentation" / f"{split}.txt", ids[split])
    for split in ids:
        _write_lines(out / "splits" / f"{split}.txt", pairs(ids[split]))
    num_train = len(ids["train"])
    order = np.random.default_rng([seed, 99]).permutation(num_train)
    for name, d in FRACTIONS.items():
        chosen = set(order[:max(1, round(num_train / d))].tolist())
        labeled = [s for i, s in enumerate(ids["train"]) if i in chosen]
        unlabeled = [s for i, s in enumerate(ids["train"]) if i not in chosen]
        _write_lines(out / "splits" / name / "labeled.txt", pairs(labeled))
        _write_lines(out / "splits" / name / "unlabeled.txt", pairs(unlabeled))


def add_synth_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="data/synthetic",
                        help="output folder (the synthetic preset's data.root; "
                             "default: %(default)s)")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--size", type=int, default=64, help="image height in pixels")
    parser.add_argument("--classes", type=int, default=7,
                        help="number of classes including background (= data.num_classes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=("voc", "cityscapes"), default="voc")


def run_synth(args: argparse.Namespace) -> int:
    """``python -m mlcl synth``: :func:`make_synthetic` with the parsed arguments; 0."""
    out = make_synthetic(args.out, args.num_train, args.num_val, args.size, args.classes,
                         args.seed, args.layout)
    print(f"wrote {args.num_train} train + {args.num_val} val images ({args.layout} layout, "
          f"{args.classes} classes) to {out}")
    return 0

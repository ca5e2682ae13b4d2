"""One's own data, the documented path (docs/own_data.md) on a dataset drawn here (not by
`synth`): data split, data verify, train with the folder preset, evaluate, predict, and the
notebooks, all on one layout: images/, masks/ (palette and grayscale PNGs), unlabeled images
without masks, classes.txt with names and colours."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mlcl.config import load_config
from mlcl.data.palette import voc_palette

from test_bad_input import run_cli  # noqa: E402  (tests/ is on sys.path)

CLASSES = "background\nsquare 220 40 40\ndisc 40 200 40\nbar 40 60 230\n"
TINY = ["model.width=16", "data.crop_size=48", "train.batch_size=4", "data.num_workers=0",
        "train.max_iters=2", "train.epochs=1"]


def draw(rng: np.random.Generator, size: int = 48) -> tuple[Image.Image, np.ndarray]:
    """A noisy background with a square (1), a disc (2) and a bar (3) somewhere."""
    pixels = rng.integers(90, 140, (size, size, 3), dtype=np.uint8)
    image, mask = Image.fromarray(pixels), Image.new("L", (size, size), 0)
    shapes = ((1, "rectangle", (220, 40, 40)), (2, "ellipse", (40, 200, 40)),
              (3, "bar", (40, 60, 230)))
    for k, kind, colour in shapes:
        x, y = (int(v) for v in rng.integers(0, size - 16, 2))
        box = [x, y, x + 15, y + 15] if kind != "bar" else [x, y, x + 15, y + 4]
        for canvas, fill in ((ImageDraw.Draw(image), colour), (ImageDraw.Draw(mask), k)):
            getattr(canvas, "ellipse" if kind == "ellipse" else "rectangle")(box, fill=fill)
    return image, np.array(mask)


def make_own_dataset(root: Path, labeled: int = 28, unlabeled: int = 24) -> Path:
    """``root`` with images/ (.jpg and .png, one 16-bit grayscale, a .gif that mlcl does not
    read), masks/ (palette PNGs, every third grayscale) and classes.txt."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(labeled + unlabeled):
        image, mask = draw(rng)
        image.save(root / "images" / f"img_{i:03d}.{'png' if i % 2 else 'jpg'}")
        if i < labeled:
            m = Image.fromarray(mask, mode="L")
            if i % 3:
                m = m.convert("P")
                m.putpalette(voc_palette())
            m.save(root / "masks" / f"img_{i:03d}.png")
    grey16 = (np.asarray(draw(rng)[0].convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(grey16).save(root / "images" / "grey16.png")  # unlabeled, 16-bit
    draw(rng)[0].save(root / "images" / "anim.gif")
    blank = Image.new("L", (48, 48))
    blank.save(root / "masks" / "orphan.png")  # a mask without an image
    blank.save(root / "masks" / f"img_{labeled:03d}.jpg")  # not a PNG: named, not used
    (root / "classes.txt").write_text(CLASSES)
    return root


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> Path:
    return make_own_dataset(tmp_path_factory.mktemp("own") / "shapes")


@pytest.fixture(scope="module")
def trained(own, tmp_path_factory) -> Path:
    """The documented commands up to a trained run (cwd: a fresh folder, so runs/ is there)."""
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        from mlcl.__main__ import main
        assert main(["data", "split", "--root", str(own), "--labeled", "1/2", "--val", "4"]) == 0
        assert main(["train", "--config", "folder", f"data.root={own}", "split=1_2",
                     "method=mlcl", *TINY]) == 0
    return cwd / "runs" / "shapes" / "1_2" / "mlcl-paper-s0"  # named after the folder


def test_data_split_writes_lists_names_skipped_files_and_keeps_val(own, trained, capsys):
    rc, out, _ = run_cli(capsys, "data", "split", "--root", str(own), "--labeled", "8")
    assert rc == 0, out
    assert "skipped images/anim.gif (not an image mlcl reads" in out
    assert "skipped masks/orphan.png (no image images/orphan.*)" in out
    assert "skipped masks/img_028.jpg (a mask is a PNG" in out
    lines = {role: [ln for ln in (own / "splits" / f).read_text().splitlines()
                    if not ln.startswith("#")]
             for role, f in (("labeled", "8/labeled.txt"), ("unlabeled", "8/unlabeled.txt"),
                             ("val", "val.txt"))}
    assert len(lines["labeled"]) == 8 and len(lines["val"]) == 4  # val.txt kept (1/2's)
    assert all(ln.split()[1].startswith("masks/") for ln in lines["labeled"] + lines["val"])
    assert "images/grey16.png" in lines["unlabeled"] and len(lines["unlabeled"]) == 53 - 12
    assert not set(lines["val"]) & set(lines["labeled"])
    assert f"wrote {own / 'splits/8/labeled.txt'} (8 images)" in out
    assert "(kept: it exists" in out and "split=8 method=mlcl" in out
    rc, out, _ = run_cli(capsys, "data", "split", "--root", str(own), "--labeled", "8")
    assert rc == 0  # its own files are replaced


def test_verify_agrees_with_training_on_images_without_masks(own, trained, capsys):
    rc, out, _ = run_cli(capsys, "data", "verify", "--root", str(own), "--layout", "folder")
    assert rc == 0 and out.strip().endswith("OK") and "splits/1_2/unlabeled.txt: 37 samples, OK" \
        in out, out


def test_train_takes_classes_and_names_from_the_folder(own, trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["dataset"] == "shapes" and metrics["split"] == "1_2"
    assert metrics["class_names"] == ["background", "square", "disc", "bar"]
    cfg = load_config("folder", [f"data.root={own}", "split=mine"])  # any split name
    assert cfg.data.labeled_split == "splits/mine/labeled.txt" and cfg.data.layout == "folder"


def test_evaluate_and_predict_with_the_folder_colours(own, trained, tmp_path, capsys):
    rc, out, _ = run_cli(capsys, "evaluate", "--checkpoint", str(trained))
    assert rc == 0 and "over 4 images" in out and "square" in out and "bar" in out
    pics = tmp_path / "pics"
    pics.mkdir()
    for name in ("grey16.png", "img_000.jpg"):
        (pics / name).write_bytes((own / "images" / name).read_bytes())
    rc, out, _ = run_cli(capsys, "predict", "--checkpoint", str(trained), "--images", str(pics),
                         "--out", str(tmp_path / "pred"))
    assert rc == 0 and (tmp_path / "pred" / "grey16.png.png").is_file()
    legend = (tmp_path / "pred" / "legend.txt").read_text().splitlines()
    assert legend[1] == "1\tsquare\t220,40,40" and legend[3] == "3\tbar\t40,60,230"


def test_notebooks_accept_the_folder_layout(own, trained, tmp_path):
    from test_notebooks import execute  # noqa: E402

    out, reg = tmp_path / "cells" / "r", tmp_path / "registry"
    execute("run", tmp_path / "run.ipynb", preset="folder", split="1_2", method="mlcl",
            output_dir=str(out), registry_dir=str(reg), num_predictions=2,
            overrides=[f"data.root={own}", *TINY])
    summary = json.loads((out / "run_notebook.json").read_text())
    assert summary["dataset"] == "shapes" and summary["iterations"] == 2
    execute("perturbations", tmp_path / "pert.ipynb", checkpoint=str(trained / "best.pt"),
            num_images=2, batch_images=4, out_dir=str(tmp_path / "pert"))
    assert (tmp_path / "pert" / "perturbations_paper.png").stat().st_size > 0
    execute("prototypes", tmp_path / "protos.ipynb", checkpoints={"MLCL": str(trained / "best.pt")},
            num_images=4, max_pixels=100, tsne=False, out_dir=str(tmp_path / "protos"))
    assert (tmp_path / "protos" / "compactness_bars.png").stat().st_size > 0

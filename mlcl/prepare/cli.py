"""``python -m mlcl data {voc,cityscapes,ade20k,coco,splits,split,verify,pretrained}`` and
data_scripts/*.py (docs/real_data.md): exit status 0 on success, 1 on a failed step or check
(the message says what to do), 2 on bad arguments, 130 on Ctrl-C."""
from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Optional

from mlcl.config import ConfigError, DataConfig
from mlcl.data.splits import LAYOUTS
from mlcl.errors import CommandLineParser, MlclError, RunInterrupted, run_reported
from mlcl.prepare.split_lists import RAW_BASE, SPLITS, get_splits


def _amount(text: str) -> str:
    from mlcl.prepare.folder import parse_amount

    try:
        parse_amount(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _counts(text: str) -> dict[str, int]:
    try:
        return {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=N[,NAME=N...], got {text!r}") from None


def _retry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retries", type=int, default=4, help="attempts per download (default 4)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="seconds before the first retry, doubled each time (default 1)")


def _split_args(p: argparse.ArgumentParser, dataset: Optional[str]) -> None:
    if dataset is None:
        p.add_argument("--dataset", choices=tuple(SPLITS), required=True)
    p.add_argument("--split-source", dest="split_mode", default="auto",
                   choices=("auto", "fetch", "generate", "none") if dataset else
                   ("auto", "fetch", "generate"),
                   help="fetch UniMatch's lists; generate NON-STANDARD seeded stand-ins; auto: "
                        "fetch, generate only if the source is unreachable (default)")
    p.add_argument("--commit", help="commit of UniMatch's repository (UniMatch V2's for "
                   "ADE20K) to take the lists from (default: the pinned one)")
    p.add_argument("--split-base-url", default=RAW_BASE,
                   help="raw-file host (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of generated lists (default 0)")


def _dataset_args(p: argparse.ArgumentParser, dataset: str, counts: str, real: str) -> None:
    """The options of voc and cityscapes: counts, downloads, splits, verify (its defaults)."""
    p.add_argument("--expect", type=_counts, metavar=counts,
                   help=f"expected counts (default: {real}; for tests)")
    p.add_argument("--no-verify", action="store_true", help="skip the final verify pass")
    p.add_argument("--downloads", help="folder for the archives (default: ROOT/../downloads)")
    _retry_args(p)
    p.add_argument("--force", action="store_true",
                   help="forget the .done markers of this dataset and redo every step "
                        "(downloads are still reused when their checksum is right)")
    _split_args(p, dataset)
    p.set_defaults(layout="cityscapes" if dataset == "cityscapes" else "voc", splits=None,
                   unlabeled=[], num_classes=None, no_values=False, workers=4, max_listed=20,
                   ignore_index=DataConfig().ignore_index)


DESCRIPTION = ("Download, prepare and verify VOC 2012 (+SBD), Cityscapes, ADE20K, COCO, the "
               "standard split lists and the backbone checkpoints; a re-run skips what is "
               "done and verified.")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The data commands under ``ap`` (``python -m mlcl data``'s parser); each runs :func:`run`."""
    ap.set_defaults(func=run)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("voc", help="VOC 2012 + augmented masks (10,582 train_aug), splits, verify",
                       description="Download the VOC trainval tar and SBD (resumable, "
                                   "md5-checked), build the augmented masks, fetch the split "
                                   "lists, verify.")
    p.set_defaults(step=_voc)
    p.add_argument("--root", default="data/VOC2012", help="dataset folder (default: %(default)s)")
    p.add_argument("--aug", default="sbd",
                   help="'sbd' (download SBD and convert its .mat labels; default), or a "
                        "SegmentationClassAug folder or zip you already have")
    p.add_argument("--voc-url", help="mirror of the VOC trainval tar")
    p.add_argument("--voc-md5", help="md5 of that tar (default: the official)")
    p.add_argument("--sbd-url", help="mirror of SBD's benchmark.tgz")
    p.add_argument("--sbd-md5", help="md5 of that tgz (default: the official)")
    p.add_argument("--keep-staging", action="store_true", help="keep the extracted SBD .mat files")
    _dataset_args(p, "pascal", "train_aug=N,train=N,val=N", "10582, 1464, 1449")

    p = sub.add_parser("cityscapes",
                       help="Cityscapes fine: zips or account, trainIds, splits, verify",
                       description="The two *_trainvaltest.zip from --zips, the downloads folder "
                                   "or the server (account in CITYSCAPES_USERNAME / "
                                   "CITYSCAPES_PASSWORD, never stored); extract, make "
                                   "labelTrainIds, fetch the split lists, verify.")
    p.set_defaults(step=_cityscapes)
    p.add_argument("--root", default="data/cityscapes",
                   help="dataset folder (default: %(default)s)")
    p.add_argument("--zips", help="folder holding the two zips, if downloaded")
    p.add_argument("--base-url",
                   help="Cityscapes server (default: the official; for mirrors and tests)")
    p.add_argument("--with-test", action="store_true", help="also extract the test images")
    _dataset_args(p, "cityscapes", "train=N,val=N", "2975, 500")

    for name, what, real in (("ade20k", "ADEChallengeData2016.zip", "20210, 2000"),
                             ("coco", "train2017.zip, val2017.zip and the annotations zip",
                              "118287, 5000")):
        p = sub.add_parser(name, help=f"{name}: download {what}, masks, splits, verify",
                           description=f"Download {what} (resumable, md5-checked), extract, "
                                       f"write the masks and classes.txt, fetch the split "
                                       f"lists, verify (docs/real_data.md).")
        p.set_defaults(step=_paired, paired=name)
        p.add_argument("--root", default=f"data/{name}", help="dataset folder (default: "
                       "%(default)s)")
        p.add_argument("--mirror", help="a host serving the archives at the official paths")
        p.add_argument("--md5", type=_md5s, default={}, metavar="FILE=MD5[,...]",
                       help="md5 of an archive when not the official one (a mirror's, tests)")
        _dataset_args(p, name, "train=N,val=N", real)

    p = sub.add_parser("splits", help="UniMatch's split lists (pinned commit) or seeded stand-ins",
                       description="Write ROOT/splits/DATASET/ and its PROVENANCE.json.")
    p.set_defaults(step=_splits)
    p.add_argument("--root", required=True, help="the prepared dataset folder")
    p.add_argument("--names", nargs="*", help="split names (default: all)")
    p.add_argument("--expect", type=_counts, metavar="POOL=N,...",
                   help="pool sizes (train[,train_aug],val) when not the real ones; for tests")
    p.add_argument("--force", action="store_true", help="let generated lists replace standard ones")
    _retry_args(p)
    _split_args(p, None)

    p = sub.add_parser("split", help="labeled / unlabeled / val split files for your own data",
                       description="For ROOT/images/ and ROOT/masks/ (docs/own_data.md): write "
                                   "ROOT/splits/NAME/{labeled,unlabeled}.txt and, unless it "
                                   "exists, ROOT/splits/val.txt; images without a mask are "
                                   "unlabeled.")
    p.set_defaults(step=_own_split)
    p.add_argument("--root", required=True, help="the dataset folder")
    p.add_argument("--labeled", required=True, type=_amount,
                   help="a fraction of the images with a mask (1/8) or a count (92)")
    p.add_argument("--val", default="1/10", type=_amount,
                   help="validation images, drawn first (default %(default)s; kept once written)")
    p.add_argument("--seed", type=int, default=0, help="the draw's seed (default 0)")
    p.add_argument("--name", default="", help="split name (default: --labeled, / as _)")

    p = sub.add_parser("verify", help="check a dataset against its split files",
                       description="Every listed file exists and decodes, sizes agree, mask values "
                                   "in 0..K-1 or --ignore-index; exit 1 naming each bad file.")
    p.set_defaults(step=_verify)
    p.add_argument("--root", required=True, help="dataset folder")
    p.add_argument("--layout", choices=LAYOUTS, required=True)
    p.add_argument("--splits", nargs="*",
                   help="split files, relative to ROOT or absolute (default: ROOT/splits/**/*.txt)")
    p.add_argument("--unlabeled", nargs="*", default=[],
                   help="split files read as training reads data.unlabeled_split: images only, "
                        "masks neither needed nor read (also any split named unlabeled*.txt)")
    p.add_argument("--num-classes", type=int,
                   help="K (default: ROOT/classes.txt, else 21 voc, 19 cityscapes)")
    p.add_argument("--ignore-index", type=int, default=DataConfig().ignore_index,
                   help="the label of unscored pixels (data.ignore_index; default %(default)s)")
    p.add_argument("--no-values", action="store_true",
                   help="skip decoding masks (existence and sizes only; faster)")
    p.add_argument("--workers", type=int, default=4, help="threads (default 4)")
    p.add_argument("--max-listed", type=int, default=20,
                   help="problems printed per split (default 20)")

    p = sub.add_parser("pretrained",
                       help="torchvision ImageNet weights, DINOv2 files; check checkpoints",
                       description="torchvision's ImageNet ResNets into the torch hub cache "
                                   "(model.pretrained: true); the official DINOv2 files to "
                                   "pretrained/dinov2_{small,base,large}.pth (the V2 presets'); "
                                   "check checkpoints (pretrained/resnet50.pth, the DINOv2 "
                                   "files): size, sha256, exact load.")
    p.set_defaults(step=_pretrained)
    p.add_argument("--torchvision", nargs="*", default=[], metavar="ARCH",
                   help="e.g. resnet50 resnet101")
    p.add_argument("--dinov2", nargs="*", default=[], metavar="ARCH",
                   help="download and check, e.g. dinov2_s dinov2_b (dinov2_l)")
    p.add_argument("--url", help="replace the URL of the one --torchvision or --dinov2 ARCH")
    p.add_argument("--check", nargs="*", default=[], metavar="PATH",
                   help="checkpoints to check, e.g. pretrained/resnet50.pth")
    p.add_argument("--backbone", help="backbone of --check files (default: from the file name)")
    _retry_args(p)


def _fetch_kw(args) -> dict:
    return {"retries": args.retries, "backoff": args.backoff}


def _splits_then_verify(args, dataset: str, pools: Optional[dict]) -> int:
    if args.split_mode != "none":
        get_splits(dataset, args.root, mode=args.split_mode, commit=args.commit,
                   base_url=args.split_base_url, pools=pools, seed=args.seed,
                   fetch_kw=_fetch_kw(args))
    return 0 if args.no_verify else _verify(args)


def _verify(args) -> int:
    from mlcl.prepare.verify import verify_dataset  # here: it loads torch (mlcl.data.preflight)

    report = verify_dataset(args.root, args.layout, args.splits, args.num_classes,
                            not args.no_values, args.workers, ignore_index=args.ignore_index,
                            unlabeled=args.unlabeled)
    print("\n".join(report.lines(args.max_listed)), flush=True)
    return 0 if report.ok else 1


def _own_split(args) -> int:
    from mlcl.prepare.folder import make_splits

    make_splits(args.root, args.labeled, args.seed, args.val, args.name)
    return 0


def _pretrained(args) -> int:
    if not (args.torchvision or args.dinov2 or args.check):
        raise MlclError("nothing to do: give --torchvision ARCH ..., --dinov2 ARCH ... and/or "
                        "--check PATH ...")
    if args.url and len(args.torchvision) + len(args.dinov2) != 1:
        raise MlclError("--url replaces the URL of one --torchvision or --dinov2 ARCH only")
    # torch and torchvision load here only: the other data commands and --help need neither
    from mlcl.prepare.pretrained import (check_checkpoint, fetch_dinov2, fetch_torchvision,
                                         fresh_backbone)

    for arch in args.torchvision:
        fetch_torchvision(arch, url=args.url, **_fetch_kw(args))
    for arch in args.dinov2:
        fetch_dinov2(arch, url=args.url, **_fetch_kw(args))
    for path in args.check:
        name = args.backbone or _backbone_of(Path(path).name)
        try:
            backbone = fresh_backbone(name)
        except ConfigError as e:
            raise MlclError(f"--backbone: {e}") from None
        check_checkpoint(path, backbone, name)
    return 0


def _backbone_of(file_name: str) -> str:
    """The backbone a checkpoint's file name suggests: dinov2_small.pth dinov2_s, resnet101.pth
    the deep-stem R101, anything else the deep-stem R50."""
    size = next((s for s in ("small", "base", "large") if s in file_name), None)
    if "dinov2" in file_name and size:
        return f"dinov2_{size[0]}"
    return f"resnet{101 if '101' in file_name else 50}_deepstem"


def run(args) -> int:
    """The parsed command's exit status; Ctrl-C becomes a RunInterrupted (the command resumes)."""
    try:
        return args.step(args)
    except KeyboardInterrupt:
        raise RunInterrupted("interrupted: run the same command again to resume",
                             signal.SIGINT) from None


def _voc(args) -> int:
    from mlcl.prepare import voc

    vres = voc.VOC._replace(url=args.voc_url or voc.VOC.url, md5=args.voc_md5 or voc.VOC.md5)
    sres = voc.SBD._replace(url=args.sbd_url or voc.SBD.url, md5=args.sbd_md5 or voc.SBD.md5)
    counts = voc.prepare_voc(args.root, args.downloads, args.aug, vres, sres, args.expect,
                             args.keep_staging, args.force, _fetch_kw(args))
    return _splits_then_verify(args, "pascal", counts if args.expect else None)


def _cityscapes(args) -> int:
    from mlcl.prepare import cityscapes

    counts = cityscapes.prepare_cityscapes(
        args.root, args.downloads, args.zips, args.base_url or cityscapes.BASE_URL,
        with_test=args.with_test, expected=args.expect, force=args.force)
    return _splits_then_verify(args, "cityscapes", counts if args.expect else None)


def _md5s(text: str) -> dict[str, str]:
    pairs = [kv.split("=", 1) for kv in text.split(",")]
    if any(len(kv) != 2 for kv in pairs):
        raise argparse.ArgumentTypeError(f"expected FILE=MD5[,...], got {text!r}")
    return dict(pairs)


def _paired(args) -> int:
    """``data ade20k`` / ``data coco``: their archives (from ``--mirror``), masks, splits."""
    from urllib.parse import urlsplit

    from mlcl.prepare import ade20k, coco

    archives, prepare = {"ade20k": (ade20k.ARCHIVES, ade20k.prepare_ade20k),
                         "coco": (coco.ARCHIVES, coco.prepare_coco)}[args.paired]
    archives = tuple(r._replace(url=args.mirror.rstrip("/") + urlsplit(r.url).path
                                if args.mirror else r.url, md5=args.md5.get(r.filename, r.md5))
                     for r in archives)
    counts = prepare(args.root, args.downloads, archives, args.expect, args.force,
                     _fetch_kw(args))
    return _splits_then_verify(args, args.paired, counts if args.expect else None)


def _splits(args) -> int:
    get_splits(args.dataset, args.root, mode=args.split_mode, names=args.names,
               commit=args.commit, base_url=args.split_base_url, pools=args.expect,
               seed=args.seed, force=args.force, fetch_kw=_fetch_kw(args))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m mlcl data ARGV`` (data_scripts/): the exit status (module docstring)."""
    ap = CommandLineParser(prog="python -m mlcl data", description=DESCRIPTION)
    add_arguments(ap)
    args = ap.parse_args(argv)
    return run_reported(lambda: run(args))

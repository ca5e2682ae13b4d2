"""Getting the real datasets, split lists and backbone checkpoints onto disk, verified.

    python -m mlcl data voc --root data/VOC2012            # VOC 2012 + SBD -> 10,582 masks
    python -m mlcl data cityscapes --root data/cityscapes  # zips or an account -> trainIds
    python -m mlcl data splits --dataset pascal --root data/VOC2012
    python -m mlcl data verify --root data/VOC2012 --layout voc
    python -m mlcl data pretrained --torchvision resnet50 resnet101

(``data_scripts/*.py`` are the same commands as stand-alone scripts.) Every step is
idempotent: a finished step leaves a ``.done`` marker holding what it checked (checksums,
counts), and a re-run skips it. The run-book is docs/real_data.md.

Modules: ``download`` (resumable, checksum-verified HTTP; safe archive extraction),
``voc``, ``cityscapes``, ``split_lists`` (UniMatch's lists pinned to a commit, or seeded
stand-ins marked NON-STANDARD), ``verify``, ``pretrained`` (backbone weights: download, check,
and the strict load that training uses), ``cli``. (The tests' fake archives
and loopback HTTP server live in tests/fakes.py.)
"""

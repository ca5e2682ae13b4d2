"""Getting the real datasets, split lists and backbone checkpoints onto disk, verified:
``python -m mlcl data {voc,cityscapes,splits,verify,pretrained}`` (:mod:`.cli`; the same as
``data_scripts/*.py``). Every step is idempotent: a finished step leaves a ``.done`` marker of
what it checked, and a re-run skips it. Run-book: docs/real_data.md."""

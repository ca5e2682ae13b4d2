"""The real datasets, split lists and backbone checkpoints onto disk, verified (:mod:`.cli`);
a finished step leaves a ``.done`` marker of what it checked, so a re-run skips it."""

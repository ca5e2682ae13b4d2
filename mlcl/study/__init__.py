"""The study around the core (which never imports it): synthetic data, grids of runs, batch
reproduction, its registry, the demo, predict, the notebooks' explore, paper numbers, viz."""

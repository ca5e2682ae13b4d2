"""The study around the core: synthetic data (synthetic), grids of runs (grids), batch
reproduction and its results registry (reproduce, registry), the demo, predictions from
checkpoints (predict), what the notebooks look at inside checkpoints (explore), the
published numbers (paper) and the figures and tables (viz). The core never imports it."""

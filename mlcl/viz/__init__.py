"""Figures and tables from results: ``plot_*`` return matplotlib Figures, ``*_table`` return
pandas DataFrames (a display table of strings; ``*_values`` the numbers behind it), and
``save_figure`` / ``save_table`` write them into ``figures/`` with a caption that names the
runs they came from. Results come from the registry (mlcl.registry) only; checkpoint-based
figures (predictions, perturbations, prototypes) take what mlcl.explore computed.

Conventions: mIoU in %; "mean ± std (n=k)" over seeds (sample std, ddof=1); "not run" where
the registry has no complete entry; "†" where a number comes from synthetic data (the
synthetic shapes set, not VOC / Cityscapes).

Modules: tables (numbers and display tables), plots, save (files and captions); every
public name is re-exported here.
"""
from mlcl.viz.plots import (class_legend, compactness_table, plot_compactness, plot_embeddings,
                            plot_perturbations, plot_prediction_grid, plot_prototypes,
                            plot_sai_response, plot_synthetic_study, plot_training_curves,
                            sai_table, seeds_text)
from mlcl.viz.save import save_figure, save_table, stamp_synthetic, write_index
from mlcl.viz.tables import (ABLATION_LABELS, COLOURS, METHOD_LABELS, NO_PAIR, NOT_RUN,
                             SYNTHETIC_MARK, SYNTHETIC_NOTE, SYNTHETIC_STAMP, ablation_table,
                             ablation_values, fmt, mean_std, method_label, paper_table,
                             paper_table_caption, paper_table_values, qualitative_runs,
                             results_kind, synthetic_table, synthetic_values)

__all__ = [
    "ABLATION_LABELS", "COLOURS", "METHOD_LABELS", "NO_PAIR", "NOT_RUN", "SYNTHETIC_MARK",
    "SYNTHETIC_NOTE", "SYNTHETIC_STAMP", "ablation_table", "ablation_values",
    "class_legend", "compactness_table", "fmt", "mean_std", "method_label", "paper_table",
    "paper_table_caption", "paper_table_values", "plot_compactness", "plot_embeddings",
    "plot_perturbations", "plot_prediction_grid", "plot_prototypes", "plot_sai_response",
    "plot_synthetic_study", "plot_training_curves", "qualitative_runs", "results_kind",
    "sai_table", "save_figure", "save_table", "seeds_text", "stamp_synthetic",
    "synthetic_table", "synthetic_values", "write_index"]

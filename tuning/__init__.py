"""Ray Tune search over the counterfactual's noise level D, guidance scale w and map kind.

:mod:`tuning.space` builds the search space from a ``TuneConfig`` and validates it against a
checkpoint; :mod:`tuning.trial` is one trial's work (the tune slices, every map kind of one D);
:mod:`tuning.results` turns the reports into the grid and the chosen settings with their τ's;
:mod:`tuning.driver` runs the trials and writes ``best.json`` / ``grid.csv`` / ``heatmap.png``.
The entry point is ``python -m ray_jobs.tune``.
"""

from tuning.driver import (
    TuningError,
    TuningResult,
    evaluate_noise_level,
    load_tune_slices,
    read_best,
    run_tuning,
)
from tuning.space import build_param_space, grid_size, validate_space

__all__ = [
    "TuningError",
    "TuningResult",
    "build_param_space",
    "evaluate_noise_level",
    "grid_size",
    "load_tune_slices",
    "read_best",
    "run_tuning",
    "validate_space",
]

"""Ray Tune search over the counterfactual's noise level D and guidance scale w.

:mod:`tuning.space` builds the search space from a ``TuneConfig`` and validates it against a
checkpoint; :mod:`tuning.driver` runs the trials and writes ``best.json`` / ``grid.csv`` /
``heatmap.png``. The entry point is ``python -m ray_jobs.tune``.
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

"""The tuning job's trial bar: Ray Tune's own status tables print only with ``--verbose``
(:mod:`ray_jobs.console`), so the driver shows one bar over the trials (done, ETA) instead.

A Ray Tune callback, which runs in the driver's process (Tune's controller lives there).
"""

from __future__ import annotations

from typing import Any

from igconda.progress import progress


def trial_bar(desc: str = "tune") -> Any:
    """A ``ray.tune.Callback`` drawing a :func:`igconda.progress.progress` bar over the trials
    (its total is the run's number of samples; a failed trial counts as done, and is named)."""
    from ray import tune

    class TrialBar(tune.Callback):
        def __init__(self) -> None:
            self.bar: Any = None
            self.failed = 0

        def setup(self, stop: Any = None, num_samples: int | None = None,
                  total_num_samples: int | None = None, **info: Any) -> None:
            self.bar = progress(total_num_samples, desc, "trial")

        def _done(self, failed: bool) -> None:
            if self.bar is None:
                return
            self.failed += failed
            if self.failed:
                self.bar.set_postfix_str(f"{self.failed} failed", refresh=False)
            self.bar.update(1)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._done(failed=False)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._done(failed=True)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            if self.bar is not None:
                self.bar.close()

    return TrialBar()

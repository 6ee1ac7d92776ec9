"""One comparison study's bookkeeping (:mod:`ray_jobs.comparison_study`): its folders, the
typed request of each job it runs on its loaded config (``ray_jobs.train``, ``tune``,
``train_baseline``, ``score_method``: no argv), and its steps' records (a step made with other
settings is discarded and made again; a failed step is reported and the others go on).
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from igconda import tracking
from igconda.config import StudyConfig, save_config
from igconda.data.study_layout import StudyLayout
from ray_jobs import stage_records
from ray_jobs.study_steps import discard, local_torch_threads, training_request

if TYPE_CHECKING:
    from ray_jobs.score_config import ScoreRequest
    from ray_jobs.train import TrainRequest
    from ray_jobs.train_baseline import BaselineRequest
    from ray_jobs.tune import TuneRequest


class Study:
    """The folders, the jobs' requests and the step bookkeeping of one comparison."""

    def __init__(self, args: argparse.Namespace, config: StudyConfig) -> None:
        self.args, self.config = args, config
        self.root = Path(args.output).resolve()
        self.data = StudyLayout(self.root).data  # the pipeline's data stage writes it
        self.config_path = self.root / "configs" / "study.yaml"  # written by run()
        self.tracking_uri = tracking.resolve_tracking_uri(
            args.tracking_uri or config.tracking.tracking_uri, self.root)
        self.experiment = args.experiment or config.tracking.experiment
        # What every job's request shares: one MLflow store and experiment, one Ray cluster.
        self.common = {"tracking_uri": self.tracking_uri, "experiment": self.experiment,
                       "address": args.address}
        self.timings: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self.data_version = ""  # set once the data step is done (the trainings' key)

    def config_file(self, name: str, config: StudyConfig) -> Path:
        """``config`` written as ``<output>/configs/<name>.yaml``: the file that step's requests
        name (their jobs get the loaded config; a scoring keys its resume on the file's
        contents), and what a step's command line would be run with by hand."""
        path = self.root / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_config(config, path)
        return path

    def baseline_dir(self, method: str) -> Path:
        """Where a baseline's network is trained: ``<output>/baselines/<method>``."""
        return self.root / "baselines" / method

    def scores_dir(self, name: str) -> Path:
        """Where one method's (or variant's) scoring writes: ``<output>/scores/<name>``."""
        return self.root / "scores" / name

    @property
    def comparison_dir(self) -> Path:
        """The comparison's tables and figures (``ray_jobs.compare``): ``<output>/comparison``."""
        return self.root / "comparison"

    @property
    def record_file(self) -> Path:
        """The study's own record (timings, failed steps, what ran): ``comparison_study.json``."""
        return self.root / "comparison_study.json"

    @property
    def num_workers(self) -> int:
        """Training workers of every network: ``--num-workers``, else ``train.num_workers``."""
        return self.args.num_workers or self.config.train.num_workers

    def baseline_request(self, method: str, output: Path, *, resume: bool) -> BaselineRequest:
        """The ``ray_jobs.train_baseline`` request of one method, on the study's config."""
        from ray_jobs.train_baseline import resolve_request

        return resolve_request(
            method, self.data, output, self.config, config_file=str(self.config_path),
            num_workers=self.num_workers, use_gpu=self.args.use_gpu, resume=resume,
            torch_threads=local_torch_threads(self.num_workers, use_gpu=self.args.use_gpu,
                                              local=not self.args.address), **self.common)

    def train_request(self, output: Path, config: StudyConfig, file: Path) -> TrainRequest:
        """The ``ray_jobs.train`` request of one network (``config``, saved as ``file``)."""
        return training_request(self.data, output, config, file, num_workers=self.num_workers,
                                use_gpu=self.args.use_gpu, local=not self.args.address,
                                **self.common)

    def tune_request(self, checkpoint: Path, out: Path, config: StudyConfig, **more) -> TuneRequest:
        """A ``ray_jobs.tune`` request on the study's data, the search being ``config``'s."""
        from ray_jobs.tune import resolve_request

        return resolve_request(checkpoint, self.data, out, config=config, **self.common, **more)

    def score_request(self, method: str, output: Path, **more) -> ScoreRequest:
        """A ``ray_jobs.score_method`` request on the study's data and config (its batch size
        and DPM + CG decoding: the ``baselines`` section); ``more``: checkpoints, variant..."""
        from ray_jobs.score_config import resolve_request

        return resolve_request(method, self.data, output, config=self.config,
                               config_file=str(self.config_path),
                               num_gpus=1.0 if self.args.use_gpu else 0.0, **self.common, **more)

    def fresh(self, step: str, settings: dict, upstream: str, *outputs: Path) -> str:
        """Before ``step`` makes ``outputs``: discard them when the step was recorded with other
        settings or inputs (``upstream``: the data version or the key of the step it reads),
        then record this run's key, which is returned for the steps that read these outputs."""
        key = stage_records.key_of(settings, upstream)
        reason = stage_records.stale_reason(self.root, step, key, settings)
        if reason:
            print(f"    {step}: made with other settings ({reason}); discarding "
                  f"{', '.join(str(o) for o in outputs if o.exists()) or 'nothing yet'}", flush=True)
            for output in outputs:
                discard(output)
        stage_records.record(self.root, step, key, settings, finished=False)
        return key

    def step(self, name: str, body: Callable[[], None], needs: tuple[str, ...] = ()) -> bool:
        """Run one step; a failure is recorded (with the error) and the study goes on.
        Skipped (False) when a step it ``needs`` failed."""
        lost = [n for n in needs if n in self.failed]
        if lost:
            self.failed[name] = f"not run: {', '.join(lost)} failed"
            print(f"\n==> {name}: not run ({', '.join(lost)} failed)", flush=True)
            return False
        print(f"\n==> {name}", flush=True)
        started = time.perf_counter()
        try:
            body()
        except (Exception, SystemExit) as err:  # run_stage: SystemExit on an exit code
            traceback.print_exc()
            self.failed[name] = f"{type(err).__name__}: {err}"
            print(f"    {name}: FAILED ({self.failed[name]}); going on with the other methods",
                  flush=True)
            return False
        self.timings[name] = time.perf_counter() - started
        print(f"    {name}: done in {self.timings[name]:.0f} s", flush=True)
        return True

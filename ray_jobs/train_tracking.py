"""The training job's MLflow run: created (or reopened on ``--resume``) by the driver, logged to
per epoch by rank 0 (:class:`igconda.tracking.RunLogger`), finished with the best checkpoint.

``<output>/mlflow_run.json`` records the run, so that ``--resume`` keeps logging to it. The
callers in :mod:`ray_jobs.train` wrap both functions in :func:`igconda.tracking.outage_tolerant`:
a tracking server that is down costs the run, never the training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igconda import checkpoint as ckpt
from igconda import tracking
from igconda.config import StudyConfig
from igconda.config_rules import UNCONDITIONED

if TYPE_CHECKING:
    from ray_jobs.train import TrainRequest

RUN_RECORD = tracking.RUN_RECORD


def open_mlflow_run(args: TrainRequest, config: StudyConfig, output: Path, tracking_uri: str,
                    storage_path: str, data_hash: str) -> dict[str, str]:
    """Create the training's MLflow run (or reopen it on --resume) and log params and tags
    (``args``: the ``ray_jobs.train`` request; its data, run_name, cpus_per_worker, smoke_test,
    resume, experiment and parent_run_id are read)."""
    # The method-run tags of docs/CONTRACTS.md (variant = model.attention): an unconditional
    # network (model.conditioning none) is the DPM of DPM + classifier guidance, not IgCONDA.
    method = "dpm" if config.model.conditioning == UNCONDITIONED else "igconda"
    tags = {**tracking.method_run_tags("train", method, config.model.attention, data_hash),
            "data.path": args.data}
    params = {**config.flat(), "job.data": args.data, "job.storage_path": storage_path,
              "job.run_name": args.run_name, "job.cpus_per_worker": args.cpus_per_worker,
              "job.smoke_test": args.smoke_test}
    return create_or_reopen_run(output / RUN_RECORD, resume=args.resume, tracking_uri=tracking_uri,
                                experiment=args.experiment or config.tracking.experiment,
                                run_name=f"train-{config.model.attention}", tags=tags,
                                params=params, parent_run_id=args.parent_run_id)


def create_or_reopen_run(record: Path, *, resume: bool, tracking_uri: str, experiment: str,
                         run_name: str, tags: dict[str, str], params: dict[str, object],
                         parent_run_id: str | None) -> dict[str, str]:
    """A training job's MLflow run: on ``resume``, the run ``record`` names (same store), tagged
    ``igconda.resumed``; else a new one with ``tags`` and ``params``, written to ``record``.

    Returns:
        ``{"tracking_uri", "run_id"}`` (what the workers' rank 0 logs to).
    """
    if resume and record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("tracking_uri") == tracking_uri:
            tracking.RunLogger(tracking_uri, saved["run_id"]).set_tags({"igconda.resumed": "true"})
            return {"tracking_uri": tracking_uri, "run_id": saved["run_id"]}
    run_id = tracking.create_run(tracking_uri, experiment, run_name, tags=tags,
                                 parent_run_id=parent_run_id)
    tracking.RunLogger(tracking_uri, run_id).log_params(params)
    tracking.write_run_record(record.parent, tracking_uri, run_id, experiment)
    return {"tracking_uri": tracking_uri, "run_id": run_id}


def finish_mlflow_run(tracking_uri: str, run_id: str, output: Path, best: Path, *,
                      register_model: str | None = None) -> None:
    """Log the best checkpoint (folder, pointer file, its epoch and validation loss) to the
    training's run; ``register_model``: also register it as a version of that MLflow model."""
    logger = tracking.RunLogger(tracking_uri, run_id)
    pointer = ckpt.read_best_pointer(output)
    logger.log_artifact(best, "best_checkpoint")
    logger.log_artifact(output / ckpt.BEST_POINTER)
    logger.set_tags({"best_checkpoint.uri": pointer["uri"], "best_checkpoint.epoch": str(pointer["epoch"])})
    logger.log_metrics({"best/valid_loss": float(pointer["valid_loss"])}, step=int(pointer["epoch"]))
    if register_model:
        # An MLflow pyfunc model (not the raw folder), so mlflow.pyfunc.load_model can run it.
        from igconda.tracking.model import log_model_folder

        with tracking.start_run(tracking_uri, "", "", run_id=run_id):
            log_model_folder(best, registered_model_name=register_model)


def fit_and_finish(trainer: Any, output: Path, record: dict[str, Any], *, tracking_uri: str,
                   mlflow_cfg: dict[str, Any] | None, outage: dict[str, str],
                   register_model: str | None = None) -> Path:
    """Fit ``trainer`` (with the driver's epoch bar, :mod:`ray_jobs.train_progress`), copy its
    best checkpoint to ``output/best`` (``record`` goes into its pointer file) and end the
    training's MLflow run (``register_model``: :func:`finish_mlflow_run`); returns the local
    best checkpoint.

    The run always ends, FINISHED once the best checkpoint is saved (and logged), else FAILED;
    an outage while logging costs the MLflow run, never the saved model.
    """
    from ray_jobs.train_progress import epoch_bar
    from ray_jobs.train_runs import export_best

    status = "FAILED"
    try:
        with epoch_bar(trainer):  # the driver's epoch bar from the workers' reports
            result = trainer.fit()
        best = export_best(result, output, {
            **record, "mlflow_run_id": mlflow_cfg and mlflow_cfg["run_id"],
            "tracking_uri": tracking_uri or None})
        status = "FINISHED"
    finally:
        if mlflow_cfg:
            if status == "FINISHED":
                with tracking.outage_tolerant("logging the best checkpoint", tracking_uri, **outage):
                    finish_mlflow_run(tracking_uri, mlflow_cfg["run_id"], output, best,
                                      register_model=register_model)
            tracking.end_run_quietly(tracking_uri, mlflow_cfg["run_id"], status, **outage)
    return best

"""MLflow tracking: the only module in igconda that imports mlflow.

The default store is local (``<output>/mlruns``, no server needed); pass an
``http://host:port`` URI to talk to a real ``mlflow server``. Stages log through these few
functions so that swapping or disabling tracking touches one file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow


def resolve_tracking_uri(tracking_uri: str, output_dir: str | Path) -> str:
    """Empty URI → a local file store under ``output_dir``; paths become ``file:`` URIs."""
    if not tracking_uri:
        return (Path(output_dir).resolve() / "mlruns").as_uri()
    if "://" not in tracking_uri and not tracking_uri.startswith(("file:", "sqlite:", "databricks")):
        return Path(tracking_uri).resolve().as_uri()
    return tracking_uri


@contextlib.contextmanager
def start_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    *,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
) -> Iterator[str]:
    """Open (or resume, with ``run_id``) an MLflow run; yields its run id.

    ``parent_run_id`` makes it a nested child run (pipeline stages, Tune trials).
    """
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=all_tags or None,
                          nested=mlflow.active_run() is not None) as run:
        yield run.info.run_id


def log_params(params: dict[str, Any]) -> None:
    """Log params (values stringified, MLflow's 6000-char limit respected)."""
    mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or a whole folder."""
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_figure(figure: Any, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file)


def log_table(data: Any, artifact_file: str) -> None:
    """Log a pandas DataFrame or dict of columns as a JSON table artifact (MLflow UI table view)."""
    mlflow.log_table(data, artifact_file=artifact_file)

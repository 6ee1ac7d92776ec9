"""MLflow tracking: the only module in igconda that imports mlflow.

Where runs go (:func:`resolve_tracking_uri`, the one place that decides): an explicit URI
(``--tracking-uri`` or the config's ``tracking.tracking_uri``), else the standard
``MLFLOW_TRACKING_URI`` environment variable (what ``cluster.yaml`` exports on the head), else
the local default.

The default store is local and needs no server: an SQLite database ``<output>/mlflow.db`` with
artifacts in ``<output>/mlartifacts`` (MLflow 3.17 refuses the old ``./mlruns`` file store unless
``MLFLOW_ALLOW_FILE_STORE=true``; a ``file:`` URI given explicitly is still passed through). Pass
an ``http://host:port`` URI to talk to a real ``mlflow server``; its artifact root is then the
server's.

Two ways to log:

- :func:`start_run` + the module-level ``log_*`` functions use MLflow's active run in the
  current process (drivers, the pipeline).
- :class:`RunLogger` logs to an explicit run id through ``MlflowClient`` without touching global
  state, so a Ray Train worker (rank 0) can log per-epoch metrics to the run its driver opened.
  Workers must be able to reach the tracking URI: a local SQLite file only works when the
  workers share the driver's filesystem (one machine, or NFS); use a server on a cluster.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

#: File names of the default local store under an output folder.
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
# MLflow caps a param value at 6000 characters and a log_batch call at 100 params / 1000 metrics.
_MAX_PARAM_CHARS = 6000
_PARAMS_PER_BATCH = 100
#: MLflow's standard variable for the tracking server; honoured when no URI is given explicitly.
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def resolve_tracking_uri(tracking_uri: str | None, output_dir: str | Path) -> str:
    """The tracking URI a job uses, in order of precedence:

    1. ``tracking_uri`` (the job's ``--tracking-uri``, else the config's ``tracking.tracking_uri``);
    2. the ``MLFLOW_TRACKING_URI`` environment variable, so that every job on a cluster whose
       nodes export it logs to that server without being told;
    3. ``sqlite:///<output_dir>/mlflow.db``.

    A plain path (from 1 or 2) becomes an SQLite db in that folder. URIs with a scheme
    (``http://``, ``https://``, ``sqlite://``, ``file:``, ``databricks``) pass through unchanged.
    """
    if not tracking_uri:
        tracking_uri = os.environ.get(TRACKING_URI_ENV, "").strip()
    if not tracking_uri:
        return _sqlite_uri(Path(output_dir))
    if "://" not in tracking_uri and not tracking_uri.startswith(("file:", "sqlite:", "databricks")):
        return _sqlite_uri(Path(tracking_uri))
    return tracking_uri


def _sqlite_uri(folder: Path) -> str:
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / LOCAL_DB}"


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside the database (MLflow's default is ``./mlruns``
    relative to the current directory, which differs between the driver and Ray workers)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / LOCAL_ARTIFACTS).as_uri()
    return None


def get_or_create_experiment(tracking_uri: str, experiment: str) -> str:
    """The id of ``experiment`` in the store at ``tracking_uri``, created if missing."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=_artifact_location(tracking_uri))
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create (concurrent jobs).
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def _experiment_and_tags(
    tracking_uri: str, experiment: str, tags: dict[str, str] | None, parent_run_id: str | None
) -> tuple[str, dict[str, str]]:
    """The run's experiment id (created if missing) and its tags, with ``mlflow.parentRunId``
    added when ``parent_run_id`` is given (that tag makes it a nested child run)."""
    experiment_id = get_or_create_experiment(tracking_uri, experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return experiment_id, all_tags


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
    """Open (or resume, with ``run_id``) an MLflow run as the active run; yields its run id.

    ``parent_run_id`` makes it a nested child run (pipeline stages, Tune trials).
    """
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id, all_tags = _experiment_and_tags(tracking_uri, experiment, tags, parent_run_id)
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                          run_name=None if run_id else run_name, tags=all_tags or None,
                          nested=mlflow.active_run() is not None) as run:
        yield run.info.run_id


def create_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    *,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create a run without making it active (for jobs whose workers log to it); returns its id.

    End it with :func:`end_run`.
    """
    experiment_id, all_tags = _experiment_and_tags(tracking_uri, experiment, tags, parent_run_id)
    run = MlflowClient(tracking_uri).create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run created by :func:`create_run` as ``FINISHED``, ``FAILED`` or ``KILLED``."""
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


def get_run(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """A run's params, metrics (latest values), tags, status and artifact URI as plain dicts."""
    run = MlflowClient(tracking_uri).get_run(run_id)
    return {
        "run_id": run.info.run_id,
        "status": run.info.status,
        "artifact_uri": run.info.artifact_uri,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
    }


def get_metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of one metric, in step order."""
    history = MlflowClient(tracking_uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def list_artifacts(tracking_uri: str, run_id: str, path: str | None = None) -> list[str]:
    """Paths of a run's artifacts directly under ``path``."""
    return [a.path for a in MlflowClient(tracking_uri).list_artifacts(run_id, path)]


def find_runs(tracking_uri: str, experiment: str, filter_string: str = "") -> list[dict[str, Any]]:
    """Runs of ``experiment`` matching an MLflow ``filter_string`` (newest first), as dicts."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], filter_string=filter_string,
                              order_by=["attributes.start_time DESC"])
    return [get_run(tracking_uri, r.info.run_id) for r in runs]


class RunLogger:
    """Log to one existing run by id, without MLflow's global active-run state.

    Safe to create on a Ray worker: it only needs the tracking URI and the run id.

    Args:
        tracking_uri: where the run lives.
        run_id: the run to log to (from :func:`create_run`).
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = MlflowClient(tracking_uri)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (values stringified and cut to MLflow's 6000-character limit)."""
        items = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i:i + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[
            Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a whole folder."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def register_model(self, artifact_path: str, name: str) -> str:
        """Register ``runs:/<run>/<artifact_path>`` as a new version of model ``name``.

        Needs a store with a model registry (SQLite or a server). Returns the version number.
        """
        client = self._client
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.create_registered_model(name)  # already exists: fine
        source = f"{client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        version = client.create_model_version(name, source, run_id=self.run_id)
        return str(version.version)


def log_params(params: dict[str, Any]) -> None:
    """Log params to the active run (values stringified, MLflow's 6000-char limit respected)."""
    mlflow.log_params({k: str(v)[:_MAX_PARAM_CHARS] for k, v in params.items()})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or a whole folder to the active run."""
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

"""MLflow tracking: the only package in igconda that imports mlflow (:mod:`igconda.tracking.model`
holds the MLflow model of a checkpoint folder).

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

Outages. Every stage writes its results to disk before it logs them, and a tracking server that
is down costs neither the results nor the run's exit status: drivers wrap their logging in
:func:`outage_tolerant` (a clear warning, naming the command that re-logs the results later,
``python -m ray_jobs.relog``), and :class:`RunLogger` pauses after a failure so that per-epoch
logging cannot stall training. The training and inference jobs record the run they log to in
``<output>/mlflow_run.json`` (:mod:`igconda.tracking.records`), so that the re-log completes or
ends a run an outage left RUNNING. MLflow's own HTTP client retries a failing call 7 times with
exponential backoff (about 4 minutes); igconda bounds that to :data:`HTTP_LIMITS` unless the
standard ``MLFLOW_HTTP_REQUEST_*`` variables are set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from igconda.tracking.records import (  # noqa: F401  (re-exported)
    RUN_RECORD,
    end_interrupted_run,
    read_run_record,
    record_active_run,
    write_run_record,
)

#: File names of the default local store under an output folder.
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
# MLflow caps a param value at 6000 characters and a log_batch call at 100 params / 1000 metrics.
_MAX_PARAM_CHARS = 6000
_PARAMS_PER_BATCH = 100
#: MLflow's standard variable for the tracking server; honoured when no URI is given explicitly.
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
#: igconda's defaults for MLflow's HTTP client: 2 retries (backoff 1 s, 2 s) and 30 s per request
#: give a down server about a minute at most, instead of MLflow's ~4 minutes per call.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
#: How long :class:`RunLogger` skips per-epoch metrics after a failed call (they stay on disk).
PAUSE_AFTER_FAILURE_S = 300.0
#: The command that re-logs a study's on-disk results (named in outage warnings).
RELOG_COMMAND = "python -m ray_jobs.relog"

_log = logging.getLogger(__name__)
for _name, _value in HTTP_LIMITS.items():
    os.environ.setdefault(_name, _value)  # read by MLflow at each request; a user's value wins


def warn_outage(what: str, tracking_uri: str, error: BaseException, on_disk: str = "",
                relog: str = "") -> str:
    """Print (stderr) a warning that MLflow logging failed, and log it where logging is set up;
    returns the message."""
    message = (f"warning: MLflow tracking at {tracking_uri} failed while {what} "
               f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
    if on_disk:
        message += f"; the results are on disk in {on_disk}"
    if relog:
        message += f"; once the server is back, re-log them with: {RELOG_COMMAND} {relog}"
    print(message, file=sys.stderr, flush=True)
    if _log.hasHandlers():  # without one, logging's last resort would print it a second time
        _log.warning(message)
    return message


@contextlib.contextmanager
def outage_tolerant(what: str, tracking_uri: str, *, on_disk: str = "",
                    relog: str = "") -> Iterator[dict[str, Any]]:
    """Run a block of MLflow logging; a failure in it is a warning, not the job's failure.

    Use it only around logging of results already on disk: the block stops at the failing call,
    a warning (:func:`warn_outage`) says what was not logged and how to re-log it, and the
    yielded dict's ``"ok"`` turns False (``"error"`` holds the exception). KeyboardInterrupt
    and SystemExit propagate.
    """
    state: dict[str, Any] = {"ok": True, "error": None}
    try:
        yield state
    except Exception as err:  # any client error: connection, HTTP status, MlflowException
        state.update(ok=False, error=err)
        # MLflow pops a run off its active-run stack before asking the server to end it, so a
        # failed start or end leaves no stale active run behind for the next start_run.
        warn_outage(what, tracking_uri, err, on_disk, relog)


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
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI process-wide (for subprocesses),
    # and every job honours that variable (resolve_tracking_uri): left set after the run, it
    # would send a later job of this process, which was told nothing, to this run's store.
    exported_before = os.environ.get(TRACKING_URI_ENV)
    mlflow.set_tracking_uri(tracking_uri)
    # set_tracking_uri exports only when the URI changes; export it whatever mlflow held before.
    os.environ[TRACKING_URI_ENV] = tracking_uri
    try:
        if run_id:  # an existing run: its experiment and tags are already set
            experiment_id, all_tags = None, dict(tags or {})
        else:
            experiment_id, all_tags = _experiment_and_tags(tracking_uri, experiment, tags, parent_run_id)
        with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                              run_name=None if run_id else run_name, tags=all_tags or None,
                              nested=mlflow.active_run() is not None) as run:
            yield run.info.run_id
    finally:
        mlflow.set_tracking_uri(exported_before)  # None unsets the variable again
        if exported_before is None:
            os.environ.pop(TRACKING_URI_ENV, None)
        else:
            os.environ[TRACKING_URI_ENV] = exported_before


@contextlib.contextmanager
def child_run(run_name: str, tags: dict[str, str] | None = None) -> Iterator[str]:
    """A run nested under this process's active run (:func:`start_run`), in the same store and
    experiment; yields its id. For results that are runs of their own inside a stage's run, e.g.
    each method the inference job scores (the method-run contract of the comparison stage)."""
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("child_run needs an active run (open one with start_run)")
    with mlflow.start_run(experiment_id=parent.info.experiment_id, run_name=run_name, nested=True,
                          tags={**(tags or {}), "mlflow.parentRunId": parent.info.run_id}) as run:
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


def end_run_quietly(tracking_uri: str, run_id: str, status: str, on_disk: str = "",
                    relog: str = "") -> bool:
    """:func:`end_run`, with a failure reported as an outage warning; True if the run ended."""
    with outage_tolerant(f"ending run {run_id} as {status}", tracking_uri, on_disk=on_disk,
                         relog=relog) as state:
        end_run(tracking_uri, run_id, status)
    return bool(state["ok"])


def active_run_id() -> str | None:
    """The id of this process's active run (:func:`start_run`), or None."""
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


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


def download_artifact(tracking_uri: str, run_id: str, path: str, dst_dir: str | Path) -> Path:
    """Copy one artifact (file or folder) of a run into the existing folder ``dst_dir``;
    returns its local path."""
    return Path(MlflowClient(tracking_uri).download_artifacts(run_id, path, str(dst_dir)))


def find_runs(tracking_uri: str, experiment: str, filter_string: str = "") -> list[dict[str, Any]]:
    """Runs of ``experiment`` matching an MLflow ``filter_string`` (newest first), as dicts."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], filter_string=filter_string,
                              order_by=["attributes.start_time DESC"])
    return [get_run(tracking_uri, r.info.run_id) for r in runs]


#: Tags of the runs the method comparison reads back (docs/CONTRACTS.md, "Method runs").
STAGE_TAG, METHOD_TAG, VARIANT_TAG, DATA_VERSION_TAG = (
    "igconda.stage", "igconda.method", "igconda.variant", "igconda.data_version")


def method_run_tags(stage: str, method: str, variant: str, data_version: str) -> dict[str, str]:
    """The tags of a baseline training (``stage="train_baseline"``) or scoring (``"score"``) run:
    the stage, the method as named in score tables, free-text variant, and the dataset version
    (:func:`igconda.train_loop.dataset_version`)."""
    return {STAGE_TAG: stage, METHOD_TAG: method, VARIANT_TAG: variant, DATA_VERSION_TAG: data_version}


class RunLogger:
    """Log to one existing run by id, without MLflow's global active-run state.

    Safe to create on a Ray worker: it only needs the tracking URI and the run id.

    Args:
        tracking_uri: where the run lives.
        run_id: the run to log to (from :func:`create_run`).
    """

    def __init__(self, tracking_uri: str, run_id: str, pause_after_failure_s: float = PAUSE_AFTER_FAILURE_S):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = MlflowClient(tracking_uri)
        self.pause_after_failure_s = pause_after_failure_s
        self._paused_until = 0.0
        self.skipped = 0  # log_metrics calls dropped while paused

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (values stringified and cut to MLflow's 6000-character limit)."""
        items = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i:i + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log metrics; after a failed call, the calls of the next ``pause_after_failure_s``
        seconds are skipped (counted in ``skipped``) so that a down server costs one bounded
        retry, not one per epoch. The failure itself is raised for the caller to report."""
        if time.monotonic() < self._paused_until:
            self.skipped += 1
            return
        now = int(time.time() * 1000)
        try:
            self._client.log_batch(self.run_id, metrics=[
                Metric(k, float(v), now, step or 0) for k, v in metrics.items()])
        except Exception:
            self._paused_until = time.monotonic() + self.pause_after_failure_s
            raise

    def set_tags(self, tags: dict[str, str]) -> None:
        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a whole folder."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)



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

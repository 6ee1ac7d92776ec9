"""Run records: the MLflow run a job's output folder was logged to, kept on disk beside it.

``<folder>/mlflow_run.json`` holds ``{"tracking_uri", "run_id", "experiment"}``. The training
jobs write it when they open their run (``--resume`` logs to it again); the inference job
writes it as soon as its run is open. A tracking server that goes down mid-run leaves that run
RUNNING on the server with part of its logging, and the record is how ``python -m
ray_jobs.relog`` finds it again once the server is back, to complete or end it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow

from igconda.io_utils import atomic_write

#: The record's file name in a job's output folder.
RUN_RECORD = "mlflow_run.json"


def write_run_record(folder: str | Path, tracking_uri: str, run_id: str,
                     experiment: str | None = None) -> Path:
    """Write ``<folder>/mlflow_run.json`` atomically (a half-written record would make a
    ``--resume`` or a re-log start a second run); returns its path."""
    text = json.dumps({"tracking_uri": tracking_uri, "run_id": run_id, "experiment": experiment},
                      indent=2)
    return atomic_write(Path(folder) / RUN_RECORD, lambda tmp: tmp.write_text(text), suffix=".tmp")


def record_active_run(folder: str | Path) -> Path:
    """:func:`write_run_record` for this process's active run (``igconda.tracking.start_run``);
    asks the server nothing, so that it is written even if the server has just gone away."""
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("record_active_run needs an active run (open one with start_run)")
    return write_run_record(folder, mlflow.get_tracking_uri(), run.info.run_id)


def read_run_record(folder: str | Path) -> dict[str, Any] | None:
    """The record of ``folder``, or None when there is none (or it is unreadable: a record is
    a pointer to a run, never a result, so a damaged one only costs that pointer)."""
    try:
        saved = json.loads((Path(folder) / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.get("run_id") else None


def end_interrupted_run(tracking_uri: str, run_id: str, status: str,
                        tags: dict[str, str] | None = None) -> bool:
    """End a run an outage left RUNNING, and its child runs still RUNNING, as ``status``
    (``FINISHED``, ``FAILED`` or ``KILLED``), after setting ``tags`` on it.

    Returns:
        True if it was RUNNING (and is now ended), False if it had already ended.
    """
    from mlflow.entities import RunTag

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    if run.info.status != "RUNNING":
        return False
    children = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'")
    for child in children:
        client.set_terminated(child.info.run_id, status)
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    client.set_terminated(run_id, status)
    return True

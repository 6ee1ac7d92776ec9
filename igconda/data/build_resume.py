"""Resuming an interrupted dataset build: only the patients without a finished file run again.

:func:`igconda.data.build.build_dataset` builds in a hidden sibling of the output folder and
renames it into place at the end. That folder is named by a *build key* (:func:`build_key`, a
digest of the manifest rows, their input files' sizes and modification times, and the
preprocessing settings), ``.<name>.tmp-<key>``, so a re-run with the same inputs
finds the folder a killed run (SIGKILL, a lost head node: nothing cleaned up) left and carries
on in it, while a run with other inputs or settings never reuses it.

The driver records each patient's result (what its task reported: slices, coverage, or why it was
rejected) in ``<build>/.results/<patient_id>.json`` once the result reaches it
(:func:`record_result`); the patient's Parquet file was written before, atomically, by the task,
to ``<build>/.patients/<patient_id>.parquet`` (:func:`patient_file`: no split yet; the driver
decides the splits once every result is in and moves each file into its split folder by rename).
On a re-run :func:`finished_results` first moves back any file a killed run had already moved
into a split folder (the splits are decided again, on this run's results), keeps a recorded
patient only if its file is there with the recorded rows, removes the temp files of writes a
kill cut short, and the build maps only the other patients. Builds left under another key are deleted (:func:`drop_stale_builds`): their
inputs or settings are no longer this run's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from igconda.config import PreprocessConfig
from igconda.data.io import slices_root
from igconda.io_utils import atomic_write

log = logging.getLogger(__name__)

#: The folder, inside a build, of the per-patient results the driver has received.
RESULTS_DIR = ".results"
#: The folder, inside a build, of the patients' Parquet files before they are moved to their split.
PATIENTS_DIR = ".patients"


def patient_file(build: Path, patient_id: str) -> Path:
    """Where a task writes a patient's slices in the build, before the split is decided."""
    return build / PATIENTS_DIR / f"{patient_id}.parquet"


def build_key(items: list[dict[str, Any]], config: PreprocessConfig) -> str:
    """A digest of what a build computes: the manifest rows, their PET/mask files' sizes and ``st_mtime_ns`` (a replaced scan is another input;
    hashing every volume would cost minutes on a real cohort) and the preprocessing settings."""
    files = []
    for item in items:
        for name in (item["pet_path"], item["mask_path"]):
            if name:
                try:
                    st = os.stat(name)
                    files.append([name, st.st_size, st.st_mtime_ns])
                except OSError:
                    files.append([name, "missing"])
    text = json.dumps({"items": items, "files": files, "config": dataclasses.asdict(config)},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_folder(output: Path, key: str) -> Path:
    """The hidden folder, beside ``output``, that the build with ``key`` is made in."""
    return output.with_name(f".{output.name}.tmp-{key}")


def drop_stale_builds(output: Path, keep: Path) -> None:
    """Delete the builds of ``output`` left by killed runs with other inputs or settings."""
    for stale in output.parent.glob(f".{output.name}.tmp-*"):
        if stale != keep and stale.is_dir():
            log.info("removing %s: an interrupted build of %s with other inputs or settings",
                     stale, output)
            shutil.rmtree(stale, ignore_errors=True)


def record_result(build: Path, result: dict[str, Any]) -> None:
    """Record, atomically, a patient's result as the driver received it (its file, if any, was
    written before by its task)."""
    folder = build / RESULTS_DIR
    folder.mkdir(exist_ok=True)
    text = json.dumps(result, default=str)
    atomic_write(folder / f"{result['patient_id']}.json", lambda tmp: tmp.write_text(text),
                 suffix=".tmp")


def finished_results(build: Path) -> dict[str, dict[str, Any]]:
    """The results a killed build of the same key recorded, ``{patient_id: result}``.

    Files a killed run had moved into ``<build>/slices/<split>/`` go back to
    :func:`patient_file` (by rename), since the splits are decided on this run's results. A
    recorded patient whose file is missing or holds other rows than recorded is left out, and so
    runs again; temp files of cut-short writes are removed.

    Args:
        build: the build folder (may not exist: then nothing is finished).
    """
    if not build.is_dir():
        return {}
    for tmp in build.rglob("*.tmp"):
        tmp.unlink(missing_ok=True)
    for moved in Path(slices_root(build)).glob("*/*.parquet"):
        patient_file(build, moved.stem).parent.mkdir(exist_ok=True)
        os.replace(moved, patient_file(build, moved.stem))
    done = {}
    for path in sorted((build / RESULTS_DIR).glob("*.json")):
        try:
            result = json.loads(path.read_text())
            if result["ok"]:
                rows = pq.read_metadata(patient_file(build, result["patient_id"])).num_rows
                if rows != result["slices"]:
                    continue
        except (OSError, ValueError, KeyError, pa.ArrowException):
            continue  # unreadable or its file gone: the patient runs again
        done[result["patient_id"]] = result
    return done

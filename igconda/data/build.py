"""Build a preprocessed slice dataset from a manifest: preprocess every patient, decide the
splits once on the survivors, file each patient in its split and write the summary.

:func:`build_dataset` is the logic behind ``python -m ray_jobs.preprocess``; it writes the
layout of ``docs/CONTRACTS.md`` (see :mod:`igconda.data.io`). :func:`process_patient` preprocesses
and writes one patient. How the patients are mapped over is the caller's: the job passes a map
that runs one Ray Data task per volume (``ray_jobs/preprocess.py``); the default,
:func:`map_in_process`, runs them one after another in this process, without Ray.

Atomicity: everything is built in a hidden sibling folder ``.<name>.tmp-<key>`` and renamed into
place only at the end, after ``dataset.json`` (written last) exists. The key is a digest of the
manifest rows, their input files and the settings, so a run killed mid-way (SIGKILL: nothing
cleaned up) is resumed by a re-run with the same inputs, which preprocesses only the patients
whose files the killed run had not finished (:mod:`igconda.data.build_resume`); a failed build
(an exception) is deleted. An existing dataset at the output path is moved aside only once the
new one is complete, and deleted after the swap, so a failed or interrupted run never leaves a
partial dataset that looks complete and never destroys a complete one. Workers write each
patient's file (no split yet) directly into that folder, so the output must
be on a filesystem every Ray node sees (local disk for a single machine, NFS on a cluster). The
driver trusts no task's report: before anything else is written it checks, from its own view,
that every file a task reported is there with the task's rows and that no PET/mask file a task
reported missing is there after all (:func:`_check_visible`), so a task on a node that does not
share the folder or the inputs fails the build instead of leaving a dataset short by those
patients (``ray_jobs.shared_storage`` refuses a non-shared output folder before any work starts).

Bad patients (manifest rows or volumes that fail validation) are skipped, logged and listed in
``rejects.csv``. Splits are decided once, by :func:`igconda.data.splits.assign_splits` on the
patients that survived (so a rejected file does not leave a cohort short of tuning patients),
after every task has reported; each file then moves into ``slices/<split>/`` by rename, never
rewritten. The split folder (and ``splits.csv``) is the only record of a slice's split: the
files carry no ``split`` column (readers take it from the folder).

Coverage (:mod:`igconda.data.summary`): ``dataset.json`` records, per patient and cohort, the
lesion voxels outside the preprocessed field of view (a crop that silently drops a cohort's
lesions would otherwise only show as a poor score), the unhealthy slices per split and cohort,
and a warning for every lesion cohort left without an unhealthy slice in a split it belongs to.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from igconda.config import PreprocessConfig, StudyConfig
from igconda.data.build_resume import (
    PATIENTS_DIR,
    RESULTS_DIR,
    build_folder,
    build_key,
    drop_stale_builds,
    finished_results,
    patient_file,
    record_result,
)
from igconda.data.compat import SETTINGS_KEY, settings_record
from igconda.data.io import DATASET_INFO, split_path
from igconda.data.manifest import ManifestEntry, parse_manifest
from igconda.data.preprocess import preprocess_volume
from igconda.data.schema import SPLITS, UNHEALTHY, volume_to_rows
from igconda.data.splits import assign_splits
from igconda.data.summary import (
    lesion_coverage_summary,
    lesion_warnings,
    log_coverage,
    split_counts,
    unhealthy_table,
)
from igconda.data.volumes import NOT_FOUND, VolumeError
from igconda.io_utils import atomic_write, replace_dir
from igconda.progress import progress as progress_bar

log = logging.getLogger(__name__)

REJECT_COLUMNS = ("row", "patient_id", "cohort", "tracer", "role", "pet_path", "mask_path", "file", "problem")
SPLIT_COLUMNS = ("patient_id", "subject_id", "cohort", "tracer", "role", "split")


#: ``map_patients(items, config, root)``: apply :func:`process_patient` to every item (a manifest
#: row) with ``config`` and ``root``, and yield the results in any order.
PatientMap = Callable[[list[dict[str, Any]], PreprocessConfig, str], Iterable[dict[str, Any]]]


class PreprocessingError(RuntimeError):
    """The job produced no dataset (nothing survived, or ``strict`` and some patients failed)."""


@dataclass
class PreprocessSummary:
    """What :func:`build_dataset` did.

    Attributes:
        output: the dataset folder (complete), or None if nothing was written.
        patients: surviving patients per split.
        slices: slices per split.
        rejects: one dict per rejected row (keys :data:`REJECT_COLUMNS`).
        seconds: wall time.
        coverage: per cohort, lesion voxels and those outside the field of view.
        warnings: cohorts without an unhealthy slice in a split (also in dataset.json).
    """

    output: Path | None
    patients: dict[str, int] = field(default_factory=dict)
    slices: dict[str, int] = field(default_factory=dict)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    coverage: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _entry_dict(e: ManifestEntry) -> dict[str, Any]:
    return {"row": e.row, "patient_id": e.patient_id, "subject_id": e.subject, "cohort": e.cohort,
            "tracer": e.tracer, "role": e.role, "pet_path": e.pet_path, "mask_path": e.mask_path or ""}


def process_patient(item: dict[str, Any], config: PreprocessConfig, root: str | Path) -> dict[str, Any]:
    """Preprocess one manifest row and write its slices (what one Ray Data task of the job does).

    Args:
        item: a manifest row (keys ``patient_id``, ``cohort``, ``tracer``, ``role``,
            ``pet_path``, ``mask_path`` (empty = none), ``row``).
        config: preprocessing settings.
        root: dataset folder being built; writes :func:`~igconda.data.build_resume.patient_file`
            (``<root>/.patients/<patient_id>.parquet``; the driver later moves it to its split).

    Returns:
        The item plus ``ok`` (bool), and either ``slices``, ``unhealthy``, ``input_slices`` (the
        source's axial slices), ``lesion_voxels``, ``lesion_voxels_outside`` (source mask voxels
        outside the field of view), ``notes`` or ``file`` and ``problem`` describing why the
        patient was rejected. Never raises for a bad volume: the job must go on with the good ones.
    """
    out = rejected(item, "", "")
    try:
        vol = preprocess_volume(item["pet_path"], item["mask_path"] or None, config)
        table = volume_to_rows(
            vol.image, vol.mask, patient_id=item["patient_id"], cohort=item["cohort"],
            tracer=item["tracer"], role=item["role"], suv_max=vol.suv_max,
            scale_min=vol.scale_min, scale_max=vol.scale_max, pet_path=item["pet_path"],
            geometry=vol.geometry)
        path = patient_file(Path(root), item["patient_id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        # Whole or not at all: a killed build's re-run keeps the files it finds.
        atomic_write(path, lambda tmp: pq.write_table(table, tmp), suffix=".tmp")
        labels = table.column("label").to_numpy()
        out.update(ok=True, slices=int(len(labels)), unhealthy=int((labels == UNHEALTHY).sum()),
                   input_slices=int(vol.geometry["original_shape"][2]),
                   lesion_voxels=int(vol.coverage["lesion_voxels"]),
                   lesion_voxels_outside=int(vol.coverage["lesion_voxels_outside"]),
                   notes="; ".join(vol.notes), file="", problem="")
    except VolumeError as err:
        out.update(ok=False, file=err.path, problem=err.problem)
    except Exception as err:  # an unforeseen failure on one scan must not stop the cohort
        out.update(ok=False, file=item["pet_path"],
                   problem=f"unexpected error {type(err).__name__}: {err}",
                   traceback=traceback.format_exc())
    return out


def rejected(item: dict[str, Any], file: str, problem: str, tb: str = "") -> dict[str, Any]:
    """The result of :func:`process_patient` for a patient refused because ``file`` has
    ``problem`` (also what a :data:`PatientMap` yields for a patient it refuses to run)."""
    # Every result has the same keys, so Ray Data sees one schema across blocks.
    return dict(item, ok=False, slices=0, unhealthy=0, input_slices=0, lesion_voxels=0,
                lesion_voxels_outside=0, notes="", file=file, problem=problem, traceback=tb)


def map_in_process(items: list[dict[str, Any]], config: PreprocessConfig,
                   root: str) -> Iterable[dict[str, Any]]:
    """A :data:`PatientMap` that runs :func:`process_patient` on each item in turn, in this process."""
    for item in items:
        yield process_patient(item, config, root)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("igconda", "monai", "torch", "ray", "pyarrow", "nibabel", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "unknown"
    return out


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _check_visible(root: Path, results: list[dict[str, Any]]) -> None:
    """What the tasks reported holds here, as the driver sees it: every file reported written is
    there with the task's rows, and no input reported missing is here after all.

    A task on a node that does not share ``root`` writes to that node's own disk and still
    reports ok, and one on a node without the manifest's files reports them missing; either
    way the dataset would be short by those patients and exit 0. Reads only Parquet footers.

    Raises:
        PreprocessingError: naming the files (at most five) and the fix.
    """
    problems = []
    for r in results:
        if not r["ok"]:
            if r["problem"].startswith(NOT_FOUND) and Path(r["file"]).is_file():
                problems.append(f"{r['file']}: its task found no such file; the driver sees it")
            continue
        path = patient_file(root, r["patient_id"])
        try:
            rows = pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowException) as err:  # missing, or not a whole Parquet file
            problems.append(f"{path}: {type(err).__name__}: {err}")
            continue
        if rows != r["slices"]:
            problems.append(f"{path}: {rows} rows, its task wrote {r['slices']}")
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise PreprocessingError(
            f"{len(problems)} of {len(results)} patient(s) are not what their preprocessing task "
            f"reported: {'; '.join(problems[:5])}{more}. The output folder's parent "
            f"({root.parent}) and the manifest's PET/mask files must be on shared storage "
            f"(NFS/EFS) that every Ray node sees at the same path (see docs/cluster.md); no "
            f"dataset was written")


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise PreprocessingError(f"{output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / DATASET_INFO).is_file():
        # Refuse to replace a folder that is not one of our datasets (e.g. a typo for $HOME).
        raise PreprocessingError(f"{output}: exists, is not empty and is not an igconda dataset "
                                 f"(no dataset.json); choose another --output or remove it")


def build_dataset(manifest: str | Path, output: str | Path, config: StudyConfig | PreprocessConfig,
                  *, strict: bool = False, map_patients: PatientMap | None = None,
                  progress: bool = True) -> PreprocessSummary:
    """Preprocess every patient of a manifest and write the slice dataset.

    Args:
        manifest: manifest CSV (see :mod:`igconda.data.manifest`).
        output: dataset folder to create or replace (local or shared filesystem path).
        config: the study config (its ``preprocess`` section is used) or a PreprocessConfig.
        strict: fail (write nothing) if any patient is rejected.
        map_patients: how to run :func:`process_patient` over the patients (a
            :data:`PatientMap`; default :func:`map_in_process`). It is called only if the
            manifest has at least one valid row, and its workers write into a hidden sibling of
            ``output``, so that folder must be on a filesystem they all see.
        progress: show a progress bar (:func:`igconda.progress.progress`).

    Returns:
        PreprocessSummary.

    Raises:
        ManifestError: the manifest file itself is unusable (missing, lacking a column).
        PreprocessingError: nothing survived, or ``strict`` and some patient was rejected; no
            dataset is written and an existing one is left as it was.
    """
    start = time.perf_counter()
    pcfg = config.preprocess if isinstance(config, StudyConfig) else config
    map_patients = map_patients or map_in_process
    manifest, output = Path(manifest), Path(output).expanduser().absolute()
    _check_output(output)

    entries, manifest_errors = parse_manifest(manifest)
    rejects: list[dict[str, Any]] = []
    for err in manifest_errors:
        rejects.append({"row": err.row, "patient_id": err.patient_id or "", "file": err.path,
                        "problem": err.problem})
        log.warning("rejected: %s", err)

    items = [_entry_dict(e) for e in entries]

    output.parent.mkdir(parents=True, exist_ok=True)
    # Built in a folder named by what it computes, so a killed run's patients are kept by a
    # re-run with the same inputs (igconda.data.build_resume).
    tmp = build_folder(output, build_key(items, pcfg))
    drop_stale_builds(output, keep=tmp)
    done = finished_results(tmp)
    if done:
        # On the console (not only in the log file): what a re-run skips is the user's business.
        print(f"resuming the interrupted build in {tmp}: {len(done)} of {len(items)} patients "
              f"already done, {len(items) - len(done)} to run", flush=True)
    tmp.mkdir(exist_ok=True)
    try:
        results: list[dict[str, Any]] = [done[i["patient_id"]] for i in items if i["patient_id"] in done]
        todo = [i for i in items if i["patient_id"] not in done]
        if todo:
            bar = progress_bar(len(todo), "preprocess", "volume", disable=not progress)
            for r in map_patients(todo, pcfg, str(tmp)):
                bar.update(1)
                record_result(tmp, r)
                results.append(r)
                if not r["ok"]:
                    log.warning("rejected %s (%s): %s", r["patient_id"], r["file"], r["problem"])
                    if r.get("traceback"):
                        log.debug("%s", r["traceback"])
                elif r["notes"]:
                    log.info("%s: %s", r["patient_id"], r["notes"])
            bar.close()
        _check_visible(tmp, results)
        good = sorted((r for r in results if r["ok"]), key=lambda r: r["patient_id"])
        rejects += [{k: r.get(k, "") for k in REJECT_COLUMNS} for r in results if not r["ok"]]
        rejects.sort(key=lambda r: (r.get("row") or 0))
        if not good:
            raise PreprocessingError(f"{manifest}: no patient survived preprocessing "
                                     f"({len(rejects)} rejected; first: {_describe(rejects[:1])})")
        if strict and rejects:
            raise PreprocessingError(f"{manifest}: {len(rejects)} patient(s) rejected with --strict, "
                                     f"no dataset written: {_describe(rejects)}")

        # The one split decision, on the survivors (a rejected scan leaves no cohort short of
        # tune patients); each file then moves to its split's folder by rename, not rewritten.
        splits = assign_splits(good, train_fraction=pcfg.train_fraction, seed=pcfg.seed,
                               valid_fraction=pcfg.valid_fraction, tune_per_cohort=pcfg.tune_per_cohort)
        for split in SPLITS:
            Path(split_path(tmp, split)).mkdir(parents=True, exist_ok=True)
        for r in good:
            r["split"] = splits[r["patient_id"]]
            os.replace(patient_file(tmp, r["patient_id"]),
                       Path(split_path(tmp, r["split"])) / f"{r['patient_id']}.parquet")

        _write_csv(tmp / "splits.csv", SPLIT_COLUMNS, good)
        _write_csv(tmp / "rejects.csv", REJECT_COLUMNS, rejects)
        counts = split_counts(good)
        coverage = lesion_coverage_summary(good)
        warnings = lesion_warnings(good)
        log_coverage(coverage, warnings)
        depths = [r["slices"] for r in good]
        info = {
            "format": "igconda-slices/1",
            "manifest": str(manifest.resolve()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "patients": len(good),
            "rejected": len(rejects),
            "slice_shape": list(pcfg.output_size[:2]),
            # A number for the fixed crop; null for the whole axial extent (see slices_per_volume).
            "num_slices_per_volume": int(pcfg.output_size[2]) if pcfg.axial_extent == "crop" else None,
            "slices_per_volume": {"min": min(depths), "max": max(depths),
                                  "mean": round(float(np.mean(depths)), 2)},
            "splits": counts,
            "unhealthy_slices": unhealthy_table(good),
            "coverage": coverage,
            "warnings": warnings,
            # Compared with a checkpoint's settings before training, tuning and inference.
            SETTINGS_KEY: settings_record(pcfg),
            "versions": _versions(),
        }
        for bookkeeping in (RESULTS_DIR, PATIENTS_DIR):  # the build's own (files of rejects too)
            shutil.rmtree(tmp / bookkeeping, ignore_errors=True)
        # dataset.json is written last: its presence marks the folder complete.
        (tmp / DATASET_INFO).write_text(json.dumps(info, indent=2))
        replace_dir(tmp, output)  # never leaves no dataset, even on a crash
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = PreprocessSummary(
        output=output,
        patients={s: counts[s]["patients"] for s in SPLITS},
        slices={s: counts[s]["slices"] for s in SPLITS},
        rejects=rejects,
        seconds=time.perf_counter() - start,
        coverage=coverage["cohorts"],
        warnings=warnings,
    )
    log.info("wrote %s: %d patients (%s), %d rejected, in %.1f s", output, len(good),
             ", ".join(f"{s} {n}" for s, n in summary.patients.items()), len(rejects), summary.seconds)
    return summary


def _describe(rejects: list[dict[str, Any]], limit: int = 5) -> str:
    parts = [f"{r.get('patient_id') or 'line ' + str(r.get('row'))}: {r.get('file')}: {r.get('problem')}"
             for r in rejects[:limit]]
    more = f" (+{len(rejects) - limit} more)" if len(rejects) > limit else ""
    return "; ".join(parts) + more


def summary_to_dict(summary: PreprocessSummary) -> dict[str, Any]:
    """JSON-friendly form of a summary (for logs and MLflow)."""
    return {"output": str(summary.output) if summary.output else None, "patients": summary.patients,
            "slices": summary.slices, "rejected": len(summary.rejects),
            "lesion_voxels_outside": {c: v["lesion_voxels_outside"] for c, v in summary.coverage.items()},
            "warnings": summary.warnings,
            "seconds": round(float(np.round(summary.seconds, 2)), 2)}

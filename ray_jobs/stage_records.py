"""What each stage of a study was run with, so that a re-run never reuses a stale output.

The pipeline skips a stage whose finished output is already there. That is only right when the
output was made with the settings of this run: a study re-run after ``train.epochs`` or the
manifest changed must not keep the old model, tuning or tables. So each stage has a *key*, a
digest of

- the config sections it reads (:data:`STAGE_SECTIONS`),
- its other inputs (the manifest's content and its files' sizes and times for ``preprocess``;
  ``--skip-tune`` for ``tune`` and ``model``), and
- the key of the stage it reads from (:data:`UPSTREAM`), so that a change anywhere upstream
  reaches every stage below it.

The pipeline records each stage's key and settings in ``<study>/stages.json`` when the stage
starts, and marks the record finished when the stage succeeded (:func:`record`). On a re-run:

- a stage whose recorded key differs from this run's is *stale*: it and every stage after it run
  again from scratch, as ``--force STAGE`` would, and the settings that changed are printed
  (:func:`describe_change`);
- a stage recorded with this run's key but not finished (killed, or failed) runs again, even if
  an older output is there, and the job carries on from what the killed run finished: the
  preprocessing keeps its finished patients, the training resumes from its checkpoints, the
  tuning keeps its finished trials, inference its finished patients;
- a stage that runs makes every stage after it run again (as ``--force`` would): their outputs
  were made from the output it replaces;
- an output without a record (a study made before records existed) is kept, with a warning.

Command-line options that are not in the config (``--num-workers``, ``--use-gpu``) are not part
of the keys: they change how a stage runs, not what it is asked to compute.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from igconda.config import StudyConfig
from igconda.io_utils import atomic_write
from ray_jobs.study_steps import STAGES

#: The file, under the study folder, that holds every stage's record.
RECORDS_FILE = "stages.json"

#: The config sections each stage's output depends on.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "cohorts": ("phantoms",),
    "preprocess": ("preprocess",),
    "train": ("model", "train"),
    "tune": ("tune", "infer"),
    "model": ("infer",),
    "infer": ("infer", "baselines"),
    "report": (),
}

#: The stage whose output each stage reads (its key is part of this stage's key).
UPSTREAM: dict[str, str | None] = {stage: STAGES[i - 1] if i else None
                                   for i, stage in enumerate(STAGES)}


def manifest_fingerprint(manifest: str | Path) -> str:
    """A digest of a manifest and of the files it lists (size and modification time each).

    Re-preprocessing is needed when the manifest's rows change or a listed scan or mask is
    replaced; reading every volume to hash it would cost minutes on a real cohort, so a file is
    identified by its size and ``st_mtime_ns`` (what ``make`` and ``rsync`` trust too).
    """
    from igconda.data.manifest import ManifestError, parse_manifest

    path = Path(manifest)
    digest = hashlib.sha256(path.read_bytes())
    try:
        entries, _ = parse_manifest(path)  # rows it cannot parse are preprocessing's to report
    except ManifestError:
        entries = []  # an unusable manifest: the preprocess stage names the problem
    for entry in entries:
        for file in (entry.pet_path, entry.mask_path):
            if not file:
                continue
            try:
                st = os.stat(file)
                digest.update(f"{file}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{file}\0missing\n".encode())
    return digest.hexdigest()[:16]


def stage_settings(config: StudyConfig, *, manifest: str | Path | None = None,
                   skip_tune: bool = False) -> dict[str, dict[str, Any]]:
    """Every stage's own settings: ``{stage: {"section.key": value, ...}}``.

    Args:
        config: the study's settings.
        manifest: the user's manifest, or None for the generated phantoms (then the cohorts
            stage's ``phantoms`` section decides the data).
        skip_tune: the pipeline's ``--skip-tune`` (the model then takes the config's ``infer``
            defaults instead of a tuning result).
    """
    settings = {stage: section_settings(config, names) for stage, names in STAGE_SECTIONS.items()}
    if manifest is not None:
        settings["cohorts"] = {"manifest": str(Path(manifest).resolve()),
                               "manifest.fingerprint": manifest_fingerprint(manifest)}
    settings["tune"]["pipeline.skip_tune"] = skip_tune
    settings["model"]["pipeline.skip_tune"] = skip_tune
    return settings


def key_of(settings: dict[str, Any], upstream: str | None) -> str:
    """A step's key: a digest of its settings and of the key of what it reads (or None)."""
    text = json.dumps({"settings": settings, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_keys(settings: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each stage's key: a digest of its settings and of its upstream stage's key."""
    keys: dict[str, str] = {}
    for stage, upstream in UPSTREAM.items():  # in STAGES order: upstream keys come first
        keys[stage] = key_of(settings[stage], keys[upstream] if upstream else None)
    return keys


def section_settings(config: StudyConfig, sections: tuple[str, ...]) -> dict[str, Any]:
    """``{"section.key": value}`` of some of a study's config sections."""
    all_sections = config.to_dict()
    return {f"{section}.{k}": v for section in sections for k, v in all_sections[section].items()}


def read_records(root: Path) -> dict[str, dict[str, Any]]:
    """The records of a study folder (``{}`` when there are none yet).

    Raises:
        ValueError: the records file exists but is not a JSON object (names the file).
    """
    path = root / RECORDS_FILE
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it to re-run every stage "
                         "from scratch") from err
    if not isinstance(records, dict):
        raise ValueError(f"{path}: expected a JSON object of stage records")
    return records


def record(root: Path, stage: str, key: str, settings: dict[str, Any], *,
           finished: bool) -> dict[str, Any]:
    """Record (atomically) that ``stage`` runs (``finished`` False) or ran to its end with
    ``key`` and ``settings``; returns the record written."""
    records = read_records(root)
    records[stage] = {"key": key, "settings": settings, "finished": finished}
    text = json.dumps(records, indent=2, sort_keys=True, default=str)
    atomic_write(root / RECORDS_FILE, lambda tmp: tmp.write_text(text), suffix=".tmp")
    return records[stage]


def describe_change(stage: str, recorded: dict[str, Any], settings: dict[str, Any]) -> str:
    """Why a stage's recorded key differs: the settings that changed, or its upstream stage."""
    old = recorded.get("settings", {})
    changed = [f"{k}: {json.dumps(old.get(k), default=str)} -> {json.dumps(settings.get(k), default=str)}"
               for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    if changed:
        return "; ".join(changed)
    return f"the output it reads from ({UPSTREAM.get(stage) or 'upstream'}) changed"


def stale_reason(root: Path, step: str, key: str, settings: dict[str, Any]) -> str | None:
    """Why the output of ``step`` recorded under ``root`` is stale (the settings that changed),
    or None when it was recorded with ``key`` or never recorded."""
    recorded = read_records(root).get(step)
    if recorded is None or recorded.get("key") == key:
        return None
    return describe_change(step, recorded, settings)

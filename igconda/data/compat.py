"""Are a dataset's slices made the way a model expects? (``dataset.json`` against a config).

A network only knows slices made one way: a scan resampled to ``spacing_mm``, a field of view of
``crop_size`` voxels centred as ``fov_centre`` says, resized to ``output_size`` and cut along z as
``axial_extent`` says. Slices made otherwise (another voxel size, FOV or slice thickness) are
inputs it never saw, and its anomaly maps on them mean nothing, with no error anywhere: the
shapes may even agree. ``ray_jobs.preprocess`` records the settings a dataset was made with in
``dataset.json`` (key ``config``, written by :func:`settings_record`), a checkpoint keeps the
study config it was trained with (``config.yaml``, section ``preprocess``), and the jobs compare
the two before any work starts:

* :func:`check_data_for_checkpoint`: ``ray_jobs.infer``, ``ray_jobs.tune`` (and, for its DPM
  checkpoints, ``ray_jobs.score_method``) against the checkpoint they load;
* :func:`check_dataset_settings`: ``ray_jobs.train`` against its ``--config``, so that the
  ``preprocess`` section stored in every checkpoint is the one its training data had (the
  premise of the check above, and of ``igconda detect``, which preprocesses a scan with it).

Compared (:data:`SLICE_SETTINGS`): the fields that change what a slice's image is. Not compared:
the split plan (``train_fraction``, ``valid_fraction``, ``tune_per_cohort``, ``seed``: which
patient lands in which split, not what a slice is), ``num_cpus_per_volume`` (scheduling), and
``binarize_mask`` (whether multi-label masks count every label as lesion: it changes the ground
truth of those cohorts, never the image the model sees, and external cohorts may need it when the
training data did not). The intensity scaling has no setting: it is the code's (``dataset.json``
records the package versions). Values are compared as recorded: settings that happen to give
the same slices (e.g. ``crop_size[2]`` and ``output_size[2]`` both halved with
``axial_extent: whole``) are still refused; preprocess with the checkpoint's config instead.

Data without ``dataset.json`` (older or hand-made folders), or whose ``dataset.json`` records no
settings or only some of them, cannot be checked: the functions return a warning line for the
job to print, never refuse such data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from igconda.config import PreprocessConfig, StudyConfig, to_plain
from igconda.data.io import DatasetError, read_dataset_info

#: The ``preprocess`` fields that change what a slice is (see the module docstring for the rest).
SLICE_SETTINGS: tuple[str, ...] = ("spacing_mm", "crop_size", "output_size", "axial_extent",
                                   "fov_centre")
#: The key of ``dataset.json`` holding the settings (:func:`settings_record`).
SETTINGS_KEY = "config"


class PreprocessMismatch(ValueError):
    """A dataset's slices were made with other preprocessing settings than a model expects."""


def settings_record(config: PreprocessConfig) -> dict[str, Any]:
    """The JSON form of the settings that ``dataset.json`` records (tuples as lists)."""
    return to_plain(asdict(config))


def slice_setting_differences(recorded: Mapping[str, Any], expected: PreprocessConfig
                              ) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """Compare a dataset's recorded settings with a config's, field by field.

    Args:
        recorded: ``dataset.json``'s ``config`` mapping (lists for tuples).
        expected: the settings the model expects.

    Returns:
        ``{field: (recorded value, expected value)}`` for each of :data:`SLICE_SETTINGS` that
        differs, and the names of those ``recorded`` lacks (not checked).
    """
    wanted = settings_record(expected)
    differences, missing = {}, []
    for name in SLICE_SETTINGS:
        if name not in recorded:
            missing.append(name)
        elif to_plain(recorded[name]) != wanted[name]:  # 12 == 12.0: JSON/YAML number forms agree
            differences[name] = (recorded[name], wanted[name])
    return differences, missing


def check_dataset_settings(data: str | Path, expected: PreprocessConfig, *, expected_from: str,
                           fix: str) -> str | None:
    """Refuse a dataset whose ``dataset.json`` records other slice settings than ``expected``.

    Args:
        data: the dataset folder or URI.
        expected: the settings the model expects.
        expected_from: where ``expected`` comes from, for the messages (e.g. ``checkpoint X
            (its config.yaml)``).
        fix: what to do instead, appended to the error.

    Returns:
        None when every compared setting agrees; a warning line when some or all of them
        cannot be checked (no ``dataset.json``, or one that records no settings).

    Raises:
        PreprocessMismatch: naming ``dataset.json``, ``expected_from`` and each differing
            setting with both values.
    """
    summary = f"{str(data).rstrip('/')}/dataset.json"
    try:
        info = read_dataset_info(data)
    except DatasetError:
        return (f"{data}: no dataset.json (older or hand-made data), so its preprocessing cannot "
                f"be checked against {expected_from}; make sure its slices were made with those "
                f"settings ({', '.join(SLICE_SETTINGS)})")
    recorded = info.get(SETTINGS_KEY) if isinstance(info, dict) else None
    if not isinstance(recorded, Mapping):
        return (f"{summary} records no preprocessing settings, so they cannot be checked against "
                f"{expected_from}")
    differences, missing = slice_setting_differences(recorded, expected)
    if differences:
        lines = "\n".join(f"  preprocess.{name}: data {got!r}, expected {want!r}"
                          for name, (got, want) in differences.items())
        raise PreprocessMismatch(
            f"{summary}: the data were preprocessed with other slice settings than "
            f"{expected_from}:\n{lines}\n{fix}")
    if missing:
        return (f"{summary} does not record preprocess.{', preprocess.'.join(missing)}; those "
                f"settings were not checked against {expected_from}")
    return None


def check_data_for_checkpoint(data: str | Path, checkpoint: str | Path,
                              config: StudyConfig | None = None) -> str | None:
    """:func:`check_dataset_settings` against the ``preprocess`` section of an IgCONDA-format
    checkpoint (IgCONDA, or the unconditional DPM of ``dpm_cg``): what inference, tuning and
    scoring call before loading the model anywhere. ``config``: the checkpoint's config as the
    caller loaded it (its ``preprocess`` section is the one checked), so that ``config.yaml``
    is not parsed again; read here when None.

    Returns:
        None, or a warning line for the job to print (settings that cannot be checked).

    Raises:
        PreprocessMismatch: naming ``dataset.json``, the checkpoint and each differing setting.
        igconda.checkpoint.CheckpointError: no checkpoint config (or a baseline's) there.
    """
    from igconda.checkpoint import CONFIG_FILE, load_checkpoint_config  # torch: only when called

    config_file = Path(checkpoint) / CONFIG_FILE
    return check_dataset_settings(
        data, (config or load_checkpoint_config(checkpoint)).preprocess,
        expected_from=f"checkpoint {checkpoint} ({config_file}, section preprocess)",
        fix=(f"A model only knows slices made as its training data were. Preprocess the scans "
             f"again with the checkpoint's settings (python -m ray_jobs.preprocess --config "
             f"{config_file} ...), or use a checkpoint trained on data made like these."))

"""Preprocess a manifest of PET/mask NIfTI volumes into Parquet slices, on Ray Data.

Run locally (starts a local Ray) or on a cluster::

    python -m ray_jobs.preprocess --manifest ../shared/data/sts-crops/manifest.csv --output data/sts
    python -m ray_jobs.preprocess --manifest study/manifest.csv --output data/study \
        --config configs/demo.yaml --strict
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m ray_jobs.preprocess --manifest M.csv --output /shared/nfs/data --address auto

Writes ``<output>/slices/<split>/<patient_id>.parquet``, ``splits.csv``, ``rejects.csv`` and
``dataset.json`` (see docs/data.md). Bad patients are skipped and listed in ``rejects.csv``.
Exit status: 0 on success; 1 if nothing survived or, with ``--strict``, if any patient was
rejected, or a task's report does not hold from the driver's view (then nothing is written); 2
for an unusable manifest or config, or, on a multi-node cluster, an output folder not every
node sees (:func:`ray_jobs.shared_storage.check_shared`, before any work).

The job is Ray Data's map over the patients (:func:`map_on_ray_data`, one task per volume,
each asking Ray for the memory its volume needs, :mod:`igconda.data.memory`; a volume no node
could hold is rejected before any task) handed to :func:`igconda.data.build.build_dataset`, which decides the splits once every task has
reported, files each patient in its split and writes the summary, and runs the same without Ray.
The command line is parsed into a :class:`PreprocessRequest` (``--config`` read once) that
:func:`run` runs; the pipeline builds the request from its loaded config.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from igconda.argtypes import non_negative_float
from igconda.config import ConfigError, PreprocessConfig, StudyConfig, load_config
from igconda.data.build import (
    PreprocessingError,
    PreprocessSummary,
    build_dataset,
    process_patient,
    rejected,
    summary_to_dict,
)
from igconda.data.manifest import ManifestError
from igconda.data.memory import preprocess_memory_bytes, too_large
from ray_jobs.console import add_verbose_flag, init_ray


def node_memory_capacity() -> float:
    """Bytes of Ray's ``memory`` resource on the largest live node of the running cluster (0 if
    none reports one). Ray sets it to about 70 % of a node's RAM unless told otherwise."""
    import ray

    return max((float(n["Resources"].get("memory", 0)) for n in ray.nodes() if n.get("Alive")),
               default=0.0)


def plan_memory(items: list[dict[str, Any]], config: PreprocessConfig, capacity: float
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Split the items into those to run and those refused for memory, and size the request.

    Args:
        items: manifest rows.
        config: preprocessing settings (``spacing_mm`` sizes the estimate).
        capacity: the largest node's memory in bytes (:func:`node_memory_capacity`; 0 = unknown).

    Returns:
        (items to run, refused results naming the PET file and the fix, bytes each task asks for).
        The request is the largest estimate among the items to run: Ray Data's ``map`` takes one
        ``memory=`` for all its tasks (``ray_remote_args_fn`` is called without the row), and
        a cohort's scans usually share a protocol, so its largest scan is close to the typical
        one; a one-off large scan only lowers how many tasks share a node.
    """
    run, refused, request = [], [], 0
    for item in items:
        needed = preprocess_memory_bytes(item["pet_path"], item["mask_path"] or None, config)
        problem = too_large(item["pet_path"], needed, capacity)
        if problem:
            refused.append(rejected(item, item["pet_path"], problem))
        else:
            run.append(item)
            request = max(request, needed)
    return run, refused, request


def map_on_ray_data(items: list[dict[str, Any]], config: PreprocessConfig, root: str, *,
                    num_cpus: float, progress: bool = True) -> Iterator[dict[str, Any]]:
    """Run :func:`igconda.data.build.process_patient` on every item, one Ray Data task each.

    A :data:`igconda.data.build.PatientMap` once ``num_cpus`` and ``progress`` are bound. Uses
    the running Ray instance (``ray.init`` is called with defaults if none is running). Results
    come back as the tasks finish, with numpy scalars turned into Python values. Each task asks
    Ray for the memory the volume needs (:func:`plan_memory`, from the NIfTI headers read here);
    a volume larger than any node's memory is refused (yielded as rejected) without a task.

    Args:
        items: manifest rows (one task, and one block, each); no split yet.
        config: preprocessing settings.
        root: the dataset folder being built; every Ray node must see it.
        num_cpus: CPUs Ray reserves per task.
        progress: whether the caller shows its own progress bar (then Ray Data's are off, so
            that there is one progress display, not two).
    """
    import ray

    if not ray.is_initialized():
        ray.init()
    items, refused, memory = plan_memory(items, config, node_memory_capacity())
    yield from refused
    if not items:
        return
    ctx = ray.data.DataContext.get_current()
    ray_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = not progress  # one progress display, not two
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
            process_patient, fn_kwargs={"config": config, "root": root}, num_cpus=num_cpus,
            memory=memory or None)
        for row in ds.iter_rows():
            yield {k: (v.item() if isinstance(v, np.generic) else v) for k, v in dict(row).items()}
    finally:
        ctx.enable_progress_bars = ray_bars


def run_preprocessing(manifest: str | Path, output: str | Path, config: StudyConfig | PreprocessConfig,
                      *, strict: bool = False, num_cpus_per_volume: float | None = None,
                      progress: bool = True) -> PreprocessSummary:
    """Preprocess every patient of a manifest on Ray Data and write the slice dataset.

    :func:`igconda.data.build.build_dataset` with :func:`map_on_ray_data`; arguments, return
    value and errors as there, plus:

    Args:
        num_cpus_per_volume: CPUs reserved per Ray task (default ``config.num_cpus_per_volume``).

    Raises:
        PreprocessingError: also when ``num_cpus_per_volume`` is not positive.
    """
    pcfg = config.preprocess if isinstance(config, StudyConfig) else config
    cpus = pcfg.num_cpus_per_volume if num_cpus_per_volume is None else num_cpus_per_volume
    if cpus <= 0:
        raise PreprocessingError(f"num_cpus_per_volume must be positive, got {cpus}")
    return build_dataset(manifest, output, pcfg, strict=strict, progress=progress,
                         map_patients=partial(map_on_ray_data, num_cpus=cpus, progress=progress))


@dataclass(frozen=True)
class PreprocessRequest:
    """What one preprocessing runs with: the command line's options, ``--config`` parsed once
    (:func:`preprocess_request`; the pipeline passes its loaded config)."""

    manifest: str
    output: str
    config: StudyConfig
    strict: bool = False
    num_cpus_per_volume: float | None = None
    progress: bool = True
    address: str | None = None
    verbose: bool | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="manifest CSV")
    parser.add_argument("--output", required=True, help="dataset folder to create or replace")
    parser.add_argument("--config", default=None, help="study YAML (default: the paper's settings)")
    parser.add_argument("--strict", action="store_true", help="fail, writing nothing, if any patient is rejected")
    parser.add_argument("--address", default=None, help="Ray address (default: start a local Ray)")
    add_verbose_flag(parser)
    parser.add_argument("--num-cpus-per-volume", type=non_negative_float, default=None,
                        help="CPUs per Ray task (default: preprocess.num_cpus_per_volume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def preprocess_request(args: argparse.Namespace) -> PreprocessRequest:
    """The request of a ``ray_jobs.preprocess`` command line (ConfigError: a bad ``--config``)."""
    return PreprocessRequest(str(args.manifest), str(args.output), load_config(args.config),
                             strict=args.strict, num_cpus_per_volume=args.num_cpus_per_volume,
                             progress=not args.no_progress, address=args.address,
                             verbose=args.verbose)


def run(request: PreprocessRequest) -> PreprocessSummary:
    """The job as ``request`` says: Ray (started here unless running), the shared-storage
    check, then :func:`run_preprocessing`.

    Raises:
        SharedStorageError, ManifestError, PreprocessingError: as the module docstring says.
    """
    from ray_jobs.shared_storage import check_shared

    init_ray(request.address, verbose=request.verbose)  # quiet unless --verbose: ray_jobs.console
    # The tasks write into a hidden sibling of --output, so its parent is what they must see.
    check_shared(Path(request.output).expanduser().absolute().parent,
                 f"the folder holding --output {request.output} (every preprocessing task writes "
                 f"its patient's Parquet file there)")
    return run_preprocessing(request.manifest, request.output, request.config,
                             strict=request.strict,
                             num_cpus_per_volume=request.num_cpus_per_volume,
                             progress=request.progress)


def execute(build: Callable[[], PreprocessRequest]) -> int:
    """:func:`run` on the request ``build`` resolves, its errors logged as the command line
    logs them; the job's exit status (the pipeline runs its preprocess stage through this)."""
    from ray_jobs.shared_storage import SharedStorageError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("ray_jobs.preprocess")
    try:
        summary = run(build())
    except (ConfigError, SharedStorageError, ManifestError) as err:
        log.error("%s", err)
        return 2
    except PreprocessingError as err:
        log.error("%s", err)
        return 1
    print(json.dumps(summary_to_dict(summary), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return execute(lambda: preprocess_request(args))


if __name__ == "__main__":
    sys.exit(main())

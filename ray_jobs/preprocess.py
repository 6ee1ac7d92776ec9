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
rejected (then nothing is written); 2 for an unusable manifest or config.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from igconda.argtypes import non_negative_float
from igconda.config import ConfigError, load_config
from igconda.data.build import PreprocessingError, run_preprocessing, summary_to_dict
from igconda.data.manifest import ManifestError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="manifest CSV")
    parser.add_argument("--output", required=True, help="dataset folder to create or replace")
    parser.add_argument("--config", default=None, help="study YAML (default: the paper's settings)")
    parser.add_argument("--strict", action="store_true", help="fail, writing nothing, if any patient is rejected")
    parser.add_argument("--address", default=None, help="Ray address (default: start a local Ray)")
    parser.add_argument("--num-cpus-per-volume", type=non_negative_float, default=None,
                        help="CPUs per Ray task (default: preprocess.num_cpus_per_volume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("ray_jobs.preprocess")

    try:
        config = load_config(args.config)
    except ConfigError as err:
        log.error("%s", err)
        return 2

    import ray

    if not ray.is_initialized():
        ray.init(address=args.address)
    try:
        summary = run_preprocessing(args.manifest, args.output, config, strict=args.strict,
                                    num_cpus_per_volume=args.num_cpus_per_volume,
                                    progress=not args.no_progress)
    except ManifestError as err:
        log.error("%s", err)
        return 2
    except PreprocessingError as err:
        log.error("%s", err)
        return 1
    print(json.dumps(summary_to_dict(summary), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

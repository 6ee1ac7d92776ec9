"""The comparison stage: every scored method of a study, read back from MLflow, in the paper's
tables and figures::

    python -m ray_jobs.compare --tracking-uri sqlite:///runs/paper/mlflow.db --experiment igconda \\
        --output runs/paper/comparison [--data-version V] [--heatmap-method LABEL ...]

It reads every run tagged ``igconda.stage = score`` (``igconda.comparison.load_scored_runs``),
writes Tables 1–4 (+ Dice@τ), Figs. 4 and 6 and ``comparison.html`` into ``--output``
(``igconda.comparison_report.write_comparison``), then logs a ``comparison`` run (tag
``igconda.stage = comparison``) with those files as artifacts. No Ray: the work is a few
thousand rows per method.

Exit status: 0 when written (a tracking outage while logging is only a warning), 2 when no
store is named (``--tracking-uri``, else ``MLFLOW_TRACKING_URI``), there is nothing to compare,
the runs mix data versions or a ``--heatmap-method`` names no method.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from igconda import tracking
from igconda.comparison import (
    COMPARISON_STAGE,
    STAGE_TAG,
    VERSION_TAG,
    ScoredRuns,
    load_scored_runs,
)
from igconda.comparison_report import write_comparison


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.compare",
                                description=__doc__.split("::")[0] + ".",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=None,
                   help="the study's MLflow store: a URI, or the folder of its mlflow.db "
                        f"(default ${tracking.TRACKING_URI_ENV})")
    p.add_argument("--experiment", required=True, help="the study's MLflow experiment")
    p.add_argument("--output", required=True, help="folder for the tables, figures and page")
    p.add_argument("--data-version", default=None,
                   help="compare only the score runs of this data version")
    p.add_argument("--allow-mixed-data-versions", action="store_true",
                   help="compare runs of several data versions (the page says so)")
    p.add_argument("--heatmap-method", action="append", default=None, metavar="LABEL",
                   help="a method label to draw in Fig. 6 (repeatable; default all)")
    return p.parse_args(argv)


def log_comparison(uri: str, experiment: str, output: Path, scored: ScoredRuns) -> str | None:
    """The ``comparison`` run: what was compared as params, the output folder as artifacts;
    its id, or None when the tracking store failed (the files are on disk either way)."""
    run_id = None
    tags = {STAGE_TAG: COMPARISON_STAGE}
    if len(scored.data_versions) == 1:
        tags[VERSION_TAG] = scored.data_versions[0]
    with tracking.outage_tolerant("logging the comparison run", uri, on_disk=str(output)):
        with tracking.start_run(uri, experiment, COMPARISON_STAGE, tags=tags) as run_id:
            tracking.log_params({"score_runs": len(scored.runs), "skipped_runs": len(scored.skipped),
                                 "data_versions": ",".join(scored.data_versions),
                                 "methods": ",".join(scored.labels)})
            tracking.log_artifact(output)
    return run_id


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    given = args.tracking_uri or os.environ.get(tracking.TRACKING_URI_ENV, "").strip()
    if not given:  # the jobs' fallback, a new mlflow.db in --output, would hold no score runs
        print(f"error: give --tracking-uri (or set {tracking.TRACKING_URI_ENV})", file=sys.stderr)
        return 2
    uri = tracking.resolve_tracking_uri(given, output)
    try:
        scored = load_scored_runs(uri, args.experiment, data_version=args.data_version,
                                  allow_mixed=args.allow_mixed_data_versions)
    except ValueError as err:  # nothing usable, or mixed data versions
        print(f"error: {err}", file=sys.stderr)
        return 2
    unknown = sorted(set(args.heatmap_method or ()) - set(scored.labels))
    if unknown:
        print(f"error: --heatmap-method {unknown}: no such method label; known: {scored.labels}",
              file=sys.stderr)
        return 2
    for skipped in scored.skipped:
        print(f"compare: skipped run {skipped.run_id} ({skipped.run_name}): {skipped.reason}",
              flush=True)
    written = write_comparison(output, scored, heatmap_labels=args.heatmap_method)
    run_id = log_comparison(uri, args.experiment, output, scored)
    print(f"compare: {len(scored.runs)} method(s) compared; {written['html']} "
          f"(MLflow run {run_id or 'not logged'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

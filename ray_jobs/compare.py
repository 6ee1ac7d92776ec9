"""The comparison stage: every scored method of a study, read back from MLflow, in the paper's
tables and figures::

    python -m ray_jobs.compare --tracking-uri sqlite:///runs/paper/mlflow.db --experiment igconda \\
        --output runs/paper/comparison [--data-version V] [--heatmap-method LABEL ...]

It reads every run tagged ``igconda.stage = score`` (``igconda.comparison.load_scored_runs``),
writes Tables 1–4 (+ Dice@τ), Figs. 4 and 6 and ``comparison.html`` into ``--output``
(``igconda.comparison_report.write_comparison``), then logs a ``comparison`` run (tag
``igconda.stage = comparison``) with those files as artifacts. No Ray: the work is a few
thousand rows per method.

The command line is resolved into a :class:`CompareRequest` (:func:`resolve_request`, shared
with the comparison study, which calls :func:`run` on it without an argv).

Exit status: 0 when written (a tracking outage while logging is only a warning), 2 when no
store is named (``--tracking-uri``, else ``MLFLOW_TRACKING_URI``), there is nothing to compare,
the runs mix data versions or a ``--heatmap-method`` names no method.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


class CompareError(ValueError):
    """A comparison refused (no store, nothing to compare, mixed data versions, an unknown
    ``--heatmap-method``): exit status 2."""


@dataclass(frozen=True)
class CompareRequest:
    """What one comparison runs with (:func:`resolve_request`): the study's MLflow store
    (``tracking_uri``, resolved) and experiment, and the other options by their names. No
    study config: the score runs carry everything compared."""

    tracking_uri: str
    experiment: str
    output: str
    data_version: str | None = None
    allow_mixed_data_versions: bool = False
    heatmap_method: tuple[str, ...] | None = None


def resolve_request(output: str | Path, experiment: str, *, tracking_uri: str | None = None,
                    data_version: str | None = None, allow_mixed_data_versions: bool = False,
                    heatmap_method: Sequence[str] | None = None) -> CompareRequest:
    """The one resolver of a comparison (the command line's and the comparison study's): the
    store is ``tracking_uri``, else ``$MLFLOW_TRACKING_URI`` (a folder: its ``mlflow.db``).

    Raises:
        CompareError: no store named (the jobs' fallback, a new ``mlflow.db`` in ``output``,
            would hold no score runs).
    """
    given = tracking_uri or os.environ.get(tracking.TRACKING_URI_ENV, "").strip()
    if not given:
        raise CompareError(f"give --tracking-uri (or set {tracking.TRACKING_URI_ENV})")
    return CompareRequest(tracking.resolve_tracking_uri(given, Path(output)), experiment,
                          str(output), data_version, allow_mixed_data_versions,
                          tuple(heatmap_method) if heatmap_method else None)


def compare_request(args: argparse.Namespace) -> CompareRequest:
    """The request of a ``ray_jobs.compare`` command line (:func:`resolve_request`)."""
    return resolve_request(args.output, args.experiment, tracking_uri=args.tracking_uri,
                           heatmap_method=args.heatmap_method, data_version=args.data_version,
                           allow_mixed_data_versions=args.allow_mixed_data_versions)


def run(request: CompareRequest) -> dict[str, Path]:
    """Write the tables, figures and page and log the comparison run; the files written.

    Raises:
        CompareError: nothing usable to compare, mixed data versions, or a
            ``heatmap_method`` that names no method.
    """
    output = Path(request.output)
    try:
        scored = load_scored_runs(request.tracking_uri, request.experiment,
                                  data_version=request.data_version,
                                  allow_mixed=request.allow_mixed_data_versions)
    except ValueError as err:  # nothing usable, or mixed data versions
        raise CompareError(str(err)) from None
    unknown = sorted(set(request.heatmap_method or ()) - set(scored.labels))
    if unknown:
        raise CompareError(f"--heatmap-method {unknown}: no such method label; "
                           f"known: {scored.labels}")
    for skipped in scored.skipped:
        print(f"compare: skipped run {skipped.run_id} ({skipped.run_name}): {skipped.reason}",
              flush=True)
    written = write_comparison(output, scored, heatmap_labels=request.heatmap_method)
    run_id = log_comparison(request.tracking_uri, request.experiment, output, scored)
    print(f"compare: {len(scored.runs)} method(s) compared; {written['html']} "
          f"(MLflow run {run_id or 'not logged'})", flush=True)
    return written


def execute(build: Callable[[], CompareRequest]) -> int:
    """:func:`run` on the request ``build`` resolves, a refusal reported as the command line
    reports it; the job's exit status (the comparison study runs its last step through this)."""
    try:
        run(build())
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return execute(lambda: compare_request(args))


if __name__ == "__main__":
    sys.exit(main())

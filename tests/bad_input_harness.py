"""How the bad-input corpus (``tests/bad_inputs.py``) is tried and reported.

Each :class:`Case` builds its input in a folder (small NIfTI volumes written with nibabel, a
YAML, a damaged checkpoint, ...) and returns an :class:`Attempt`: the call that must refuse it
and the words its message must hold. :func:`try_case` runs one and says whether it was refused
*clearly*: with the expected error type, never a bare ``ZeroDivisionError``/``KeyError``/... ,
and with every word. The cases marked ``batch`` are also patients of one manifest that mixes
them with good patients; :func:`run_batch` runs the preprocessing job (``ray_jobs.preprocess``,
on Ray Data) on it: every good patient must come out (lost = 0) and every bad one must be listed
in ``rejects.csv`` with its file and reason.

The cases: ``tests/bad_inputs.py`` (``python -m tests.bad_inputs`` prints the report); the
tests: ``tests/test_bad_input_corpus.py``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igconda.config import PreprocessConfig
from tests.data.nifti_fixtures import write_manifest_csv, write_patient

#: Small volumes, quick to preprocess (as tests/data/test_preprocess_job.py).
CONFIG = PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0), crop_size=(24, 24, 20), output_size=(16, 16, 12),
                          train_fraction=0.5, valid_fraction=0.25, tune_per_cohort=1)
#: Errors that are a crash, not a refusal, whatever their message.
BARE = (ZeroDivisionError, KeyError, IndexError, TypeError, AttributeError, AssertionError,
        NameError, UnboundLocalError, RecursionError, StopIteration)
#: The good patients of the batch manifest: (cohort, count, role).
GOOD_COHORTS = (("lymphoma", 3, "internal"), ("lung", 3, "internal"), ("negative", 2, "negative_control"))


class CommandError(Exception):
    """A command line that exited with a non-zero status; the message is its stderr."""

    def __init__(self, code: int, stderr: str) -> None:
        self.code = code
        super().__init__(stderr)


def run_command(main: Callable[[list[str]], int | None], argv: list[str]) -> None:
    """Run a console entry point's ``main`` in this process; raise CommandError unless it exits 0."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: usage error
            code = exit_.code if isinstance(exit_.code, int) else 1
    if code:
        raise CommandError(code, err.getvalue())


@dataclass
class Attempt:
    """What one case does and what its refusal must say.

    Attributes:
        call: the call that must refuse the input (raise).
        named: the file or setting the message must name.
        words: further words the message must hold (what is wrong, the fix).
        rows: manifest rows ``(patient_id, cohort, tracer, pet_path, mask_path, role)`` (paths
            relative to the folder) that bring this input into the batch job; empty if none.
    """

    call: Callable[[], Any]
    named: str
    words: tuple[str, ...]
    rows: list[tuple[str, ...]] = field(default_factory=list)


@dataclass(frozen=True)
class Case:
    """One bad input: its name, what is wrong, the entry point, the expected error type, and
    ``make(folder) -> Attempt``. ``batch``: a manifest row, also run in the batch job."""

    name: str
    wrong: str
    entry: str
    expected: type[BaseException]
    make: Callable[[Path], Attempt]
    batch: bool = False


def registrar(cases: list[Case]):
    """A ``@case(name, wrong, entry, expected, batch=False)`` decorator appending the decorated
    ``make(folder) -> Attempt`` to ``cases`` (one list per corpus module)."""
    def case(name: str, wrong: str, entry: str, expected: type[BaseException], batch: bool = False):
        def register(make):
            cases.append(Case(name, wrong, entry, expected, make, batch))
            return make
        return register
    return case


@dataclass
class Outcome:
    """What :func:`try_case` saw."""

    case: Case
    error: str  # the type raised, or "accepted"
    message: str
    missing: list[str]  # required words the message lacks
    clear: bool  # refused with the expected type, not a bare error, naming every word


def try_case(case: Case, folder: Path) -> Outcome:
    """Build ``case``'s input in ``folder`` and try it."""
    folder.mkdir(parents=True, exist_ok=True)
    attempt = case.make(folder)
    try:
        attempt.call()
    except Exception as err:  # what we want: a refusal; judged below
        message = str(err)
        missing = [w for w in (attempt.named, *attempt.words) if w not in message]
        clear = (isinstance(err, case.expected) and not isinstance(err, BARE) and not missing
                 and "Traceback" not in message
                 and (not isinstance(err, CommandError) or err.code == 2))
        return Outcome(case, type(err).__name__, message, missing, clear)
    return Outcome(case, "accepted", "", [attempt.named, *attempt.words], False)


@dataclass
class BatchOutcome:
    """The preprocessing job on good patients mixed with every batch case.

    Attributes:
        good: the good patients' ids; kept: the ids the dataset holds (``splits.csv``).
        lost: good patients missing from the dataset (must be empty).
        listed: per batch case, whether each of its patients is in ``rejects.csv`` with the
            expected file and words; problems: the reject lines of those that are not.
    """

    good: list[str]
    kept: list[str]
    lost: list[str]
    listed: dict[str, bool]
    problems: dict[str, str]


def write_batch(folder: Path, cases: list[Case]) -> tuple[Path, list[str], dict[str, Attempt]]:
    """The batch manifest: the good cohorts plus every batch case's rows; returns the manifest,
    the good ids and each case's attempt."""
    rows, good = [], []
    for cohort, n, role in GOOD_COHORTS:
        for i in range(n):
            pid = f"{cohort}{i}"
            write_patient(folder, pid, lesion=role != "negative_control", seed=i)
            rows.append((pid, cohort, "FDG", f"images/{pid}.nii.gz", f"labels/{pid}.nii.gz", role))
            good.append(pid)
    attempts = {}
    for case in cases:
        if case.batch:
            attempts[case.name] = case.make(folder)
            rows += attempts[case.name].rows
    return write_manifest_csv(folder / "manifest.csv", rows), good, attempts


def run_batch(folder: Path, cases: list[Case]) -> BatchOutcome:
    """Run ``ray_jobs.preprocess`` (Ray Data, the running Ray) on the mixed manifest."""
    from ray_jobs.preprocess import run_preprocessing

    manifest, good, attempts = write_batch(folder, cases)
    summary = run_preprocessing(manifest, folder / "data", CONFIG, progress=False)
    with (summary.output / "splits.csv").open() as fh:
        kept = sorted(r["patient_id"] for r in csv.DictReader(fh))
    with (summary.output / "rejects.csv").open() as fh:
        rejects = list(csv.DictReader(fh))
    listed, problems = {}, {}
    for name, attempt in attempts.items():
        # A manifest row's error names the manifest; a volume's, the volume.
        named = str(manifest) if attempt.named.endswith(".csv") else attempt.named
        ids = {row[0] for row in attempt.rows}
        lines = [r for r in rejects if r["patient_id"] in ids]
        ok = [r for r in lines if r["file"] == named and all(w in r["problem"] for w in attempt.words)]
        listed[name] = len(ok) == len(attempt.rows)
        if not listed[name]:
            problems[name] = "; ".join(f"{r['file']}: {r['problem']}" for r in lines) or "not listed"
    return BatchOutcome(good, kept, sorted(set(good) - set(kept)), listed, problems)


def report(outcomes: list[Outcome], batch: BatchOutcome | None) -> str:
    """The corpus table and its totals (Markdown)."""
    lost = "–" if batch is None else str(len(batch.lost))
    lines = ["| case | entry point | refused clearly? | good patients lost |", "|---|---|---|---|"]
    for o in outcomes:
        verdict = "yes" if o.clear else f"**no** ({o.error}; lacks {o.missing})"
        if o.case.batch and batch is not None and not batch.listed.get(o.case.name, False):
            verdict += f"; **not listed by the job** ({batch.problems.get(o.case.name)})"
        lines.append(f"| {o.case.name}: {o.case.wrong} | {o.case.entry} | {verdict} | "
                     f"{lost + ' (batch job)' if o.case.batch else '–'} |")
    clear = sum(o.clear and (not o.case.batch or batch is None or batch.listed.get(o.case.name, False))
                for o in outcomes)
    in_batch = sum(o.case.batch for o in outcomes)
    total = (f"\n\nTried: {len(outcomes)}; refused clearly: {clear}; good patients lost: {lost}"
             + ("" if batch is None else
                f" (of {len(batch.good)} good patients in one preprocessing job with the "
                f"{in_batch} batch cases)"))
    return "\n".join(lines) + total


def main(cases: list[Case]) -> int:
    """Try every case, run the batch job on a local Ray, print the report; 1 if any case fails."""
    import ray

    from tests.conftest import LOCAL_RAY

    with tempfile.TemporaryDirectory() as tmp:
        outcomes = [try_case(case, Path(tmp) / case.name) for case in cases]
        ray.init(**LOCAL_RAY)
        try:
            batch = run_batch(Path(tmp) / "batch", cases)
        finally:
            ray.shutdown()
    print(report(outcomes, batch))
    failed = [o for o in outcomes if not o.clear] + [n for n, ok in batch.listed.items() if not ok]
    return 1 if failed or batch.lost else 0

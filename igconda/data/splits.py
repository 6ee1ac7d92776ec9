"""Subject-level splits, seeded and stratified by cohort and tracer (paper §3.1).

A manifest row is one study (``patient_id`` names its file); several studies of one person
(AutoPET's follow-up scans) share a ``subject_id``. Splits are drawn per SUBJECT, and every study
of a subject lands in its subject's split: a person's second scan in test while the first is in
train would let the model have seen the test patient. Rows without a subject id are their own
subject.

Rules (per subject, in the stratum of its study with the most restrictive role: external, then
negative_control, then internal; so a person with a lesion-free negative-control study stays in
train/valid and never lends a study to test):

* **internal** cohorts: each cohort's patients are shuffled (seeded per cohort) and divided into
  train / valid / test by ``train_fraction`` / ``valid_fraction`` (the rest is test), using
  largest-remainder rounding so the counts add up; then ``tune_per_cohort`` patients are moved
  from test to tune (the paper's 10-patient tuning set: 2 per internal cohort).
* **external** cohorts: test only.
* **negative_control**: train / valid only, in the ratio train_fraction : valid_fraction.

Tiny cohorts: every internal and negative-control cohort keeps at least one train patient; when
a cohort's test share is smaller than ``tune_per_cohort``, tune gets what test has (possibly
leaving that cohort without test patients) and a warning says so.

Each cohort is shuffled with its own generator seeded by ``(seed, role, cohort)``, so adding or
removing one cohort never reshuffles the others; subjects are sorted by id before shuffling, so
the manifest's row order does not matter. Strata are (role, cohort): negative controls that
share a cohort name with internal patients are split by the negative-control rule. Within a
cohort of several tracers (AutoPET's PSMA cohort: 18F- and 68Ga-PSMA), each tracer's subjects
are shuffled on their own and interleaved by rank (systematic sampling), so train, valid, tune
and test each get the cohort's tracers in proportion (to within one subject per tracer).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from igconda.data.schema import ROLES

log = logging.getLogger(__name__)


def _largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` into integer counts proportional to ``fractions`` that sum to ``n``."""
    total = float(sum(fractions))
    ideal = [n * f / total for f in fractions] if total > 0 else [0.0] * len(fractions)
    counts = [int(np.floor(x)) for x in ideal]
    order = sorted(range(len(fractions)), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _ensure_one_train(counts: list[int]) -> list[int]:
    """Move one patient into train (index 0) from the largest other bucket if train is empty."""
    if counts[0] == 0 and sum(counts) > 0:
        donor = max(range(1, len(counts)), key=lambda i: counts[i])
        counts[donor] -= 1
        counts[0] += 1
    return counts


def _rng(seed: int, cohort: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(cohort.encode("utf-8"))])


#: Which study decides a subject's stratum: the most restrictive role.
_ROLE_PRIORITY = {"external": 0, "negative_control": 1, "internal": 2}


def _stratified_order(subjects: list[tuple[str, str]], seed: int, key: str) -> list[str]:
    """Shuffle ``(subject, tracer)`` pairs; with several tracers, interleave them by rank.

    One tracer: one permutation seeded by ``key`` (as before tracers were considered, so such
    cohorts keep their splits). Several: each tracer's subjects are permuted on their own and
    merged by (rank + 0.5) / count, so any contiguous block holds the tracers in proportion.
    """
    tracers = sorted({t for _, t in subjects})
    if len(tracers) == 1:
        ids = sorted(s for s, _ in subjects)
        return [ids[i] for i in _rng(seed, key).permutation(len(ids))]
    merged = []
    for tracer in tracers:
        ids = sorted(s for s, t in subjects if t == tracer)
        order = [ids[i] for i in _rng(seed, f"{key}/{tracer}").permutation(len(ids))]
        merged += [((rank + 0.5) / len(order), tracer, sid) for rank, sid in enumerate(order)]
    return [sid for _, _, sid in sorted(merged)]


def assign_splits(patients: Iterable[Any], *, train_fraction: float, valid_fraction: float,
                  tune_per_cohort: int, seed: int) -> dict[str, str]:
    """Assign each study to ``train``, ``valid``, ``tune`` or ``test``, by subject.

    Args:
        patients: objects with ``patient_id``, ``cohort`` and ``role`` attributes (e.g.
            :class:`igconda.data.manifest.ManifestEntry`) or mappings with those keys, and
            optionally ``tracer`` and ``subject_id`` (missing or empty: the study is its own
            subject).
        train_fraction: share of each internal cohort for train, in (0, 1).
        valid_fraction: share for valid, in [0, 1); train + valid < 1, the rest is test.
        tune_per_cohort: patients moved from test to tune in each internal cohort.
        seed: random seed.

    Returns:
        ``{patient_id: split}`` for every study; a subject's studies share one split.

    Raises:
        ValueError: on bad fractions, an unknown role or a duplicate patient id.
    """
    if not 0 < train_fraction < 1 or not 0 <= valid_fraction < 1 or train_fraction + valid_fraction >= 1:
        raise ValueError(f"need 0 < train_fraction < 1, 0 <= valid_fraction and train + valid < 1; "
                         f"got {train_fraction}, {valid_fraction}")
    if tune_per_cohort < 0:
        raise ValueError(f"tune_per_cohort must be >= 0, got {tune_per_cohort}")

    def get(p: Any, key: str, default: str | None = None) -> str:
        value = p.get(key, default) if isinstance(p, dict) else getattr(p, key, default)
        if value is None:
            raise ValueError(f"a patient lacks {key!r}: {p!r}")
        return str(value)

    studies: dict[str, list[tuple[int, str, str, str, str]]] = {}
    seen: set[str] = set()
    for p in patients:
        pid, cohort, role = get(p, "patient_id"), get(p, "cohort"), get(p, "role")
        if role not in ROLES:
            raise ValueError(f"patient {pid}: unknown role {role!r}")
        if pid in seen:
            raise ValueError(f"duplicate patient_id {pid!r}")
        seen.add(pid)
        subject = get(p, "subject_id", "") or pid
        studies.setdefault(subject, []).append(
            (_ROLE_PRIORITY[role], pid, role, cohort, get(p, "tracer", "")))

    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for subject, rows in studies.items():
        _, _, role, cohort, tracer = min(rows)
        if len({r[2] for r in rows}) > 1:
            log.info("subject %s has studies with roles %s: split as %s (cohort %s) so that its "
                     "studies stay together", subject, sorted({r[2] for r in rows}), role, cohort)
        groups.setdefault((role, cohort), []).append((subject, tracer))

    by_subject: dict[str, str] = {}
    test_fraction = 1.0 - train_fraction - valid_fraction
    for (role, cohort), subjects in sorted(groups.items()):
        order = _stratified_order(subjects, seed, f"{role}/{cohort}")
        if role == "external":
            by_subject.update({pid: "test" for pid in order})
            continue
        if role == "negative_control":
            n_train, n_valid = _ensure_one_train(
                _largest_remainder(len(order), (train_fraction, valid_fraction)))
            names = ["train"] * n_train + ["valid"] * n_valid
            by_subject.update(dict(zip(order, names, strict=True)))
            continue
        n_train, n_valid, n_test = _ensure_one_train(
            _largest_remainder(len(order), (train_fraction, valid_fraction, test_fraction)))
        n_tune = min(tune_per_cohort, n_test)
        if n_tune < tune_per_cohort:
            log.warning("cohort %r has %d patient(s) and only %d in test: tune gets %d instead of %d%s",
                        cohort, len(order), n_test, n_tune, tune_per_cohort,
                        "; no test patients are left for this cohort" if n_test == n_tune else "")
        names = (["train"] * n_train + ["valid"] * n_valid + ["tune"] * n_tune
                 + ["test"] * (n_test - n_tune))
        by_subject.update(dict(zip(order, names, strict=True)))
    return {r[1]: by_subject[subject] for subject, rows in studies.items() for r in rows}

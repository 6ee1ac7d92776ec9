"""Patient-level splits, seeded and stratified by cohort (paper §3.1 and DESIGN.md).

Rules:

* **internal** cohorts: each cohort's patients are shuffled (seeded per cohort) and divided into
  train / valid / test by ``train_fraction`` / ``valid_fraction`` (the rest is test), using
  largest-remainder rounding so the counts add up; then ``tune_per_cohort`` patients are moved
  from test to tune (the paper's 10-patient tuning set: 2 per internal cohort).
* **external** cohorts: test only.
* **negative_control**: train / valid only, in the ratio train_fraction : valid_fraction.

Tiny cohorts: every internal and negative-control cohort keeps at least one train patient; when
a cohort's test share is smaller than ``tune_per_cohort``, tune gets what test has (possibly
leaving that cohort without test patients) and a warning says so.

Each cohort is shuffled with its own generator seeded by ``(seed, cohort name)``, so adding or
removing one cohort never reshuffles the others; patients are sorted by id before shuffling, so
the manifest's row order does not matter. Strata are (role, cohort): negative controls that
share a cohort name with internal patients are split by the negative-control rule.
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


def assign_splits(patients: Iterable[Any], *, train_fraction: float, valid_fraction: float,
                  tune_per_cohort: int, seed: int) -> dict[str, str]:
    """Assign each patient to ``train``, ``valid``, ``tune`` or ``test``.

    Args:
        patients: objects with ``patient_id``, ``cohort`` and ``role`` attributes (e.g.
            :class:`igconda.data.manifest.ManifestEntry`) or mappings with those keys.
        train_fraction: share of each internal cohort for train, in (0, 1).
        valid_fraction: share for valid, in [0, 1); train + valid < 1, the rest is test.
        tune_per_cohort: patients moved from test to tune in each internal cohort.
        seed: random seed.

    Returns:
        ``{patient_id: split}`` for every patient.

    Raises:
        ValueError: on bad fractions, an unknown role or a duplicate patient id.
    """
    if not 0 < train_fraction < 1 or not 0 <= valid_fraction < 1 or train_fraction + valid_fraction >= 1:
        raise ValueError(f"need 0 < train_fraction < 1, 0 <= valid_fraction and train + valid < 1; "
                         f"got {train_fraction}, {valid_fraction}")
    if tune_per_cohort < 0:
        raise ValueError(f"tune_per_cohort must be >= 0, got {tune_per_cohort}")

    def get(p: Any, key: str) -> str:
        return str(p[key] if isinstance(p, dict) else getattr(p, key))

    groups: dict[tuple[str, str], list[str]] = {}
    seen: set[str] = set()
    for p in patients:
        pid, cohort, role = get(p, "patient_id"), get(p, "cohort"), get(p, "role")
        if role not in ROLES:
            raise ValueError(f"patient {pid}: unknown role {role!r}")
        if pid in seen:
            raise ValueError(f"duplicate patient_id {pid!r}")
        seen.add(pid)
        groups.setdefault((role, cohort), []).append(pid)

    split: dict[str, str] = {}
    test_fraction = 1.0 - train_fraction - valid_fraction
    for (role, cohort), ids in sorted(groups.items()):
        ids = sorted(ids)
        order = [ids[i] for i in _rng(seed, f"{role}/{cohort}").permutation(len(ids))]
        if role == "external":
            split.update({pid: "test" for pid in order})
            continue
        if role == "negative_control":
            n_train, n_valid = _ensure_one_train(
                _largest_remainder(len(order), (train_fraction, valid_fraction)))
            names = ["train"] * n_train + ["valid"] * n_valid
            split.update(dict(zip(order, names, strict=True)))
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
        split.update(dict(zip(order, names, strict=True)))
    return split

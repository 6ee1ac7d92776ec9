"""Invariants of the patient-level splits, over many random study shapes and seeds."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest

from igconda.data.splits import assign_splits

ARGS = dict(train_fraction=0.6, valid_fraction=0.1, tune_per_cohort=2)


def study(sizes: dict[tuple[str, str], int]) -> list[dict[str, str]]:
    return [{"patient_id": f"{cohort}-{i:03d}", "cohort": cohort, "role": role}
            for (role, cohort), n in sizes.items() for i in range(n)]


def random_study(rng: np.random.Generator) -> list[dict[str, str]]:
    sizes = {("internal", f"int{k}"): int(rng.integers(1, 30)) for k in range(int(rng.integers(1, 5)))}
    sizes.update({("external", f"ext{k}"): int(rng.integers(1, 10)) for k in range(int(rng.integers(0, 3)))})
    sizes.update({("negative_control", f"neg{k}"): int(rng.integers(1, 10)) for k in range(int(rng.integers(0, 2)))})
    return study(sizes)


CASES = [(seed, random_study(np.random.default_rng(seed))) for seed in range(40)]


@pytest.mark.parametrize("seed, patients", CASES, ids=[f"study{s}" for s, _ in CASES])
def test_split_invariants(seed, patients):
    frac = dict(train_fraction=0.5 + 0.02 * (seed % 10), valid_fraction=0.1, tune_per_cohort=1 + seed % 3)
    split = assign_splits(patients, seed=seed, **frac)
    # every patient in exactly one split (a dict cannot hold a patient twice; none missing)
    assert set(split) == {p["patient_id"] for p in patients}
    assert set(split.values()) <= {"train", "valid", "tune", "test"}
    by_cohort: dict[str, Counter] = {}
    for p in patients:
        by_cohort.setdefault(p["cohort"], Counter())[split[p["patient_id"]]] += 1
        if p["role"] == "external":
            assert split[p["patient_id"]] == "test"
        if p["role"] == "negative_control":
            assert split[p["patient_id"]] in ("train", "valid")
    for p in patients:
        c = by_cohort[p["cohort"]]
        n = sum(c.values())
        if p["role"] == "internal":
            assert c["train"] >= 1
            # tune = tune_per_cohort taken from test when test has them, never more
            assert c["tune"] <= frac["tune_per_cohort"]
            test_share = n - c["train"] - c["valid"]
            assert c["tune"] == min(frac["tune_per_cohort"], test_share)
            # stratified: each cohort's train share is its own fraction, up to rounding
            if c["train"] > 1:
                assert abs(c["train"] - frac["train_fraction"] * n) < 1.0 + 1e-9
        if p["role"] == "negative_control":
            assert c["train"] >= 1


def test_paper_sized_cohorts():
    patients = study({("internal", c): 100 for c in "abcde"} | {("external", "sts"): 30,
                                                               ("negative_control", "neg"): 20})
    split = assign_splits(patients, seed=0, **ARGS)
    counts = Counter((p["cohort"], split[p["patient_id"]]) for p in patients)
    for c in "abcde":
        assert (counts[(c, "train")], counts[(c, "valid")], counts[(c, "tune")], counts[(c, "test")]) == (60, 10, 2, 28)
    assert sum(v for (c, s), v in counts.items() if s == "tune") == 10  # the paper's 10 tune patients
    assert counts[("sts", "test")] == 30 and counts[("neg", "train")] + counts[("neg", "valid")] == 20


def test_deterministic_and_independent_of_row_order():
    patients = random_study(np.random.default_rng(7))
    a = assign_splits(patients, seed=3, **ARGS)
    assert a == assign_splits(list(reversed(patients)), seed=3, **ARGS)
    assert a != assign_splits(patients, seed=4, **ARGS) or len(patients) < 5


def test_adding_a_cohort_does_not_reshuffle_the_others():
    base = study({("internal", "a"): 20, ("internal", "b"): 15})
    more = base + study({("internal", "c"): 12})
    a, b = assign_splits(base, seed=0, **ARGS), assign_splits(more, seed=0, **ARGS)
    assert all(b[pid] == s for pid, s in a.items())


def test_tiny_cohort_warns_and_keeps_a_train_patient(caplog):
    with caplog.at_level(logging.WARNING, logger="igconda.data.splits"):
        split = assign_splits(study({("internal", "tiny"): 2}), seed=0, **ARGS)
    assert Counter(split.values())["train"] >= 1
    assert "cohort 'tiny'" in caplog.text and "tune gets" in caplog.text
    one = assign_splits(study({("internal", "solo"): 1, ("negative_control", "n"): 1}), seed=0, **ARGS)
    assert set(one.values()) == {"train"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(train_fraction=0.0, valid_fraction=0.1, tune_per_cohort=2), "train_fraction"),
    (dict(train_fraction=0.8, valid_fraction=0.3, tune_per_cohort=2), "train \\+ valid"),
    (dict(train_fraction=0.6, valid_fraction=0.1, tune_per_cohort=-1), "tune_per_cohort"),
])
def test_bad_fractions(kwargs, match):
    with pytest.raises(ValueError, match=match):
        assign_splits(study({("internal", "a"): 3}), seed=0, **kwargs)


def test_bad_role_and_duplicates():
    with pytest.raises(ValueError, match="unknown role"):
        assign_splits([{"patient_id": "p", "cohort": "a", "role": "train"}], seed=0, **ARGS)
    with pytest.raises(ValueError, match="duplicate"):
        assign_splits(study({("internal", "a"): 2}) * 2, seed=0, **ARGS)


# --- subjects and tracers ----------------------------------------------------------------------


def autopet_like(n_subjects: int, seed: int) -> list[dict[str, str]]:
    """AutoPET-like studies: about a third of the subjects have 2-3 studies (follow-ups)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        tracer = "18F-PSMA" if s % 3 else "68Ga-PSMA"
        for k in range(int(rng.choice([1, 1, 2, 3]))):
            rows.append({"patient_id": f"psma_{s:04x}_{k}", "subject_id": f"psma_{s:04x}",
                         "cohort": "psma", "tracer": tracer, "role": "internal"})
    return rows


@pytest.mark.parametrize("seed", range(10))
def test_a_subjects_studies_never_straddle_splits(seed):
    rows = autopet_like(60, seed)
    split = assign_splits(rows, seed=seed, **ARGS)
    by_subject: dict[str, set[str]] = {}
    for r in rows:
        by_subject.setdefault(r["subject_id"], set()).add(split[r["patient_id"]])
    assert all(len(s) == 1 for s in by_subject.values())
    # the fractions apply to subjects, not studies
    counts = Counter(next(iter(s)) for s in by_subject.values())
    assert (counts["train"], counts["valid"], counts["tune"] + counts["test"]) == (36, 6, 18)


def test_tracers_are_stratified_within_a_cohort():
    rows = [{"patient_id": f"p{i:03d}", "cohort": "psma", "role": "internal",
             "tracer": "68Ga-PSMA" if i < 30 else "18F-PSMA"} for i in range(90)]
    for seed in range(5):
        split = assign_splits(rows, seed=seed, **ARGS)
        for name, n in (("train", 54), ("valid", 9), ("test", 25)):
            ga = sum(1 for r in rows if split[r["patient_id"]] == name and r["tracer"] == "68Ga-PSMA")
            assert abs(ga - n / 3) <= 1.0, (seed, name, ga)  # a third of every split is 68Ga


def test_single_tracer_cohorts_keep_the_split_they_had_without_tracers():
    plain = study({("internal", "a"): 37, ("negative_control", "neg"): 9})
    tagged = [dict(p, tracer="FDG") for p in plain]
    assert assign_splits(plain, seed=3, **ARGS) == assign_splits(tagged, seed=3, **ARGS)


def test_a_subject_with_a_negative_control_study_stays_in_train_or_valid():
    rows = [{"patient_id": f"x{i}_a", "subject_id": f"x{i}", "cohort": "psma", "role": "internal"} for i in range(20)]
    rows += [{"patient_id": f"x{i}_b", "subject_id": f"x{i}", "cohort": "psma", "role": "negative_control"}
             for i in range(5)]
    split = assign_splits(rows, seed=0, **ARGS)
    for i in range(5):
        assert split[f"x{i}_a"] == split[f"x{i}_b"] in ("train", "valid")

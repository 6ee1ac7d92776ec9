"""The per-split and per-cohort summaries that ``dataset.json`` records (see docs/data.md §6).

Each function takes the preprocessing results of the surviving patients (one dict per patient,
as :func:`igconda.data.build.process_patient` returns them, with the ``split`` the build then
decided) and returns plain JSON-ready values; :func:`igconda.data.build.build_dataset` writes
them and :func:`log_coverage` logs them.
"""

from __future__ import annotations

import logging
from typing import Any

from igconda.data.schema import HEALTHY, SPLITS, UNHEALTHY

log = logging.getLogger(__name__)

#: The splits in which a cohort of each role should have unhealthy slices (negative controls
#: have none by definition).
LESION_SPLITS = {"internal": ("train", "valid", "tune", "test"), "external": ("test",)}


def split_counts(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per split, and per split and cohort: patients, slices, healthy/unhealthy slices."""
    def block(rs: list[dict[str, Any]]) -> dict[str, int]:
        slices = sum(r["slices"] for r in rs)
        unhealthy = sum(r["unhealthy"] for r in rs)
        return {"patients": len(rs), "slices": slices, f"label_{HEALTHY}": slices - unhealthy,
                f"label_{UNHEALTHY}": unhealthy}

    out: dict[str, Any] = {}
    for split in SPLITS:
        rs = [r for r in results if r["split"] == split]
        cohorts = sorted({r["cohort"] for r in rs})
        out[split] = {**block(rs), "cohorts": {c: block([r for r in rs if r["cohort"] == c]) for c in cohorts}}
    return out


def lesion_coverage_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Lesion voxels outside the field of view, per patient and per cohort (source voxels)."""
    def block(rs: list[dict[str, Any]]) -> dict[str, Any]:
        total = sum(r["lesion_voxels"] for r in rs)
        outside = sum(r["lesion_voxels_outside"] for r in rs)
        return {"lesion_voxels": total, "lesion_voxels_outside": outside,
                "fraction_outside": round(outside / total, 6) if total else 0.0}

    patients = {r["patient_id"]: {**block([r]), "input_slices": r["input_slices"], "slices": r["slices"]}
                for r in results}
    cohorts = {c: {**block([r for r in results if r["cohort"] == c]),
                   "patients_with_lesions_outside": sum(1 for r in results
                                                        if r["cohort"] == c and r["lesion_voxels_outside"])}
               for c in sorted({r["cohort"] for r in results})}
    return {"cohorts": cohorts, "patients": patients}


def unhealthy_table(results: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Unhealthy slices per split and cohort (every cohort listed in every split, 0 included)."""
    cohorts = sorted({r["cohort"] for r in results})
    return {split: {c: sum(r["unhealthy"] for r in results if r["split"] == split and r["cohort"] == c)
                    for c in cohorts} for split in SPLITS}


def lesion_warnings(results: list[dict[str, Any]]) -> list[str]:
    """One line per lesion cohort without an unhealthy slice in a split it belongs to."""
    warnings = []
    for cohort in sorted({r["cohort"] for r in results}):
        rows = [r for r in results if r["cohort"] == cohort]
        for role in sorted({r["role"] for r in rows} & set(LESION_SPLITS)):
            for split in LESION_SPLITS[role]:
                rs = [r for r in rows if r["role"] == role and r["split"] == split]
                if sum(r["unhealthy"] for r in rs) == 0:
                    outside = sum(r["lesion_voxels_outside"] for r in rs)
                    why = (f"{len(rs)} patient(s), none with a lesion slice"
                           + (f"; {outside} lesion voxels lie outside the field of view" if outside else "")
                           if rs else "no patient")
                    warnings.append(f"cohort {cohort!r} ({role}) has no unhealthy slice in {split} ({why})")
    return warnings


def log_coverage(coverage: dict[str, Any], warnings: list[str]) -> None:
    """Log :func:`lesion_coverage_summary`'s cohorts (a warning for lesion voxels outside the
    field of view) and :func:`lesion_warnings`' lines."""
    for cohort, c in coverage["cohorts"].items():
        if c["lesion_voxels_outside"]:
            log.warning("cohort %s: %d of %d lesion voxels (%.1f %%) lie outside the field of view, "
                        "in %d patient(s)", cohort, c["lesion_voxels_outside"], c["lesion_voxels"],
                        100 * c["fraction_outside"], c["patients_with_lesions_outside"])
        else:
            log.info("cohort %s: all %d lesion voxels inside the field of view", cohort, c["lesion_voxels"])
    for line in warnings:
        log.warning("%s", line)

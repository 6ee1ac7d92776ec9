"""Study manifests: one CSV row per patient, read and validated with errors that point at a row.

Format (header required, extra columns are kept in :attr:`ManifestEntry.extra` and ignored)::

    patient_id,cohort,tracer,pet_path,mask_path,role
    STS_002,sts,FDG,images/STS_002.nii.gz,labels/STS_002.nii.gz,internal

* ``pet_path`` / ``mask_path``: relative to the manifest's folder, or absolute. ``mask_path``
  may be empty (no lesion mask: the mask is taken as all zero, e.g. for negative controls).
* ``role``: ``internal`` (train/valid/test/tune), ``external`` (test only) or
  ``negative_control`` (train/valid only); see :mod:`igconda.data.splits`.
* ``patient_id``: unique, and usable as a file name (it names ``<patient_id>.parquet``). One row
  is one STUDY: a person scanned twice has two rows.
* ``subject_id`` (optional column): the person a study belongs to; the studies of one subject
  always land in the same split (:mod:`igconda.data.splits`). Empty or absent: the study is its
  own subject.

:func:`read_manifest` raises :class:`ManifestError` on the first problem; :func:`parse_manifest`
returns the good rows plus one error per bad row, for a job that skips bad patients. Problems
with the file as a whole (missing, unreadable, a required column missing) always raise.

Builders write a manifest for the folder layouts used by the reference code:
:func:`build_autopet_manifest` (nnU-Net style ``<case>_0001.nii.gz`` PET, ``<case>.nii.gz`` mask)
and :func:`build_hecktor_manifest` (``<case>__PT.nii.gz`` PET, ``<case>.nii.gz`` mask). Both key
splits by person: AutoPET case names are ``<tracer>_<patient hash>_<study date>``, so the
subject is ``<tracer>_<patient hash>``; a HECKTOR case is one patient.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from igconda.data.schema import ROLES
from igconda.io_utils import atomic_write

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("patient_id", "cohort", "tracer", "pet_path", "mask_path", "role")
#: Optional column: the person a study belongs to (splits keep a subject's studies together).
SUBJECT_COLUMN = "subject_id"
#: AutoPET (nnU-Net layout) case names: ``fdg_0011f3deaf_03-23-2003``,
#: ``psma_95b833d46f153cd2_2017-11-18``: tracer, anonymised patient hash, study date.
AUTOPET_SUBJECT = r"^(?P<subject>[A-Za-z]+_[0-9A-Fa-f]+)_.+$"
#: Tracer names for AutoPET's case-name prefixes.
AUTOPET_TRACERS = {"fdg": "FDG", "psma": "PSMA"}
# A patient id names a file; keep it to characters every filesystem and URI accepts.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class ManifestError(ValueError):
    """A manifest file or one of its rows is invalid.

    Attributes:
        path: the manifest file.
        row: 1-based line number in the file (the header is line 1), or None for the whole file.
        problem: what is wrong.
        patient_id: the row's patient id, if it had one.
    """

    def __init__(self, path: str | Path, row: int | None, problem: str,
                 patient_id: str | None = None) -> None:
        self.path = str(path)
        self.row = row
        self.problem = problem
        self.patient_id = patient_id
        where = f"{self.path}" + (f", line {row}" if row is not None else "")
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        return (type(self), (self.path, self.row, self.problem, self.patient_id))


@dataclass(frozen=True)
class ManifestEntry:
    """One patient of a manifest, with paths resolved against the manifest's folder."""

    patient_id: str
    cohort: str
    tracer: str
    pet_path: str
    mask_path: str | None
    role: str
    row: int  # 1-based line number in the manifest
    extra: dict[str, str] = field(default_factory=dict, compare=False)
    subject_id: str = ""  # the person; empty = the study is its own subject

    @property
    def subject(self) -> str:
        """The split key: ``subject_id``, or ``patient_id`` when none is given."""
        return self.subject_id or self.patient_id


def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def parse_manifest(path: str | Path) -> tuple[list[ManifestEntry], list[ManifestError]]:
    """Read a manifest, separating good rows from bad ones.

    Args:
        path: CSV file.

    Returns:
        (entries, errors): the valid rows in file order, and one :class:`ManifestError` per
        invalid row (unknown role, empty field, unsafe or duplicate patient id, ...). Every row
        of a duplicated patient id is rejected: there is no telling which one is right.

    Raises:
        ManifestError: the file is missing or unreadable, empty, or lacks a required column.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, None, "manifest file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ManifestError(path, None, f"cannot read the manifest ({err})") from None
    if not header:
        raise ManifestError(path, None, "manifest is empty (no header line)")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ManifestError(path, 1, f"missing required column(s) {', '.join(missing)} "
                                     f"(header has: {', '.join(header)})")
    base = path.resolve().parent
    entries: list[ManifestEntry] = []
    errors: list[ManifestError] = []
    for line, raw in enumerate(rows, start=2):
        values = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in raw.items()}
        pid = values.get("patient_id", "")
        if None in raw:  # csv puts surplus fields under the key None
            errors.append(ManifestError(path, line, "more fields than header columns; quote a value "
                                                    "that holds a comma", pid or None))
            continue
        empty = [c for c in REQUIRED_COLUMNS if c != "mask_path" and not values.get(c)]
        if empty:
            errors.append(ManifestError(path, line, f"empty value for {', '.join(empty)}; fill it in "
                                                    f"(only mask_path may be empty)", pid or None))
            continue
        if not _SAFE_ID.match(pid):
            errors.append(ManifestError(path, line, f"patient_id {pid!r} must start with a letter or "
                                                    f"digit and contain only letters, digits, '.', '_', '+', '-'", pid))
            continue
        if values["role"] not in ROLES:
            errors.append(ManifestError(path, line, f"unknown role {values['role']!r} "
                                                    f"(expected one of {', '.join(ROLES)})", pid))
            continue
        entries.append(ManifestEntry(
            patient_id=pid,
            cohort=values["cohort"],
            tracer=values["tracer"],
            pet_path=_resolve(base, values["pet_path"]),
            mask_path=_resolve(base, values["mask_path"]) if values["mask_path"] else None,
            role=values["role"],
            row=line,
            extra={k: v for k, v in values.items() if k not in (*REQUIRED_COLUMNS, SUBJECT_COLUMN)},
            subject_id=values.get(SUBJECT_COLUMN, ""),
        ))
    counts = Counter(e.patient_id for e in entries)
    duplicated = {pid for pid, n in counts.items() if n > 1}
    if duplicated:
        keep = []
        for e in entries:
            if e.patient_id in duplicated:
                lines = [str(o.row) for o in entries if o.patient_id == e.patient_id]
                errors.append(ManifestError(path, e.row, f"duplicate patient_id {e.patient_id!r} "
                                                         f"(lines {', '.join(lines)}); give each study its "
                                                         f"own patient_id (a person's studies share a "
                                                         f"subject_id)", e.patient_id))
            else:
                keep.append(e)
        entries = keep
    entries, shared = _reject_shared_pet_files(path, entries)
    errors += shared
    errors.sort(key=lambda err: err.row or 0)
    return entries, errors


def _file_key(file: str) -> tuple[int, int] | str:
    """What identifies a file: device and inode when it exists (so a symlink, a hard link or
    another spelling of the path is the same file), else its normalised path."""
    try:
        st = os.stat(file)
    except OSError:
        return os.path.realpath(file)
    return (st.st_dev, st.st_ino)


def _reject_shared_pet_files(path: Path, entries: list[ManifestEntry]
                             ) -> tuple[list[ManifestEntry], list[ManifestError]]:
    """Reject every row whose PET file is also another patient id's.

    One scan under two ids would be split as two patients and could land in train and in test
    (a leak that inflates every test metric); there is no telling which id is right, so all of
    them are refused, each error naming the others.
    """
    by_file: dict[tuple[int, int] | str, list[ManifestEntry]] = {}
    for e in entries:
        by_file.setdefault(_file_key(e.pet_path), []).append(e)
    errors: list[ManifestError] = []
    keep = []
    for e in entries:
        sharing = by_file[_file_key(e.pet_path)]
        if len(sharing) == 1:
            keep.append(e)
            continue
        ids = ", ".join(f"{o.patient_id!r} (line {o.row})" for o in sharing)
        errors.append(ManifestError(
            path, e.row, f"the PET file {e.pet_path} is listed under patient ids {ids}: one scan "
                         f"under two ids could leak into both train and test; keep one row for it",
            e.patient_id))
    return keep, errors


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Read a manifest and raise on the first invalid row.

    Raises:
        ManifestError: naming the file, the line and the problem.
    """
    entries, errors = parse_manifest(path)
    if errors:
        raise errors[0]
    if not entries:
        raise ManifestError(path, None, "manifest has no patients")
    return entries


def write_manifest(entries: list[ManifestEntry], path: str | Path) -> Path:
    """Write entries as a manifest CSV, with paths relative to its folder where possible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.resolve().parent

    def rel(p: str | None) -> str:
        if not p:
            return ""
        try:
            return Path(p).resolve().relative_to(base).as_posix()
        except ValueError:
            return str(Path(p).resolve())

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow((*REQUIRED_COLUMNS, SUBJECT_COLUMN))
            for e in entries:
                writer.writerow([e.patient_id, e.cohort, e.tracer, rel(e.pet_path), rel(e.mask_path),
                                 e.role, e.subject_id])

    return atomic_write(path, write, suffix=".tmp")


def _is_empty_mask(path: str) -> bool:
    import nibabel as nib
    import numpy as np

    return not np.any(np.asanyarray(nib.load(path).dataobj))


def _build(root: Path, pet_suffix: str, output: str | Path | None, *, cohort: str, tracer: str | None,
           role: str, labels_dir: str | Path | None, empty_mask_role: str | None,
           subject_pattern: str | None, tracers: dict[str, str] | None = None) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(root, None, "dataset folder not found")
    if role not in ROLES or (empty_mask_role is not None and empty_mask_role not in ROLES):
        raise ManifestError(root, None, f"role must be one of {', '.join(ROLES)}")
    pets = sorted(p for p in root.rglob(f"*{pet_suffix}") if p.is_file())
    if not pets:
        raise ManifestError(root, None, f"no PET files matching *{pet_suffix} under this folder")
    # Masks are <case>.nii.gz, in labels_dir if given, else anywhere under root.
    search = Path(labels_dir) if labels_dir is not None else root
    pattern = re.compile(subject_pattern) if subject_pattern else None
    masks: dict[str, list[Path]] = {}
    for p in search.rglob("*.nii.gz"):
        masks.setdefault(p.name[: -len(".nii.gz")], []).append(p)
    entries = []
    for pet in pets:
        case = pet.name[: -len(pet_suffix)]
        found = masks.get(case, [])
        if len(found) > 1:
            raise ManifestError(root, None, f"case {case!r}: several masks named {case}.nii.gz: "
                                            f"{', '.join(map(str, found))}")
        mask = str(found[0]) if found else None
        if mask is None:
            log.warning("%s: no mask %s.nii.gz found; the case is listed without a mask", pet, case)
        case_role = role
        if empty_mask_role is not None and (mask is None or _is_empty_mask(mask)):
            case_role = empty_mask_role
        match = pattern.match(case) if pattern else None
        subject = match.group("subject") if match else case
        case_tracer = tracer
        if case_tracer is None:
            case_tracer = (tracers or {}).get(case.split("_", 1)[0].lower())
            if case_tracer is None:
                raise ManifestError(root, None, f"case {case!r}: cannot tell its tracer from the name "
                                                f"(known prefixes: {', '.join(sorted(tracers or {}))}); "
                                                f"pass tracer=")
        entries.append(ManifestEntry(case, cohort, case_tracer, str(pet), mask, case_role, row=0,
                                     subject_id=subject))
    ids = Counter(e.patient_id for e in entries)
    dup = sorted(pid for pid, n in ids.items() if n > 1)
    if dup:
        raise ManifestError(root, None, f"case ids found more than once: {', '.join(dup)}")
    return write_manifest(entries, output if output is not None else root / "manifest.csv")


def build_autopet_manifest(root: str | Path, output: str | Path | None = None, *,
                           cohort: str = "autopet", tracer: str | None = None, role: str = "internal",
                           labels_dir: str | Path | None = None,
                           empty_mask_role: str | None = "negative_control",
                           subject_pattern: str | None = AUTOPET_SUBJECT) -> Path:
    """Manifest for an AutoPET folder in nnU-Net layout.

    ``imagesTr/<case>_0000.nii.gz`` is CT (ignored), ``imagesTr/<case>_0001.nii.gz`` the SUV PET
    and ``labelsTr/<case>.nii.gz`` the lesion mask, as the reference code's preprocessing reads
    them. Files are found recursively under ``root``.

    Args:
        root: dataset folder.
        output: manifest path (default ``root/manifest.csv``).
        cohort, role: written for every case.
        tracer: written for every case; None (default) reads it from the case name's prefix
            (``fdg_`` → FDG, ``psma_`` → PSMA), so a merged FDG + PSMA folder is labelled right.
        labels_dir: where masks live (default: anywhere under ``root``).
        empty_mask_role: cases whose mask is missing or all zero get this role: by default
            ``negative_control``, AutoPET's lesion-free ("NEGATIVE") studies, which splits then
            keep out of test and tune. None leaves them ``role``. This reads every mask once.
        subject_pattern: regular expression with a ``subject`` group applied to each case name;
            the match is the case's ``subject_id`` (default: ``<tracer>_<patient hash>`` of
            AutoPET's ``<tracer>_<hash>_<date>``), so one patient's studies share a split.
            A name that does not match is its own subject; None: every case is.

    Returns:
        The manifest path.

    Raises:
        ManifestError: no PET found, ambiguous masks, duplicate case ids, or (``tracer=None``)
            a case name without a known tracer prefix.
    """
    return _build(Path(root), "_0001.nii.gz", output, cohort=cohort, tracer=tracer, role=role,
                  labels_dir=labels_dir, empty_mask_role=empty_mask_role,
                  subject_pattern=subject_pattern, tracers=AUTOPET_TRACERS)


def build_hecktor_manifest(root: str | Path, output: str | Path | None = None, *,
                           cohort: str = "hecktor", tracer: str = "FDG", role: str = "internal",
                           labels_dir: str | Path | None = None,
                           empty_mask_role: str | None = None) -> Path:
    """Manifest for a HECKTOR folder: ``<case>__PT.nii.gz`` PET, ``<case>__CT.nii.gz`` CT
    (ignored) and ``<case>.nii.gz`` masks (e.g. ``imagesTr/`` and ``labelsTr/``).

    Arguments and errors as :func:`build_autopet_manifest`, except that each case (``CHUM-001``)
    is one patient, hence its own subject, and that empty masks keep ``role`` unless
    ``empty_mask_role`` is given: every HECKTOR patient has a tumour, so a lesion-free case is
    a labelling gap, not a negative control. HECKTOR masks label primary tumour (1) and lymph
    nodes (2): set ``preprocess.binarize_mask: true`` to count both as lesion.
    """
    return _build(Path(root), "__PT.nii.gz", output, cohort=cohort, tracer=tracer, role=role,
                  labels_dir=labels_dir, empty_mask_role=empty_mask_role, subject_pattern=None)

"""Atomic file writes: write a hidden temp file beside the target, then rename it into place.

Readers (other jobs, a report being built, a resumed run) then see either the old file or the
complete new one, never a half-written file, and an interrupted or failing writer leaves the
old file as it was.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

#: Last suffixes that belong to the one before them: ``.nii.gz`` is kept whole.
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


def _real_suffix(path: Path) -> str:
    """``.nii.gz`` for ``scan.nii.gz``, ``.png`` for ``a.b.png``, ``""`` for ``README``."""
    if path.suffix in _COMPRESSION_SUFFIXES and len(path.suffixes) >= 2:
        return "".join(path.suffixes[-2:])
    return path.suffix


def _new_temp(path: Path, suffix: str) -> Path:
    """Create an empty hidden sibling ``.<name>.<random><suffix>``, as ``open(p, "w")`` would
    (mode 0o666 less the umask), and return its path."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{path}: no free temporary name beside it")


def atomic_write(
    path: str | Path,
    write: Callable[[Path], object],
    *,
    mode: int | None = None,
    fsync: bool = False,
    suffix: str | None = None,
) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temp file beside it, which then replaces it.

    The temp file is ``.<name>.<random><suffix>`` in ``path``'s folder (same filesystem, so
    ``os.replace`` is atomic). By default it keeps ``path``'s suffix (``.nii.gz`` whole), so
    writers that pick the format from the extension (nibabel, matplotlib) still work. On any
    exception (KeyboardInterrupt included) the temp file is removed, an existing ``path`` is
    left untouched and the exception propagates. The parent folder must exist.

    Args:
        path: the file to create or replace.
        write: called once with the temp file's path (the file exists, empty); writes the
            content there, e.g. ``lambda tmp: tmp.write_text(text)``. Its return value is ignored.
        mode: permission bits for the file, e.g. ``0o644`` for a file other users read. None:
            what ``open(path, "w")`` would give (0o666 less the umask).
        fsync: flush the content to disk before the rename (survives a power cut, costs time).
        suffix: the temp file's suffix instead of ``path``'s, e.g. ``".tmp"`` so that a temp
            file orphaned by a killed process never matches a ``*.parquet`` or ``*.nii.gz``
            glob (pathlib's globs match hidden names).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    tmp = _new_temp(path, _real_suffix(path) if suffix is None else suffix)
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def replace_dir(new: str | Path, target: str | Path) -> Path:
    """Swap a finished folder ``new`` into ``target`` without ever leaving no ``target``.

    An existing ``target`` is first renamed aside (``.<name>.old-<random>``), ``new`` is renamed
    into place, and only then is the old folder deleted; if the second rename fails the old
    folder is put back. ``new`` must be on the same filesystem (write it beside ``target``).

    Returns:
        ``target`` as a Path.
    """
    new, target = Path(new), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)  # put the previous folder back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def file_digest(path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def folder_digest(folder: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of every file under ``folder``: their relative paths and
    :func:`file_digest` s, in sorted order (so the same files give the same digest anywhere)."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()[:16]

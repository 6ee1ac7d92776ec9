"""One owner for where a split's slices live: ``igconda.data.io.split_path``.

Every module of the library, the jobs and the tuning builds ``<data>/slices/<split>`` through it
(local paths and URIs alike); a new spelling of the layout elsewhere fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

from igconda.data.io import split_path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("igconda", "ray_jobs", "tuning")
OWNER = ROOT / "igconda" / "data" / "io.py"


def _spellings(path: Path) -> list[int]:
    """Lines that join ``"slices"`` with something after it: ``x / "slices" / s``,
    ``_join(x, "slices", s)`` or an f-string ``.../slices/{split}``."""
    tree, lines = ast.parse(path.read_text()), []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            left = node.left
            if isinstance(left, ast.BinOp) and isinstance(left.right, ast.Constant) \
                    and left.right.value == "slices":
                lines.append(node.lineno)
        elif isinstance(node, ast.Call):
            args = node.args
            if any(isinstance(a, ast.Constant) and a.value == "slices" for a in args[:-1]):
                lines.append(node.lineno)
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            if "/slices/" in text and text.endswith("/slices/"):
                lines.append(node.lineno)
    return lines


def test_only_split_path_spells_the_split_folder():
    found = {str(p.relative_to(ROOT)): lines for package in PACKAGES
             for p in sorted((ROOT / package).rglob("*.py")) if p != OWNER
             if (lines := _spellings(p))}
    assert found == {}


def _filesystem_calls(path: Path) -> list[int]:
    """Lines that build a pyarrow filesystem (``FileSystem.from_uri``, ``LocalFileSystem()``)."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
            and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("from_uri", "LocalFileSystem")]


def test_only_io_builds_a_filesystem():
    """Local paths and URIs are told apart once, in ``igconda.data.io.filesystem``."""
    found = {str(p.relative_to(ROOT)): lines for package in PACKAGES
             for p in sorted((ROOT / package).rglob("*.py")) if p != OWNER
             if (lines := _filesystem_calls(p))}
    assert found == {}


def test_the_scan_finds_each_spelling(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('a = data / "slices" / split\nb = _join(data, "slices", split)\n'
                   'c = f"{data}/slices/{split}"\nd = output / "slices"\n')
    assert _spellings(bad) == [1, 2, 3]  # a prediction folder (output / "slices") is no split


def test_split_path_for_paths_and_uris():
    assert split_path("s3://bucket/data/", "test") == "s3://bucket/data/slices/test"
    assert Path(split_path(Path("/d"), "train")) == Path("/d/slices/train")

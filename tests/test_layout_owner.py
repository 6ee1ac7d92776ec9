"""One owner for data on disk: ``igconda.data.io``.

Every module of the library, the jobs, the tuning and the benchmarks builds a dataset's split
folder through ``split_path`` (``<data>/slices/<split>``, local paths and URIs alike), the
inference output's files through ``InferOutput`` (``slices/<pid>.parquet``, ``tables/``,
``figures/``, ``volumes/``, ``summary.json``), and pyarrow filesystems through ``filesystem``;
a new spelling of either layout, or a second filesystem builder, fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

from igconda.data.io import InferOutput, split_path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("igconda", "ray_jobs", "tuning", "benchmarks")
OWNER = ROOT / "igconda" / "data" / "io.py"
#: The study folder's and the tuning output's layouts (igconda.data.study_layout).
STUDY_OWNER = ROOT / "igconda" / "data" / "study_layout.py"
#: Folder and file names of the two layouts ``igconda.data.io`` owns.
LAYOUT_NAMES = {"slices", "tables", "figures", "volumes", "scored", "summary.json"}
#: The compare stage writes its own ``<comparison>/tables`` and ``figures`` (docs/report.md):
#: another stage's output, with names of its own that the inference layout does not own.
OTHER_LAYOUTS = {ROOT / "igconda" / "comparison_report.py": {"tables", "figures"}}


def _is_name(node: ast.AST, names: set[str]) -> bool:
    return isinstance(node, ast.Constant) and node.value in names


def _spellings(path: Path, names: set[str] = LAYOUT_NAMES) -> list[int]:
    """Lines that build a path with one of ``names``: ``x / "slices"``, ``"slices" / x``,
    ``join(x, "slices", s)``, an f-string ``.../slices/{split}``, or a glob/file name
    ``"slices/*.parquet"`` or ``"..._anomaly.nii.gz"`` (texts with spaces are prose)."""
    tree, lines = ast.parse(path.read_text()), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            if _is_name(node.left, names) or _is_name(node.right, names):
                lines.add(node.lineno)
        elif isinstance(node, ast.Call):
            # The last argument may name an MLflow artifact folder (log_artifact(x, "tables")).
            if any(_is_name(a, names) for a in node.args[:-1]):
                lines.add(node.lineno)
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            if "slices" in names and text.endswith("/slices/"):
                lines.add(node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and not any(c.isspace() for c in node.value):
            if ("slices" in names and node.value.startswith("slices/")) \
                    or node.value.endswith("_anomaly.nii.gz"):
                lines.add(node.lineno)
    return sorted(lines)


def _scanned() -> list[Path]:
    return [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
            if p not in (OWNER, STUDY_OWNER)]


def test_only_io_spells_the_data_and_inference_layouts():
    found = {str(p.relative_to(ROOT)): lines for p in _scanned()
             if (lines := _spellings(p, LAYOUT_NAMES - OTHER_LAYOUTS.get(p, set())))}
    assert found == {}


def _filesystem_calls(path: Path) -> list[int]:
    """Lines that build a pyarrow filesystem (``FileSystem.from_uri``, ``LocalFileSystem()``)."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
            and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("from_uri", "LocalFileSystem")]


def test_only_io_builds_a_filesystem():
    """Local paths and URIs are told apart once, in ``igconda.data.io.filesystem``."""
    found = {str(p.relative_to(ROOT)): lines for p in _scanned() if (lines := _filesystem_calls(p))}
    assert found == {}


def test_the_scans_find_each_spelling(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('a = data / "slices" / split\nb = _join(data, "slices", split)\n'
                   'c = f"{data}/slices/{split}"\nd = output / "slices"\n'
                   'e = output.glob("slices/*.parquet")\nf = out / "tables" / "methods.csv"\n'
                   'g = out / f"{pid}_anomaly.nii.gz"\nh = out / "summary.json"\n'
                   'i = log_artifact(out, "tables")\nj = "text about slices/ and tables"\n'
                   'k = pafs.FileSystem.from_uri(u)\nm = LocalFileSystem()\n')
    assert _spellings(bad) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert _filesystem_calls(bad) == [11, 12]


def test_split_path_for_paths_and_uris():
    assert split_path("s3://bucket/data/", "test") == "s3://bucket/data/slices/test"
    assert Path(split_path(Path("/d"), "train")) == Path("/d/slices/train")


def test_infer_output_layout(tmp_path):
    out = InferOutput(str(tmp_path))
    assert out.prediction("P1") == tmp_path / "slices" / "P1.parquet"
    assert out.volume("P1") == tmp_path / "volumes" / "P1_anomaly.nii.gz"
    assert out.methods_csv == tmp_path / "tables" / "methods.csv"
    assert out.per_slice_metrics_csv == tmp_path / "tables" / "per_slice_metrics.csv"
    assert (out.figures, out.summary, out.scores) == (
        tmp_path / "figures", tmp_path / "summary.json", tmp_path / "scores")
    out.slices.mkdir()
    for name in ("B.parquet", "A.parquet", "C.parquet.tmp"):  # a half-written file is not listed
        (out.slices / name).write_bytes(b"")
    assert out.predictions() == {"A": out.prediction("A"), "B": out.prediction("B")}
    assert out.volume_files() == {}


#: File names with one owner each: a checkpoint's files (igconda.checkpoint), a dataset's
#: (igconda.data.io), a tuning's and a study's (igconda.data.study_layout), the model folder's tuned settings
#: (igconda.tuned_model). Another module takes the owner's name, never the literal.
FILE_OWNERS = {
    ROOT / "igconda" / "checkpoint.py": {"config.yaml", "model.safetensors", "ema.safetensors",
                                         "train_state.pt", "metadata.json", "best_checkpoint.json"},
    OWNER: {"dataset.json", "summary.json"},
    STUDY_OWNER: {"grid.csv", "best.json", "heatmap.png", "report.html"},
    ROOT / "igconda" / "tuned_model.py": {"tuning.json"},
}


def _file_name_literals(path: Path, names: set[str]) -> list[int]:
    """Lines with a string constant that is exactly one of ``names`` (docstrings and messages
    that mention a name are longer texts, so prose is not caught)."""
    tree = ast.parse(path.read_text())
    return sorted({node.lineno for node in ast.walk(tree)
                   if isinstance(node, ast.Constant) and node.value in names})


def test_checkpoint_tuning_and_dataset_file_names_have_one_owner():
    found = {}
    for owner, names in FILE_OWNERS.items():
        for path in _scanned():
            if path == owner:
                continue
            lines = _file_name_literals(path, names)
            if lines:
                found[f"{path.relative_to(ROOT)} ({owner.name}'s names)"] = lines
    assert found == {}, "spell these through their owner's constant or layout class"


def test_the_file_name_scan_catches_a_literal(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('from pathlib import Path\nbest = Path("x") / "model.safetensors"\n'
                     'note = "copy model.safetensors again"\n')
    assert _file_name_literals(probe, FILE_OWNERS[ROOT / "igconda" / "checkpoint.py"]) == [2]

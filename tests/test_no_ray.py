"""Ray stays at the edges: every module of ``igconda`` imports without Ray and mentions no Ray
import, even inside a function; Ray is for ``ray_jobs/`` and ``tuning/``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import igconda

PACKAGE = Path(igconda.__file__).resolve().parent

# Run in a fresh interpreter: a meta-path finder refuses ``ray`` and its submodules, then every
# module of the package is imported (``__main__`` modules would run their program, so they are
# parsed instead). Prints the modules that failed and whether ``ray`` got loaded anyway.
_IMPORT_ALL = r"""
import importlib, json, pkgutil, sys, traceback

class BlockRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by tests/test_no_ray.py)")
        return None

sys.meta_path.insert(0, BlockRay())
import igconda

failed, imported = {}, []
for info in pkgutil.walk_packages(igconda.__path__, "igconda.",
                                  onerror=lambda name: failed.setdefault(name, "walk failed")):
    if info.name.rsplit(".", 1)[-1] == "__main__":
        continue
    try:
        importlib.import_module(info.name)
        imported.append(info.name)
    except BaseException:
        failed[info.name] = traceback.format_exc(limit=-3)
print(json.dumps({"failed": failed, "imported": imported, "ray_loaded": "ray" in sys.modules}))
"""


def _ray_imports(tree: ast.AST) -> list[int]:
    """Line numbers of ``import ray[...]`` / ``from ray[...] import ...`` anywhere in a module."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(n == "ray" or n.startswith("ray.") for n in names):
            lines.append(node.lineno)
    return lines


def test_every_module_of_igconda_imports_with_ray_blocked(repo_root):
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL], cwd=repo_root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}, "\n".join(f"{k}:\n{v}" for k, v in result["failed"].items())
    assert not result["ray_loaded"]
    # the walk really covered the package (a broken walk would import nothing and pass)
    expected = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
                for p in PACKAGE.rglob("*.py") if p.stem not in ("__init__", "__main__")}
    assert expected <= set(result["imported"]), sorted(expected - set(result["imported"]))


def test_no_module_of_igconda_imports_ray_even_lazily():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = _ray_imports(ast.parse(path.read_text(), filename=str(path)))
        if lines:
            offenders[str(path.relative_to(PACKAGE.parent))] = lines
    assert offenders == {}, f"Ray belongs in ray_jobs/ or tuning/, not in igconda/: {offenders}"


def test_the_scan_finds_a_lazy_ray_import():
    # The check above would pass vacuously if the scan missed imports inside functions.
    tree = ast.parse("def f():\n    import ray.train\n    from ray.data import Dataset\n"
                     "from rayleigh import x\nimport numpy\n")
    assert _ray_imports(tree) == [2, 3]

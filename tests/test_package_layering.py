"""Dependencies point one way: edgellm_core <- edgellm_validate <- edgellm_export. The core and the
validation stage (what a device installs) never import the exporter, and the core imports neither;
importing the validation stage loads no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"edgellm_core": ("edgellm_export", "edgellm_validate"), "edgellm_validate": ("edgellm_export",)}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_imports_point_one_way():
    wrong = []
    for pkg, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / pkg).rglob("*.py")):
            wrong += [f"{path.relative_to(ROOT)} imports {m}" for m in _imports(path)
                      if m.split(".")[0] in forbidden]
    assert wrong == []


def test_validation_stage_imports_without_torch_or_the_exporter():
    code = ("import sys, edgellm_validate.validate, edgellm_validate.generate, edgellm_validate.targets, "
            "edgellm_validate.report\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'edgellm_export')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)

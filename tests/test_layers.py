"""The house's floors: every import of the project's packages, read from their source (module level
and inside functions alike), runs downwards only:

    distill_core  <-  shards  <-  labels  <-  teacher_service, student_trainer  <-  distill_demo"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {  # package: the project's packages it may import
    "distill_core": set(),
    "shards": {"distill_core"},
    "labels": {"distill_core", "shards"},
    "teacher_service": {"distill_core", "shards", "labels"},
    "student_trainer": {"distill_core", "shards", "labels"},
    "distill_demo": {"distill_core", "shards", "labels", "teacher_service", "student_trainer"},
}

pytestmark = pytest.mark.unit


def imports(path: Path) -> set[str]:
    """The top-level names of every module `path` imports (relative imports resolved to its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(ROOT).parts[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add(package if node.level else (node.module or "").split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_imports_run_downwards(package):
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = (imports(path) & set(FLOORS)) - FLOORS[package] - {package}
        if bad:
            wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert not wrong, f"imports that run upwards or sideways: {wrong}"

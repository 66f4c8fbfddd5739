"""The code's shape, as DESIGN.md states it: the import-linter contracts of pyproject.toml
(stages call each other only downward, no cycles), one entry point per stage
(`<stage>/stage.py: run`), no library module over 400 lines, and a clean ruff run."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "rebase_ray"
BIN = Path(sys.executable).parent
STAGES = ["datastore", "retrieve", "transform", "distill", "baselines", "train", "evaluate"]
MAX_LINES = 400


def test_import_contracts_are_kept():
    proc = subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_one_entry_point(stage):
    tree = ast.parse((PACKAGE / stage / "stage.py").read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "run" in functions, f"{stage}/stage.py defines no run()"
    assert ast.get_docstring(functions["run"]), f"{stage}/stage.py: run() has no docstring"


def test_no_library_module_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_ruff_is_clean():
    proc = subprocess.run([str(BIN / "ruff"), "check", "rebase_ray", "tests", "benchmarks",
                           "jobs"], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]

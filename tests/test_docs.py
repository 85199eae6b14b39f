"""The documents name tests as their proof: every test they name exists.

README.md, RELIABILITY.md and ARCHITECTURE.md cite tests as ``tests/FILE.py`` or
``tests/FILE.py::FUNCTION``; a renamed or deleted test would leave a claim without its proof.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "RELIABILITY.md", "ARCHITECTURE.md"]
CITED = re.compile(r"tests/([A-Za-z0-9_]+\.py)(?:::([A-Za-z0-9_]+))?")


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


@pytest.mark.parametrize("doc", DOCS)
def test_every_test_a_document_names_exists(doc):
    path = REPO / doc
    if not path.exists():
        pytest.skip(f"{doc} is not in this checkout")
    cited = CITED.findall(path.read_text(encoding="utf-8"))
    missing = []
    for file, func in cited:
        test_file = REPO / "tests" / file
        if not test_file.exists():
            missing.append(f"tests/{file}")
        elif func and func not in _functions(test_file):
            missing.append(f"tests/{file}::{func}")
    assert not missing, f"{doc} names tests that do not exist: {sorted(set(missing))}"


def test_the_pattern_finds_citations():
    text = "see `tests/test_a.py::test_b` and tests/test_c.py"
    assert CITED.findall(text) == [("test_a.py", "test_b"), ("test_c.py", "")]

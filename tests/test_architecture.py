"""The layers of ARCHITECTURE.md, checked on the source: who may import whom, and sizes a reader can hold.

- music/: pure (reading bytes, tokenizers, metrics): no storage, no pipeline, no model, no Ray, no boto3,
  no TensorFlow.
- model/: bytes and arrays in: no storage, no pipeline, no Ray, no boto3.
- storage/: bytes only: no music, no model, no pipeline, no Ray.
- pipeline/: the stages; none imports the CLI.
- every module under ~500 lines, every function under ~60.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "midiforge"
MAX_MODULE_LINES = 520
MAX_FUNCTION_LINES = 60

FORBIDDEN = {
    "music": ("midiforge.storage", "midiforge.pipeline", "midiforge.model", "midiforge.cli", "ray", "boto3",
              "botocore", "tensorflow", "tf_keras"),
    "model": ("midiforge.storage", "midiforge.pipeline", "midiforge.cli", "ray", "boto3", "botocore"),
    "storage": ("midiforge.music", "midiforge.model", "midiforge.pipeline", "midiforge.cli", "ray"),
    "pipeline": ("midiforge.cli",),
}


def _modules(layer: str | None = None) -> list[Path]:
    root = SRC / layer if layer else SRC
    return sorted(p for p in root.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def _banned(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_it_may(layer):
    offenders = {}
    for path in _modules(layer):
        bad = sorted(m for m in _imports(path) if _banned(m, FORBIDDEN[layer]))
        if bad:
            offenders[str(path.relative_to(SRC))] = bad
    assert not offenders, f"{layer}/ imports across its layer: {offenders}"


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {str(p.relative_to(SRC)): n for p in _modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_longer_than_a_screenful_or_two():
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(SRC)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_checks_see_violations(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("import ray\nfrom midiforge.storage import open_store\nfrom . import x\n")
    assert _imports(bad) == {"ray", "midiforge.storage"}
    assert _banned("midiforge.storage.s3", FORBIDDEN["music"]) and not _banned("rayon", FORBIDDEN["music"])

"""The layers around bundles: pipeline/ never imports the CLI above it (the demo runs its stages through
their own modules), the CLI never leaves out a stage whose module cannot be imported, and the storage
layer's job-wide error is midiforge's own (errors.py)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "midiforge"


def _imported(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_pipeline_does_not_import_the_cli():
    offenders = [p.name for p in sorted((SRC / "pipeline").glob("*.py")) if "midiforge.cli" in _imported(p)]
    assert offenders == []


def test_a_stage_module_that_cannot_be_imported_fails_the_command():
    code = ("import midiforge.cli as c\n"
            "c.COMMANDS['ghost'] = ('midiforge.pipeline.no_such_stage', 'a stage whose module is missing')\n"
            "raise SystemExit(c.main(['verify', '--help']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "ModuleNotFoundError: No module named 'midiforge.pipeline.no_such_stage'" in out.stderr
    ok = subprocess.run([sys.executable, "-m", "midiforge.cli", "--help"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and all(name in ok.stdout for name in ("preprocess", "train", "generate", "demo"))


def test_storage_unavailable_is_defined_in_errors():
    from midiforge import errors, storage
    from midiforge.storage import store

    assert storage.StorageUnavailableError is errors.StorageUnavailableError is store.StorageUnavailableError
    assert errors.StorageUnavailableError.__module__ == "midiforge.errors"
    assert issubclass(errors.StorageUnavailableError, errors.MidiforgeError)

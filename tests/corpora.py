"""Where the shared corpora are, for tests that read them (skipped with a reason when absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "corpora"


def corpus(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"shared corpus {path} is absent (a fresh clone without ../shared)")
    return path


def midi_files(name: str) -> list[Path]:
    return sorted(corpus(name).glob("*.mid"))

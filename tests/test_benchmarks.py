"""The preprocess benchmark runs end to end and reports what the README quotes from it.

A smoke test on a few real files with one round: it checks the JSON's shape and that every
measurement saw the same files and tokens, never a speed (speeds are the benchmark's job)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corpora import midi_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
def test_preprocess_benchmark_reports_every_measurement(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in midi_files("ff")[:6]:
        shutil.copy(f, corpus / f.name)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "preprocess.py"), str(corpus), "--repeats", "1",
         "--tutorial-sample", "1", "--workers", "2"],
        capture_output=True, text=True, timeout=220, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["files"] == 6
    e2e = result["end_to_end"]
    one, two = e2e["workers_1"], e2e["workers_2"]
    assert one["pieces"] == two["pieces"] == result["engine"]["pieces"] == 6
    assert one["tokens"] == two["tokens"] == result["engine"]["tokens"] > 0
    assert set(one["timing"]) >= {"listing", "setup", "ray_start", "batches", "batch_busy", "finalize"}
    assert result["raw_symusic"]["score_path"]["notes"] == result["raw_symusic"]["read_from_midi"]["notes"] > 0
    assert result["accounting"] == "every measurement accounted for every file"
    for k in ("processes_1", "processes_2"):  # the files split over plain processes: all of them, once
        assert result["engine_processes"][k]["pieces"] == 6
        assert result["raw_symusic_processes"][k]["notes"] == result["raw_symusic"]["read_from_midi"]["notes"]
    assert result["music21_tutorial"]["files"] == 1 and result["miditok_tsd"]["files_per_second"] > 0
    assert set(result["ratios"]) >= {
        "single_worker_vs_raw_symusic", "single_worker_vs_raw_symusic_score_path", "single_worker_vs_miditok",
        "two_workers_vs_one", "machine_processes_2_vs_one_no_ray", "raw_symusic_processes_2_vs_one",
        "two_workers_vs_one_ceiling", "single_worker_serial_fraction"}
    assert set(result["targets_met"]) == set(result["targets"])


def test_the_benchmark_refuses_figures_that_do_not_compare_like_with_like():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_preprocess", ROOT / "benchmarks" / "preprocess.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = {"pieces": 5, "duplicates": 0, "failures": 1, "tokens": 900}
    good = {"raw_symusic": {"score_path": {"notes": 40}, "read_from_midi": {"notes": 40}, "ceiling": "read_from_midi"},
            "raw_symusic_processes": {"processes_2": {"notes": 40}}, "engine": dict(run),
            "engine_processes": {"processes_2": {**run, "tokens": 950}},  # split: copies are not recognised
            "end_to_end": {"ray_cpus": 2, "workers_1": dict(run), "workers_2": dict(run)}}
    assert bench._accounting(good, 6) == []
    lost = {**good, "end_to_end": {"workers_1": dict(run), "workers_2": {**run, "pieces": 4}}}
    assert bench._accounting(lost, 6) == ["end_to_end.workers_2: 4 pieces + 0 duplicates + 1 failures for 6 files"]
    other = {**good, "raw_symusic_processes": {"processes_2": {"notes": 39}}, "engine": {**run, "tokens": 901}}
    assert [p.split(":")[0] for p in bench._accounting(other, 6)] == [
        "the raw parsers saw different notes", "whole-corpus runs made different tokens"]

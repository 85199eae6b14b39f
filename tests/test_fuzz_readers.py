"""The readers under fuzzing (issues 12 and 14): a few hundred cases of benchmarks/fuzz_readers.py (mutated
real files through both reader paths and the preprocess worker, hostile calls of the C entry points),
the fuzzer's own crash catching, a caller's wrong meta that once overwrote the heap, and a file whose
times wrap past int32 among good ones in a real preprocess run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from corpora import corpus, midi_files
from midiforge.errors import FAILURE_REASONS
from midiforge.music import readers
from test_readers import wrapped_negative, wrapped_positive

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "benchmarks" / "fuzz_readers.py"


def _fuzz(tmp_path, *args: str, env=None, timeout=500) -> tuple[int, dict, str]:
    corpus("ff"), corpus("nottingham")  # skip when the shared corpora are absent
    proc = subprocess.Popen([sys.executable, str(FUZZ), "--save", str(tmp_path / "saved"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:  # the fuzzer and its worker share a process group: stopped together, whatever happens
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return proc.returncode, json.loads(out), err


@pytest.mark.timeout(600)
def test_a_few_hundred_fuzz_cases_are_clean(tmp_path):
    code, result, err = _fuzz(tmp_path, "--cases", "300", "--api-cases", "300", "--seed", "12",
                              "--preprocess-every", "3", "--chunk", "150")
    assert code == 0 and result["clean"], json.dumps(result)[-3000:] + err[-2000:]
    assert result["cases"] == 300 and result["api"]["cases"] == 300
    assert result["pieces"] + sum(result["failures_by_reason"].values()) == 300  # every case accounted for
    assert set(result["failures_by_reason"]) <= set(FAILURE_REASONS)
    assert result["pieces"] > 10 and result["failures_by_reason"]["corrupt"] > 100  # both outcomes exercised
    assert set(result["mutations"]) == {"truncate", "bitflip", "insert", "delete", "chunk_length", "track_count",
                                        "varlen", "meta", "tick_overflow", "splice"}
    assert result["crashes"] == [] and result["disagreements"] == 0 and result["unaccounted"] == []
    assert result["preprocess"]["batches"] == 2 and result["preprocess"]["unaccounted"] == []
    api = result["api"]
    assert api["guard_violations"] == 0 and api["unexpected_count"] == 0 and api["disagreement_count"] == 0
    assert api["compared"] > 100
    assert set(api["calls"]) == ({"scan_fill", "ticks", "encode"} if result["compiled"]["_midi"] else {"encode"})
    assert api["rejected"].get("ValueError", 0) > 10 and api["rejected"].get("TypeError", 0) > 10


@pytest.mark.timeout(300)
def test_the_fuzzer_catches_a_crash_saves_the_case_and_goes_on(tmp_path):
    """A worker killed by SIGSEGV on case 57 (the fuzzer's test hook): reported with the case, its bytes
    saved, every other case still run."""
    code, result, _ = _fuzz(tmp_path, "--cases", "120", "--api-cases", "0", "--seed", "3", "--chunk", "100",
                            env={"MIDIFORGE_FUZZ_CRASH_AT": "57"})
    assert code == 1 and not result["clean"]
    assert [(c["case"], c["how"]) for c in result["crashes"]] == [(57, "signal 11")]
    assert result["cases"] == 120 and result["pieces"] + sum(result["failures_by_reason"].values()) == 119
    saved = Path(result["crashes"][0]["saved"])
    sys.path.insert(0, str(FUZZ.parent))
    try:
        import fuzz_readers
    finally:
        sys.path.remove(str(FUZZ.parent))
    data, how = fuzz_readers.make_case(3, 57, fuzz_readers.seed_files(["ff", "nottingham"]))
    assert saved.read_bytes() == data
    line = json.loads((tmp_path / "saved" / "crashes.jsonl").read_text().splitlines()[0])
    assert line["case"] == 57 and line["mutations"] == how["mutations"]


FILL_WITH_A_WRONG_COUNT = """
import numpy as np, symusic, sys
from midiforge.music import _midi
state = [symusic.Score.from_midi(open(sys.argv[1], "rb").read()).__getstate__()]
meta = np.zeros((1, 8), np.int64)
_midi.scan(state, 0, 10**9, meta)
assert meta[0, 0] == 0 and meta[0, 4] > 100
meta[0, 4] = 1  # a caller's mistake: one note kept, room for one
G = 7
bases, outs = [], []
for dt in ("f8", "f8", "i2", "i2", "i2", "i2"):
    size = np.dtype(dt).itemsize
    base = np.full((1 + 2 * G) * size, 0xA5, np.uint8)
    bases.append((base, size))
    outs.append(base[G * size:(G + 1) * size].view(dt))
try:
    _midi.fill(state, 0, meta, *outs, np.zeros((1, 3)))
    print("no error")
except ValueError as exc:
    print("ValueError", exc)
print("guards", all((b[:G * s] == 0xA5).all() and (b[(G + 1) * s:] == 0xA5).all() for b, s in bases))
"""


@pytest.mark.skipif(readers._native_midi is None, reason="midiforge.music._midi is not built (no C compiler at install)")
def test_fill_with_a_wrong_note_count_raises_and_writes_nothing_out_of_bounds(tmp_path):
    """Issue 12: fill wrote a file's notes before checking the count it was given (a heap overwrite,
    glibc aborted with 'corrupted double-linked list'); now it checks first.  In a subprocess: a
    regression would kill it, not the test run."""
    out = subprocess.run([sys.executable, "-c", FILL_WITH_A_WRONG_COUNT, str(midi_files("ff")[0])],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["ValueError fill: the states or meta do not agree with scan's", "guards True"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.mark.timeout(300)
def test_preprocess_counts_wrapped_files_as_corrupt_among_good_ones(tmp_path, ray_local):
    """Issue 14: files whose delta times add past int32 are `corrupt` failures naming the file, not
    pieces with negative seconds; inputs == pieces + duplicates + failures still holds."""
    from midiforge.pipeline.preprocess import PreprocessSettings, run_preprocess

    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    good = midi_files("ff")[:5]
    for p in good:
        shutil.copy(p, src / p.name)
    (src / "wrapped-negative.mid").write_bytes(wrapped_negative())
    (src / "wrapped-positive.mid").write_bytes(wrapped_positive())
    (src / "copy-of-wrapped.mid").write_bytes(wrapped_negative())  # a duplicate of a failure
    m = run_preprocess(str(src), str(dest), PreprocessSettings(), batch_files=3, progress=False)
    assert m["inputs"] == 8 == m["pieces"] + m["duplicates"] + m["failures"]
    assert m["pieces"] == 5 and m["failures"] == 3 and m["failure_reasons"] == {"corrupt": 3}
    failures = {r["source"]: (r["reason"], r["detail"]) for r in pq.read_table(dest / "failures.parquet").to_pylist()}
    assert set(failures) == {"wrapped-negative.mid", "wrapped-positive.mid", "copy-of-wrapped.mid"}
    assert all(reason == "corrupt" and "past 2147483647" in detail for reason, detail in failures.values())
    rows = [r for s in sorted((dest / "shards").glob("*.parquet")) for r in pq.read_table(s).to_pylist()]
    assert sorted(r["source"] for r in rows) == sorted(p.name for p in good)
    assert all(r["seconds"] > 0 for r in rows)

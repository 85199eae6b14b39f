"""preprocess under faults (issue 14): a driver killed while its workers run on and resumed at once, a
file that crashes the reader natively, a file that hangs, files bigger than the limits.

The crash and the hang are real: the fault-injection hook of midiforge.music.readers (inert unless its
environment variable is set) sends SIGSEGV to the Ray worker reading the file, or sleeps forever in it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from corpora import corpus
from raycluster import RayHead

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(1500)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "midiforge.cli", "preprocess", *args, "--no-progress"]


def _run(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """The CLI in its own process group, stopped (the group) whatever happens."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass


def _local_env(**extra: str) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "", **extra}
    return env


def _few_files(dst: Path, n: int) -> list[str]:
    dst.mkdir(parents=True)
    names = sorted(p for p in os.listdir(corpus("nottingham")) if p.endswith(".mid"))[:n]
    for name in names:
        shutil.copy(corpus("nottingham") / name, dst / name)
    return names


def _shard_rows(dest: Path) -> list[tuple]:
    rows = []
    for s in json.loads((dest / "manifest.json").read_text())["shards"]:
        t = pq.read_table(dest / s["path"], columns=["piece_id", "source", "transpose", "tokens"])
        rows.extend(zip(t["piece_id"].to_pylist(), t["source"].to_pylist(), t["transpose"].to_pylist(),
                        map(tuple, t["tokens"].to_pylist())))
    return sorted(rows)


def _check_exact(dest: Path, files: int) -> dict:
    """The accounting of a finished DEST: every input unit once, no shard row twice."""
    m = json.loads((dest / "manifest.json").read_text())
    assert m["input_files"] == files and m["inputs"] == files, (m["input_files"], m["inputs"])
    assert m["inputs"] == m["pieces"] + m["duplicates"] + m["failures"]
    inputs = pq.read_table(dest / "inputs.parquet")
    sources = inputs["source"].to_pylist()
    assert len(sources) == len(set(sources)) == files
    rows = _shard_rows(dest)
    assert len({(r[0], r[2]) for r in rows}) == len(rows), "a piece twice in the shards"
    assert len({r[1] for r in rows if r[2] == 0}) == m["pieces"] == sum(r[2] == 0 for r in rows)
    on_disk = sorted(p.name for p in (dest / "shards").glob("*.parquet"))
    assert on_disk == sorted(Path(s["path"]).name for s in m["shards"]), "a shard the manifest does not name"
    v = subprocess.run([sys.executable, "-m", "midiforge.cli", "verify", str(dest)], check=False, capture_output=True, text=True,
                       timeout=300)
    assert v.returncode == 0, v.stdout + v.stderr
    return m


# -------------------------------------------------------------------------------------------
# 1. a killed driver whose workers live on, resumed at once
# -------------------------------------------------------------------------------------------
def test_kill_the_driver_and_resume_at_once_is_exact(tmp_path, monkeypatch):
    """Issue 14.1: SIGKILL only the driver (its Ray workers on the cluster run on and write their batches)
    at several points, each time start --resume at once; the result is exactly a clean run's."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from preprocess import transposed_copies
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    src = Path(transposed_copies(str(corpus("nottingham")), str(tmp_path / "src"), 2))
    files = sum(1 for _ in src.glob("*.mid"))
    assert files > 2000
    # every batch takes 1.5 s more (a real sleep in the worker): a batch runs on after the driver dies
    monkeypatch.setenv("MIDIFORGE_TEST_SLOW_SECONDS", "1.5")
    head = RayHead(num_cpus=2)
    try:
        env = {**head.driver_env(), "RAY_ADDRESS": head.address}
        args = [str(src), "--batch-files", "100"]
        clean = _run(_cli(args[0], str(tmp_path / "clean"), *args[1:]), env, 600)
        assert clean.returncode == 0, clean.stderr[-3000:]
        dest = tmp_path / "dest"
        kills = 0
        for k, threshold in enumerate((2, 6, 11, 16, 21)):  # journals in DEST (all runs) when the driver dies
            proc = subprocess.Popen(_cli(args[0], str(dest), *args[1:], *(["--resume"] if k else [])), env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            try:
                deadline = time.monotonic() + 300
                while proc.poll() is None and time.monotonic() < deadline:
                    if len(list((dest / "_work").glob("part-*.json"))) >= threshold:
                        break
                    time.sleep(0.01)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)  # the driver only: the workers belong to the cluster
                    kills += 1
                proc.wait(timeout=60)
            finally:
                _kill_group(proc)
        assert kills >= 3, f"only {kills} runs were killed before they finished"
        last = _run(_cli(args[0], str(dest), *args[1:], "--resume"), env, 600)
        assert last.returncode == 0, last.stderr[-3000:]
    finally:
        head.stop()
    m = _check_exact(dest, files)
    c = _check_exact(tmp_path / "clean", files)
    keys = ("pieces", "duplicates", "failures", "rows", "tokens", "splits", "tokenizer")
    assert {k: m[k] for k in keys} == {k: c[k] for k in keys}
    assert _shard_rows(dest) == _shard_rows(tmp_path / "clean")


# -------------------------------------------------------------------------------------------
# 3. a file that crashes the reader natively, a file that hangs
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["crash", "hang"])
def test_a_file_that_crashes_or_hangs_costs_only_itself(tmp_path, fault):
    """Issue 14.3: one of 25 files kills its worker (SIGSEGV) or never returns; it ends as a failure
    (parser_crash / timeout), the 24 others are exactly what a run without it makes; --resume is a no-op."""
    names = _few_files(tmp_path / "src", 25)
    bad = names[11]
    (tmp_path / "src" / bad).rename(tmp_path / "src" / f"BAD-{bad}")
    hook = {"crash": {"MIDIFORGE_TEST_CRASH_ON": "BAD-"}, "hang": {"MIDIFORGE_TEST_HANG_ON": "BAD-"}}[fault]
    args = ["--batch-files", "25", "--workers", "1", "--file-timeout", "10"]
    started = time.monotonic()
    out = _run(_cli(str(tmp_path / "src"), str(tmp_path / "d"), *args), _local_env(**hook), 900)
    assert out.returncode == 0, out.stderr[-3000:]
    took = time.monotonic() - started
    m = _check_exact(tmp_path / "d", 25)
    reason = {"crash": "parser_crash", "hang": "timeout"}[fault]
    assert m["failures"] == 1 and m["failure_reasons"] == {reason: 1}
    failures = pq.read_table(tmp_path / "d" / "failures.parquet").to_pylist()
    assert [(f["source"], f["reason"]) for f in failures] == [(f"BAD-{bad}", reason)]
    # the others: as a run without the bad file makes them
    (tmp_path / "src" / f"BAD-{bad}").unlink()
    ref = _run(_cli(str(tmp_path / "src"), str(tmp_path / "ref"), *args), _local_env(), 600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert _shard_rows(tmp_path / "d") == _shard_rows(tmp_path / "ref")
    (tmp_path / "src" / f"BAD-{bad}").write_bytes((corpus("nottingham") / bad).read_bytes())
    before = (tmp_path / "d" / "manifest.json").read_bytes()
    again = _run(_cli(str(tmp_path / "src"), str(tmp_path / "d"), *args, "--resume"), _local_env(**hook), 300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "d" / "manifest.json").read_bytes() == before
    print(f"{fault}: {took:.1f} s")


# -------------------------------------------------------------------------------------------
# 4. sizes and memory
# -------------------------------------------------------------------------------------------
_MEASURE = r"""
import json, os, resource, sys
from midiforge.music.readers import ReadOptions
from midiforge.pipeline.preprocess import InputRef, PreprocessSettings, process_batch
from midiforge.storage import StorageOptions
src, dest, small = sys.argv[1], sys.argv[2], sys.argv[3]
st = PreprocessSettings(read=ReadOptions(max_bytes=1 << 20))
process_batch(0, [InputRef(small, src, small, os.path.getsize(os.path.join(src, small)))], dest, StorageOptions(), st)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
refs = [InputRef("big.mid", src, "big.mid", os.path.getsize(os.path.join(src, "big.mid"))),
        InputRef("listed.mid", src, "big.mid", -1),   # from a list file: no size listed, the file's is taken
        InputRef("gone.mid", src, "no-such-file.mid", 200 << 20)]  # the listing's size: never opened
r = process_batch(1, refs, dest, StorageOptions(), st)
print(json.dumps({"grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, "journal": r["journal"]}))
"""


def test_a_file_over_max_bytes_is_refused_by_its_listed_size_without_being_read(tmp_path):
    """Issue 14.4: a 200 MB file with --max-bytes 1 MB is too_long, and reading it costs nothing."""
    names = _few_files(tmp_path / "src", 1)
    with open(tmp_path / "src" / "big.mid", "wb") as fh:  # sparse: 200 MB listed, nothing on the disk
        fh.truncate(200 << 20)
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "src"), str(tmp_path / "d"), names[0]],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.splitlines()[-1])
    j = r["journal"]
    assert j["reason"] == ["too_long"] * 3 and j["status"] == ["failure"] * 3
    assert j["detail"][0] == j["detail"][1] == f"{200 << 20} bytes > max {1 << 20}"
    assert r["grew_kb"] < 50 * 1024, f"the refused files cost {r['grew_kb'] // 1024} MB"


def _lyric_only_midi(size: int) -> bytes:
    """A Standard MIDI File of one track of lyric meta events and no note: ~``size`` bytes."""
    import struct

    event = b"\x00\xff\x05\x14" + b"la" * 10
    track = event * (size // len(event)) + b"\x00\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, 480) + b"MTrk" + struct.pack(">I", len(track)) + track


def test_big_files_are_cut_into_batches_of_bounded_bytes_with_memory_reserved(tmp_path):
    """Issue 14.4: three 40 MB lyric-only MIDI files asked in one batch of 100 files run as three batches
    (MAX_BATCH_BYTES), each reserving Ray memory for its bytes; all three fail as no_notes."""
    from midiforge.pipeline.preprocess_inputs import InputRef
    from midiforge.pipeline.preprocess_plan import (
        MAX_BATCH_BYTES,
        MEMORY_BASE,
        MEMORY_FACTOR,
        batch_bytes,
        cap_bytes,
    )

    src = tmp_path / "src"
    names = _few_files(src, 3)
    data = _lyric_only_midi(40 << 20)
    for k in range(3):
        (src / f"lyrics{k}.mid").write_bytes(data)
    out = _run(_cli(str(src), str(tmp_path / "d"), "--batch-files", "100"), _local_env(), 900)
    assert out.returncode == 0, out.stderr[-3000:]
    m = _check_exact(tmp_path / "d", 6)
    assert m["failure_reasons"] == {"no_notes": 3} and m["pieces"] == 3
    assert m["timing"]["batch_count"] >= 3  # no batch holds two of the big files
    # the cut, and what a batch asks of Ray (bytes of files over --max-bytes are never read: 0)
    refs = [InputRef(f"{k}.mid", "", "", s) for k, s in enumerate([40 << 20, 10, 40 << 20, 30 << 20, 5, 99 << 20])]
    batches = cap_bytes([refs], max_bytes=64 << 20)
    assert [[r.source for r in b] for b in batches] == [["0.mid", "1.mid"], ["2.mid"], ["3.mid", "4.mid", "5.mid"]]
    assert all(batch_bytes(b, 64 << 20) <= MAX_BATCH_BYTES for b in batches)
    assert MEMORY_BASE + MEMORY_FACTOR * batch_bytes(batches[0], 64 << 20) > 12 * (40 << 20)  # > the measured 12x
    assert names


_LATE_WRITER = r"""
import json, sys
from midiforge.pipeline.preprocess import InputRef, PreprocessSettings, process_batch
from midiforge.storage import StorageOptions
src, dest, part, names = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
process_batch(part, [InputRef(n, src, n) for n in names], dest, StorageOptions(), PreprocessSettings())
"""


def test_a_late_writer_of_a_killed_run_is_never_counted(tmp_path):
    """Issue 14.1, the race itself: a batch of the killed run (its next part number, inputs not yet done) is
    written by a real process_batch after the resumed run took stock and while it runs: the resumed run's
    result is exact and no file of the late writer is counted or left named in the manifest."""
    src = corpus("nottingham")
    dest = tmp_path / "d"
    args = [str(src), "--batch-files", "100", "--workers", "1"]
    proc = subprocess.Popen(_cli(args[0], str(dest), *args[1:]), env=_local_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list((dest / "_work").glob("part-*.json"))) >= 3:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        _kill_group(proc)
    assert not (dest / "manifest.json").exists()
    journals = {p.name: json.loads(p.read_text()) for p in (dest / "_work").glob("part-*.json")}
    done = {i for j in journals.values() for i in j["input"]}
    late_part = max(int(n[5:-5]) for n in journals) + 1  # the killed run's next batch
    late_inputs = sorted(n for n in os.listdir(src) if n.endswith(".mid") and n not in done)[:100]
    # the resumed run, slowed (1 s a batch) so that it is still running when the late writer writes
    resumed = subprocess.Popen(_cli(args[0], str(dest), *args[1:], "--resume"),
                               env=_local_env(MIDIFORGE_TEST_SLOW_SECONDS="1"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while resumed.poll() is None and time.monotonic() < deadline:  # it took stock: a batch of its own is done
            if len(list((dest / "_work").glob("part-*.json"))) > len(journals):
                break
            time.sleep(0.01)
        late = subprocess.run([sys.executable, "-c", _LATE_WRITER, str(src), str(dest), str(late_part),
                               json.dumps(late_inputs)], check=False, capture_output=True, text=True, timeout=300)
        assert late.returncode == 0, late.stderr[-3000:]
        assert resumed.poll() is None, "the resumed run ended before the late writer wrote"
        _out, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, err[-3000:]
    finally:
        _kill_group(resumed)
    files = sum(1 for n in os.listdir(src) if n.endswith(".mid"))
    m = _check_exact(dest, files)
    clean = _run(_cli(args[0], str(tmp_path / "clean"), *args[1:]), _local_env(), 600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    c = _check_exact(tmp_path / "clean", files)
    keys = ("pieces", "duplicates", "failures", "rows", "tokens", "splits", "tokenizer")
    assert {k: m[k] for k in keys} == {k: c[k] for k in keys}
    assert _shard_rows(dest) == _shard_rows(tmp_path / "clean")

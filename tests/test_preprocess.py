"""The preprocess stage on a real local Ray: accounting, bad input, resume after a kill, the CLI end to end."""
from __future__ import annotations

import difflib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from corpora import corpus, midi_files

from midiforge.errors import FAILURE_REASONS, MidiforgeError
from midiforge.music.readers import ReadOptions
from midiforge.music.tokenizers import load_tokenizer
from midiforge.pipeline.preprocess import PreprocessSettings, run_preprocess
from midiforge.storage import open_store, verify_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _rows(dest: Path) -> list[tuple]:
    rows = []
    for shard in sorted((dest / "shards").glob("part-*.parquet")):
        t = pq.read_table(shard)
        for r in t.to_pylist():
            rows.append((r["source"], r["transpose"], r["piece_id"], r["split"], tuple(r["tokens"]), r["n_notes"]))
    return sorted(rows)


def _failures(dest: Path) -> list[tuple]:
    return sorted((r["source"], r["reason"]) for r in pq.read_table(dest / "failures.parquet").to_pylist())


def _hostile_folder(root: Path) -> dict[str, str]:
    """Good files mixed with bad ones; returns the expected outcome per source."""
    ff = midi_files("ff")
    good = [p for p in ff if p.name in ("8.mid", "Cids.mid", "DOS.mid", "FF4.mid")]
    big = next(p for p in ff if p.name == "AT.mid")  # 3,329 notes: too_long under --max-notes 3000
    (root / "sub").mkdir(parents=True)
    expected = {}
    for p in good:
        shutil.copy(p, root / p.name)
        expected[p.name] = "piece"
    shutil.copy(good[0], root / "sub" / "copy-of-8.mid")       # identical bytes in another batch
    shutil.copy(good[0], root / "zz-copy-of-8.MID")             # and another, upper-case suffix
    expected["sub/copy-of-8.mid"] = "duplicate"
    expected["zz-copy-of-8.MID"] = "duplicate"
    shutil.copy(big, root / "big.mid")
    expected["big.mid"] = "too_long"
    (root / "empty.mid").write_bytes(b"")
    expected["empty.mid"] = "empty"
    (root / "garbage.mid").write_bytes(np.random.default_rng(1).bytes(3000))
    expected["garbage.mid"] = "not_midi"
    (root / "truncated.mid").write_bytes(good[1].read_bytes()[:300])
    expected["truncated.mid"] = "corrupt"
    import symusic

    score = symusic.Score(480)
    score.tracks.append(symusic.Track("silent", 0, False))
    (root / "silent.mid").write_bytes(score.dumps_midi())
    expected["silent.mid"] = "no_notes"
    header = b"MThd\x00\x00\x00\x06\x00\x00\x00\x01\xe7\x28"
    (root / "smpte.mid").write_bytes(header + b"MTrk\x00\x00\x00\x04\x00\xff\x2f\x00")
    expected["smpte.mid"] = "unsupported"
    (root / "broken.musicxml").write_text("<score-partwise><part id='P1'><measure>")
    expected["broken.musicxml"] = "parser_error"
    (root / "README.txt").write_text("not an input: unknown suffixes are not listed")
    return expected


def test_every_input_is_accounted_for(tmp_path, ray_local):
    src, dest = tmp_path / "src", tmp_path / "dest"
    expected = _hostile_folder(src)
    settings = PreprocessSettings(read=ReadOptions(max_notes=3000), transpose=(-1, 1))
    m = run_preprocess(str(src), str(dest), settings, batch_files=3, progress=False)
    assert m["inputs"] == len(expected) == m["input_files"]
    assert m["inputs"] == m["pieces"] + m["duplicates"] + m["failures"]
    assert m["pieces"] == 4 and m["duplicates"] == 2
    timing, phases = m["timing"], ("listing", "setup", "ray_start", "batches", "finalize")
    assert set(timing) == {*phases, "batch_busy", "batch_count", "batch_hosts"}
    assert timing["batch_count"] == -(-m["input_files"] // 3) and 0 < timing["batch_busy"]
    assert timing["batch_hosts"] == {socket.gethostname(): timing["batch_count"]}  # one machine: every batch here
    assert 0 < sum(timing[k] for k in phases) <= m["seconds"] + 0.01
    failures = dict(_failures(dest))
    assert failures == {k: v for k, v in expected.items() if v not in ("piece", "duplicate")}
    assert set(failures.values()) <= set(FAILURE_REASONS)
    assert m["failure_reasons"] == {r: list(failures.values()).count(r) for r in set(failures.values())}
    details = {r["source"]: r["detail"] for r in pq.read_table(dest / "failures.parquet").to_pylist()}
    assert "3000" in details["big.mid"] and "MThd" in details["garbage.mid"]
    inputs = {r["source"]: r["status"] for r in pq.read_table(dest / "inputs.parquet").to_pylist()}
    assert {k: (v if v in ("piece", "duplicate") else "failure") for k, v in expected.items()} == inputs
    rows = _rows(dest)
    assert {r[0] for r in rows} == {k for k, v in expected.items() if v == "piece"}
    # transposed copies only for the train split, and they really are transposed
    tok = load_tokenizer((dest / "tokenizer.json").read_text())
    original = {pid: tokens for _s, k, pid, _sp, tokens, _n in rows if k == 0}
    moved = [(k, pid, split, tokens) for _s, k, pid, split, tokens, _n in rows if k != 0]
    assert moved and all(split == "train" for _k, _p, split, _t in moved)
    for k, pid, _split, tokens in moved:
        a, b = tok.decode_quantized(original[pid]), tok.decode_quantized(tokens)
        assert b.pitch.tolist() == (a.pitch + k).tolist()
        assert (a.onset.tolist(), a.duration.tolist(), a.velocity.tolist()) == \
            (b.onset.tolist(), b.duration.tolist(), b.velocity.tolist())
    assert sum(s["rows"] for s in m["shards"]) == len(rows)
    # the manifest lists every object with its sha256, and they verify
    assert verify_store(open_store(str(dest))).ok
    assert tok.id == m["tokenizer"] and all(r["tokenizer"] == tok.id for r in pq.read_table(dest / "shards" / "part-00000.parquet").to_pylist())


@pytest.mark.parametrize("tokenizer", ["events", "classic"])
def test_duplicates_resolve_the_same_whatever_the_batching(tmp_path, ray_local, tokenizer):
    src = tmp_path / "src"
    _hostile_folder(src)
    settings = PreprocessSettings(tokenizer=tokenizer)
    a = run_preprocess(str(src), str(tmp_path / "a"), settings, batch_files=1, progress=False)
    b = run_preprocess(str(src), str(tmp_path / "b"), settings, batch_files=50, progress=False)
    assert a["duplicates"] == 2  # the copy in another batch: its shard rewritten by finalize in run a
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    assert _failures(tmp_path / "a") == _failures(tmp_path / "b")
    assert {k: a[k] for k in ("pieces", "duplicates", "failures", "tokens", "rows", "splits")} == \
        {k: b[k] for k in ("pieces", "duplicates", "failures", "tokens", "rows", "splits")}
    for dest, m in ((tmp_path / "a", a), (tmp_path / "b", b)):  # the shard entries are those of the files written
        assert verify_store(open_store(str(dest))).ok
        assert [s["rows"] for s in m["shards"]] == [pq.read_metadata(dest / s["path"]).num_rows for s in m["shards"]]


def test_an_input_without_an_outcome_stops_finalize(tmp_path, ray_local):
    from midiforge.pipeline.preprocess_finalize import finalize

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(midi_files("ff")[0], src / "a.mid")
    m = run_preprocess(str(src), str(tmp_path / "d"), PreprocessSettings(), progress=False)
    dest = open_store(str(tmp_path / "d"))
    again = finalize(dest, PreprocessSettings(), src_count=1, started=time.time(), expected_inputs={"a.mid"})
    assert {k: again[k] for k in ("inputs", "pieces", "shards")} == {k: m[k] for k in ("inputs", "pieces", "shards")}
    with pytest.raises(MidiforgeError, match=r"1 inputs have no outcome in any batch journal .*'b\.mid'"):
        finalize(dest, PreprocessSettings(), src_count=2, started=time.time(), expected_inputs={"a.mid", "b.mid"})
    assert not (tmp_path / "d" / "manifest.json").exists()  # no manifest for an incomplete run


def test_existing_dest_needs_resume_and_same_settings(tmp_path, ray_local):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(midi_files("ff")[0], src / "a.mid")
    run_preprocess(str(src), str(tmp_path / "d"), PreprocessSettings(), progress=False)
    with pytest.raises(MidiforgeError, match="--resume"):
        run_preprocess(str(src), str(tmp_path / "d"), PreprocessSettings(), progress=False)
    with pytest.raises(MidiforgeError, match="different settings"):
        run_preprocess(str(src), str(tmp_path / "d"), PreprocessSettings(splits=(0.5, 0.25, 0.25)),
                       resume=True, progress=False)
    with pytest.raises(MidiforgeError, match="no such folder"):
        run_preprocess(str(tmp_path / "missing"), str(tmp_path / "e"), PreprocessSettings(), progress=False)
    journal = tmp_path / "d" / "_work" / "part-00000.json"
    assert json.loads(journal.read_text())["source"] == ["a.mid"]
    journal.write_bytes(b'{"input": ["a.mid"], "sou')  # damaged outside midiforge (journals are written atomically)
    with pytest.raises(MidiforgeError, match=r"part-00000\.json: not a readable batch journal"):
        run_preprocess(str(src), str(tmp_path / "d"), PreprocessSettings(), resume=True, progress=False)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "midiforge.cli", "preprocess", *args, "--no-progress"]


def test_resume_after_kill_equals_a_clean_run(tmp_path, ray_local):
    """SIGKILL the whole preprocess job mid-run, resume it, and compare with one clean run."""
    src = corpus("nottingham")
    dest = tmp_path / "resumed"
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(_cli(str(src), str(dest), "--workers", "1", "--batch-files", "8"),
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((dest / "_work").glob("part-*.json"))) >= 3:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (dest / "manifest.json").exists(), "the run finished before it could be killed"
    done_before = len(list((dest / "_work").glob("part-*.json")))
    assert done_before >= 3
    resumed = run_preprocess(str(src), str(dest), PreprocessSettings(), resume=True, batch_files=64, progress=False)
    clean = run_preprocess(str(src), str(tmp_path / "clean"), PreprocessSettings(), batch_files=64, progress=False)
    keys = ("input_files", "inputs", "pieces", "duplicates", "failures", "failure_reasons", "rows", "tokens", "splits",
            "tokenizer", "qpm_median")
    assert {k: resumed[k] for k in keys} == {k: clean[k] for k in keys}
    assert _rows(dest) == _rows(tmp_path / "clean")
    assert _failures(dest) == _failures(tmp_path / "clean")
    assert verify_store(open_store(str(dest))).ok
    # a resume of a finished run does nothing and keeps the result, manifest included
    before = (dest / "manifest.json").read_bytes()
    again = run_preprocess(str(src), str(dest), PreprocessSettings(), resume=True, progress=False)
    assert {k: again[k] for k in keys} == {k: clean[k] for k in keys}
    assert (dest / "manifest.json").read_bytes() == before


def test_cli_end_to_end_on_the_ff_corpus(tmp_path):
    """The user's command on local Ray: every file becomes a piece, tokens decode, verify passes."""
    src = corpus("ff")
    dest = tmp_path / "ff"
    out = subprocess.run(_cli(str(src), str(dest), "--sample", "60", "--seed", "7"), check=False, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.splitlines()[0])
    manifest = json.loads((dest / "manifest.json").read_text())
    assert summary["inputs"] == manifest["inputs"] == 60
    assert manifest["pieces"] == 60 and manifest["failures"] == 0
    assert manifest["splits"]["train"] > manifest["splits"]["validation"]
    tok = load_tokenizer((dest / "tokenizer.json").read_text())
    rows = pq.read_table(dest / "shards" / "part-00000.parquet").to_pylist()
    piece = tok.decode(rows[0]["tokens"])
    assert len(piece) == rows[0]["n_notes"] or len(piece) > 0
    v = subprocess.run([sys.executable, "-m", "midiforge.cli", "verify", str(dest)], check=False, capture_output=True, text=True,
                       timeout=120)
    assert v.returncode == 0, v.stdout + v.stderr
    # the same sample again gives the same files
    sources = sorted(r["source"] for s in sorted((dest / "shards").glob("*.parquet")) for r in pq.read_table(s, columns=["source"]).to_pylist())
    assert len(sources) == 60 and len(set(sources)) == 60


def test_abc_tunes_are_units_read_through_music21(tmp_path, ray_local):
    abc = corpus("nottingham-abc") / "ashover.abc"
    listing = tmp_path / "list.txt"
    listing.write_text(f"{abc}\n")
    m = run_preprocess(str(listing), str(tmp_path / "abc"), PreprocessSettings(tokenizer="classic"), progress=False,
                       allow_absolute_paths=True)  # the list names the shared corpus by absolute path
    assert m["inputs"] == 46 == m["pieces"] + m["duplicates"] + m["failures"]
    assert m["pieces"] >= 40
    rows = _rows(tmp_path / "abc")
    assert all(r[0].startswith(str(abc)) and "#X" in r[0] for r in rows)
    tok = load_tokenizer((tmp_path / "abc" / "tokenizer.json").read_text())
    words = [tok.vocab[i] for i in rows[0][4]]
    assert words[0] == "BOS" and words[-1] == "EOS" and len(words) > 10


def test_classic_tokens_agree_between_symusic_and_music21(tmp_path, ray_local):
    """The tutorial's reading (music21) against the fast path (symusic) on the ff corpus."""
    src = corpus("ff")
    runs = {}
    for parser in ("symusic", "music21"):
        settings = PreprocessSettings(tokenizer="classic", read=ReadOptions(parser=parser, tracks="first"))
        dest = tmp_path / parser
        m = run_preprocess(str(src), str(dest), settings, progress=False)
        assert m["failures"] == 0, m["failure_reasons"]
        tok = load_tokenizer((dest / "tokenizer.json").read_text())
        runs[parser] = {r[0]: [tok.vocab[i] for i in r[4]][1:-1] for r in _rows(dest)}
    assert runs["symusic"].keys() == runs["music21"].keys()
    ratios, identical = [], 0
    for source, a in runs["symusic"].items():
        b = runs["music21"][source]
        ratios.append(difflib.SequenceMatcher(None, a, b, autojunk=False).ratio())
        identical += a == b
    mean = float(np.mean(ratios))
    report = {"files": len(ratios), "identical": identical, "mean_agreement": round(mean, 4),
              "median_agreement": round(float(np.median(ratios)), 4),
              "files_at_least_0.9": int(sum(r >= 0.9 for r in ratios))}
    print("classic agreement symusic vs music21:", json.dumps(report))
    assert mean >= 0.8 and report["files_at_least_0.9"] >= 0.75 * len(ratios), report

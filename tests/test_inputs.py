"""What preprocess may read: regular files only, list entries inside the list's folder, no empty SRC.

Issue 14, points 6 and 9.  Special files (FIFOs, devices, symbolic link loops) are real ones made
here with os.mkfifo/os.symlink; the reads that used to hang or eat memory run in a subprocess with
a timeout and an address-space limit, so a regression fails the test instead of the machine.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from corpora import midi_files
from midiforge.errors import FAILURE_REASONS, MidiforgeError
from midiforge.pipeline.preprocess import list_inputs
from midiforge.storage import open_store

ROOT = Path(__file__).resolve().parents[1]


def _limited():  # a child that reads /dev/zero hits MemoryError at 1.5 GB, not the OOM killer
    resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
    os.setsid()


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_limited, cwd=ROOT)


def _special_folder(root: Path) -> dict[str, str]:
    """Two good MIDI files and every kind of local input that is not a regular file; the expected outcomes."""
    good = [p for p in midi_files("ff") if p.name in ("8.mid", "Cids.mid")]
    root.mkdir(parents=True)
    (root / "sub").mkdir()
    shutil.copy(good[0], root / "a.mid")
    shutil.copy(good[1], root / "sub" / "b.mid")
    os.symlink("sub/b.mid", root / "link-to-b.mid")           # a link to a regular file: followed
    os.mkfifo(root / "fifo.mid")                              # no writer: open() would block for ever
    os.symlink("/dev/zero", root / "zero.mid")                # read() would never end
    os.symlink("loop.mid", root / "loop.mid")                 # ELOOP
    os.symlink("nowhere.mid", root / "dangling.mid")          # a link to nothing
    os.symlink("..", root / "sub" / "up")                     # a folder loop: sub/up/sub/up/...
    # the same bytes twice: the smaller source is the piece
    return {"a.mid": "piece", "sub/b.mid": "duplicate", "link-to-b.mid": "piece", "fifo.mid": "not_regular",
            "zero.mid": "not_regular", "loop.mid": "not_regular", "dangling.mid": "not_regular"}


# -------------------------------------------------------------------------------------------
# point 6: special files
# -------------------------------------------------------------------------------------------
def test_listing_a_folder_with_a_link_loop_lists_every_input_once(tmp_path):
    expected = _special_folder(tmp_path / "src")
    refs = list_inputs(str(tmp_path / "src"))  # used to raise OSError: Too many levels of symbolic links
    assert sorted(r.source for r in refs) == sorted(expected)
    assert {r.source: r.size for r in refs}["fifo.mid"] == -1  # listed, so that it is reported


def test_a_local_store_reads_only_regular_files(tmp_path):
    from midiforge.storage.store import NotRegularFileError

    _special_folder(tmp_path / "src")
    store = open_store(str(tmp_path / "src"))
    assert store.read_bytes("link-to-b.mid") == (tmp_path / "src" / "sub" / "b.mid").read_bytes()
    for name, what in (("fifo.mid", "FIFO"), ("zero.mid", "character device"), ("loop.mid", "loop"),
                       ("dangling.mid", "to nothing"), ("sub", "folder")):
        with pytest.raises(NotRegularFileError, match=what) as exc:
            store.read_bytes(name)
        assert exc.value.reason == "not_regular" and str(tmp_path / "src" / name) in str(exc.value)
        assert "\n" not in str(exc.value)


def test_process_batch_reports_special_files_as_not_regular_without_reading_them(tmp_path):
    """The batch task itself, in a child with a time and memory limit: a FIFO used to hang it, /dev/zero
    to read until memory ran out."""
    expected = _special_folder(tmp_path / "src")
    r = _run(f"""
        import json
        from midiforge.pipeline.preprocess import PreprocessSettings, list_inputs, process_batch
        from midiforge.storage import StorageOptions
        refs = list_inputs({str(tmp_path / "src")!r})
        out = process_batch(0, refs, {str(tmp_path / "out")!r}, StorageOptions(), PreprocessSettings())
        j = out["journal"]
        print(json.dumps({{s: [st, re, d] for s, st, re, d in zip(j["source"], j["status"], j["reason"], j["detail"])}}))
        """, timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]
    outcome = json.loads(r.stdout.strip().splitlines()[-1])
    assert {s: (o[1] if o[0] == "failure" else o[0]) for s, o in outcome.items()} == expected
    assert "FIFO" in outcome["fifo.mid"][2] and "device" in outcome["zero.mid"][2]
    assert "loop" in outcome["loop.mid"][2] and "nothing" in outcome["dangling.mid"][2]


def test_cli_run_over_special_files_accounts_for_every_input(tmp_path):
    expected = _special_folder(tmp_path / "src")
    dest = tmp_path / "dest"
    r = subprocess.run([sys.executable, "-m", "midiforge.cli", "preprocess", str(tmp_path / "src"), str(dest),
                        "--no-progress", "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((dest / "manifest.json").read_text())
    assert m["inputs"] == len(expected) == m["pieces"] + m["duplicates"] + m["failures"]
    assert m["failure_reasons"] == {"not_regular": 4}
    failures = {x["source"]: x["reason"] for x in pq.read_table(dest / "failures.parquet").to_pylist()}
    assert failures == {s: o for s, o in expected.items() if o == "not_regular"}
    assert "not_regular" in FAILURE_REASONS
    assert "`not_regular`" in (ROOT / "README.md").read_text()


# -------------------------------------------------------------------------------------------
# point 6: what a list file may name
# -------------------------------------------------------------------------------------------
def _list(folder: Path, *lines: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "list.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_list_entries_outside_the_lists_folder_are_refused(tmp_path):
    good = midi_files("ff")[0]
    inside = tmp_path / "corpus"
    inside.mkdir()
    shutil.copy(good, inside / "a.mid")
    (tmp_path / "secret.mid").write_bytes(good.read_bytes())
    os.symlink("../secret.mid", inside / "escape.mid")   # inside by name, outside once resolved
    for entry, why in (("../../../../../../etc/shadow", "outside"), ("../secret.mid", "outside"),
                       ("escape.mid", "outside"), ("/etc/passwd", "absolute"), ("/proc/self/environ", "absolute"),
                       (f"file://{tmp_path}/secret.mid", "absolute"), ("s3://bucket/x.mid", "absolute")):
        listing = _list(inside, "a.mid", "# a comment", entry)
        with pytest.raises(MidiforgeError) as exc:
            list_inputs(str(listing))
        msg = str(exc.value)
        assert f"{listing}:3" in msg and entry in msg and why in msg and "--allow-absolute-paths" in msg, msg
    # the flag allows them, and they are read as given
    listing = _list(inside, "a.mid", "../secret.mid", str(tmp_path / "secret.mid"))
    refs = list_inputs(str(listing), allow_absolute_paths=True)
    assert sorted(r.source for r in refs) == sorted(["a.mid", "../secret.mid", str(tmp_path / "secret.mid")])
    # inside stays fine, also through a folder and a link that stays inside
    (inside / "sub").mkdir()
    shutil.copy(good, inside / "sub" / "b.mid")
    os.symlink("sub/b.mid", inside / "link.mid")
    refs = list_inputs(str(_list(inside, "a.mid", "sub/b.mid", "sub/../a.mid", "./link.mid")))
    assert sorted(r.source for r in refs) == ["./link.mid", "a.mid", "sub/../a.mid", "sub/b.mid"]


def test_list_file_naming_a_fifo_inside_its_folder_gives_a_failure_not_a_hang(tmp_path):
    inside = tmp_path / "corpus"
    inside.mkdir()
    shutil.copy(midi_files("ff")[0], inside / "a.mid")
    os.mkfifo(inside / "pipe.mid")
    listing = _list(inside, "a.mid", "pipe.mid")
    r = _run(f"""
        import json
        from midiforge.pipeline.preprocess import PreprocessSettings, list_inputs, process_batch
        from midiforge.storage import StorageOptions
        out = process_batch(0, list_inputs({str(listing)!r}), {str(tmp_path / "out")!r}, StorageOptions(),
                            PreprocessSettings())
        print(json.dumps(dict(zip(out["journal"]["source"], out["journal"]["reason"]))))
        """, timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"a.mid": "", "pipe.mid": "not_regular"}


def test_bad_list_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9.mid\n")
    with pytest.raises(MidiforgeError, match=r"latin1\.txt: not UTF-8 text"):
        list_inputs(str(bad))
    nul = _list(tmp_path / "n", "a\0b.mid")
    with pytest.raises(MidiforgeError, match=r"list\.txt:1: .*NUL"):
        list_inputs(str(nul))


# -------------------------------------------------------------------------------------------
# point 9: an empty SRC
# -------------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "midiforge.cli", "preprocess", *args, "--no-progress"],
                          capture_output=True, text=True, timeout=300)


def test_an_empty_src_is_refused_unless_allowed(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("no inputs here")
    comments = _list(tmp_path / "lists", "# nothing yet")
    for src in (empty, comments):
        r = _cli(str(src), str(tmp_path / "dest"))
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and str(src) in lines[0] and "no input files" in lines[0] and "--allow-empty" in lines[0]
        assert "shards:" not in r.stdout
        assert not (tmp_path / "dest").exists()  # nothing written
    r = _cli(str(empty), str(tmp_path / "dest"), "--allow-empty")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "dest" / "manifest.json").read_text())
    assert m["inputs"] == 0 == m["pieces"] and m["shards"] == []
    assert "shards: none (no inputs)" in r.stdout


@pytest.mark.parametrize("flag", ["--workers", "--batch-files"])
def test_zero_workers_or_batch_files_is_a_usage_error_not_a_hang(tmp_path, capsys, flag):
    """--workers 0 started a Ray with no CPU and waited for one forever: now argparse refuses it."""
    from midiforge.cli import main

    (tmp_path / "src").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["preprocess", str(tmp_path / "src"), str(tmp_path / "out"), flag, "0"])
    assert exc.value.code == 2
    assert f"argument {flag}: 0 must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

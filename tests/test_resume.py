"""--resume continues the run it finds, on the data that run was made from (issue 14, point 2).

preprocess: another SRC is refused (SRC compared as a normalized URI), unless --add-inputs adds its
inputs deliberately (the manifest's ``sources`` records each SRC and when it came).  train: other
shards than the run's (their manifest's sha256 differs) are refused, with --resume and without;
the same shards at another URI are accepted.  Real Ray, real TensorFlow worker processes.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corpora import midi_files
from midiforge.errors import MidiforgeError
from midiforge.pipeline.preprocess import PreprocessSettings, run_preprocess

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import make_shards, worker_env  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _folder(root: Path, names: list[str], files: list[Path]) -> Path:
    root.mkdir(parents=True)
    for name, f in zip(names, files):
        shutil.copy(f, root / name)
    return root


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -------------------------------------------------------------------------------------------
# preprocess
# -------------------------------------------------------------------------------------------
def test_preprocess_resume_refuses_another_src_unless_inputs_are_added(tmp_path, ray_local):
    ff = midi_files("ff")
    bach = _folder(tmp_path / "bach", ["a.mid", "b.mid", "c.mid"], ff[:3])
    folk = _folder(tmp_path / "folk", ["x.mid", "y.mid"], ff[3:5])
    dest = tmp_path / "dest"
    first = run_preprocess(str(bach), str(dest), PreprocessSettings(), progress=False)
    assert first["inputs"] == 3
    before = _snapshot(dest)

    with pytest.raises(MidiforgeError) as exc:  # used to merge folk's inputs into the run (3 -> 5)
        run_preprocess(str(folk), str(dest), PreprocessSettings(), resume=True, progress=False)
    msg = str(exc.value)
    assert str(bach) in msg and str(folk) in msg and "--add-inputs" in msg and "\n" not in msg
    assert _snapshot(dest) == before

    # the same SRC spelled otherwise (file:// URI, trailing slash, a link to it) is the same SRC
    (tmp_path / "bach-link").symlink_to(bach)
    for same in (f"file://{bach}", f"{bach}/", str(tmp_path / "bach-link")):
        assert run_preprocess(same, str(dest), PreprocessSettings(), resume=True, progress=False) == first
    assert _snapshot(dest) == before

    # deliberately: --add-inputs, recorded in the manifest with the time
    added = run_preprocess(str(folk), str(dest), PreprocessSettings(), add_inputs=True, progress=False)
    assert added["inputs"] == 5 == added["pieces"] + added["duplicates"] + added["failures"]
    assert [s["src"] for s in added["sources"]] == [f"file://{bach}", f"file://{folk}"]
    assert all(s["added"] for s in added["sources"]) and added["sources"][0]["added"] <= added["sources"][1]["added"]
    # both SRCs are now this run's: resuming with either is a no-op
    assert run_preprocess(str(bach), str(dest), PreprocessSettings(), resume=True, progress=False) == added

    # inputs whose names are already the run's (sources are relative to their SRC) are refused
    clash = _folder(tmp_path / "clash", ["a.mid", "z.mid"], ff[5:7])
    after = _snapshot(dest)
    with pytest.raises(MidiforgeError, match=r"a\.mid"):
        run_preprocess(str(clash), str(dest), PreprocessSettings(), add_inputs=True, progress=False)
    assert _snapshot(dest) == after


def test_preprocess_cli_names_both_srcs(tmp_path):
    ff = midi_files("ff")
    one = _folder(tmp_path / "one", ["a.mid"], ff[:1])
    two = _folder(tmp_path / "two", ["b.mid"], ff[1:2])
    cli = [sys.executable, "-m", "midiforge.cli", "preprocess"]
    r = subprocess.run([*cli, str(one), str(tmp_path / "d"), "--no-progress", "--workers", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([*cli, str(two), str(tmp_path / "d"), "--no-progress", "--resume"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert str(one) in line and str(two) in line and "--add-inputs" in line


# -------------------------------------------------------------------------------------------
# train
# -------------------------------------------------------------------------------------------
TINY = ["--seq-len", "32", "--batch-size", "8", "--lstm-units", "32", "--embedding-dim", "16",
        "--steps-per-epoch", "4", "--validation-steps", "2"]


def _train(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "midiforge.cli", "train", *args], env=worker_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_train_refuses_other_shards_and_accepts_the_same_shards_elsewhere(tmp_path):
    bach, folk = tmp_path / "bach", tmp_path / "folk"
    make_shards(str(bach), pieces=40, files=2, seed=1)
    make_shards(str(folk), pieces=40, files=2, seed=2)  # same tokenizer, other pieces
    model, cache = tmp_path / "model", ["--cache-dir", str(tmp_path / "cache")]
    r = _train([str(bach), str(model), "--epochs", "1", *TINY, *cache])
    assert r.returncode == 0, r.stderr[-3000:]
    before = _snapshot(model)

    # --resume on other shards used to continue the Bach model on folk data and overwrite run.json
    for extra in (["--resume", "--epochs", "2"], ["--epochs", "1"]):
        r = _train([str(folk), str(model), *extra, *TINY, *cache])
        assert r.returncode == 2, r.stderr[-3000:]
        line = r.stderr.strip().splitlines()[-1]
        assert str(bach) in line and str(folk) in line and "manifest sha256" in line, line
        assert _snapshot(model) == before

    # the same shards copied elsewhere (same manifest bytes): the run continues from them
    copy = tmp_path / "copy-of-bach"
    shutil.copytree(bach, copy)
    r = _train([str(copy), str(model), "--resume", "--epochs", "2", *TINY, *cache])
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((model / "run.json").read_text())
    assert run["shards"] == str(copy)
    epochs = [json.loads(x)["epoch"] for x in (model / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]

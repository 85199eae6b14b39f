"""`midiforge demo` end to end at a tiny size: the demo's own code path (corpus export on Ray,
preprocess, train, generate, evaluate, report, the check against the corpus), with real Ray and a
real TensorFlow training, on 16 chorales and a tiny model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT = 600


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "midiforge.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


TINY = ["--chorales", "16", "--split", "0.5,0.25,0.25", "--transpose", "-1..1", "--epochs", "2",
        "--steps-per-epoch", "3", "--lstm-units", "16", "--embedding-dim", "8", "--batch-size", "4",
        "--seq-len", "32", "--pieces", "3", "--max-tokens", "48", "--primer-length", "16", "--workers", "2",
        "--no-audio", "--progress", "none"]


@pytest.mark.timeout(TIMEOUT + 120)
def test_demo_tiny_end_to_end(tmp_path):
    out = tmp_path / "demo-out"
    res = _run(["demo", "--out", str(out), *TINY], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    # every stage's output, complete (each writes manifest.json last)
    assert len(list((out / "corpus").glob("*.mid"))) == 16
    for stage in ("tokens", "model", "pieces"):
        assert (out / stage / "manifest.json").exists(), stage
    tokens = json.loads((out / "tokens" / "manifest.json").read_text())
    assert tokens["pieces"] == 16 and tokens["rows"] > 16  # transposed copies of the training chorales
    midi = sorted((out / "pieces" / "midi" / "final").glob("*.mid"))
    assert len(midi) == 3

    # the report, and the figures of evaluate in its JSON
    index = out / "report" / "index.html"
    assert index.exists() and index.stat().st_size > 1000
    evaluation = json.loads((out / "report" / "evaluate.json").read_text())
    assert evaluation["generated"]["pieces"] == 3
    assert evaluation["reference"]["split"] == "test" and evaluation["reference"]["pieces"] >= 1
    for name in ("pitch_class_entropy", "scale_consistency", "polyphony", "pitch_range"):
        m = evaluation["metrics"][name]
        assert m["generated"]["mean"] is not None and m["reference"]["mean"] is not None, name
    assert evaluation["identical_pieces"]["generated"] == 0  # sampled from different primers
    loss = evaluation["loss"]
    assert loss["model_nats_per_token"] > 0 and loss["ngram5_nats_per_token"] > 0 and loss["targets"] > 0

    # the demo's check against its corpus, and what it printed last
    check = json.loads((out / "report" / "demo-check.json").read_text())
    assert check["corpus_pieces"] == 16 and check["generated_pieces"] == 3
    assert set(check["targets"]) == {"pitch_class_entropy", "scale_consistency", "polyphony", "pitch_range",
                                     "identical_pieces", "held_out_loss"}
    low, high = check["targets"]["pitch_range"]["corpus"]
    assert 20 <= low < high <= 100
    assert check["targets"]["held_out_loss"]["model"] == loss["model_nats_per_token"]
    last = res.stdout.strip().splitlines()[-1]
    assert last == f"demo: open the report: {index}", res.stdout[-2000:]
    assert "pitch_class_entropy:" in res.stdout and "held-out loss" in res.stdout
    # no TensorFlow start-up noise for a user who did nothing wrong
    for noise in ("oneDNN custom operations", "absl::InitializeLog", "cuInit", "Could not find cuda drivers"):
        assert noise not in res.stderr, res.stderr[-3000:]

    # the same command again: everything is finished, nothing is redone, the report is written again
    mtime = (out / "model" / "manifest.json").stat().st_mtime
    res2 = _run(["demo", "--out", str(out), *TINY], tmp_path)
    assert res2.returncode == 0, res2.stdout[-3000:] + res2.stderr[-3000:]
    assert "is finished" in res2.stdout
    assert (out / "model" / "manifest.json").stat().st_mtime == mtime
    assert res2.stdout.strip().splitlines()[-1] == f"demo: open the report: {index}"

    # the generation guards, on the demo's model: greedy from BOS makes the same piece every time
    greedy = _run(["generate", str(out / "model"), str(tmp_path / "greedy"), "--num-pieces", "3", "--greedy",
                   "--seed", "0", "--max-tokens", "24", "--workers", "1", "--no-progress"], tmp_path)
    assert greedy.returncode == 0, greedy.stderr[-3000:]
    assert "--greedy always takes the most likely token" in greedy.stderr
    assert "all 3 pieces will be the same" in greedy.stderr
    assert "2 of the final pieces are identical to an earlier piece" in greedy.stderr, greedy.stderr[-3000:]
    manifest = json.loads((tmp_path / "greedy" / "manifest.json").read_text())
    assert manifest["identical_pieces"] == {"final": 2}


def test_same_pieces_warning_settings():
    from midiforge.model.sampling import SamplingSettings
    from midiforge.pipeline.generate import GenerateSettings, same_pieces_warning

    def warn(n=4, **kw):
        primer = kw.pop("primer", "none")
        return same_pieces_warning(GenerateSettings(sampling=SamplingSettings(**kw), primer=primer,
                                                    primer_path=None if primer == "none" else "x"), n)

    assert warn(greedy=True) and "all 4 pieces will be the same" in warn(greedy=True)
    assert "--top-k 1" in warn(top_k=1)
    assert "--primer-midi" in warn(greedy=True, primer="midi")
    assert warn(greedy=True, primer="shards") is None  # each piece has its own primer window
    assert warn(n=1, greedy=True) is None
    assert warn(top_k=2) is None and warn() is None

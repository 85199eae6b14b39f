"""The stages chained through their real CLIs, each in its own subprocess (bounded, stopped on failure):
preprocess a few real Nottingham tunes in 3/4 and 6/8 -> train one short epoch -> generate with
--primer-shards; every piece starts in the meter of the tune its primer comes from (in its MIDI file).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys


from corpora import corpus
from midiforge.music.readers import read_piece
from midiforge.pipeline import pieces, tokens
from midiforge.storage import open_store, read_manifest
from train_helpers import SMALL, worker_env

#: real tunes: 3/4 (waltzes) and 6/8 (jigs) of the Nottingham corpus
TUNES = {"ashover1.mid": (3, 4), "ashover15.mid": (3, 4), "ashover37.mid": (3, 4), "ashover39.mid": (3, 4),
         "ashover11.mid": (6, 8), "ashover14.mid": (6, 8), "ashover18.mid": (6, 8), "ashover21.mid": (6, 8)}


def _cli(*args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """``midiforge ARGS`` in its own process group; the group is killed on a timeout or any failure."""
    proc = subprocess.Popen([sys.executable, "-m", "midiforge.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env or worker_env(RAY_ADDRESS=""))
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None or proc.returncode != 0:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
    assert proc.returncode == 0, f"midiforge {args[0]} exited {proc.returncode}:\n{err[-4000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_preprocess_train_generate_keeps_the_primers_meter(tmp_path):
    src = tmp_path / "tunes"
    src.mkdir()
    nottingham = corpus("nottingham")
    for name, ts in TUNES.items():
        shutil.copy(nottingham / name, src / name)
        assert read_piece(name, (src / name).read_bytes()).time_signature == ts  # what the reader gives
    data, model, out = tmp_path / "tokens", tmp_path / "model", tmp_path / "pieces"

    # preprocess: every tune a row, with its own time signature
    _cli("preprocess", str(src), str(data), "--split", "0.5,0.5,0", "--seed", "1", "--no-progress", timeout=600)
    store = open_store(str(data))
    manifest = read_manifest(store)
    assert manifest["pieces"] == len(TUNES) and manifest["failures"] == 0
    assert manifest["splits"]["train"] > 0 and manifest["splits"]["validation"] > 0
    rows = [r for s in manifest["shards"] for r in tokens.read_shard(store, s["path"], entry=s).to_pylist()]
    meter = {r["source"]: (r["ts_numerator"], r["ts_denominator"]) for r in rows}
    assert meter == TUNES
    # evaluate's reference set decodes each tune in its own meter
    from midiforge.pipeline.piece_sets import load_token_set
    ref, _tok = load_token_set(str(data), "validation")
    assert ref.names and all(p.time_signature == TUNES[n] for n, p in zip(ref.names, ref.pieces))

    # train: one short epoch on them
    _cli("train", str(data), str(model), "--epochs", "1", *SMALL, "--seq-len", "16",
         "--cache-dir", str(tmp_path / "cache"), timeout=600, env=worker_env(RAY_ADDRESS=""))
    assert (model / "bundle" / "manifest.json").exists() or any(model.rglob("manifest.json"))

    # generate: each piece from a window of a validation tune
    res = _cli("generate", str(model), str(out), "-n", "4", "--seed", "3", "--max-tokens", "24",
               "--primer-shards", str(data), "--primer-split", "validation", "--primer-length", "20",
               "--workers", "0", "--no-progress", timeout=600)
    assert json.loads(res.stdout.splitlines()[0])["pieces"] == 4
    made = pieces.read_pieces(str(out), columns=["primer_source", "midi", "midi_path", "checkpoint", "index"])
    assert made.num_rows == 4
    validation = {r["source"] for r in rows if r["split"] == "validation"}
    seen = set()
    for r in made.to_pylist():
        assert r["primer_source"] in validation
        want = TUNES[r["primer_source"]]
        # in the MIDI bytes of the piece and in its file: the meter of its primer's tune, not 4/4
        assert read_piece("p.mid", r["midi"]).time_signature == want
        assert read_piece("p.mid", (out / r["midi_path"]).read_bytes()).time_signature == want
        seen.add(want)
    assert seen and (4, 4) not in seen

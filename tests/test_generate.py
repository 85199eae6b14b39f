"""generate: NumPy engine vs Keras, greedy vs a plain loop, seeds across batch sizes and Ray workers,
resume, checkpoints, primers, MIDI readable by symusic and music21, metrics, S3, bad input.

One tiny LSTM is trained for a few steps on real tokens (events tokenizer on files of the shared
``ff`` corpus) and written as a MODEL_DIR with two checkpoints and a final bundle by the bundle
module's writer; shards in preprocess's format hold the same real tokens for shard primers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from corpora import midi_files
from midiforge.cli import main as cli_main
from midiforge.errors import MidiforgeError
from midiforge.model.decode import KerasLSTM, Limits, NumpyLSTM, PieceJob, decode
from midiforge.model.sampling import (
    SamplingSettings, choose, draw, piece_rng, repetition_penalty, softmax, top_k_mask, top_p_mask,
)
from midiforge.music import metrics as M
from midiforge.music.midi_io import piano_roll_png, piece_to_midi
from midiforge.music.piece import Piece
from midiforge.music.primer import encode_primer, start_primer
from midiforge.music.readers import read_piece
from midiforge.music.tokenizers import BOS_ID, EOS_ID, PAD_ID, UNK_ID, make_tokenizer
from midiforge.pipeline import pieces
from midiforge.pipeline.generate import GenerateSettings, numpy_weights, run_generate
from midiforge.storage import file_entry, open_store, read_manifest, verify_store, write_manifest
from midiforge.pipeline import tokens
from midiforge.storage.shards import int_lists

N_FILES = 4


# ---------------------------------------------------------------------------------------------
# fixtures: a tiny trained model dir, shards of real tokens
# ---------------------------------------------------------------------------------------------
def _weights_bytes(model) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.weights.h5")
        model.save_weights(path)
        return Path(path).read_bytes()


@pytest.fixture(scope="module")
def corpus():
    files = midi_files("ff")[:N_FILES]
    tok = make_tokenizer("events")
    pieces = [read_piece(f.name, f.read_bytes()) for f in files]
    return {"files": files, "tok": tok, "pieces": pieces, "ids": [tok.encode(p) for p in pieces]}


@pytest.fixture(scope="module")
def model_dir(corpus, tmp_path_factory):
    """MODEL_DIR: checkpoints/epoch-0001, epoch-0002 (+ index.json) and bundle/ (= epoch 2)."""
    from midiforge.model.bundle import INDEX, checkpoint_dir
    from midiforge.pipeline.bundles import write_bundle
    from midiforge.model.lstm import ModelConfig, build_model, tf_keras

    _tf, keras = tf_keras()
    keras.utils.set_random_seed(11)
    tok = corpus["tok"]
    stream = np.concatenate(corpus["ids"])
    seq = 32
    n = (len(stream) - 1) // seq
    x, y = stream[:n * seq].reshape(n, seq), stream[1:n * seq + 1].reshape(n, seq)
    cfg = ModelConfig(vocab_size=tok.vocab_size, embedding_dim=16, lstm_units=(48, 32), dropout=0.0,
                      tokenizer_id=tok.id)
    model = build_model(cfg)
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    root = tmp_path_factory.mktemp("model")
    store = open_store(str(root))
    index = []
    for epoch in (1, 2):
        hist = model.fit(x, y, batch_size=32, epochs=1, verbose=0)
        data = write_bundle(store, checkpoint_dir(epoch), config=cfg, tokenizer_json=tok.to_json(),
                            training={"qpm_median": 100.0, "epochs_done": epoch}, weights=_weights_bytes(model))
        index.append({"epoch": epoch, "val_loss": float(hist.history["loss"][-1]), "val_accuracy": None,
                      "path": checkpoint_dir(epoch), "sha256": hashlib.sha256(data).hexdigest()})
    store.write_bytes(INDEX, json.dumps({"checkpoints": index, "best": 2, "latest": 2}).encode())
    write_bundle(store, "bundle", config=cfg, tokenizer_json=tok.to_json(),
                 training={"qpm_median": 100.0, "epochs_done": 2}, weights=_weights_bytes(model))
    return str(root)


@pytest.fixture(scope="module")
def bundle(model_dir):
    from midiforge.pipeline.bundles import load_bundle

    return load_bundle(model_dir)


@pytest.fixture(scope="module")
def engine(bundle):
    return NumpyLSTM(numpy_weights(bundle))


@pytest.fixture(scope="module")
def shards_dir(corpus, tmp_path_factory):
    """A preprocess output (shards/part-00000.parquet, tokenizer.json, manifest.json) of the real tokens."""
    tok, ids = corpus["tok"], corpus["ids"]
    root = str(tmp_path_factory.mktemp("shards"))
    store = open_store(root)
    ts_num, ts_den = tokens.time_signature_columns([p.time_signature for p in corpus["pieces"]])
    t = tokens.rows_table({
        "piece_id": [hashlib.sha256(f.read_bytes()).hexdigest() for f in corpus["files"]],
        "source": [f.name for f in corpus["files"]], "split": ["train"] * len(ids),
        "transpose": pa.array([0] * len(ids), pa.int8()), "tokens": int_lists(ids),
        "n_tokens": pa.array([len(i) for i in ids], pa.int32()),
        "n_notes": pa.array([len(p) for p in corpus["pieces"]], pa.int32()),
        "seconds": [p.seconds for p in corpus["pieces"]], "qpm": [p.qpm for p in corpus["pieces"]],
        "tokenizer": [tok.id] * len(ids), "ts_numerator": ts_num, "ts_denominator": ts_den,
    })
    shard = tokens.write_shard(store, 0, t)
    tok_bytes = tok.to_json().encode()
    store.write_bytes("tokenizer.json", tok_bytes)
    write_manifest(store, {"stage": "preprocess", "tokenizer": tok.id, "qpm_median": 100.0, "shards": [shard],
                           "files": [file_entry("tokenizer.json", tok_bytes),
                                     {k: shard[k] for k in ("path", "bytes", "sha256")}]})
    return root


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A private local Ray with 2 CPUs, started while the S3 test credentials are in the environment
    (its workers inherit them).  address="local": never join a `ray start` cluster of this machine."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _jobs(corpus, n: int, primer_len: int = 12) -> list[PieceJob]:
    """Pieces with different primers: BOS+tempo, and windows of real pieces of different lengths."""
    tok = corpus["tok"]
    jobs = []
    for i in range(n):
        if i % 3 == 0:
            primer = start_primer(tok, 100.0)
        else:
            src = corpus["ids"][i % len(corpus["ids"])]
            primer = src[: primer_len + i]
        jobs.append(PieceJob(i, np.asarray(primer, np.int32), 100.0))
    return jobs


def _pieces(dest: str) -> pa.Table:
    return pieces.read_pieces(dest)


def _tokens(dest: str) -> dict:
    t = _pieces(dest)
    return {(c, i): tuple(tok) for c, i, tok in zip(t["checkpoint"].to_pylist(), t["index"].to_pylist(),
                                                      t["tokens"].to_pylist())}


# ---------------------------------------------------------------------------------------------
# the engine and the decoding loop
# ---------------------------------------------------------------------------------------------
def test_numpy_engine_equals_keras_predictions(bundle, engine, corpus):
    model = bundle.build()
    x = np.stack([ids[:60] for ids in corpus["ids"]]).astype(np.int32)
    ref = model(x, training=False).numpy().astype(np.float64)
    engine.begin(len(x))
    got = np.stack([engine.step(x[:, t]) for t in range(x.shape[1])], axis=1)
    assert np.abs(ref).max() > 1.0  # a trained model with real spread in its logits
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert np.abs(got - ref).max() < 2e-5 * np.abs(ref).max() + 1e-5
    f32 = NumpyLSTM(numpy_weights(bundle), dtype=np.float32)  # --precision float32
    f32.begin(len(x))
    got32 = np.stack([f32.step(x[:, t]) for t in range(x.shape[1])], axis=1)
    assert np.abs(got32 - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_greedy_equals_plain_reference_loop_and_stateful_keras(bundle, engine, corpus):
    """The tutorial's argmax, but on the whole prefix each step (a plain, obviously right loop)."""
    model = bundle.build()
    jobs = _jobs(corpus, 3)
    steps = 30
    ref = []
    for job in jobs:
        seq = list(job.primer)
        for _ in range(steps):
            logits = model(np.array([seq], np.int32), training=False).numpy()[0, -1].astype(np.float64)
            logits[[PAD_ID, BOS_ID, UNK_ID]] = -np.inf
            seq.append(int(np.argmax(logits)))
            if seq[-1] == EOS_ID:
                break
        ref.append(seq)
    greedy = SamplingSettings(greedy=True)
    got = decode(engine, jobs, greedy, seed=0, limits=Limits(steps), batch_size=3)
    assert [r.tokens.tolist() for r in got] == ref
    keras_engine = KerasLSTM(bundle, batch_size=3)
    got_keras = decode(keras_engine, jobs, greedy, seed=0, limits=Limits(steps), batch_size=3)
    assert [r.tokens.tolist() for r in got_keras] == ref


def test_top_k_one_equals_greedy(engine, corpus):
    jobs = _jobs(corpus, 4)
    greedy = decode(engine, jobs, SamplingSettings(greedy=True), 5, Limits(40), 4)
    top1 = decode(engine, jobs, SamplingSettings(top_k=1, temperature=1.7), 5, Limits(40), 4)
    assert [r.tokens.tolist() for r in top1] == [r.tokens.tolist() for r in greedy]


def test_same_seed_same_tokens_whatever_the_batch(engine, corpus):
    jobs = _jobs(corpus, 7)
    s = SamplingSettings(temperature=1.1, top_p=0.95, repetition_penalty=1.3, repetition_window=16)
    runs = {b: [r.tokens.tolist() for r in decode(engine, jobs, s, 42, Limits(60), b)] for b in (1, 3, 7)}
    assert runs[1] == runs[3] == runs[7]
    alone = decode(engine, [jobs[5]], s, 42, Limits(60), 1)[0].tokens.tolist()   # without the others
    assert alone == runs[7][5]
    other = [r.tokens.tolist() for r in decode(engine, jobs, s, 43, Limits(60), 7)]
    assert other != runs[7]
    assert len({tuple(t) for t in runs[7]}) == len(jobs)  # pieces differ from each other


def test_max_seconds_stops_at_the_note_that_reaches_it(engine, corpus):
    tok = corpus["tok"]
    jobs = [PieceJob(i, start_primer(tok, 100.0), 100.0) for i in range(4)]
    res = decode(engine, jobs, SamplingSettings(top_k=20), 9, Limits(400, 3.0), 4, tok)
    assert {r.stop for r in res} <= {"max_seconds", "eos"}
    for r in res:
        if r.stop != "max_seconds":
            continue
        seconds = tok.decode(r.tokens).end() * 60 / 100.0
        before = tok.decode(r.tokens[:-1]).end() * 60 / 100.0
        assert seconds >= 3.0 > before


def test_sampling_building_blocks():
    logits = np.log(np.array([[0.0, 0.0, 0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.1, 0.0, 0.1, 0.8]]) + 1e-300)
    p = top_p_mask(softmax(logits.copy()), 0.7)
    assert (p[0] > 0).tolist() == [False, False, True, False, True, False]  # 0.5 then 0.3 reaches 0.7
    assert (p[1] > 0).tolist() == [False, False, False, False, False, True]
    k = top_k_mask(np.array([[1.0, 3.0, 3.0, 2.0]]), 2)
    assert np.isfinite(k).tolist() == [[False, True, True, False]]  # ties go to the lower ids
    pen = repetition_penalty(np.array([[2.0, -2.0, 2.0]]), np.array([[0, 1, -1]]), 2.0)
    assert pen.tolist() == [[1.0, -4.0, 2.0]]
    probs = np.array([[0.0, 0.5, 0.0, 0.5]] * 4)
    assert draw(probs, np.array([0.0, 0.49, 0.5, 0.999])).tolist() == [1, 1, 3, 3]
    # each row's draw depends on its own generator only
    rows = np.log(np.full((3, 8), 1 / 8))
    a = choose(rows, SamplingSettings(), rngs=[piece_rng(1, i) for i in range(3)])
    b = choose(rows[2:], SamplingSettings(), rngs=[piece_rng(1, 2)])
    assert a[2] == b[0]
    assert not {PAD_ID, BOS_ID, UNK_ID} & set(choose(np.zeros((200, 8)), SamplingSettings(),
                                                      rngs=[piece_rng(0, i) for i in range(200)]).tolist())
    for bad in (dict(temperature=0), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(repetition_penalty=0.5)):
        with pytest.raises(MidiforgeError):
            SamplingSettings(**bad).validate()


# ---------------------------------------------------------------------------------------------
# music: metrics, MIDI files, primers
# ---------------------------------------------------------------------------------------------
def test_metrics_follow_muspy_definitions():
    # C major triad for a quarter, then a rest, then E alone for two quarters (res 24 ticks/quarter)
    p = Piece.from_columns([60, 64, 67, 64], [0, 0, 0, 2], [1, 1, 1, 2], [80] * 4, [0] * 4)
    assert M.pitch_class_entropy(p) == pytest.approx(-(0.25 * math.log2(0.25) * 2 + 0.5 * math.log2(0.5)))
    assert M.scale_consistency(p) == 1.0
    assert M.pitch_range(p) == 7
    assert M.polyphony(p) == pytest.approx((3 * 24 + 2 * 24) / (24 + 48))
    # length 4 quarters -> 5 beats (0..4); beats touched: 0,1 (the triad ends on beat 1) and 2,3,4
    assert M.empty_beat_rate(p) == pytest.approx(0.0)
    gap = Piece.from_columns([60, 62], [0, 3.5], [0.5, 0.5], [80, 80], [0, 0])
    assert M.empty_beat_rate(gap) == pytest.approx(1 - 3 / 5)  # beats 0, 3 and 4 (ends on line 4) of 0..4
    chromatic = Piece.from_columns(list(range(60, 72)), list(range(12)), [1] * 12, [80] * 12, [0] * 12)
    assert M.pitch_class_entropy(chromatic) == pytest.approx(math.log2(12))
    assert M.scale_consistency(chromatic) == pytest.approx(7 / 12)
    drums = Piece.from_columns([36, 38], [0, 1], [1, 1], [80, 80], [128, 128])
    assert math.isnan(M.pitch_class_entropy(drums)) and M.pitch_range(drums) == 0 and math.isnan(M.polyphony(drums))
    assert M.longest_repeat([5, 5, 6, 6, 6, 7]) == 3 and M.longest_repeat([]) == 0
    assert M.distinct_4gram_ratio([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(4 / 5)
    assert math.isnan(M.distinct_4gram_ratio([1, 2, 3]))


def test_midi_writer_round_trips_through_symusic_and_music21():
    import symusic
    from music21 import midi as m21midi

    p = Piece.from_columns([60, 64, 36, 72], [0, 0.5, 0, 1.25], [0.5, 1, 0.25, 0.75], [90, 70, 100, 60],
                           [0, 0, 128, 40], qpm=96.0, time_signature=(3, 4))
    data = piece_to_midi(p)
    score = symusic.Score.from_midi(data)
    assert score.tempos[0].qpm == pytest.approx(96.0, rel=1e-3)
    assert (score.time_signatures[0].numerator, score.time_signatures[0].denominator) == (3, 4)
    back = read_piece("x.mid", data)
    assert sorted(zip(back.pitch.tolist(), back.start.tolist(), back.duration.tolist(), back.program.tolist())) == \
        sorted(zip(p.pitch.tolist(), p.start.tolist(), p.duration.tolist(), p.program.tolist()))
    mf = m21midi.MidiFile()
    mf.readstr(data)
    assert len(m21midi.translate.midiFileToStream(mf).flatten().notes) >= 3
    png = piano_roll_png(p)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" in png[-12:]


def test_primers(corpus):
    tok = corpus["tok"]
    ids, mapped = encode_primer(tok, corpus["pieces"][0], qpm=100.0)
    assert mapped == 0 and ids[0] == BOS_ID and ids[-1] != EOS_ID
    assert ids[1] == tok.tempo_base + tok.tempo_bin(100.0)
    classic = make_tokenizer("classic").with_vocab(["C4", "E4", "G5", "0.4.7", "2.5.9"])
    assert classic.vocab[classic.nearest_known("F4")] == "E4"
    assert classic.vocab[classic.nearest_known("0.4.8")] == "0.4.7"
    assert classic.vocab[classic.nearest_known("C#6")] == "G5"
    piece = Piece.from_columns([61, 60, 64, 67], [0, 1, 1, 1], [1, 1, 1, 1], [80] * 4, [0] * 4)
    ids, mapped = encode_primer(classic, piece)
    assert mapped == 1 and [classic.vocab[i] for i in ids[1:]] == ["C4", "0.4.7"]


# ---------------------------------------------------------------------------------------------
# the stage: Ray workers, resume, checkpoints, S3, bad input
# ---------------------------------------------------------------------------------------------
def _check_outputs(dest: str, n: int, labels=("final",)) -> pa.Table:
    import symusic
    from music21 import midi as m21midi

    manifest = read_manifest(open_store(dest))
    assert manifest["pieces"] == n * len(labels)
    assert verify_store(open_store(dest)).ok
    t = _pieces(dest)
    assert sorted(set(t["checkpoint"].to_pylist())) == sorted(labels)
    for col in ("piece_id", "seed", "index", "temperature", "top_k", "top_p", "repetition_penalty", "bundle_sha256",
                "tokens", "n_notes", "seconds", "midi_path", *M.METRICS):
        assert col in t.column_names
    assert t.schema.equals(pieces.SCHEMA)
    assert sum(s["rows"] for s in manifest["shards"]) == n * len(labels)  # every piece in exactly one shard
    assert sorted(s["path"] for s in manifest["shards"]) == sorted(pieces.list_shards(open_store(dest)))
    for rel, n_notes, midi in zip(t["midi_path"].to_pylist(), t["n_notes"].to_pylist(), t["midi"].to_pylist()):
        data = Path(dest, rel).read_bytes()
        assert data == midi  # the shard holds the file's bytes
        assert symusic.Score.from_midi(data).note_num() == n_notes
        mf = m21midi.MidiFile()
        mf.readstr(data)
        m21midi.translate.midiFileToStream(mf)
    return t


def test_ray_workers_and_batch_sizes_give_the_same_pieces(ray_cluster, model_dir, shards_dir, tmp_path):
    settings = GenerateSettings(sampling=SamplingSettings(temperature=1.0, top_p=0.98), limits=Limits(80),
                                primer="shards", primer_path=shards_dir, primer_length=24, piano_roll=True)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ma = run_generate(model_dir, a, 6, settings, seed=7, batch_size=4, workers=1, progress=False)
    mb = run_generate(model_dir, b, 6, settings, seed=7, batch_size=2, workers=2, progress=False)
    assert ma["run"]["workers"] == 1 and mb["run"]["workers"] == 2
    assert ma["run"]["batches_per_worker"] == [2] and mb["run"]["batches_per_worker"] == [2, 1]
    assert _tokens(a) == _tokens(b)
    t = _check_outputs(a, 6)
    assert t["primer"].to_pylist() == ["shards"] * 6 and all(s.endswith(".mid") for s in t["primer_source"].to_pylist())
    assert all(Path(a, p).read_bytes()[:4] == b"\x89PNG" for p in t["png_path"].to_pylist())
    assert t["piece_id"].to_pylist()[0] == "final-s7-000000" and t["midi_path"][0].as_py() == "midi/final/s7-000000.mid"
    assert ma["tokens_per_second"] > 0 and ma["run"]["worker_peak_rss_bytes"] > 0
    # a cluster that cannot hold the actors: refused before anything is written
    with pytest.raises(MidiforgeError, match="GPUs"):
        run_generate(model_dir, str(tmp_path / "gpu"), 2, settings, seed=7, workers=1, num_gpus_per_worker=1,
                     progress=False)
    assert not (tmp_path / "gpu").exists()


def test_resume_makes_only_the_missing_pieces(model_dir, tmp_path):
    settings = GenerateSettings(sampling=SamplingSettings(top_k=30), limits=Limits(50))
    full, dest = str(tmp_path / "full"), str(tmp_path / "dest")
    run_generate(model_dir, full, 7, settings, seed=3, batch_size=7, workers=0, progress=False)
    run_generate(model_dir, dest, 5, settings, seed=3, batch_size=2, workers=0, progress=False)
    # an interrupted run: the batch of pieces 2-3 never finished, no manifest
    os.remove(os.path.join(dest, "pieces", "final", "part-000000002.parquet"))
    os.remove(os.path.join(dest, "manifest.json"))
    with pytest.raises(MidiforgeError, match="--resume"):
        run_generate(model_dir, dest, 7, settings, seed=3, batch_size=2, workers=0, progress=False)
    with pytest.raises(MidiforgeError, match="settings"):
        other = GenerateSettings(sampling=SamplingSettings(top_k=31), limits=Limits(50))
        run_generate(model_dir, dest, 7, other, seed=3, batch_size=2, workers=0, resume=True, progress=False)
    m = run_generate(model_dir, dest, 7, settings, batch_size=3, workers=0, resume=True, progress=False)
    assert m["seed"] == 3 and m["run"]["pieces"] == 4  # pieces 2, 3 (lost) and 5, 6 (new N)
    assert m["run"]["batches_per_worker"] == [2]  # a batch never spans a gap: [2, 3] and [5, 6]
    assert [s["first"] for s in m["shards"]] == [0, 2, 4, 5]
    assert _tokens(dest) == _tokens(full)
    _check_outputs(dest, 7)
    again = run_generate(model_dir, dest, 7, settings, workers=0, resume=True, progress=False)
    assert again["run"]["pieces"] == 0 and again["pieces"] == 7


def _objects(dest) -> list[str]:
    return [o.path for o in open_store(str(dest)).list()]


def test_no_midi_files_keeps_every_piece_in_the_shards(model_dir, tmp_path):
    """--no-midi-files: no per-piece object, and the shards hold the bytes each file would have had."""
    import symusic

    a, b = tmp_path / "files", tmp_path / "nofiles"
    common = ["-n", "5", "--seed", "4", "--max-tokens", "40", "--top-k", "20", "--piano-roll", "--workers", "0",
              "--no-progress", "--batch-size", "2"]
    assert cli_main(["generate", model_dir, str(a), *common]) == 0
    assert cli_main(["generate", model_dir, str(b), *common, "--no-midi-files"]) == 0
    objects = _objects(b)
    assert not [o for o in objects if o.startswith(("midi/", "png/"))], objects
    assert sorted(objects) == sorted(["manifest.json", "_work/settings.json", *pieces.list_shards(open_store(str(b)))])
    assert len(pieces.list_shards(open_store(str(b)))) == 3  # batches of 2, 2, 1
    m = read_manifest(open_store(str(b)))
    assert m["settings"]["midi_files"] is False and m["pieces"] == 5
    assert sorted(f["path"] for f in m["files"]) == sorted(s["path"] for s in m["shards"])
    assert verify_store(open_store(str(b))).ok
    with_files, t = _pieces(str(a)), _pieces(str(b))
    assert t["midi_path"].null_count == 5 and t["png_path"].null_count == 5
    assert t["tokens"].to_pylist() == with_files["tokens"].to_pylist()
    for row, ref in zip(t.to_pylist(), with_files.to_pylist()):
        file_bytes = (a / ref["midi_path"]).read_bytes()
        assert hashlib.sha256(row["midi"]).hexdigest() == hashlib.sha256(file_bytes).hexdigest() == row["midi_sha256"]
        assert len(row["midi"]) == row["midi_bytes"]
        assert symusic.Score.from_midi(row["midi"]).note_num() == row["n_notes"]
        assert row["png"] == (a / ref["png_path"]).read_bytes() and row["png"][:4] == b"\x89PNG"
    # the files can be made later from the shards, under the names --midi-files gives them
    assert pieces.export_midi(str(b), str(tmp_path / "exported")) == 5
    for ref in with_files.to_pylist():
        assert (tmp_path / "exported" / ref["midi_path"]).read_bytes() == (a / ref["midi_path"]).read_bytes()
    # --resume keeps the layout of the run it continues
    with pytest.raises(MidiforgeError, match="settings"):
        run_generate(model_dir, str(b), 6, GenerateSettings(sampling=SamplingSettings(top_k=20), limits=Limits(40),
                                                            piano_roll=True), workers=0, resume=True, progress=False)


def test_read_and_iter_pieces_round_trip(model_dir, tmp_path):
    dest = str(tmp_path / "out")
    settings = GenerateSettings(sampling=SamplingSettings(top_k=30), limits=Limits(30))
    run_generate(model_dir, dest, 7, settings, seed=8, checkpoint="all", batch_size=3, workers=0, progress=False)
    store = open_store(dest)
    manifest = read_manifest(store)
    table = pieces.read_pieces(dest)
    assert table.schema.equals(pieces.SCHEMA) and table.num_rows == 21
    labels = ["epoch-0001", "epoch-0002", "final"]
    assert list(zip(table["checkpoint"].to_pylist(), table["index"].to_pylist())) == \
        [(c, i) for c in labels for i in range(7)]  # piece order
    assert [(s["checkpoint"], s["first"], s["rows"]) for s in manifest["shards"]] == \
        [(c, f, r) for c in labels for f, r in ((0, 3), (3, 3), (6, 1))]
    assert manifest["shards"][0]["path"] == pieces.shard_rel(0, "epoch-0001") == "pieces/epoch-0001/part-000000000.parquet"
    batches = list(pieces.iter_pieces(dest))
    assert all(isinstance(b, pa.RecordBatch) for b in batches)
    assert pa.Table.from_batches(batches).equals(table)
    # only some columns, from a Store object too
    some = pieces.read_pieces(store, columns=["tokens", "piece_id"])
    assert some.column_names == ["tokens", "piece_id"] and some.equals(table.select(["tokens", "piece_id"]))
    idx = pa.Table.from_batches(list(pieces.iter_pieces(store, columns=["index"])))
    assert idx.column_names == ["index"] and idx["index"].to_pylist() == list(range(7)) * 3
    # what each shard holds is one batch's rows as written
    for entry in manifest["shards"]:
        t = pq_read(Path(dest, entry["path"]))
        assert t.num_rows == entry["rows"] and t["index"].to_pylist() == list(range(entry["first"], entry["first"] + entry["rows"]))
    with pytest.raises(MidiforgeError, match="no column 'midi_file'"):
        pieces.read_pieces(dest, columns=["midi_file"])
    with pytest.raises(MidiforgeError, match="not a pieces table: .*tokens"):
        pieces.write_shard(store, pieces.shard_rel(99), table.drop_columns(["tokens"]))
    # a shard replaced by another file, one that is gone, no manifest: errors naming the file
    shard = Path(dest, manifest["shards"][1]["path"])
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    with pytest.raises(MidiforgeError, match=f"{shard.name}: not a readable pieces shard"):
        pieces.read_pieces(dest)
    shard.unlink()
    with pytest.raises(MidiforgeError, match=f"{shard.name}: no such file"):
        list(pieces.iter_pieces(dest))
    with pytest.raises(MidiforgeError, match="no manifest"):
        pieces.read_pieces(str(tmp_path / "nothing"))


def pq_read(path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def test_late_writer_and_smaller_n_leave_each_piece_once(model_dir, tmp_path):
    """A batch cut differently by an earlier run that finished late overlaps two shards: a resume keeps
    each piece once (the shards that overlap lose the rows held before); a smaller N drops the rest."""
    settings = GenerateSettings(sampling=SamplingSettings(top_k=30), limits=Limits(30))
    dest = str(tmp_path / "d")
    run_generate(model_dir, dest, 8, settings, seed=5, batch_size=4, workers=0, progress=False)
    store = open_store(dest)
    clean = _tokens(dest)
    late = pieces.read_pieces(dest)
    late = late.filter(pa.array([2 <= i <= 5 for i in late["index"].to_pylist()]))
    pieces.write_shard(store, pieces.shard_rel(2), late)  # pieces 2..5 again
    m = run_generate(model_dir, dest, 8, settings, workers=0, resume=True, progress=False)
    assert m["run"]["pieces"] == 0 and m["pieces"] == 8
    # part-000000002 keeps pieces 4, 5 (a rewritten shard keeps its name: "first" says what it holds)
    assert [(s["path"][-13:], s["first"], s["rows"]) for s in m["shards"]] == \
        [("00000.parquet", 0, 4), ("00002.parquet", 4, 2), ("00004.parquet", 6, 2)]
    assert sorted(pieces.list_shards(store)) == [s["path"] for s in m["shards"]]
    assert _tokens(dest) == clean and verify_store(store).ok
    # a resume with a smaller N: pieces 6 and 7 leave the output, their files too
    m = run_generate(model_dir, dest, 6, settings, workers=0, resume=True, progress=False)
    assert m["pieces"] == 6 and [(s["first"], s["rows"]) for s in m["shards"]] == [(0, 4), (4, 2)]
    assert _tokens(dest) == {k: v for k, v in clean.items() if k[1] < 6}
    assert sorted(o for o in _objects(dest) if o.startswith("midi/")) == \
        [f"midi/final/s5-{i:06d}.mid" for i in range(6)]
    report = verify_store(store)
    assert report.ok and report.unlisted == ["_work/settings.json"]


def _generate_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "midiforge.cli", "generate", *args, "--no-progress"]


def test_resume_after_kill_gives_each_piece_once(model_dir, tmp_path):
    """SIGKILL the whole generate job (CLI process, its local Ray and actor) mid-run, resume it with
    another batch size: every piece exactly once, the same tokens as one clean run."""
    dest = tmp_path / "killed"
    n = 160
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(_generate_cli(model_dir, str(dest), "-n", str(n), "--seed", "9", "--max-tokens", "30",
                                          "--top-k", "30", "--batch-size", "2", "--workers", "1"),
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards = dest / "pieces" / "final"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(shards.glob("part-*.parquet"))) >= 3:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        err = proc.communicate(timeout=60)[1]
    assert not (dest / "manifest.json").exists(), "the run finished before it could be killed"
    before = len(list(shards.glob("part-*.parquet")))
    assert 3 <= before < n // 2, err.decode()[-2000:]
    settings = GenerateSettings(sampling=SamplingSettings(top_k=30), limits=Limits(30))
    m = run_generate(model_dir, str(dest), n, settings, batch_size=16, workers=0, resume=True, progress=False)
    assert m["seed"] == 9 and m["pieces"] == n and 0 < m["run"]["pieces"] <= n - 2 * before
    clean = tmp_path / "clean"
    run_generate(model_dir, str(clean), n, settings, seed=9, batch_size=64, workers=0, progress=False)
    assert _tokens(str(dest)) == _tokens(str(clean))
    t = _check_outputs(str(dest), n)
    assert len(set(t["piece_id"].to_pylist())) == n
    assert t["midi_sha256"].to_pylist() == _pieces(str(clean))["midi_sha256"].to_pylist()


def test_every_checkpoint_and_a_midi_primer(model_dir, corpus, tmp_path):
    primer = str(corpus["files"][1])
    settings = GenerateSettings(sampling=SamplingSettings(temperature=0.9), limits=Limits(30), primer="midi",
                                primer_path=primer, qpm=132.0)
    dest = str(tmp_path / "all")
    m = run_generate(model_dir, dest, 2, settings, seed=1, checkpoint="all", workers=0, progress=False)
    assert [b["checkpoint"] for b in m["bundles"]] == ["epoch-0001", "epoch-0002", "final"]
    t = _check_outputs(dest, 2, ("epoch-0001", "epoch-0002", "final"))
    tok = corpus["tok"]
    expected, _ = encode_primer(tok, corpus["pieces"][1], qpm=132.0)
    for row in t.to_pylist():
        assert row["tokens"][:len(expected)] == expected.tolist() and row["primer_length"] == len(expected)
        assert row["qpm"] == 132.0
    by = {(r["checkpoint"], r["index"]): r["tokens"] for r in t.to_pylist()}
    assert by[("epoch-0002", 0)] == by[("final", 0)]  # same weights, same seed: same piece
    assert by[("epoch-0001", 0)] != by[("epoch-0002", 0)]


def test_keras_engine_through_the_stage_agrees_with_numpy(model_dir, tmp_path):
    settings = GenerateSettings(sampling=SamplingSettings(greedy=True), limits=Limits(25), qpm=90.0)
    k, n = str(tmp_path / "keras"), str(tmp_path / "numpy")
    mk = run_generate(model_dir, k, 3, dataclasses.replace(settings, engine="keras"), seed=2, batch_size=2,
                      workers=0, progress=False)
    run_generate(model_dir, n, 3, settings, seed=2, batch_size=3, workers=0, progress=False)
    assert mk["engine"] == "keras" and _pieces(k)["engine"].to_pylist() == ["keras"] * 3
    assert _tokens(k) == _tokens(n)
    assert _pieces(k)["qpm"].to_pylist() == [90.0] * 3


def test_bundle_and_dest_on_s3(ray_cluster, s3_server, model_dir, tmp_path):
    bucket = s3_server.new_bucket()
    model = open_store(bucket + "/model", s3_server.options())
    for p in Path(model_dir, "bundle").iterdir():
        model.put_file(p, f"bundle/{p.name}")
    dest = bucket + "/pieces"
    code = cli_main(["generate", bucket + "/model", dest, "-n", "3", "--seed", "5", "--max-tokens", "40",
                     "--workers", "1", "--no-progress", "--endpoint-url", s3_server.endpoint_url])
    assert code == 0
    out = open_store(dest, s3_server.options())
    assert verify_store(out).ok and read_manifest(out)["pieces"] == 3
    local = str(tmp_path / "local")
    run_generate(model_dir, local, 3, GenerateSettings(limits=Limits(40)), seed=5, workers=0, progress=False)
    t = pieces.read_pieces(dest, s3_server.options())
    assert [b.num_rows for b in pieces.iter_pieces(out, columns=["index"])] == [3]
    assert t["tokens"].to_pylist() == _pieces(local)["tokens"].to_pylist()
    # a bundle whose weights were replaced on the server: refused, nothing written
    model.write_bytes("bundle/model.weights.h5", b"not the weights")
    code = cli_main(["generate", bucket + "/model", bucket + "/bad", "-n", "1", "--workers", "0",
                     "--no-progress", "--endpoint-url", s3_server.endpoint_url])
    assert code == 2 and not open_store(bucket + "/bad", s3_server.options()).list()


def test_bad_input_is_refused_and_nothing_written(model_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(model_dir, broken)
    (broken / "bundle" / "model.weights.h5").write_bytes(b"\0" * 64)
    garbage = tmp_path / "garbage.mid"
    garbage.write_bytes(b"this is not a MIDI file")
    cases = [
        ([str(broken), "-n", "2"], "does not match its manifest entry"),
        ([model_dir, "-n", "2", "--primer-midi", str(garbage)], "cannot read the primer"),
        ([model_dir, "-n", "2", "--primer-midi", str(tmp_path / "missing.mid")], "cannot read the primer"),
        ([model_dir, "-n", "0"], "--num-pieces"),
        ([model_dir, "-n", "2", "--temperature", "0"], "--temperature"),
        ([model_dir, "-n", "2", "--top-p", "1.5"], "--top-p"),
        ([model_dir, "-n", "2", "--top-k", "-3"], "--top-k"),
        ([model_dir, "-n", "2", "--max-tokens", "0"], "--max-tokens"),
        ([model_dir, "-n", "2", "--checkpoint", "9"], "no checkpoint for epoch 9"),
    ]
    for k, (argv, message) in enumerate(cases):
        dest = tmp_path / f"out{k}"
        code = cli_main(["generate", argv[0], str(dest), *argv[1:], "--workers", "0", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (argv, err)
        assert not dest.exists(), argv

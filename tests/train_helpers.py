"""Small token shards in preprocess's output format, for the training tests.

Real tokenizers encode real notes (simple arpeggio and scale figures in random keys, so a
tiny model has something to learn); the files follow preprocess's contract: shards/part-*.parquet
(SHARD_SCHEMA), tokenizer.json, manifest.json written last.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from midiforge.music.piece import Piece
from midiforge.music.tokenizers import make_tokenizer
from midiforge.storage import file_entry, open_store, write_manifest
from midiforge.storage.shards import SHARD_SCHEMA, int_lists, write_table


def figure_piece(rng: np.random.Generator, n_notes: int) -> Piece:
    root = int(rng.integers(48, 66))
    figure = [[0, 4, 7, 12], [0, 2, 4, 5, 7, 9, 11, 12], [0, 3, 7, 10]][int(rng.integers(3))]
    pitch = [root + figure[i % len(figure)] for i in range(n_notes)]
    step = float(rng.choice([0.25, 0.5]))
    start = np.arange(n_notes) * step
    return Piece.from_columns(pitch, start, [step] * n_notes, [64 + 8 * (i % 4) for i in range(n_notes)],
                              [0] * n_notes, qpm=float(rng.choice([90.0, 120.0])))


def make_shards(dest: str, *, pieces: int = 40, files: int = 2, notes: tuple[int, int] = (40, 80),
                tokenizer: str = "events", seed: int = 0, options=None) -> dict:
    rng = np.random.default_rng(seed)
    tok = make_tokenizer(tokenizer)
    made = [figure_piece(rng, int(rng.integers(*notes))) for _ in range(pieces)]
    if tokenizer == "classic":
        tok = tok.with_vocab({t for p in made for t in tok.encode_text(p)})
    store = open_store(dest, options)
    shards, qpms = [], []
    for f in range(files):
        idx = list(range(f, pieces, files))
        ids = [tok.encode(made[i]) for i in idx]
        split = ["validation" if i % 5 == 4 else "train" for i in idx]
        t = pa.table({
            "piece_id": [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in idx],
            "source": [f"synthetic/{i}.mid" for i in idx],
            "split": split,
            "transpose": pa.array([0] * len(idx), pa.int8()),
            "tokens": int_lists(ids),
            "n_tokens": pa.array([len(x) for x in ids], pa.int32()),
            "n_notes": pa.array([len(made[i]) for i in idx], pa.int32()),
            "seconds": [made[i].end() * 60 / made[i].qpm for i in idx],
            "qpm": [made[i].qpm for i in idx],
            "tokenizer": [tok.id] * len(idx),
        }).cast(SHARD_SCHEMA)
        shards.append(write_table(store, f"shards/part-{f:05d}.parquet", t))
        qpms += [made[i].qpm for i in idx]
    tok_bytes = tok.to_json().encode()
    store.write_bytes("tokenizer.json", tok_bytes)
    manifest = {"stage": "preprocess", "pieces": pieces, "tokenizer": tok.id, "vocab_size": tok.vocab_size,
                "qpm_median": float(np.median(qpms)), "shards": shards,
                "files": [file_entry("tokenizer.json", tok_bytes)]
                + [{k: s[k] for k in ("path", "bytes", "sha256")} for s in shards]}
    write_manifest(store, manifest)
    return manifest

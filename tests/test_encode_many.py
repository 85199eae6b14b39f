"""EventsTokenizer.encode_many (the preprocess worker's batched path): the same ids whatever the chunking,
and exact round trips on edge cases."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from corpora import midi_files

from midiforge.music.midi_io import piece_to_midi
from midiforge.music.piece import DRUM_PROGRAM, Piece
from midiforge.music.readers import read_piece
from midiforge.music.tokenizers import EventsConfig, EventsTokenizer
from midiforge.pipeline.preprocess import PreprocessSettings, list_inputs, process_batch
from midiforge.storage import StorageOptions

CONFIGS = [
    EventsConfig(),
    EventsConfig(bars=True, programs=True, drums=True, velocity_bins=32, steps_per_quarter=12,
                 max_shift_steps=8, max_duration_steps=96),
    EventsConfig(velocity_bins=0, tempo_bins=0, drums=True),
]


def _edge_pieces() -> list[Piece]:
    return [
        Piece.from_columns([36, 40], [0.0, 1.0], [0.25, 0.25], [100, 100], [DRUM_PROGRAM] * 2),  # drums only
        Piece.from_columns([], [], [], [], []),  # no notes
        Piece.from_columns([60, 62, 60], [0.0, 5.25, 5.25], [1.0, 1.0, 1.0], [90, 20, 90], [0, 3, 0],
                           time_signature=(3, 4), qpm=400.0),  # bars, a long rest, equal onsets
    ]


def test_edge_pieces_round_trip_exactly():
    for config in CONFIGS:
        tok = EventsTokenizer(config)
        for piece in _edge_pieces():
            ids = tok.encode(piece)
            back = tok.decode(ids, piece.time_signature)
            assert tok.quantize(back).as_tuple() == tok.quantize(piece).as_tuple(), config


def test_encode_many_is_independent_of_chunking_on_every_shared_file():
    """A piece's ids do not depend on the pieces encoded with it (state resets at each piece)."""
    pieces = [read_piece(p.name, p.read_bytes()) for name in ("ff", "nottingham") for p in midi_files(name)]
    assert len(pieces) > 1000
    pieces[5:5] = _edge_pieces()
    for config in CONFIGS:
        tok = EventsTokenizer(config)
        one_by_one = [tok.encode(p) for p in pieces]
        for part in (slice(None), slice(0, 1), slice(4, 9)):  # everything, one piece, the edge cases among others
            many = tok.encode_many(pieces[part])
            assert len(many) == len(one_by_one[part])
            for a, b in zip(one_by_one[part], many):
                assert b.dtype == np.int32 and np.array_equal(a, b), config
    assert EventsTokenizer().encode_many([]) == []


def test_a_piece_that_cannot_be_encoded_fails_alone_with_its_reason(tmp_path, monkeypatch):
    """The worker encodes a whole batch at once; if that raises, the pieces are encoded one by one and
    only the one that fails (and its identical copy in the batch) becomes a parser_error failure."""
    good = Piece.from_columns([60, 64], [0.0, 1.0], [1.0, 1.0], [90, 90], [0, 0])
    marked = Piece.from_columns([60, 13], [0.0, 1.0], [1.0, 1.0], [90, 90], [0, 0])  # pitch 13: the fault below
    src = tmp_path / "src"
    src.mkdir()
    for name, piece in (("a.mid", good), ("b.mid", marked), ("b2.mid", marked), ("c.mid", good.transpose(2))):
        (src / name).write_bytes(piece_to_midi(piece))
    encode_batch = EventsTokenizer.encode_batch

    def failing(self, batch):  # an encoder bug that only a piece with a pitch-13 note triggers
        if (batch.pitch == 13).any():
            raise IndexError("pitch 13 cannot be encoded")
        return encode_batch(self, batch)

    monkeypatch.setattr(EventsTokenizer, "encode_batch", failing)
    refs = list_inputs(str(src))
    res = process_batch(0, refs, str(tmp_path / "out"), StorageOptions(), PreprocessSettings())
    assert (res["pieces"], res["duplicates"], res["failures"]) == (2, 0, 2)
    columns = json.loads((tmp_path / "out" / "_work" / "part-00000.json").read_text())
    journal = [dict(zip(columns, row)) for row in zip(*columns.values())]
    assert [(r["source"], r["status"], r["reason"]) for r in journal] == [
        ("a.mid", "piece", ""), ("b.mid", "failure", "parser_error"), ("b2.mid", "failure", "parser_error"),
        ("c.mid", "piece", "")]
    assert "IndexError: pitch 13 cannot be encoded" in journal[1]["detail"]
    shard = pq.read_table(tmp_path / "out" / "shards" / "part-00000.parquet").to_pylist()
    tok = EventsTokenizer()
    assert [r["source"] for r in shard] == ["a.mid", "c.mid"]
    for r, piece in zip(shard, (good, good.transpose(2))):
        assert r["tokens"] == tok.encode(piece).tolist() and r["n_tokens"] == len(r["tokens"])


def test_a_reader_that_loses_a_piece_stops_the_batch_instead_of_mislabelling_it(tmp_path, monkeypatch):
    from midiforge.errors import MidiforgeError
    from midiforge.pipeline import preprocess_batch

    src = tmp_path / "src"
    src.mkdir()
    for k in range(3):
        (src / f"{k}.mid").write_bytes(piece_to_midi(Piece.from_columns([60 + k], [0.0], [1.0], [90], [0])))
    read_pieces = preprocess_batch.read_pieces

    def lossy(units, options):  # a reader bug: the first piece vanishes, its outcome says it was read
        batch, errors = read_pieces(units, options)
        return batch.slice(1, len(batch)), errors

    monkeypatch.setattr(preprocess_batch, "read_pieces", lossy)
    with pytest.raises(MidiforgeError, match="returned 2 pieces and 3 outcomes for 3 units"):
        process_batch(0, list_inputs(str(src)), str(tmp_path / "out"), StorageOptions(), PreprocessSettings())
    assert not (tmp_path / "out" / "_work").exists()  # no journal: the batch counts as not done

"""EventsTokenizer.encode_many (the preprocess worker's batched path): the same ids whatever the chunking,
and exact round trips on edge cases."""
from __future__ import annotations

import numpy as np

from corpora import midi_files
from midiforge.music.piece import DRUM_PROGRAM, Piece
from midiforge.music.readers import read_piece
from midiforge.music.tokenizers import EventsConfig, EventsTokenizer
from midiforge.pipeline.preprocess import _encode_rows

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


def test_a_piece_that_cannot_be_encoded_fails_alone_with_its_reason():
    tok = EventsTokenizer(EventsConfig(programs=True))
    good = Piece.from_columns([60, 64], [0.0, 1.0], [1.0, 1.0], [90, 90], [0, 0])
    bad = Piece.from_columns([60], [0.0], [1.0], [90], [0])
    bad = Piece(bad.pitch, bad.start, bad.duration, bad.velocity, np.array([999], dtype=np.int16))  # no such program
    rows = {"piece_id": ["a", "b", "c"], "source": ["a.mid", "b.mid", "c.mid"], "tokens": [good, bad, good],
            "n_tokens": [0, 0, 0]}
    journal = {"input": ["a.mid", "b.mid", "b2.mid", "c.mid"], "source": ["a.mid", "b.mid", "b2.mid", "c.mid"],
               "piece_id": ["a", "b", "b", "c"], "status": ["piece", "piece", "duplicate", "piece"],
               "reason": [""] * 4, "detail": [""] * 4}
    _encode_rows(tok, rows, journal)
    assert rows["piece_id"] == ["a", "c"] and rows["source"] == ["a.mid", "c.mid"]
    assert all(np.array_equal(ids, tok.encode(good)) for ids in rows["tokens"])
    assert rows["n_tokens"] == [len(tok.encode(good))] * 2
    assert journal["status"] == ["piece", "failure", "failure", "piece"]
    assert journal["reason"][1] == journal["reason"][2] == "parser_error"
    assert "IndexError" in journal["detail"][1]

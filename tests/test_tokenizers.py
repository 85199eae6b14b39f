"""Tokenizers: exact round trips on every shared MIDI file, the tutorial's classic encoding."""
from __future__ import annotations

import json

import numpy as np
import pytest

from corpora import midi_files
from midiforge.errors import MidiforgeError
from midiforge.music.piece import DRUM_PROGRAM, Piece
from midiforge.music.readers import read_piece
from midiforge.music.tokenizers import (
    BOS_ID, EOS_ID, UNK_ID, ClassicTokenizer, EventsConfig, EventsTokenizer, load_tokenizer,
    make_tokenizer, normal_order,
)

CONFIGS = [
    EventsConfig(),
    EventsConfig(bars=True, programs=True, drums=True, velocity_bins=32, steps_per_quarter=12,
                 max_shift_steps=8, max_duration_steps=96),
    EventsConfig(velocity_bins=0, tempo_bins=0, drums=True),
]


def _pieces(name):
    for path in midi_files(name):
        yield path.name, read_piece(path.name, path.read_bytes())


@pytest.mark.parametrize("corpus_name", ["ff", "nottingham"])
def test_events_round_trip_every_shared_file(corpus_name):
    """decode(encode(piece)) gives back the piece's quantized notes exactly, through a Piece."""
    toks = [EventsTokenizer(c) for c in CONFIGS]
    n = 0
    for name, piece in _pieces(corpus_name):
        for tok in toks:
            ids = tok.encode(piece)
            assert ids[0] == BOS_ID and ids[-1] == EOS_ID
            assert ids.min() >= 0 and ids.max() < tok.vocab_size
            back = tok.decode(ids, piece.time_signature)
            assert tok.quantize(back).as_tuple() == tok.quantize(piece).as_tuple(), (name, tok.config)
            assert np.array_equal(tok.encode(back), ids), name
        n += 1
    assert n > 90


def test_events_tokens_read_as_music():
    tok = EventsTokenizer(EventsConfig(velocity_bins=4, tempo_bins=8))
    # C4 quarter at 0, rest, E4 + G4 eighths at beat 2 (8 steps later), velocity 100
    piece = Piece.from_columns([60, 64, 67], [0.0, 2.0, 2.0], [1.0, 0.5, 0.5], [100, 100, 100], [0, 0, 0], qpm=120.0)
    words = [tok.vocab[i] for i in tok.encode(piece)]
    assert words == ["BOS", f"TEMPO_{tok.tempo_bin(120.0)}", "VELOCITY_3", "PITCH_60", "DURATION_4",
                     "TIME_SHIFT_8", "PITCH_64", "DURATION_2", "PITCH_67", "DURATION_2", "EOS"]


def test_events_long_rest_chains_shifts_and_bars():
    tok = EventsTokenizer(EventsConfig(bars=True, velocity_bins=0, tempo_bins=0, max_shift_steps=4))
    piece = Piece.from_columns([60, 62], [0.0, 5.25], [1.0, 1.0], [90, 90], [0, 0], time_signature=(3, 4))
    words = [tok.vocab[i] for i in tok.encode(piece)]
    # bar = 12 steps; note 2 at step 21 = bar 1 (step 12) + 9 steps = 4 + 4 + 1
    assert words == ["BOS", "BAR", "PITCH_60", "DURATION_4", "BAR", "TIME_SHIFT_4", "TIME_SHIFT_4",
                     "TIME_SHIFT_1", "PITCH_62", "DURATION_4", "EOS"]


def test_events_vocabulary_depends_on_settings_only():
    a, b = EventsTokenizer(), EventsTokenizer(EventsConfig())
    assert a.vocab == b.vocab and a.id == b.id
    assert EventsTokenizer(EventsConfig(bars=True)).id != a.id
    loaded = load_tokenizer(a.to_json())
    assert loaded.vocab == a.vocab and loaded.id == a.id


def test_events_drums_and_programs():
    piece = Piece.from_columns([36, 60, 40], [0.0, 0.0, 1.0], [0.25, 1.0, 0.25], [100, 80, 100],
                               [DRUM_PROGRAM, 33, DRUM_PROGRAM])
    plain = EventsTokenizer()
    assert plain.decode(plain.encode(piece)).pitch.tolist() == [60]  # drums dropped, program merged to 0
    full = EventsTokenizer(EventsConfig(programs=True, drums=True))
    back = full.decode(full.encode(piece))
    assert sorted(zip(back.pitch.tolist(), back.program.tolist())) == [(36, DRUM_PROGRAM), (40, DRUM_PROGRAM), (60, 33)]


def test_decoder_tolerates_generated_garbage():
    tok = EventsTokenizer()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, tok.vocab_size, 5000)
    piece = tok.decode(ids)
    assert (piece.duration > 0).all()


def test_tokenizer_json_is_self_sufficient_and_checked():
    tok = make_tokenizer("events", bars=True)
    d = json.loads(tok.to_json())
    assert d["kind"] == "events" and d["vocab"] == tok.vocab
    d["vocab"] = d["vocab"][:-1]
    with pytest.raises(MidiforgeError, match="vocabulary"):
        load_tokenizer(d)
    with pytest.raises(MidiforgeError, match="unknown settings"):
        make_tokenizer("events", colour=True)


# --- classic --------------------------------------------------------------------------------
def test_normal_order_matches_music21():
    """Checked once on all 4,095 sets; here on a spread of 300 (music21 chords are slow to build)."""
    from music21 import chord

    for mask in sorted(set(range(1, 4096, 14)) | {0b100010010001, 0b101010101010, 0b111111111111}):
        pcs = [i for i in range(12) if mask >> i & 1]
        assert normal_order(pcs) == list(chord.Chord(pcs).normalOrder), pcs


def test_classic_tokens_as_the_tutorial_writes_them():
    # E-4 alone, then an E minor triad (E G B: normal order 4.7.11), then C major in 2nd inversion
    piece = Piece.from_columns([63, 64, 67, 71, 55, 60, 64], [0, 1, 1, 1, 2, 2, 2], [1] * 7, [90] * 7, [0] * 7)
    tok = ClassicTokenizer()
    assert tok.encode_text(piece) == ["E-4", "4.7.11", "0.4.7"]
    tok = tok.with_vocab(tok.encode_text(piece))
    ids = tok.encode(piece)
    assert [tok.vocab[i] for i in ids] == ["BOS", "E-4", "4.7.11", "0.4.7", "EOS"]
    back = tok.decode(ids)  # the tutorial's decoding: 0.5 apart, chords in octave 4
    assert back.start.tolist() == [0.0, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert back.pitch.tolist() == [63, 64, 67, 71, 60, 64, 67]
    assert tok.ids_of(["C#9"])[1] == UNK_ID


def test_classic_groups_onsets_on_music21s_grid():
    # 0.98 and 1.02 both snap to 1.0 (quarter grid); 1.33 snaps to 4/3 (triplet grid)
    piece = Piece.from_columns([60, 64, 67], [0.98, 1.02, 1.33], [1, 1, 1], [90] * 3, [0] * 3)
    assert ClassicTokenizer().encode_text(piece) == ["0.4", "G4"]


def test_classic_tokenizer_json_round_trip():
    tok = ClassicTokenizer().with_vocab(["E-4", "4.7.11"])
    again = load_tokenizer(tok.to_json())
    assert again.vocab == tok.vocab and again.id == tok.id and again.config == tok.config


@pytest.mark.parametrize("native", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("column", ["start", "duration"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_both_encoder_paths_refuse_a_start_or_duration_that_is_not_finite(native, column, bad):
    """NaN or inf cast to int64 would be an arbitrary onset: the compiled encoder and the NumPy one
    (also its fallback for batches the C code declines) refuse it with the same ValueError."""
    from midiforge.music import tokenizers
    from midiforge.music.piece import PieceBatch

    if native and tokenizers._native is None:
        pytest.skip("midiforge.music._events is not built (no C compiler at install)")
    good = Piece.from_columns([60, 62, 64], [0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [90, 90, 90], [0, 0, 0])
    cols = {"start": good.start.copy(), "duration": good.duration.copy()}
    cols[column][1] = bad
    piece = Piece(good.pitch, cols["start"], cols["duration"], good.velocity, good.program)
    tok = EventsTokenizer(EventsConfig(bars=True, programs=True, drums=True))
    tok.native = native
    batch = PieceBatch.from_pieces([good, piece])
    with pytest.raises(ValueError, match=r"^encode: note 4: its start or duration is not finite \(NaN or inf\)$"):
        tok.encode_batch(batch)  # note 4 of the batch: the second note of the second piece
    with pytest.raises(ValueError, match="not finite"):
        tok.encode(piece)
    if native:  # the C code checks before it declines a batch (pitch 200: the NumPy path's), NumPy checks too
        odd = Piece(np.array([60, 200, 64], np.int16), piece.start, piece.duration, piece.velocity, piece.program)
        with pytest.raises(ValueError, match="not finite"):
            tok._encode_native(PieceBatch.from_pieces([odd]))
        tok.native = False
        with pytest.raises(ValueError, match="not finite"):
            tok.encode(odd)
    tok.native = True
    assert tok.encode(good).tolist() == EventsTokenizer(tok.config).encode(good).tolist()

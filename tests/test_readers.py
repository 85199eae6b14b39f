"""The batch MIDI reader: symusic's state buffer read in bulk gives exactly what symusic's public
``.numpy()`` gives, on every shared file; mixed batches keep input order and blame only bad units."""
from __future__ import annotations

import numpy as np
import pytest
import symusic

from corpora import corpus, midi_files
from midiforge.errors import PieceError
from midiforge.music import readers
from midiforge.music.piece import Piece, PieceBatch
from midiforge.music.readers import ReadOptions, read_midi_batch, read_piece, read_pieces

OPTIONS = [ReadOptions(), ReadOptions(tracks="first"), ReadOptions(max_notes=400), ReadOptions(max_quarters=120)]


def _same(a: Piece, b: Piece) -> bool:
    cols = ("pitch", "start", "duration", "velocity", "program", "track")
    return all(np.array_equal(getattr(a, k), getattr(b, k)) and getattr(a, k).dtype == getattr(b, k).dtype
               for k in cols) and (a.qpm, a.time_signature, a.seconds) == (b.qpm, b.time_signature, b.seconds)


def _all_midi() -> list[bytes]:
    return [p.read_bytes() for name in ("ff", "nottingham") for p in midi_files(name)]


def _same_batches(a: PieceBatch, b: PieceBatch) -> bool:
    cols = PieceBatch.NOTE_COLUMNS + ("offsets", "qpm", "seconds", "time_signature")
    return all(np.array_equal(getattr(a, k), getattr(b, k)) and getattr(a, k).dtype == getattr(b, k).dtype
               for k in cols)


def _reasons(errors) -> list:
    return [e and (e.reason, e.detail) for e in errors]


@pytest.mark.parametrize("options", OPTIONS, ids=["all", "first", "max_notes", "max_quarters"])
def test_the_three_ways_of_reading_agree_on_every_shared_file(options, monkeypatch):
    """symusic's state buffers read in C (_midi), the same in Python, and symusic's public .numpy() per
    track: the same batch, the same failures, on every shared file plus three bad ones."""
    datas = _all_midi() + [b"MThd", b"", b"not midi"]
    assert len(datas) > 1000 and readers._native_midi is not None  # `make` builds it
    compiled, compiled_errors = read_midi_batch(datas, options)
    monkeypatch.setattr(readers, "_native_midi", None)
    python, python_errors = read_midi_batch(datas, options)

    def no_layout(buf):  # as if symusic's buffer had another layout: every file through .numpy()
        raise readers._Layout

    monkeypatch.setattr(readers, "_state_layout", no_layout)
    public, public_errors = read_midi_batch(datas, options)
    assert _reasons(compiled_errors) == _reasons(python_errors) == _reasons(public_errors)
    assert _same_batches(compiled, python) and _same_batches(compiled, public)
    assert len(compiled) == sum(e is None for e in compiled_errors)
    if options == OPTIONS[0]:
        assert len(compiled) == len(datas) - 3  # every shared file reads
        for i, data in enumerate(datas[:50]):  # and note for note as symusic has them
            score = symusic.Score.from_midi(data)
            pitches = np.concatenate([t.notes.numpy()["pitch"] for t in score.tracks])
            assert compiled.piece(i).pitch.tolist() == pitches.tolist()


def test_files_whose_buffer_does_not_fit_go_the_python_way_in_input_order(monkeypatch):
    datas = _all_midi()[:40]
    expected, expected_errors = read_midi_batch(datas)
    scan = readers._native_midi.scan

    class Half:  # the compiled module, but every other file's buffer "does not fit"
        fill = readers._native_midi.fill

        @staticmethod
        def scan(states, first_only, max_notes, meta):
            total = scan(states, first_only, max_notes, meta)
            meta[::2, readers._M_STATUS] = readers._LAYOUT
            return total

    monkeypatch.setattr(readers, "_native_midi", Half)
    mixed, mixed_errors = read_midi_batch(datas)
    assert _reasons(mixed_errors) == _reasons(expected_errors) and _same_batches(mixed, expected)


def test_a_buffer_of_another_layout_is_detected():
    data = midi_files("nottingham")[0].read_bytes()
    buf = symusic.Score.from_midi(data).__getstate__()
    readers._state_layout(buf)  # fits
    for other in (buf[:-1], buf + b"\0", buf[:40], b""):
        with pytest.raises(readers._Layout):
            readers._state_layout(other)


def test_mixed_units_keep_input_order_and_each_bad_unit_has_its_reason():
    mids = midi_files("ff")[:3]
    abc = sorted(corpus("nottingham-abc").glob("*.abc"))[0]
    tune = readers.split_units(abc.name, abc.read_bytes())[0]
    units = [
        (mids[0].name, mids[0].read_bytes()),
        ("garbage.mid", b"not a midi file at all"),
        tune,
        ("truncated.mid", mids[1].read_bytes()[:30]),
        (mids[2].name, mids[2].read_bytes()),
        ("empty.mid", b""),
        ("notes.txt.mid", b"MThd"),
    ]
    batch, errors = read_pieces(units)
    reasons = [e.reason if e else None for e in errors]
    assert reasons == [None, "not_midi", None, "corrupt", None, "empty", "corrupt"]
    assert len(batch) == 3
    for i, u in enumerate((0, 2, 4)):
        assert _same(batch.piece(i), read_piece(*units[u]))
    assert all(isinstance(e, PieceError) and e.detail for e in errors if e)


def test_piece_batch_take_concat_and_transpose():
    pieces = [read_piece(p.name, p.read_bytes()) for p in midi_files("ff")[:4]]
    batch = PieceBatch.from_pieces(pieces)
    assert [len(p) for p in batch.pieces()] == [len(p) for p in pieces]
    assert all(_same(a, b) for a, b in zip(batch.pieces(), pieces))
    back = batch.take([3, 1, 1])
    assert all(_same(back.piece(i), pieces[j]) for i, j in enumerate((3, 1, 1)))
    joined = PieceBatch.concat([batch.slice(0, 2), batch.slice(2, 4)])
    assert all(_same(a, b) for a, b in zip(joined.pieces(), pieces))
    moved = batch.transposed(np.array([0, 2, -3, 5]))
    for i, k in enumerate((0, 2, -3, 5)):
        assert np.array_equal(moved.piece(i).pitch, pieces[i].transpose(k).pitch)
    low, high = batch.pitch_range()
    pitched = [p.pitch[~p.is_drum] for p in pieces]  # drums do not move, so they do not count
    assert low.tolist() == [int(x.min()) for x in pitched] and high.tolist() == [int(x.max()) for x in pitched]

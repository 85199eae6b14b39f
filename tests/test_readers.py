"""The batch MIDI reader: symusic's state buffer read in bulk gives exactly what symusic's public
``.numpy()`` gives, on every shared file; mixed batches keep input order and blame only bad units."""
from __future__ import annotations

import os

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


needs_native = pytest.mark.skipif(readers._native_midi is None and not os.environ.get("MIDIFORGE_REQUIRE_NATIVE"),
                                  reason="midiforge.music._midi is not built (no C compiler at install): the "
                                         "Python path is the only one, there is nothing to compare it with")


@needs_native
@pytest.mark.parametrize("options", OPTIONS, ids=["all", "first", "max_notes", "max_quarters"])
def test_the_compiled_and_python_paths_agree_on_every_shared_file(options, monkeypatch):
    """symusic's state buffers read in C (_midi) and symusic's public .numpy() per track (the Python
    path): the same batch, the same failures, on every shared file plus bad ones (a wrapped one)."""
    datas = _all_midi() + [b"MThd", b"", b"not midi", wrapped_negative()]
    assert len(datas) > 1000
    compiled, compiled_errors = read_midi_batch(datas, options)
    monkeypatch.setattr(readers, "_native_midi", None)
    python, python_errors = read_midi_batch(datas, options)
    assert _reasons(compiled_errors) == _reasons(python_errors)
    assert _same_batches(compiled, python)
    assert len(compiled) == sum(e is None for e in compiled_errors)
    if options == OPTIONS[0]:
        assert len(compiled) == len(datas) - 4  # every shared file reads
        for i, data in enumerate(datas[:50]):  # and note for note as symusic has them
            score = symusic.Score.from_midi(data)
            pitches = np.concatenate([t.notes.numpy()["pitch"] for t in score.tracks])
            assert compiled.piece(i).pitch.tolist() == pitches.tolist()


@needs_native
def test_files_whose_buffer_does_not_fit_go_the_python_way_in_input_order(monkeypatch):
    datas = _all_midi()[:40]
    expected, expected_errors = read_midi_batch(datas)
    scan = readers._native_midi.scan

    class Half:  # the compiled module, but every other file's buffer "does not fit"
        fill = readers._native_midi.fill
        ticks = readers._native_midi.ticks

        @staticmethod
        def scan(states, first_only, max_notes, meta):
            total = scan(states, first_only, max_notes, meta)
            meta[::2, readers._M_STATUS] = readers._LAYOUT
            return total

    monkeypatch.setattr(readers, "_native_midi", Half)
    mixed, mixed_errors = read_midi_batch(datas)
    assert _reasons(mixed_errors) == _reasons(expected_errors) and _same_batches(mixed, expected)


@needs_native
def test_a_buffer_of_another_layout_is_detected():
    data = midi_files("nottingham")[0].read_bytes()
    buf = symusic.Score.from_midi(data).__getstate__()
    others = [buf[:-1], buf + b"\0", buf[:40], b"", buf[:4] + b"\xff\xff\xff\xff" + buf[8:]]
    meta = np.zeros((1 + len(others), readers._META), np.int64)
    readers._native_midi.scan([buf, *others], 0, 10**6, meta)
    assert meta[0, readers._M_STATUS] == readers._OK  # fits
    assert (meta[1:, readers._M_STATUS] == readers._LAYOUT).all()


# ------------------------------------------------------------------------------------------
# times that wrap past int32 (issue 14): corrupt, not music
# ------------------------------------------------------------------------------------------
def varlen(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def smf(tracks: list[list[tuple[int, bytes]]], tpq: int = 480) -> bytes:
    """A Standard MIDI File of (delta, event bytes) tracks, each ended by an end-of-track event."""
    out = b"MThd" + (6).to_bytes(4, "big") + (int(len(tracks) > 1)).to_bytes(2, "big") \
        + len(tracks).to_bytes(2, "big") + tpq.to_bytes(2, "big")
    for events in tracks:
        body = b"".join(varlen(d) + e for d, e in events) + b"\x00\xff\x2f\x00"
        out += b"MTrk" + len(body).to_bytes(4, "big") + body
    return out


def _notes(pitches=(60, 64, 67), step=480) -> list:
    ev = []
    for p in pitches:
        ev += [(0, bytes([0x90, p, 80])), (step, bytes([0x80, p, 0]))]
    return ev


BIG = 0x0FFFFFFF  # the largest delta time (4 bytes)


def wrapped_negative() -> bytes:
    """Text events 8 x BIG ticks apart, then notes: symusic's int32 times wrap to about -2**31, so
    the piece had every note at onset 0 and seconds < 0, and passed --max-quarters."""
    return smf([[(BIG, b"\xff\x01\x01a")] * 8 + _notes()])


def wrapped_positive() -> bytes:
    """16 x BIG ticks (2**32 - 16) before the notes: the times wrap twice and look like tick 84."""
    return smf([[(BIG, b"\xff\x01\x01a")] * 16 + [(100, b"\xff\x01\x01a")] + _notes()])


def test_symusic_really_wraps_these_files():
    """The premise: symusic gives the wrapped times (no error), so only our check can catch them."""
    neg = symusic.Score.from_midi(wrapped_negative())
    assert min(n.time for n in neg.tracks[0].notes) < 0
    pos = symusic.Score.from_midi(wrapped_positive())
    assert [n.time for n in pos.tracks[0].notes][:1] == [84]


@pytest.mark.parametrize("native", [True, False], ids=["compiled", "python"])
def test_times_past_int32_are_corrupt(native, monkeypatch):
    if native and readers._native_midi is None:
        pytest.skip("midiforge.music._midi is not built (no C compiler at install)")
    if not native:
        monkeypatch.setattr(readers, "_native_midi", None)
    good = midi_files("ff")[0].read_bytes()
    at_limit = smf([[(BIG, b"\xff\x01\x01a")] * 7 + [(2**31 - 1 - 7 * BIG - 3 * 480, b"\xff\x01\x01a")]
                    + _notes()])  # the last note ends at tick 2**31 - 1: fits
    # two tracks of 5 x BIG ticks each: the times of each track fit (tracks do not add up)
    in_two_tracks = smf([[(BIG, b"\xff\x01\x01a")] * 5 + _notes(), [(BIG, b"\xff\x01\x01a")] * 5 + _notes()])
    datas = [good, wrapped_negative(), at_limit, wrapped_positive(), in_two_tracks, b"RIFF" + bytes(16) + wrapped_negative()]
    batch, errors = read_midi_batch(datas, ReadOptions(max_quarters=10**9))
    reasons = [e and e.reason for e in errors]
    assert reasons == [None, "corrupt", None, "corrupt", None, "corrupt"]
    for e in (errors[1], errors[3], errors[5]):
        assert "past 2147483647" in e.detail and "ticks" in e.detail
    assert len(batch) == 3 and (batch.seconds > 0).all() and (batch.start >= 0).all()
    assert batch.piece(1).start.max() * 480 + 480 == 2**31 - 1
    # the default --max-quarters (50,000) stops the file at the limit, as too_long
    _, errors = read_midi_batch([at_limit])
    assert errors[0].reason == "too_long"
    with pytest.raises(PieceError, match="corrupt.*past 2147483647"):
        read_piece("wrapped.mid", wrapped_negative())


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

"""The compiled events tokenizer (midiforge.music._events) gives exactly the ids of the NumPy code, on
every shared file and on edge cases, hands back what it cannot encode, and checks its arguments.

Both C extensions are optional (setup.py): without a C compiler the install goes on and midiforge
runs its Python/NumPy code.  Then the tests of the compiled code skip, saying why (test_fuzz_native.py
checks that, with the extensions hidden); MIDIFORGE_REQUIRE_NATIVE=1 makes a missing one a failure."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from corpora import midi_files
from midiforge.music import tokenizers
from midiforge.music.piece import DRUM_PROGRAM, Piece, PieceBatch
from midiforge.music.readers import read_midi_batch
from midiforge.music.tokenizers import EventsConfig, EventsTokenizer

CONFIGS = [
    EventsConfig(),
    EventsConfig(bars=True, programs=True, drums=True, velocity_bins=32, steps_per_quarter=12,
                 max_shift_steps=8, max_duration_steps=96),
    EventsConfig(velocity_bins=0, tempo_bins=0, drums=True),
    EventsConfig(bars=True, max_shift_steps=1),
]


NOT_BUILT = ("midiforge.music._events is not built (no C compiler when midiforge was installed): the NumPy "
             "path runs instead; `pip install -e .` with a C compiler builds it")
needs_events = pytest.mark.skipif(tokenizers._native is None and not os.environ.get("MIDIFORGE_REQUIRE_NATIVE"),
                                  reason=NOT_BUILT)


@needs_events
def test_the_extension_is_built():
    # `make` builds it (setup.py); a machine without a C compiler skips this file (see pytestmark)
    assert tokenizers._native is not None, NOT_BUILT


MODES = (True, False)  # EventsTokenizer.native: the C code, the NumPy code


def _all_modes(tok: EventsTokenizer, batch: PieceBatch) -> list:
    out = []
    for mode in MODES:
        tok.native = mode
        out.append(tok.encode_batch(batch))
    return out


@needs_events
@pytest.mark.parametrize("config", CONFIGS, ids=["default", "everything", "no_velocity_tempo", "bars_shift1"])
def test_native_equals_numpy_on_every_shared_file(config):
    datas = [p.read_bytes() for name in ("ff", "nottingham") for p in midi_files(name)]
    batch, errors = read_midi_batch(datas)
    assert len(batch) == len(datas) > 1000
    edge = PieceBatch.from_pieces([
        Piece.from_columns([36, 40], [0.0, 1.0], [0.25, 0.25], [100, 100], [DRUM_PROGRAM] * 2),  # drums only
        Piece.from_columns([], [], [], [], []),  # no notes
        Piece.from_columns([60, 62, 60], [0.0, 37.25, 37.25], [1.0, 1.0, 1.0], [90, 20, 90], [0, 3, 0],
                           time_signature=(3, 4), qpm=400.0),  # bars, a long rest, equal onsets
        Piece.from_columns([64, 60, 67, 60], [2.0, 0.0, 2.0, 0.0], [0.5, 9.0, 0.5, 9.0], [1, 127, 64, 127], [5, 0, 5, 0]),
    ])
    batch = PieceBatch.concat([batch.slice(0, 5), edge, batch.slice(5, len(batch))])
    (ids, offsets), *others = _all_modes(EventsTokenizer(config), batch)
    assert ids.dtype == np.int32
    for other_ids, other_offsets in others:
        assert other_ids.dtype == np.int32
        assert np.array_equal(offsets, other_offsets) and np.array_equal(ids, other_ids)


@needs_events
def test_a_note_outside_the_packed_key_takes_the_numpy_path():
    odd = Piece(np.array([60, 200], np.int16), np.array([0.0, 1.0]), np.array([1.0, 1.0]),
                np.array([90, 90], np.int16), np.zeros(2, np.int16))  # pitch 200: no MIDI file has it
    batch = PieceBatch.from_pieces([odd, odd.select(np.array([True, False]))])
    tok = EventsTokenizer()
    assert tok._encode_native(batch) is None  # the C encoder declines this batch ...
    assert tok._encode_native(batch.slice(1, 2)) is not None  # ... but not the piece without pitch 200
    (a, oa), (b, ob) = _all_modes(tok, batch)
    assert np.array_equal(a, b) and np.array_equal(oa, ob)


@needs_events
def test_native_rejects_a_program_out_of_range_like_numpy():
    bad = Piece.from_columns([60], [0.0], [1.0], [90], [0])
    bad = Piece(bad.pitch, bad.start, bad.duration, bad.velocity, np.array([999], dtype=np.int16))
    tok = EventsTokenizer(EventsConfig(programs=True))
    for mode in MODES:
        tok.native = mode
        with pytest.raises(IndexError):
            tok.encode(bad)


@needs_events
def test_native_checks_its_arguments():
    native = tokenizers._native
    z = np.zeros(0, np.int64)
    rule = (16, 3, -1, 8, 40, 48, 175, 0, 0, 2, np.full(129, -1, np.int64))
    grid = (4, 64, 8, 0, 0)
    batch = PieceBatch.from_pieces([Piece.from_columns([60], [0.0], [1.0], [90], [0])])
    tok = EventsTokenizer()
    good = tok._encode_native(batch)
    assert good is not None and good[0].tolist() == tok.encode(batch.piece(0)).tolist()
    cols = [batch.offsets, batch.start, batch.duration, batch.pitch, batch.velocity, batch.program]
    with pytest.raises(ValueError):  # a start column of the wrong length
        native.encode(cols[0], batch.start[:0], *cols[2:], np.zeros(1, np.int64), z, grid, rule, np.zeros(1, np.int64))
    with pytest.raises(ValueError):  # offsets that do not cover the notes
        native.encode(np.array([0, 5], np.int64), *cols[1:], np.zeros(1, np.int64), z, grid, rule, np.zeros(1, np.int64))
    with pytest.raises(TypeError, match="pitch"):  # pitch as int64, not int16
        native.encode(*cols[:3], batch.pitch.astype(np.int64), *cols[4:], np.zeros(1, np.int64), z, grid, rule,
                      np.zeros(1, np.int64))
    with pytest.raises(ValueError):  # no room for the counts of each piece
        native.encode(*cols, np.zeros(1, np.int64), z, grid, rule, z)
    with pytest.raises(ValueError, match="not finite"):  # NaN, inf: rejected before any cast to int64
        for bad in (np.nan, np.inf, -np.inf):
            start = batch.start.copy()
            start[0] = bad
            native.encode(cols[0], start, *cols[2:], np.zeros(1, np.int64), z, grid, rule, np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="not finite"):
        native.encode(*cols[:2], np.array([np.nan]), *cols[3:], np.zeros(1, np.int64), z, grid, rule,
                      np.zeros(1, np.int64))
    two = PieceBatch.from_pieces([Piece.from_columns([60, 62], [0.0, 1.0], [1.0, 1.0], [90, 90], [0, 0])])
    with pytest.raises(ValueError, match="contiguous"):  # a start column that is not C-contiguous
        native.encode(two.offsets, np.zeros(4)[::2], two.duration, two.pitch, two.velocity, two.program,
                      np.zeros(1, np.int64), z, grid, rule, np.zeros(1, np.int64))
    with pytest.raises(ValueError):  # per_piece read-only
        ro = np.zeros(1, np.int64)
        ro.flags.writeable = False
        native.encode(*cols, np.zeros(1, np.int64), z, grid, rule, ro)
    with pytest.raises(TypeError):  # grid not a tuple
        native.encode(*cols, np.zeros(1, np.int64), z, list(grid), rule, np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="out of range"):  # a rule whose sums would overflow
        native.encode(*cols, np.zeros(1, np.int64), z, grid, (2**62, *rule[1:]), np.zeros(1, np.int64))


@needs_events
def test_native_declines_what_it_cannot_cast_and_numpy_agrees():
    """Onsets and durations too large for the packed key or for int64 (finite): the C code hands the
    batch to NumPy (it never casts them), so both modes give the same ids."""
    base = Piece.from_columns([60, 62], [0.0, 1.0], [1.0, 1.0], [90, 90], [0, 0])
    for start, dur in ((1e300, 1.0), (0.0, 1e300), (-1e300, 1.0), (0.0, -1e300), (2.0**36, 1.0), (-5.0, 3.0)):
        piece = Piece(base.pitch, np.array([0.0, start]), np.array([1.0, dur]), base.velocity, base.program)
        batch = PieceBatch.from_pieces([piece])
        tok = EventsTokenizer(EventsConfig(max_shift_steps=2**20))
        native = tok._encode_native(batch)
        expect_decline = start >= 2.0**35 or abs(dur) >= 1e18  # 2**35 quarters: past the packed key; a negative onset is 0 in both
        assert (native is None) == expect_decline, (start, dur)
        with np.errstate(invalid="ignore"):  # NumPy's own cast of +-1e300 warns
            (a, oa), (b, ob) = _all_modes(tok, batch)
            assert np.array_equal(a, b) and np.array_equal(oa, ob)


@needs_events
def test_per_piece_sharing_memory_with_offsets_cannot_move_the_reads():
    """per_piece is written once at the end: an alias of the offsets (a caller's mistake) changes no read."""
    batch = PieceBatch.from_pieces([Piece.from_columns([60, 64], [0.0, 1.0], [1.0, 1.0], [90, 90], [0, 0])] * 3)
    tok = EventsTokenizer()
    ids, offsets = tok._encode_native(batch)
    c = tok.config
    grid = (c.steps_per_quarter, c.max_duration_steps, c.velocity_bins, int(c.programs), int(c.drums))
    rule = (c.max_shift_steps, tok.shift_base, tok.bar_id, c.velocity_bins, tok.velocity_base, tok.pitch_base,
            tok.duration_base, int(bool((tok.instrument_ids >= 0).any())), int(c.bars), 1 + (c.tempo_bins > 0),
            tok.instrument_ids)
    off = batch.offsets.astype(np.int64).copy()
    got = tokenizers._native.encode(off, batch.start, batch.duration, batch.pitch, batch.velocity, batch.program,
                                    tok._tempo_ids(batch), np.zeros(0, np.int64), grid, rule, off[1:])
    assert np.frombuffer(got, np.int32).tolist() == ids.tolist()
    assert off[1:].tolist() == np.diff(offsets).tolist()  # the counts, written after every read


HIDE = """
import sys
from importlib.abc import MetaPathFinder

class Hide(MetaPathFinder):  # as on a machine where the C extensions could not be built
    def find_spec(self, name, path=None, target=None):
        if name in ("midiforge.music._events", "midiforge.music._midi"):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, Hide())
import pytest
from midiforge.music import readers, tokenizers
assert readers._native_midi is None and tokenizers._native is None
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_without_the_extensions_the_native_tests_skip_with_a_reason(tmp_path):
    """The C extensions hidden by an import hook, in a subprocess: the tests of the compiled code skip
    and say why, every other test of the readers still passes (the Python path), nothing fails."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "MIDIFORGE_REQUIRE_NATIVE"}
    out = subprocess.run([sys.executable, "-c", HIDE, "-q", "-rs", "-p", "no:cacheprovider",
                          str(root / "tests" / "test_native.py"), str(root / "tests" / "test_readers.py"),
                          "-k", "not without_the_extensions"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary and " skipped" in summary and " passed" in summary
    assert "midiforge.music._events is not built" in out.stdout  # test_native.py's reason, in the -rs report
    assert "midiforge.music._midi is not built" in out.stdout     # test_readers.py's
    skipped = int(summary.split(" skipped")[0].split()[-1])
    assert skipped >= 10  # every test of the compiled code (9 here, 4 + 3 + 1 in test_readers.py)

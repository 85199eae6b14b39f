"""symusic Scores into the columns of a :class:`~midiforge.music.piece.PieceBatch`: which tracks are
read (:func:`_keep_tracks`), the Python path through symusic's ``.numpy()`` (:func:`_file_of`,
:func:`_assemble`) and the compiled one over symusic's serialized Scores (:func:`_native_batch`).
:func:`midiforge.music.readers.read_midi_batch` drives them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from midiforge.errors import PieceError
from midiforge.music.piece import DRUM_PROGRAM, PieceBatch

if TYPE_CHECKING:
    from midiforge.music.readers import ReadOptions


def _seconds(end_tick: int, tempos: list, tpq: int) -> float:
    """Seconds at ``end_tick`` under a tempo map: (tick, microseconds per quarter from that tick on)."""
    if not tempos or tempos[0][0] > 0:
        tempos = [(0, 500_000)] + list(tempos)
    kept = [(t, m) for t, m in tempos if t < end_tick] or [(0, tempos[0][1])]
    total = 0.0
    for (t, m), (t_next, _) in zip(kept, kept[1:] + [(end_tick, 0)]):
        total += (t_next - t) * float(m)
    return total / tpq / 1e6


# symusic's own serialization of a Score (its pickle state, zpp_bits format) is a flat buffer:
# reading notes out of it in bulk (midiforge.music._midi, in C) costs far less than symusic's
# per-track ``.numpy()`` (which builds four arrays a track).  The layout, for symusic 0.6:
#   Score: i32 ticks_per_quarter, tracks, time_signatures, key_signatures, tempos, markers
#   Track: string name, u8 program, u8 is_drum, notes, controls, pitch_bends, pedals, lyrics
#   a list is a u32 count then its items; a string a u32 length then its bytes; a text event an
#   i32 time then a string; Note is 12 bytes (i32 time, i32 duration, i8 pitch, i8 velocity, 2
#   padding); ControlChange, PitchBend, Pedal, TimeSignature, KeySignature and Tempo are 8 bytes.
# Every buffer is checked against the Score it came from (ticks per quarter, tracks, notes); a
# buffer that does not fit (another symusic version) is read through ``.numpy()`` instead (the
# Python path, :func:`_file_of`): slower, same result.


@dataclass
class _File:
    """One parsed MIDI file, before the batch's columns are built."""

    tpq: int
    chunks: list      # (time, duration, pitch, velocity) arrays of each track kept
    counts: list      # notes of each chunk
    programs: list    # program (DRUM_PROGRAM for drums) of each chunk
    tracks: list      # track index of each chunk
    tempos: list      # [(tick, microseconds per quarter)]
    time_signature: tuple


def _keep_tracks(heads, options: ReadOptions):
    """(program, index, count) of the tracks read, by ``options.tracks``; raises too_long/no_notes."""
    kept, total, first_program = [], 0, None
    for index, (program, drum, count) in enumerate(heads):
        if count == 0:
            continue
        program = DRUM_PROGRAM if drum else program
        if options.tracks == "first":
            # music21's partitionByInstrument()[0]: every note of the first instrument, across tracks
            if drum:
                continue
            if first_program is None:
                first_program = program
            elif program != first_program:
                continue
        total += count
        if total > options.max_notes:
            raise PieceError("too_long", f"more than {options.max_notes} notes")
        kept.append((program, index, count))
    if total == 0:
        raise PieceError("no_notes", f"{len(heads)} tracks, no notes")
    return kept



def _parse_score(data: bytes):
    """(symusic Score, ticks per quarter) of one checked MIDI payload, or the PieceError that says why not."""
    import symusic

    try:
        score = symusic.Score.from_midi(data)
    except Exception as exc:  # symusic raises RuntimeError/ValueError for malformed files
        raise PieceError("corrupt", str(exc).replace("iostream error", "").strip(" :")) from None
    tpq = int(score.ticks_per_quarter)
    if tpq <= 0:
        raise PieceError("unsupported", f"ticks per quarter = {tpq}")
    return score, tpq


def _file_of(score, tpq: int, options: ReadOptions) -> _File:
    """One parsed file's notes through symusic's public ``.numpy()`` per track: the Python path, for
    every file when the compiled part is not built, else for the files whose state buffer it
    declines (another symusic layout).  The same numbers as the compiled path (tests/test_readers.py)."""
    tracks = list(score.tracks)
    kept = _keep_tracks([(int(t.program), bool(t.is_drum), len(t.notes)) for t in tracks], options)
    chunks = []
    for _, index, count in kept:
        arrays = tracks[index].notes.numpy()
        chunks.append(tuple(np.asarray(arrays[k]) for k in ("time", "duration", "pitch", "velocity")))
    tempos = []
    if len(score.tempos):
        t = score.tempos.numpy()
        tempos = list(zip(t["time"].tolist(), t["mspq"].tolist()))
    ts = (4, 4)
    if len(score.time_signatures):
        first = score.time_signatures[0]
        if first.numerator > 0 and first.denominator > 0:
            ts = (int(first.numerator), int(first.denominator))
    return _File(tpq, chunks, [c for *_, c in kept], [p for p, _, _ in kept], [i for _, i, _ in kept], tempos, ts)


def _column(files: list[_File], k: int, dtype) -> np.ndarray:
    parts = [c[k] for f in files for c in f.chunks]
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _assemble(files: list[_File]) -> tuple[PieceBatch, np.ndarray]:
    """The batch of pieces of ``files``, and the end tick of each."""
    n = len(files)
    counts = np.fromiter((c for f in files for c in f.counts), dtype=np.int64)
    program = np.repeat(np.fromiter((p for f in files for p in f.programs), dtype=np.int16, count=len(counts)), counts)
    track = np.repeat(np.fromiter((t for f in files for t in f.tracks), dtype=np.int16, count=len(counts)), counts)
    lengths = np.fromiter((sum(f.counts) for f in files), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tpq = np.fromiter((f.tpq for f in files), dtype=np.int64, count=n)
    time, dur = _column(files, 0, np.int64), _column(files, 1, np.int64)
    end_tick = np.maximum.reduceat(time + dur, offsets[:-1]) if n else np.zeros(0, np.int64)
    scale = np.repeat(1.0 / tpq, lengths)
    batch = PieceBatch(
        _column(files, 2, np.int16), time * scale, dur * scale, _column(files, 3, np.int16), program,
        track, offsets,
        np.array([6e7 / f.tempos[0][1] if f.tempos and f.tempos[0][1] > 0 else 120.0 for f in files], dtype=np.float64),
        np.array([_seconds(int(e), f.tempos, f.tpq) for e, f in zip(end_tick.tolist(), files)], dtype=np.float64),
        np.array([f.time_signature for f in files], dtype=np.int64).reshape(n, 2))
    return batch, end_tick


# the columns of _midi.scan's meta rows, and its statuses
_M_STATUS, _M_TPQ, _M_TRACKS, _M_NOTES_ALL, _M_KEPT, _M_TS_NUM, _M_TS_DEN, _M_TEMPOS, _META = range(9)
_OK, _LAYOUT, _TOO_LONG, _NO_NOTES = range(4)


def _native_batch(native, parsed: list, options: ReadOptions, errors: list) -> tuple[PieceBatch, np.ndarray, list, list]:
    """The compiled path (``native``: midiforge.music._midi): every state buffer of the batch in two C passes.

    Returns the batch of the files read, their end ticks, their input indices, and the (index, score,
    tpq) of the files whose buffer did not fit, for the Python path."""
    states = [score.__getstate__() for _, score, _ in parsed]
    meta = np.zeros((len(parsed), _META), dtype=np.int64)
    native.scan(states, int(options.tracks == "first"), options.max_notes, meta)
    left = []
    for j, (i, score, tpq) in enumerate(parsed):
        m = meta[j]
        if m[_M_STATUS] != _LAYOUT and (m[_M_TPQ] != tpq or m[_M_TRACKS] != len(score.tracks)
                                        or m[_M_NOTES_ALL] != score.note_num()):
            m[_M_STATUS] = _LAYOUT
        status = m[_M_STATUS]
        if status == _LAYOUT:
            left.append((i, score, tpq))
        elif status == _TOO_LONG:
            errors[i] = PieceError("too_long", f"more than {options.max_notes} notes")
        elif status == _NO_NOTES:
            errors[i] = PieceError("no_notes", f"{int(m[_M_TRACKS])} tracks, no notes")
    ok = meta[:, _M_STATUS] == _OK
    lengths = meta[ok, _M_KEPT]
    total = int(lengths.sum())
    cols = [np.empty(total, np.float64), np.empty(total, np.float64)] + [np.empty(total, np.int16) for _ in range(4)]
    facts = np.empty((int(ok.sum()), 3), dtype=np.float64)
    native.fill(states, int(options.tracks == "first"), meta, *cols, facts)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    start, dur, pitch, vel, prog, track = cols
    batch = PieceBatch(pitch, start, dur, vel, prog, track, offsets, facts[:, 0].copy(),
                       facts[:, 1].copy(), meta[ok][:, [_M_TS_NUM, _M_TS_DEN]].copy())
    return batch, facts[:, 2].astype(np.int64), [i for (i, _, _), k in zip(parsed, ok) if k], left



"""Reading bytes into :class:`Piece`: symusic for MIDI (the fast path), music21 for the tutorial's
reading of MIDI and for score formats (ABC, MusicXML, Humdrum **kern).

Pure functions over bytes: no storage, no Ray.  Every failure of one input is a
:class:`~midiforge.errors.PieceError` with a reason from FAILURE_REASONS.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from midiforge.errors import PieceError
from midiforge.music.piece import DRUM_PROGRAM, Piece, PieceBatch

try:  # the compiled bulk step of read_midi_batch (optional: the Python code does the same, slower)
    from midiforge.music import _midi as _native_midi
except ImportError:  # not built (no C compiler when installed)
    _native_midi = None

MIDI_SUFFIXES = (".mid", ".midi")
SCORE_SUFFIXES = {".abc": "abc", ".xml": "musicxml", ".musicxml": "musicxml", ".mxl": "mxl", ".krn": "humdrum"}
SUFFIXES = MIDI_SUFFIXES + tuple(SCORE_SUFFIXES)


@dataclass(frozen=True)
class ReadOptions:
    parser: str = "symusic"          # for MIDI files: symusic | music21
    tracks: str = "all"              # all: merge every track; first: the first instrument, like the tutorial
    max_notes: int = 200_000
    max_quarters: float = 50_000.0   # ~7 hours at 120 qpm
    max_bytes: int = 64 * 1024 * 1024


def file_format(name: str) -> str | None:
    """'midi', a music21 format name, or None for a file we do not read."""
    low = name.lower()
    if low.endswith(MIDI_SUFFIXES):
        return "midi"
    for suffix, fmt in SCORE_SUFFIXES.items():
        if low.endswith(suffix):
            return fmt
    return None


# ------------------------------------------------------------------------------------------
# units: one file may hold several tunes (ABC); each tune is its own input unit
# ------------------------------------------------------------------------------------------
_ABC_X = re.compile(rb"^X:\s*(\S*)", re.MULTILINE)


def split_units(source: str, data: bytes) -> list[tuple[str, bytes]]:
    """(unit_source, unit_bytes) pairs: the file itself, or one per ``X:`` tune of an ABC file.

    The ABC file header (lines before the first ``X:``) is kept in front of every tune.
    """
    if file_format(source) != "abc":
        return [(source, data)]
    starts = [m.start() for m in _ABC_X.finditer(data)]
    if len(starts) <= 1:
        return [(source, data)]
    header = data[: starts[0]]
    out = []
    bounds = starts + [len(data)]
    seen: dict[str, int] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        tune = data[a:b]
        label = _ABC_X.match(tune).group(1).decode("latin-1") or "?"
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}.{seen[label]}"
        out.append((f"{source}#X{label}", header + tune))
    return out


# ------------------------------------------------------------------------------------------
# MIDI through symusic
# ------------------------------------------------------------------------------------------
def _midi_payload(data: bytes) -> bytes:
    if not data:
        raise PieceError("empty", "0 bytes")
    if data[:4] == b"RIFF":  # RMID: a Standard MIDI File inside a RIFF container
        at = data.find(b"MThd", 0, 256)
        if at < 0:
            raise PieceError("not_midi", "RIFF file without a MIDI header")
        data = data[at:]
    if data[:4] != b"MThd":
        raise PieceError("not_midi", f"starts with {data[:4]!r}, not b'MThd'")
    if len(data) < 14:
        raise PieceError("corrupt", f"header truncated ({len(data)} bytes)")
    if data[12] & 0x80:
        raise PieceError("unsupported", "SMPTE time division")
    return data


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


#: the largest tick symusic can hold (its times are int32): a file whose delta times add past it
#: would wrap to negative (or small) times and pass for music
MAX_TICK = 2**31 - 1


def _varlen(data: bytes, pos: int, end: int):
    """(value, next position) of a variable-length quantity of at most 4 bytes, or None."""
    value = 0
    for _ in range(4):
        if pos >= end:
            return None
        b = data[pos]
        pos += 1
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            return value, pos
    return None


def _track_ticks(data: bytes, pos: int, end: int) -> int:
    total, running = 0, 0
    while pos < end:
        got = _varlen(data, pos, end)
        if got is None:
            break
        delta, pos = got
        total += delta
        if pos >= end:
            break
        status = data[pos]
        if status & 0x80:
            pos += 1
        elif running:
            status = running
        else:
            break
        if status == 0xFF:
            if pos >= end:
                break
            kind = data[pos]
            got = _varlen(data, pos + 1, end)
            if got is None or kind == 0x2F:
                break
            pos = min(got[1] + got[0], end)
        elif status in (0xF0, 0xF7):
            got = _varlen(data, pos, end)
            if got is None:
                break
            pos = min(got[1] + got[0], end)
        elif status >= 0xF0:
            pos += 2 if status == 0xF2 else 1 if status in (0xF1, 0xF3) else 0
        else:
            running = status
            pos += 1 if status & 0xF0 in (0xC0, 0xD0) else 2
    return total


def _smf_ticks(data: bytes) -> int:
    """The largest sum of delta times of one MTrk chunk of a Standard MIDI File: the same walk as
    ``_midi.ticks`` (see _midi.c for its rules), in Python."""
    if len(data) < 8 or data[:4] != b"MThd":
        return 0
    pos = 8 + int.from_bytes(data[4:8], "big")
    best = 0
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos + 4: pos + 8], "big")
        at = pos + 8
        if data[pos: pos + 4] == b"MTrk":
            best = max(best, _track_ticks(data, at, min(at + length, len(data))))
        pos = at + length
    return best


def _wrapped(ticks: int) -> PieceError:
    return PieceError("corrupt", f"delta times add up to {ticks} ticks in one track, past {MAX_TICK} "
                                 "(times would wrap)")


def _checked_payload(data: bytes, options: ReadOptions) -> bytes:
    """The Standard MIDI File in ``data``, after the checks that need no parsing."""
    if len(data) > options.max_bytes:
        raise PieceError("too_long", f"{len(data)} bytes > max {options.max_bytes}")
    return _midi_payload(data)


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


def _native_batch(parsed: list, options: ReadOptions, errors: list) -> tuple[PieceBatch, np.ndarray, list, list]:
    """The compiled path (midiforge.music._midi): every state buffer of the batch in two C passes.

    Returns the batch of the files read, their end ticks, their input indices, and the (index, score,
    tpq) of the files whose buffer did not fit, for the Python path."""
    states = [score.__getstate__() for _, score, _ in parsed]
    meta = np.zeros((len(parsed), _META), dtype=np.int64)
    _native_midi.scan(states, int(options.tracks == "first"), options.max_notes, meta)
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
    _native_midi.fill(states, int(options.tracks == "first"), meta, *cols, facts)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    start, dur, pitch, vel, prog, track = cols
    batch = PieceBatch(pitch, start, dur, vel, prog, track, offsets, facts[:, 0].copy(),
                       facts[:, 1].copy(), meta[ok][:, [_M_TS_NUM, _M_TS_DEN]].copy())
    return batch, facts[:, 2].astype(np.int64), [i for (i, _, _), k in zip(parsed, ok) if k], left


def _ticks(payloads: list[bytes]) -> list[int]:
    """:func:`_smf_ticks` of every payload: in C when it is built."""
    if _native_midi is None:
        return [_smf_ticks(p) for p in payloads]
    out = np.empty(len(payloads), dtype=np.int64)
    _native_midi.ticks(payloads, out)
    return out.tolist()


def read_midi_batch(datas: list[bytes], options: ReadOptions = ReadOptions()) -> tuple[PieceBatch, list]:
    """Many MIDI files through symusic at once: (the pieces read, in input order; for each input
    its :class:`PieceError`, or None if it is in the batch).

    symusic parses each file (after a walk over its delta times: a file whose times would wrap past
    int32 is ``corrupt``); the notes of all of them are then read out of symusic's serialized
    Scores at once, in C (midiforge.music._midi) when it is built, else through symusic's
    ``.numpy()``.  A piece's notes are in the file's order (track by track): tokenizers sort what
    they need.
    """
    errors: list = [None] * len(datas)
    payloads = []  # (input index, the Standard MIDI File's bytes)
    for i, data in enumerate(datas):
        try:
            payload = _checked_payload(data, options)
            payloads.append((i, payload if type(payload) is bytes else bytes(payload)))
        except PieceError as exc:
            errors[i] = exc
        except Exception as exc:  # a bug for one file: its failure, not the batch's
            errors[i] = PieceError("parser_error", f"{type(exc).__name__}: {exc}")
    parsed = []  # (input index, score, ticks per quarter)
    for (i, payload), ticks in zip(payloads, _ticks([p for _, p in payloads])):
        if ticks > MAX_TICK:
            errors[i] = _wrapped(ticks)
            continue
        try:
            parsed.append((i, *_parse_score(payload)))
        except PieceError as exc:
            errors[i] = exc
        except Exception as exc:  # a bug for one file: its failure, not the batch's
            errors[i] = PieceError("parser_error", f"{type(exc).__name__}: {exc}")
    tpq_of = {i: tpq for i, _, tpq in parsed}
    parts, ends, where = [], [], []  # batches, their end ticks, the input index of each piece
    if _native_midi is not None and parsed:
        batch, end_tick, done, parsed = _native_batch(parsed, options, errors)
        parts.append(batch)
        ends.append(end_tick)
        where.extend(done)
    files = []
    for i, score, tpq in parsed:  # the Python path: every file without the compiled part, else the leftovers
        try:
            files.append(_file_of(score, tpq, options))
            where.append(i)
        except PieceError as exc:
            errors[i] = exc
        except Exception as exc:  # a bug for one file: its failure, not the batch's
            errors[i] = PieceError("parser_error", f"{type(exc).__name__}: {exc}")
    if files or not parts:
        batch, end_tick = _assemble(files)
        parts.append(batch)
        ends.append(end_tick)
    batch, end_tick = PieceBatch.concat(parts), np.concatenate(ends)
    if len(parts) > 1:  # back to input order
        order = np.argsort(np.array(where, dtype=np.int64), kind="stable")
        batch, end_tick, where = batch.take(order), end_tick[order], [where[k] for k in order]
    quarters = end_tick / np.array([tpq_of[i] for i in where], dtype=np.float64)
    # the tick walk keeps wrapped times out; a negative end is corrupt whatever made it
    drop = np.flatnonzero((quarters > options.max_quarters) | (end_tick < 0))
    if len(drop):  # rare: drop those pieces, record why
        for j in drop.tolist():
            errors[where[j]] = (PieceError("corrupt", f"negative times (the last note ends at tick {end_tick[j]})")
                                if end_tick[j] < 0 else
                                PieceError("too_long", f"{quarters[j]:.0f} quarters > max {options.max_quarters:.0f}"))
        batch = batch.take(np.setdiff1d(np.arange(len(batch)), drop))
    return batch, errors


def read_midi_symusic(data: bytes, options: ReadOptions = ReadOptions()) -> Piece:
    """One MIDI file through symusic (see :func:`read_midi_batch`)."""
    batch, errors = read_midi_batch([data], options)
    if errors[0] is not None:
        raise errors[0]
    return batch.piece(0)


# ------------------------------------------------------------------------------------------
# music21: the tutorial's reading of MIDI, and the score formats
# ------------------------------------------------------------------------------------------
def _music21_parse(data: bytes, fmt: str):
    import warnings

    with warnings.catch_warnings():  # music21 warns per track about unknown instrument names
        warnings.simplefilter("ignore")
        return _music21_parse_loud(data, fmt)


def _music21_parse_loud(data: bytes, fmt: str):
    from music21 import converter, midi

    if fmt == "midi":
        data = _midi_payload(data)
        mf = midi.MidiFile()
        try:
            mf.readstr(data)
        except Exception as exc:  # music21 raises MidiException, IndexError, struct.error ...
            raise PieceError("corrupt", f"{type(exc).__name__}: {exc}") from None
        try:
            return midi.translate.midiFileToStream(mf)
        except Exception as exc:
            raise PieceError("parser_error", f"music21: {type(exc).__name__}: {exc}") from None
    if not data.strip():
        raise PieceError("empty", "no content")
    try:
        if fmt == "mxl":
            return converter.parseData(data, format="musicxml") if data[:2] != b"PK" else _parse_mxl(data)
        return converter.parseData(data.decode("utf-8", errors="replace"), format=fmt)
    except Exception as exc:  # music21's parsers raise many unrelated types for bad input
        raise PieceError("parser_error", f"music21 {fmt}: {type(exc).__name__}: {exc}") from None


def _parse_mxl(data: bytes):
    import io
    import zipfile

    from music21 import converter

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = [n for n in zf.namelist() if n.endswith((".xml", ".musicxml")) and not n.startswith("META-INF")]
        if not names:
            raise PieceError("corrupt", "compressed MusicXML without a score inside")
        return converter.parseData(zf.read(names[0]).decode("utf-8", errors="replace"), format="musicxml")


def read_music21(data: bytes, fmt: str, options: ReadOptions = ReadOptions()) -> Piece:
    """A piece through music21, the tutorial's way (``partitionByInstrument`` for ``tracks=first``)."""
    from music21 import chord, instrument, meter, note, stream, tempo

    if len(data) > options.max_bytes:
        raise PieceError("too_long", f"{len(data)} bytes > max {options.max_bytes}")
    score = _music21_parse(data, fmt)
    if isinstance(score, stream.Opus):
        if not score.scores:
            raise PieceError("no_notes", "empty opus")
        score = score.scores[0]
    if fmt != "midi":
        try:
            score = score.stripTies()
        except Exception as exc:
            raise PieceError("parser_error", f"music21 stripTies: {type(exc).__name__}: {exc}") from None
    if options.tracks == "first":
        # the tutorial takes partitionByInstrument(...).parts[0]; we take the first part with notes
        parts = instrument.partitionByInstrument(score)
        with_notes = [p for p in parts.parts if p.recurse().notes] if parts is not None else []
        streams = with_notes[:1] or [score]
    else:
        streams = list(score.parts) or [score]
    pitch, start, dur, vel, prog, trk = [], [], [], [], [], []
    for index, part in enumerate(streams):
        inst = part.getInstrument(returnDefault=True)
        is_drum = isinstance(inst, instrument.UnpitchedPercussion) or getattr(inst, "midiChannel", None) == 9
        program = DRUM_PROGRAM if is_drum else int(inst.midiProgram or 0)
        for el in part.flatten().notes:
            if isinstance(el, chord.Chord):
                pitches = [p.midi for p in el.pitches]
            elif isinstance(el, note.Note):
                pitches = [el.pitch.midi]
            else:
                continue
            v = el.volume.velocity if el.volume.velocityIsRelative is False or el.volume.velocity else None
            for p in pitches:
                pitch.append(p)
                start.append(float(el.offset))
                dur.append(float(el.quarterLength))
                vel.append(int(v) if v else 90)
                prog.append(program)
                trk.append(index)
            if len(pitch) > options.max_notes:
                raise PieceError("too_long", f"more than {options.max_notes} notes")
    if not pitch:
        raise PieceError("no_notes", "music21 found no notes")
    flat = score.flatten()
    marks = list(flat.getElementsByClass(tempo.MetronomeMark))
    qpm = float(marks[0].getQuarterBPM()) if marks and marks[0].getQuarterBPM() else 120.0
    sigs = list(flat.getElementsByClass(meter.TimeSignature))
    ts = (int(sigs[0].numerator), int(sigs[0].denominator)) if sigs else (4, 4)
    piece = Piece.from_columns(pitch, start, dur, vel, prog, trk, qpm=qpm, time_signature=ts)
    end = piece.end()
    if end > options.max_quarters:
        raise PieceError("too_long", f"{end:.0f} quarters > max {options.max_quarters:.0f}")
    return Piece.from_columns(pitch, start, dur, vel, prog, trk, qpm=qpm, time_signature=ts,
                              seconds=piece.end_seconds())


def read_piece(source: str, data: bytes, options: ReadOptions = ReadOptions()) -> Piece:
    """Read one input unit; the format comes from ``source``'s suffix (``#X..`` tune labels allowed)."""
    fmt = file_format(source.split("#", 1)[0])
    if fmt is None:
        raise PieceError("unsupported", f"unknown file type {source.rsplit('.', 1)[-1]!r}")
    if not data:
        raise PieceError("empty", "0 bytes")
    if fmt == "midi" and options.parser == "symusic":
        return read_midi_symusic(data, options)
    return read_music21(data, fmt, options)


def read_pieces(units: list[tuple[str, bytes]], options: ReadOptions = ReadOptions()) -> tuple[PieceBatch, list]:
    """Many input units (``(source, bytes)``) at once: (the pieces read, in input order; for each
    unit its :class:`PieceError`, or None if it is in the batch).

    MIDI files on the symusic path are read as one batch (:func:`read_midi_batch`); the others
    one by one (:func:`read_piece`).  An unexpected exception of a parser on one unit becomes that
    unit's ``parser_error``: nothing raised for one unit stops the others.
    """
    if any(k in os.environ for k in _FAULT_ENV):
        _inject_faults(units)
    fast = [i for i, (src, _) in enumerate(units) if options.parser == "symusic"
            and file_format(src.split("#", 1)[0]) == "midi" and units[i][1]]
    errors: list = [None] * len(units)
    batch, fast_errors = _read_midi_guarded([units[i][1] for i in fast], options)
    for i, e in zip(fast, fast_errors):
        errors[i] = e
    if len(fast) == len(units):
        return batch, errors
    order = [i for i, e in zip(fast, fast_errors) if e is None]  # unit of each piece, batch first
    slow: list[Piece] = []
    for i in sorted(set(range(len(units))) - set(fast)):
        try:
            slow.append(read_piece(*units[i], options))
            order.append(i)
        except PieceError as exc:
            errors[i] = exc
        except Exception as exc:  # a parser bug on one unit: its failure, not the batch's
            errors[i] = PieceError("parser_error", f"{type(exc).__name__}: {exc}")
    batch = PieceBatch.concat([batch, PieceBatch.from_pieces(slow)])
    return batch.take(np.argsort(order, kind="stable")), errors


#: Fault-injection hook, for tests only (inert unless one of these environment variables is set in the
#: reading process): MIDIFORGE_TEST_CRASH_ON=<substring> makes read_pieces send SIGSEGV to its own process
#: when a unit's source contains the substring (a real native crash of a Ray worker, as a parser bug in C
#: would cause), MIDIFORGE_TEST_HANG_ON=<substring> makes it sleep forever on such a unit (a parser that
#: never returns), MIDIFORGE_TEST_SLOW_SECONDS=<s> makes every call sleep s seconds first (a slow batch: a
#: window in which a test kills the driver while its workers still run).  tests/test_preprocess_faults.py
#: uses them; nothing else may.
_FAULT_ENV = ("MIDIFORGE_TEST_CRASH_ON", "MIDIFORGE_TEST_HANG_ON", "MIDIFORGE_TEST_SLOW_SECONDS")


def _inject_faults(units: list[tuple[str, bytes]]) -> None:
    import signal
    import time

    time.sleep(float(os.environ.get("MIDIFORGE_TEST_SLOW_SECONDS") or 0))
    crash, hang = os.environ.get("MIDIFORGE_TEST_CRASH_ON"), os.environ.get("MIDIFORGE_TEST_HANG_ON")
    for src, _data in units:
        if crash and crash in src:
            os.kill(os.getpid(), signal.SIGSEGV)
        if hang and hang in src:
            while True:
                time.sleep(3600)


def _read_midi_guarded(datas: list[bytes], options: ReadOptions):
    """:func:`read_midi_batch`; if it raises (it catches what one file raises, so only a bug can),
    each file alone, so that the exception is the failure of the file that caused it."""
    try:
        return read_midi_batch(datas, options)
    except Exception:
        pieces, errors = [], []
        for data in datas:
            try:
                b, (e,) = read_midi_batch([data], options)
            except Exception as exc:
                b, e = None, PieceError("parser_error", f"{type(exc).__name__}: {exc}")
            errors.append(e)
            if e is None:
                pieces.append(b)
        return PieceBatch.concat(pieces or [PieceBatch.from_pieces([])]), errors

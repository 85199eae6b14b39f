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
# the names of midi_columns and smf that tests, benchmarks and _midi.c's comments read here: noqa F401
from midiforge.music.midi_columns import (  # noqa: F401
    _LAYOUT, _M_KEPT, _M_STATUS, _M_TPQ, _META, _OK, _assemble, _file_of, _keep_tracks, _native_batch, _parse_score,
    _seconds,
)
from midiforge.music.piece import DRUM_PROGRAM, Piece, PieceBatch
from midiforge.music.smf import MAX_TICK, _midi_payload, _smf_ticks, _varlen, _wrapped  # noqa: F401

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
# MIDI through symusic: the header checks and the tick walk in midiforge.music.smf, symusic's
# Scores into columns in midiforge.music.midi_columns; read_midi_batch drives them
# ------------------------------------------------------------------------------------------
def _checked_payload(data: bytes, options: ReadOptions) -> bytes:
    """The Standard MIDI File in ``data``, after the checks that need no parsing."""
    if len(data) > options.max_bytes:
        raise PieceError("too_long", f"{len(data)} bytes > max {options.max_bytes}")
    return _midi_payload(data)


def _payload_bytes(data: bytes, options: ReadOptions) -> bytes:
    """:func:`_checked_payload` as ``bytes``."""
    payload = _checked_payload(data, options)
    return payload if type(payload) is bytes else bytes(payload)


def _ticks(payloads: list[bytes]) -> list[int]:
    """:func:`_smf_ticks` of every payload: in C when it is built."""
    if _native_midi is None:
        return [_smf_ticks(p) for p in payloads]
    out = np.empty(len(payloads), dtype=np.int64)
    _native_midi.ticks(payloads, out)
    return out.tolist()


def _one_file(errors: list, i: int, step, *args):
    """``step(*args)`` for input ``i``, or None with its failure in ``errors[i]``: a
    :class:`PieceError`, or any other exception as ``parser_error`` (a bug for one file: its
    failure, not the batch's)."""
    try:
        return step(*args)
    except PieceError as exc:
        errors[i] = exc
    except Exception as exc:
        errors[i] = PieceError("parser_error", f"{type(exc).__name__}: {exc}")
    return None


def _payloads(datas: list[bytes], options: ReadOptions, errors: list) -> list[tuple[int, bytes]]:
    """(input index, the Standard MIDI File's bytes) of every input that passes the checks that need
    no parsing."""
    out = []
    for i, data in enumerate(datas):
        payload = _one_file(errors, i, _payload_bytes, data, options)
        if payload is not None:
            out.append((i, payload))
    return out


def _parse_all(payloads: list[tuple[int, bytes]], errors: list) -> list[tuple]:
    """(input index, symusic Score, ticks per quarter) of every payload symusic parses, after the walk
    over its delta times (a file whose times would wrap past int32 is ``corrupt``, never parsed)."""
    parsed = []
    for (i, payload), ticks in zip(payloads, _ticks([p for _, p in payloads])):
        if ticks > MAX_TICK:
            errors[i] = _wrapped(ticks)
            continue
        got = _one_file(errors, i, _parse_score, payload)
        if got is not None:
            parsed.append((i, *got))
    return parsed


def _read_parsed(parsed: list[tuple], options: ReadOptions, errors: list) -> tuple[PieceBatch, np.ndarray, list]:
    """The notes of the parsed files: (their batch in input order, the end tick of each piece, the
    input index of each piece); in C when it is built, the Python path for the rest."""
    parts, ends, where = [], [], []  # batches, their end ticks, the input index of each piece
    if _native_midi is not None and parsed:
        batch, end_tick, done, parsed = _native_batch(_native_midi, parsed, options, errors)
        parts.append(batch)
        ends.append(end_tick)
        where.extend(done)
    files = []
    for i, score, tpq in parsed:  # the Python path: every file without the compiled part, else the leftovers
        f = _one_file(errors, i, _file_of, score, tpq, options)
        if f is not None:
            files.append(f)
            where.append(i)
    if files or not parts:
        batch, end_tick = _assemble(files)
        parts.append(batch)
        ends.append(end_tick)
    batch, end_tick = PieceBatch.concat(parts), np.concatenate(ends)
    if len(parts) > 1:  # back to input order
        order = np.argsort(np.array(where, dtype=np.int64), kind="stable")
        batch, end_tick, where = batch.take(order), end_tick[order], [where[k] for k in order]
    return batch, end_tick, where


def _drop_bad_ends(batch: PieceBatch, end_tick: np.ndarray, quarters: np.ndarray, where: list,
                   options: ReadOptions, errors: list) -> PieceBatch:
    """``batch`` without the pieces longer than ``max_quarters`` or ending at a negative tick (the
    tick walk keeps wrapped times out; a negative end is corrupt whatever made it), their reasons
    recorded."""
    drop = np.flatnonzero((quarters > options.max_quarters) | (end_tick < 0))
    if not len(drop):
        return batch
    for j in drop.tolist():  # rare: drop those pieces, record why
        errors[where[j]] = (PieceError("corrupt", f"negative times (the last note ends at tick {end_tick[j]})")
                            if end_tick[j] < 0 else
                            PieceError("too_long", f"{quarters[j]:.0f} quarters > max {options.max_quarters:.0f}"))
    return batch.take(np.setdiff1d(np.arange(len(batch)), drop))


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
    parsed = _parse_all(_payloads(datas, options, errors), errors)
    tpq_of = {i: tpq for i, _, tpq in parsed}
    batch, end_tick, where = _read_parsed(parsed, options, errors)
    quarters = end_tick / np.array([tpq_of[i] for i in where], dtype=np.float64)
    return _drop_bad_ends(batch, end_tick, quarters, where, options, errors), errors


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

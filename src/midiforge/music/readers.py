"""Reading bytes into :class:`Piece`: symusic for MIDI (the fast path), music21 for the tutorial's
reading of MIDI and for score formats (ABC, MusicXML, Humdrum **kern).

Pure functions over bytes: no storage, no Ray.  Every failure of one input is a
:class:`~midiforge.errors.PieceError` with a reason from FAILURE_REASONS; :data:`READ_ERRORS`
is the one tuple of exceptions a loader may raise for a bad file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from midiforge.errors import PieceError
from midiforge.music.piece import DRUM_PROGRAM, Piece

READ_ERRORS = (PieceError,)

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


def _seconds(end_tick: int, tempo_ticks: np.ndarray, tempo_mspq: np.ndarray, tpq: int) -> float:
    """Seconds at ``end_tick`` under a tempo map (microseconds per quarter from each tick on)."""
    if len(tempo_ticks) < 7:  # the usual map, one or a few tempos: plain Python, the same sum as NumPy's
        ticks, mspq = [int(x) for x in tempo_ticks], [float(x) for x in tempo_mspq]
        if not ticks or ticks[0] > 0:
            ticks, mspq = [0] + ticks, [500_000.0] + mspq
        kept = [(t, m) for t, m in zip(ticks, mspq) if t < end_tick]
        total = 0.0
        for (t, m), (t_next, _) in zip(kept, kept[1:] + [(end_tick, 0.0)]):
            total += (t_next - t) * m
        return total / tpq / 1e6
    if len(tempo_ticks) == 0 or tempo_ticks[0] > 0:
        tempo_ticks = np.concatenate(([0], tempo_ticks))
        tempo_mspq = np.concatenate(([500_000], tempo_mspq))
    keep = tempo_ticks < end_tick
    t, m = tempo_ticks[keep], tempo_mspq[keep]
    spans = np.diff(np.concatenate((t, [end_tick])))
    return float((spans * m).sum() / tpq / 1e6)


def read_midi_symusic(data: bytes, options: ReadOptions = ReadOptions()) -> Piece:
    import symusic

    if len(data) > options.max_bytes:
        raise PieceError("too_long", f"{len(data)} bytes > max {options.max_bytes}")
    data = _midi_payload(data)
    try:
        score = symusic.Score.from_midi(data)
    except Exception as exc:  # symusic raises RuntimeError/ValueError for malformed files
        raise PieceError("corrupt", str(exc).replace("iostream error", "").strip(" :")) from None
    tpq = int(score.ticks_per_quarter)
    if tpq <= 0:
        raise PieceError("unsupported", f"ticks per quarter = {tpq}")
    found: list[tuple[dict, int, int]] = []  # (note arrays, program, track index) of each track kept
    first_program = None
    total = 0
    for index, track in enumerate(score.tracks):
        notes = track.notes
        n = len(notes)
        if n == 0:
            continue
        program = DRUM_PROGRAM if track.is_drum else int(track.program)
        if options.tracks == "first":
            # music21's partitionByInstrument()[0]: every note of the first instrument, across tracks
            if track.is_drum:
                continue
            if first_program is None:
                first_program = program
            elif program != first_program:
                continue
        total += n
        if total > options.max_notes:
            raise PieceError("too_long", f"more than {options.max_notes} notes")
        found.append((notes.numpy(), program, index))
    if total == 0:
        raise PieceError("no_notes", f"{len(score.tracks)} tracks, no notes")

    if len(found) == 1:  # the common case: no concatenation
        arrays, program, index = found[0]
        time, dur, pitch, vel = arrays["time"], arrays["duration"], arrays["pitch"], arrays["velocity"]
        prog = np.full(total, program, dtype=np.int16)
        trk = np.full(total, index, dtype=np.int16)
    else:
        time, dur, pitch, vel = (np.concatenate([f[0][k] for f in found]) for k in ("time", "duration", "pitch", "velocity"))
        counts = [len(f[0]["time"]) for f in found]
        prog = np.repeat(np.array([f[1] for f in found], dtype=np.int16), counts)
        trk = np.repeat(np.array([f[2] for f in found], dtype=np.int16), counts)
    end_tick = int((time.astype(np.int64) + dur).max())
    if end_tick / tpq > options.max_quarters:
        raise PieceError("too_long", f"{end_tick / tpq:.0f} quarters > max {options.max_quarters:.0f}")
    tempos = score.tempos
    if len(tempos):
        tarr = tempos.numpy()
        t_ticks, t_mspq = tarr["time"], tarr["mspq"]
        qpm = 6e7 / float(t_mspq[0])
    else:
        t_ticks, t_mspq, qpm = (), (), 120.0
    ts = (4, 4)
    if len(score.time_signatures):
        first = score.time_signatures[0]
        if first.numerator > 0 and first.denominator > 0:
            ts = (int(first.numerator), int(first.denominator))
    scale = 1.0 / tpq
    # the file's note order: tokenizers sort what they need (a sort here would be paid twice)
    return Piece(pitch, time * scale, dur * scale, vel, prog, float(qpm), ts,
                 _seconds(end_tick, t_ticks, t_mspq, tpq), {}, trk)


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
                              seconds=end * 60.0 / qpm)


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

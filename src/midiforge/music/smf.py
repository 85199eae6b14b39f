"""Standard MIDI File bytes before any parser sees them: the header checks (RIFF/RMID unwrapped,
SMPTE refused) and the walk over each track's delta times that keeps files whose times would wrap
past int32 (symusic's tick type) from passing for music.  Pure Python; ``midiforge.music._midi``
does the same walk in C (:func:`midiforge.music.readers._ticks` picks)."""
from __future__ import annotations

from midiforge.errors import PieceError


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

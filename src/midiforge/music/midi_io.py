"""Writing pieces out: Standard MIDI File bytes (through symusic) and a piano-roll PNG.

Pure functions from a :class:`~midiforge.music.piece.Piece` to bytes; no storage.  The PNG
encoder is a few lines of zlib (grayscale, 8 bit), so no imaging library is needed.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

from midiforge.music.piece import DRUM_PROGRAM, Piece

TICKS_PER_QUARTER = 480


def piece_to_midi(piece: Piece, qpm: float | None = None, tpq: int = TICKS_PER_QUARTER) -> bytes:
    """A type-1 MIDI file: one track per program (drums on their own drum track), a tempo of
    ``qpm`` (default ``piece.qpm``) and the piece's first time signature, at ``tpq`` ticks per quarter."""
    import symusic

    qpm = float(qpm if qpm is not None else piece.qpm)
    if not (qpm > 0 and np.isfinite(qpm)):
        raise ValueError(f"tempo {qpm}: must be > 0")
    score = symusic.Score(int(tpq))
    score.tempos.append(symusic.Tempo(time=0, qpm=qpm))
    num, den = piece.time_signature
    score.time_signatures.append(symusic.TimeSignature(time=0, numerator=int(num), denominator=int(den)))
    start = np.floor(piece.start * tpq + 0.5).astype(np.int64)
    dur = np.maximum(np.floor(piece.duration * tpq + 0.5).astype(np.int64), 1)
    pitch = np.clip(piece.pitch, 0, 127).astype(np.int8)
    vel = np.clip(piece.velocity, 1, 127).astype(np.int8)
    programs = np.unique(piece.program)
    for prog in sorted(int(p) for p in programs):
        sel = piece.program == prog
        drum = prog == DRUM_PROGRAM
        track = symusic.Track(name="Drums" if drum else f"Program {prog}", program=0 if drum else prog, is_drum=drum)
        order = np.lexsort((pitch[sel], start[sel]))
        track.notes.extend(symusic.Note.from_numpy(
            time=start[sel][order].astype(np.int32), duration=dur[sel][order].astype(np.int32),
            pitch=pitch[sel][order], velocity=vel[sel][order]))
        score.tracks.append(track)
    if not len(programs):  # an empty piece is still a valid file with one (empty) piano track
        score.tracks.append(symusic.Track(name="Program 0", program=0, is_drum=False))
    return bytes(score.dumps_midi())


# ---------------------------------------------------------------------------------------------
# piano roll
# ---------------------------------------------------------------------------------------------
def _png(gray: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of ``gray`` ([height, width] uint8)."""
    h, w = gray.shape
    raw = np.zeros((h, w + 1), dtype=np.uint8)  # filter byte 0 (None) before each row
    raw[:, 1:] = gray

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + chunk(b"IEND", b""))


def piano_roll_png(piece: Piece, steps_per_quarter: int = 4, cell: int = 3, max_width: int = 4096) -> bytes:
    """A piano roll: time left to right (``steps_per_quarter`` columns per quarter), pitch bottom
    to top over the piece's range, brightness from velocity, beat lines every quarter, bar lines
    darker.  Each cell is ``cell`` pixels; the width is capped at ``max_width`` pixels."""
    pitched = ~piece.is_drum
    if not pitched.any():
        return _png(np.zeros((cell, cell), dtype=np.uint8))
    pitch = piece.pitch[pitched].astype(np.int64)
    s = np.floor(piece.start[pitched] * steps_per_quarter + 0.5).astype(np.int64)
    e = np.maximum(np.floor((piece.start + piece.duration)[pitched] * steps_per_quarter + 0.5).astype(np.int64), s + 1)
    lo, hi = int(pitch.min()) - 1, int(pitch.max()) + 1
    steps = min(int(e.max()) + 1, max(1, max_width // cell))
    roll = np.zeros((hi - lo + 1, steps), dtype=np.uint8)
    num, den = piece.time_signature
    bar = max(1, int(round(num * 4 / den * steps_per_quarter)))
    roll[:, ::steps_per_quarter] = 24
    roll[:, ::bar] = 48
    level = (96 + np.clip(piece.velocity[pitched], 1, 127).astype(np.int64) * 159 // 127).astype(np.uint8)
    for a, b, p, v in zip(s, e, pitch, level):
        if a < steps:
            roll[hi - p, a:min(b, steps)] = v
            roll[hi - p, a] = 255  # onsets stand out
    return _png(np.repeat(np.repeat(roll, cell, axis=0), cell, axis=1))

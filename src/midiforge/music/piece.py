"""The one canonical record every reader produces and every tokenizer consumes.

A :class:`Piece` is a set of notes held as parallel NumPy arrays (so that
tokenizers work on whole columns, not on Python objects), with times in
quarter notes, plus the few global facts the tokenizers need.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DRUM_PROGRAM = 128  # the program value that marks a drum note in ``program``
DEFAULT_QPM = 120.0  # the tempo of a piece that states none (MIDI's default, 500000 us per quarter)


def quarters_to_seconds(quarters, qpm):
    """Seconds that ``quarters`` last at ``qpm`` quarters per minute (a missing or zero tempo:
    :data:`DEFAULT_QPM`); scalars or arrays.  The one rule for a piece's ``seconds`` wherever its
    length comes from quarters and one tempo (a MIDI file's tempo map is read by its reader)."""
    if np.ndim(qpm):
        qpm = np.where(np.asarray(qpm, dtype=np.float64) > 0, qpm, DEFAULT_QPM)
    elif not qpm or qpm <= 0:
        qpm = DEFAULT_QPM
    return quarters * 60.0 / qpm


@dataclass(frozen=True)
class Piece:
    """Notes of one piece; all arrays have one entry per note.

    ``start`` and ``duration`` are in quarter notes.  ``program`` is the
    General MIDI program 0..127, or :data:`DRUM_PROGRAM` for drum notes.
    ``seconds`` is the length of the piece in seconds (end of the last note).
    Notes come in no guaranteed order (readers keep the file's; :meth:`from_columns` sorts by
    start, program, pitch): whoever needs an order sorts, as the tokenizers do.
    """

    pitch: np.ndarray
    start: np.ndarray
    duration: np.ndarray
    velocity: np.ndarray
    program: np.ndarray
    qpm: float = DEFAULT_QPM
    time_signature: tuple[int, int] = (4, 4)
    seconds: float = 0.0
    track: np.ndarray | None = None  # source track (MIDI) or part (score) index of each note

    @classmethod
    def from_columns(cls, pitch, start, duration, velocity, program, track=None, **kw) -> "Piece":
        """Build a piece from array-likes, sorted by (start, program, pitch)."""
        pitch = np.asarray(pitch, dtype=np.int16)
        start = np.asarray(start, dtype=np.float64)
        duration = np.asarray(duration, dtype=np.float64)
        velocity = np.asarray(velocity, dtype=np.int16)
        program = np.asarray(program, dtype=np.int16)
        n = len(pitch)
        if not all(len(a) == n for a in (start, duration, velocity, program)):
            raise ValueError("note columns differ in length")
        track = np.zeros(n, dtype=np.int16) if track is None else np.asarray(track, dtype=np.int16)
        order = np.lexsort((pitch, program, start))
        return cls(pitch[order], start[order], duration[order], velocity[order], program[order],
                   track=track[order], **kw)

    def __len__(self) -> int:
        return int(self.pitch.shape[0])

    @property
    def is_drum(self) -> np.ndarray:
        return self.program == DRUM_PROGRAM

    def end(self) -> float:
        """End of the last note, in quarters."""
        return float((self.start + self.duration).max()) if len(self) else 0.0

    def end_seconds(self) -> float:
        """End of the last note in seconds at the piece's tempo: :func:`quarters_to_seconds` of :meth:`end`."""
        return float(quarters_to_seconds(self.end(), self.qpm))

    def select(self, mask: np.ndarray) -> "Piece":
        return Piece(
            self.pitch[mask], self.start[mask], self.duration[mask], self.velocity[mask],
            self.program[mask], self.qpm, self.time_signature, self.seconds,
            None if self.track is None else self.track[mask],
        )

    def transpose(self, semitones: int) -> "Piece | None":
        """The piece moved by ``semitones`` (drums stay); None if a pitch leaves 0..127."""
        if semitones == 0:
            return self
        pitched = ~self.is_drum
        moved = self.pitch.astype(np.int32) + np.where(pitched, semitones, 0)
        if moved.size and (moved.min() < 0 or moved.max() > 127):
            return None
        return Piece(
            moved.astype(np.int16), self.start, self.duration, self.velocity, self.program,
            self.qpm, self.time_signature, self.seconds, self.track,
        )


@dataclass(frozen=True)
class PieceBatch:
    """Many pieces as one set of note columns (the columnar form of a list of :class:`Piece`).

    The notes of piece ``i`` are rows ``offsets[i]:offsets[i + 1]`` of every note column; the
    per-piece facts (``qpm``, ``seconds``, ``time_signature``) have one entry per piece.  Readers
    and tokenizers that work on a whole batch at once use it to pay NumPy's per-call cost once per
    batch instead of once per piece; :meth:`piece` gives back piece ``i`` (views, no copies).
    """

    pitch: np.ndarray     # int16
    start: np.ndarray     # float64, quarters
    duration: np.ndarray  # float64, quarters
    velocity: np.ndarray  # int16
    program: np.ndarray   # int16
    track: np.ndarray     # int16
    offsets: np.ndarray   # int64, len(self) + 1
    qpm: np.ndarray       # float64, one per piece
    seconds: np.ndarray   # float64, one per piece
    time_signature: np.ndarray  # int64 (pieces, 2): numerator, denominator

    NOTE_COLUMNS = ("pitch", "start", "duration", "velocity", "program", "track")

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def piece(self, i: int) -> Piece:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        num, den = self.time_signature[i]
        return Piece(self.pitch[a:b], self.start[a:b], self.duration[a:b], self.velocity[a:b],
                     self.program[a:b], float(self.qpm[i]), (int(num), int(den)), float(self.seconds[i]),
                     self.track[a:b])

    def pieces(self) -> list[Piece]:
        return [self.piece(i) for i in range(len(self))]

    @classmethod
    def from_pieces(cls, pieces: list[Piece]) -> "PieceBatch":
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])

        def column(name, dtype):
            parts = [np.zeros(len(p), dtype) if name == "track" and p.track is None else getattr(p, name)
                     for p in pieces]
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

        return cls(column("pitch", np.int16), column("start", np.float64), column("duration", np.float64),
                   column("velocity", np.int16), column("program", np.int16), column("track", np.int16),
                   offsets, np.array([p.qpm for p in pieces], dtype=np.float64),
                   np.array([p.seconds for p in pieces], dtype=np.float64),
                   np.array([p.time_signature for p in pieces], dtype=np.int64).reshape(len(pieces), 2))

    def take(self, indices) -> "PieceBatch":
        """The pieces at ``indices`` (in that order, repeats allowed), as a new batch."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        rows = np.repeat(self.offsets[indices] - offsets[:-1], lengths) + np.arange(int(offsets[-1]))
        return PieceBatch(*(getattr(self, k)[rows] for k in self.NOTE_COLUMNS), offsets,
                          self.qpm[indices], self.seconds[indices], self.time_signature[indices])

    def slice(self, a: int, b: int) -> "PieceBatch":
        """Pieces ``a..b-1`` as views (no copies)."""
        lo, hi = int(self.offsets[a]), int(self.offsets[b])
        return PieceBatch(*(getattr(self, k)[lo:hi] for k in self.NOTE_COLUMNS), self.offsets[a:b + 1] - lo,
                          self.qpm[a:b], self.seconds[a:b], self.time_signature[a:b])

    def transposed(self, semitones: np.ndarray) -> "PieceBatch":
        """Every piece moved by its own number of semitones (drums stay); the caller checks the range."""
        shift = np.repeat(np.asarray(semitones, dtype=np.int16), self.lengths)
        pitch = np.where(self.program == DRUM_PROGRAM, self.pitch, self.pitch + shift).astype(np.int16)
        return PieceBatch(pitch, *(getattr(self, k) for k in self.NOTE_COLUMNS[1:]), self.offsets,
                          self.qpm, self.seconds, self.time_signature)

    def pitch_range(self) -> tuple[np.ndarray, np.ndarray]:
        """(lowest, highest) pitched (non-drum) note of each piece; (128, -1) for a piece without one."""
        pitched = self.program != DRUM_PROGRAM
        low = np.where(pitched, self.pitch, 128).astype(np.int16)
        high = np.where(pitched, self.pitch, -1).astype(np.int16)
        n = len(self)
        lo, hi = np.full(n, 128, np.int16), np.full(n, -1, np.int16)
        nonempty = self.lengths > 0
        if nonempty.any():
            starts = self.offsets[:-1][nonempty]
            lo[nonempty] = np.minimum.reduceat(low, starts)
            hi[nonempty] = np.maximum.reduceat(high, starts)
        return lo, hi

    @staticmethod
    def concat(batches: list["PieceBatch"]) -> "PieceBatch":
        batches = [b for b in batches if len(b)] or batches[:1]
        if len(batches) == 1:
            return batches[0]
        shift = np.cumsum([0] + [int(b.offsets[-1]) for b in batches[:-1]])
        offsets = np.concatenate([batches[0].offsets[:1]] + [b.offsets[1:] + s for b, s in zip(batches, shift)])
        cols = [np.concatenate([getattr(b, k) for b in batches]) for k in PieceBatch.NOTE_COLUMNS]
        return PieceBatch(*cols, offsets, np.concatenate([b.qpm for b in batches]),
                          np.concatenate([b.seconds for b in batches]),
                          np.concatenate([b.time_signature for b in batches]))

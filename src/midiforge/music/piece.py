"""The one canonical record every reader produces and every tokenizer consumes.

A :class:`Piece` is a set of notes held as parallel NumPy arrays (so that
tokenizers work on whole columns, not on Python objects), with times in
quarter notes, plus the few global facts the tokenizers need.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DRUM_PROGRAM = 128  # the program value that marks a drum note in ``program``


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
    qpm: float = 120.0
    time_signature: tuple[int, int] = (4, 4)
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)
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

    def select(self, mask: np.ndarray) -> "Piece":
        return Piece(
            self.pitch[mask], self.start[mask], self.duration[mask], self.velocity[mask],
            self.program[mask], self.qpm, self.time_signature, self.seconds, dict(self.meta),
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
            self.qpm, self.time_signature, self.seconds, dict(self.meta), self.track,
        )

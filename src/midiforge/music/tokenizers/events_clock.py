"""The events decoding rules (:class:`EventsClock`, one id at a time on the integer grid) and what a
round trip through the events tokenizer preserves (:class:`QuantizedNotes`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from midiforge.music.piece import Piece
from midiforge.music.tokenizers.base import Clock

if TYPE_CHECKING:
    from midiforge.music.tokenizers.events import EventsTokenizer

# what an events id means to the decoder (EventsTokenizer.token_rules)
_SKIP, _EOS, _BAR, _SHIFT, _TEMPO, _INSTRUMENT, _VELOCITY, _PITCH, _DURATION = range(9)


@dataclass
class QuantizedNotes:
    """A piece on the tokenizer's grid, in canonical order; what a round trip preserves."""

    onset: np.ndarray     # steps
    duration: np.ndarray  # steps, 1..max_duration_steps
    pitch: np.ndarray
    velocity: np.ndarray  # bin (0 when velocity_bins == 0)
    program: np.ndarray   # 0..127 or DRUM_PROGRAM (0 for every pitched note when programs is off)
    tempo: int = -1       # tempo bin, -1 when tempo_bins == 0

    def as_tuple(self):
        return (self.tempo, *(a.tolist() for a in (self.onset, self.duration, self.pitch, self.velocity, self.program)))



class EventsClock(Clock):
    """The events decoding rules, one id at a time, on the integer grid.

    TIME_SHIFT_k moves the time k steps; BAR moves it to the next bar line of the time signature
    (the first BAR is bar 0, at time 0); PROGRAM/DRUM and VELOCITY set the state of the notes
    that follow; PITCH starts a note whose length is the DURATION right after it (one step if none
    follows); PAD/BOS/UNK and misplaced tokens are skipped; EOS ends the piece.
    """

    __slots__ = ("tokenizer", "time_signature", "bar_steps", "spq", "rule", "value", "notes", "t", "program",
                 "velocity", "tempo", "bars_started", "pending", "end", "done")

    def __init__(self, tokenizer: EventsTokenizer, time_signature: tuple[int, int], keep_notes: bool) -> None:
        self.tokenizer = tokenizer
        self.time_signature = (int(time_signature[0]), int(time_signature[1]))
        self.bar_steps = tokenizer.bar_steps(self.time_signature)
        self.spq = tokenizer.config.steps_per_quarter
        self.rule, self.value = tokenizer.token_rules
        self.notes: list[tuple[int, int, int, int, int]] | None = [] if keep_notes else None
        self.t = self.program = self.velocity = 0
        self.tempo = -1
        self.bars_started = self.done = False
        self.pending: tuple[int, int] | None = None  # (onset, pitch) of a PITCH whose DURATION may follow
        self.end = 0.0                                # quarters: end of the last finished note

    def feed(self, token: int) -> None:
        if self.done:
            return
        rule, value = (self.rule[token], self.value[token]) if 0 <= token < len(self.rule) else (_SKIP, 0)
        if self.pending is not None:
            onset, pitch = self.pending
            self.pending = None
            self._note(onset, value if rule == _DURATION else 1, pitch)
            if rule == _DURATION:
                return
        if rule == _SHIFT:
            self.t += value
        elif rule == _PITCH:
            self.pending = (self.t, value)
        elif rule == _VELOCITY:
            self.velocity = value
        elif rule == _INSTRUMENT:
            self.program = value
        elif rule == _BAR:
            self.t = (self.t // self.bar_steps + 1) * self.bar_steps if self.bars_started else 0
            self.bars_started = True
        elif rule == _TEMPO:
            self.tempo = value
        elif rule == _EOS:
            self.done = True

    def _note(self, onset: int, steps: int, pitch: int) -> None:
        end = onset / self.spq + steps / self.spq  # as Piece.end() adds start and duration
        if end > self.end:
            self.end = end
        if self.notes is not None:
            self.notes.append((onset, steps, pitch, self.velocity, self.program))

    def quarters(self) -> float:
        if self.pending is None:
            return self.end
        return max(self.end, self.pending[0] / self.spq + 1 / self.spq)

    @property
    def qpm(self) -> float:
        return self.tokenizer.tempo_value(self.tempo)

    def quantized(self) -> QuantizedNotes:
        """The notes so far in canonical order (a pending PITCH as a one-step note)."""
        if self.notes is None:
            raise ValueError("quantized(): a clock made without keep_notes")
        notes = self.notes
        if self.pending is not None:
            notes = notes + [(self.pending[0], 1, self.pending[1], self.velocity, self.program)]
        arr = np.array(notes, dtype=np.int64).reshape(-1, 5)
        arr = arr[np.lexsort((arr[:, 3], arr[:, 1], arr[:, 2], arr[:, 4], arr[:, 0]))]
        return QuantizedNotes(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], arr[:, 4], self.tempo)

    def piece(self) -> Piece:
        q = self.quantized()
        tok = self.tokenizer
        vel = np.array([tok.velocity_value(int(b)) for b in q.velocity], dtype=np.int16)
        start, dur = q.onset / self.spq, q.duration / self.spq
        return Piece.from_columns(q.pitch, start, dur, vel, q.program, qpm=self.qpm, time_signature=self.time_signature,
                                  seconds=self.seconds())


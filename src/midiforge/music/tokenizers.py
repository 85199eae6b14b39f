"""Tokenizers: :class:`EventsTokenizer` (time-aware, the default) and :class:`ClassicTokenizer`
(the Keras-tutorial encoding), both a :class:`Tokenizer`: they read a
:class:`~midiforge.music.piece.Piece`, decode through their own :class:`Clock` (the decoding
rules, read one id at a time) and are fully described by their ``tokenizer.json``
(:meth:`Tokenizer.to_json` / :func:`load_tokenizer`).

Ids 0..3 are always PAD, BOS, EOS, UNK.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from midiforge.errors import MidiforgeError
from midiforge.music.piece import DEFAULT_QPM, DRUM_PROGRAM, Piece, PieceBatch, quarters_to_seconds

try:  # EventsTokenizer.encode_batch compiled (optional: the NumPy code does the same, slower)
    from midiforge.music import _events as _native
except ImportError:  # not built (no C compiler when installed): the NumPy path
    _native = None

SPECIALS = ("PAD", "BOS", "EOS", "UNK")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
FORMAT = "midiforge-tokenizer"
FORMAT_VERSION = 1

# music21's spelling of MIDI numbers (pitch.Pitch(midi=m)), which the tutorial's tokens use.
_NAMES = ("C", "C#", "D", "E-", "E", "F", "F#", "G", "G#", "A", "B-", "B")
PITCH_NAMES = tuple(f"{_NAMES[m % 12]}{m // 12 - 1}" for m in range(128))
_NAME_TO_MIDI = {n: m for m, n in enumerate(PITCH_NAMES)}


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    """[0..c0-1, 0..c1-1, ...] for non-negative counts."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    return np.arange(total) - np.repeat(ends - counts, counts)


def _batch_order(seg, onset, prog, pitch, dur, vel, max_dur: int, vel_bins: int) -> np.ndarray:
    """``np.lexsort((vel, dur, pitch, prog, onset, seg))`` as one argsort of a packed int64 key.

    Notes come in (piece, start) order already, so a stable sort of the packed key (timsort)
    runs over nearly sorted data; lexsort would make six passes.  Equal keys are equal notes,
    so the order among them does not show.  Falls back to lexsort if the key cannot fit.
    """
    if len(seg) == 0:
        return np.zeros(0, dtype=np.int64)
    low = (DRUM_PROGRAM + 1) * 128 * (max_dur + 1) * max(vel_bins, 1)
    span = int(onset.max()) + 1
    in_range = 0 <= int(pitch.min()) and int(pitch.max()) <= 127 and 0 <= int(prog.min()) \
        and int(prog.max()) <= DRUM_PROGRAM
    if not in_range or (int(seg[-1]) + 1) * span * low >= 2**62:
        return np.lexsort((vel, dur, pitch, prog, onset, seg))
    key = (seg * span + onset) * low + ((prog * 128 + pitch) * (max_dur + 1) + dur) * max(vel_bins, 1) + vel
    return np.argsort(key, kind="stable")


def _short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------
# the interface
# ---------------------------------------------------------------------------------------------
class Clock(ABC):
    """A tokenizer's decoding rules as a state machine read one token id at a time.

    :meth:`Tokenizer.decode` is feeding every id to a clock that keeps its notes, so the time a
    clock tells after some ids is ``decode(those ids).end()``, by construction: generation's
    ``--max-seconds`` and decoding cannot disagree.  EOS ends the piece (later ids change nothing).
    """

    __slots__ = ()
    done: bool = False

    @abstractmethod
    def feed(self, token: int) -> None:
        """Read one more id."""

    def feed_all(self, ids) -> "Clock":
        for token in ids:
            if self.done:
                break
            self.feed(int(token))
        return self

    @abstractmethod
    def quarters(self) -> float:
        """End of the last note so far, in quarters (0.0 before any note)."""

    @property
    @abstractmethod
    def qpm(self) -> float:
        """The tempo the ids so far state (the tokenizer's default without a tempo token)."""

    def seconds(self, qpm: float | None = None) -> float:
        """:meth:`quarters` in seconds at ``qpm`` (default: the tempo the ids state)."""
        return float(quarters_to_seconds(self.quarters(), qpm or self.qpm))

    @abstractmethod
    def piece(self) -> Piece:
        """The notes read so far as a piece (a clock made with ``keep_notes``)."""


class Tokenizer(ABC):
    """What every tokenizer offers; generate, primers and preprocess use only this.

    ``vocab[i]`` is the text of id ``i``; ids 0..3 are always :data:`SPECIALS`.  A tokenizer is
    fully described by its ``tokenizer.json`` (:meth:`to_json`; :func:`load_tokenizer` reads it).
    """

    kind: str = ""
    vocab: list[str]
    #: the vocabulary comes from the corpus, not from the settings: preprocess gathers every piece's
    #: tokens as text (``encode_text``), builds the vocabulary (``with_vocab``), then the ids (``ids_of``)
    vocab_from_data: bool = False

    @property
    @abstractmethod
    def id(self) -> str:
        """``<kind>-<hash of kind, settings and vocabulary>``: equal ids, equal token meanings."""

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # -- encode -----------------------------------------------------------------------------
    @abstractmethod
    def encode(self, piece: Piece) -> np.ndarray:
        """Token ids of ``piece``, BOS ... EOS, as int32."""

    def encode_many(self, pieces: list[Piece]) -> list[np.ndarray]:
        return [self.encode(p) for p in pieces]

    def encode_batch(self, batch: PieceBatch) -> tuple[np.ndarray, np.ndarray]:
        """The ids of every piece of ``batch`` one after the other (int32), and where each piece's
        ids start: piece ``i`` is ``ids[offsets[i]:offsets[i + 1]]``."""
        parts = self.encode_many(batch.pieces())
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        return (np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)), offsets

    def encode_known(self, piece: Piece) -> tuple[np.ndarray, int]:
        """Ids of ``piece`` (BOS ... EOS) with every token the vocabulary lacks replaced by the
        nearest known one (dropped if there is none), and how many were replaced."""
        return self.encode(piece), 0

    def head(self, qpm: float | None = None) -> np.ndarray:
        """The ids every piece starts with: BOS (and what states ``qpm``, if the tokenizer can)."""
        return np.array([BOS_ID], dtype=np.int32)

    def with_tempo(self, ids: np.ndarray, qpm: float) -> np.ndarray:
        """``ids`` (starting with BOS) stating the tempo ``qpm``; unchanged if the tokenizer has no
        tempo tokens."""
        return ids

    # -- decode -----------------------------------------------------------------------------
    @abstractmethod
    def clock(self, time_signature: tuple[int, int] = (4, 4), keep_notes: bool = False) -> Clock:
        """A fresh :class:`Clock` (the decoding rules) for a piece in ``time_signature``."""

    def decode(self, ids, time_signature: tuple[int, int] = (4, 4)) -> Piece:
        """The piece of ``ids``; tolerant of ill-formed (generated) sequences; stops at EOS."""
        return self.clock(time_signature, keep_notes=True).feed_all(ids).piece()

    # -- tokenizer.json ---------------------------------------------------------------------
    @abstractmethod
    def config_dict(self) -> dict:
        """The settings, as JSON values."""

    @classmethod
    @abstractmethod
    def from_dict(cls, d: dict) -> "Tokenizer":
        """The tokenizer of a parsed ``tokenizer.json`` of this kind."""

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind, "id": self.id,
                "config": self.config_dict(), "vocab": self.vocab,
                "special": {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"


# ---------------------------------------------------------------------------------------------
# events
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EventsConfig:
    steps_per_quarter: int = 4        # onset/duration grid: 4 = sixteenth notes
    max_shift_steps: int = 16         # TIME_SHIFT_1..N; longer rests chain several shifts
    max_duration_steps: int = 64      # DURATION_1..N; longer notes are clipped to N
    velocity_bins: int = 8            # 0: no velocity tokens (all notes decode at velocity 80)
    programs: bool = False            # PROGRAM_p tokens; off: all pitched tracks merged (piano reduction)
    drums: bool = False               # keep drum tracks (DRUM token); off: drums dropped
    bars: bool = False                # BAR tokens at each bar line (first time signature)
    tempo_bins: int = 32              # TEMPO_i after BOS (first tempo, log-spaced 30..300 qpm); 0: none
    tempo_min: float = 30.0
    tempo_max: float = 300.0

    def __post_init__(self) -> None:
        for name in ("steps_per_quarter", "max_shift_steps", "max_duration_steps"):
            if getattr(self, name) < 1:
                raise MidiforgeError(f"events tokenizer: {name} must be >= 1")
        if not 0 <= self.velocity_bins <= 127:
            raise MidiforgeError("events tokenizer: velocity_bins must be in 0..127")
        if self.tempo_bins < 0 or not 0 < self.tempo_min < self.tempo_max:
            raise MidiforgeError("events tokenizer: bad tempo settings")


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


# what an events id means to the decoder (EventsTokenizer.token_rules)
_SKIP, _EOS, _BAR, _SHIFT, _TEMPO, _INSTRUMENT, _VELOCITY, _PITCH, _DURATION = range(9)


class EventsTokenizer(Tokenizer):
    """Time-shift/pitch/duration events; the vocabulary depends on the settings only."""

    kind = "events"

    def __init__(self, config: EventsConfig | None = None) -> None:
        self.config = c = config or EventsConfig()
        vocab = list(SPECIALS)
        self.bar_id = -1
        if c.bars:
            self.bar_id = len(vocab)
            vocab.append("BAR")
        self.shift_base = len(vocab) - 1  # id of TIME_SHIFT_k is shift_base + k
        vocab += [f"TIME_SHIFT_{k}" for k in range(1, c.max_shift_steps + 1)]
        self.tempo_base = len(vocab)
        vocab += [f"TEMPO_{i}" for i in range(c.tempo_bins)]
        # instrument states: program 0..127 and DRUM_PROGRAM; tokens only if there is more than one state
        states = list(range(128)) if c.programs else [0]
        if c.drums:
            states.append(DRUM_PROGRAM)
        self.instrument_ids = np.full(DRUM_PROGRAM + 1, -1, dtype=np.int64)
        if len(states) > 1:
            for s in states:
                self.instrument_ids[s] = len(vocab)
                vocab.append("DRUM" if s == DRUM_PROGRAM else f"PROGRAM_{s}")
        self.velocity_base = len(vocab)
        vocab += [f"VELOCITY_{b}" for b in range(c.velocity_bins)]
        self.pitch_base = len(vocab)
        vocab += [f"PITCH_{p}" for p in range(128)]
        self.duration_base = len(vocab) - 1  # id of DURATION_d is duration_base + d
        vocab += [f"DURATION_{d}" for d in range(1, c.max_duration_steps + 1)]
        self.vocab = vocab
        self._id = f"events-{_short_hash({'kind': self.kind, 'config': asdict(c), 'vocab': vocab})}"
        self._tempo_edges = np.geomspace(c.tempo_min, c.tempo_max, c.tempo_bins + 1) if c.tempo_bins else None
        self.token_rules = self._token_rules()

    @property
    def id(self) -> str:
        return self._id

    def _token_rules(self) -> tuple[list[int], list[int]]:
        """What each id means to the decoder: (rule, value) per id, e.g. (_SHIFT, steps)."""
        c = self.config
        rule, value = [_SKIP] * len(self.vocab), [0] * len(self.vocab)

        def put(kind: int, first: int, values) -> None:
            for k, v in enumerate(values):
                rule[first + k], value[first + k] = kind, v

        put(_EOS, EOS_ID, [0])
        if self.bar_id >= 0:
            put(_BAR, self.bar_id, [0])
        put(_SHIFT, self.shift_base + 1, range(1, c.max_shift_steps + 1))
        put(_TEMPO, self.tempo_base, range(c.tempo_bins))
        for state, tok in enumerate(self.instrument_ids.tolist()):
            if tok >= 0:
                put(_INSTRUMENT, tok, [state])
        put(_VELOCITY, self.velocity_base, range(c.velocity_bins))
        put(_PITCH, self.pitch_base, range(128))
        put(_DURATION, self.duration_base + 1, range(1, c.max_duration_steps + 1))
        return rule, value

    # -- helpers ----------------------------------------------------------------------------

    def velocity_bin(self, velocity: np.ndarray) -> np.ndarray:
        n = self.config.velocity_bins
        if n == 0:
            return np.zeros_like(velocity, dtype=np.int64)
        v = np.clip(velocity.astype(np.int64), 1, 127)
        return np.minimum((v - 1) * n // 127, n - 1)

    def velocity_value(self, b: int) -> int:
        n = self.config.velocity_bins
        return 80 if n == 0 else 1 + ((2 * b + 1) * 127) // (2 * n)

    def tempo_bin(self, qpm: float) -> int:
        if self._tempo_edges is None:
            return -1
        q = min(max(qpm, self.config.tempo_min), self.config.tempo_max)
        return int(min(np.searchsorted(self._tempo_edges, q, side="right") - 1, self.config.tempo_bins - 1))

    def tempo_value(self, b: int) -> float:
        e = self._tempo_edges
        return float(np.sqrt(e[b] * e[b + 1])) if e is not None and b >= 0 else DEFAULT_QPM

    def head(self, qpm: float | None = None) -> np.ndarray:
        """``[BOS]``, plus ``TEMPO_i`` of ``qpm`` when there are tempo tokens."""
        ids = [BOS_ID]
        if qpm is not None and self.config.tempo_bins:
            ids.append(self.tempo_base + self.tempo_bin(qpm))
        return np.array(ids, dtype=np.int32)

    def with_tempo(self, ids: np.ndarray, qpm: float) -> np.ndarray:
        """``ids`` with its leading tempo token (after BOS) set to ``qpm``'s, or one inserted."""
        if not self.config.tempo_bins or len(ids) == 0 or ids[0] != BOS_ID:
            return ids
        tempo = self.tempo_base + self.tempo_bin(qpm)
        if len(ids) > 1 and self.tempo_base <= ids[1] < self.tempo_base + self.config.tempo_bins:
            out = ids.copy()
            out[1] = tempo
            return out
        return np.concatenate([ids[:1], [tempo], ids[1:]]).astype(np.int32)

    def bar_steps(self, time_signature: tuple[int, int]) -> int:
        """Grid steps in a bar of ``time_signature`` (numerator, denominator)."""
        return int(self._bar_steps(np.array([time_signature], dtype=np.int64))[0])

    # -- encode -----------------------------------------------------------------------------
    def _grid(self, start, duration, pitch, velocity, program):
        """The quantization rule: onset and duration steps, pitch, velocity bin, instrument state."""
        c = self.config
        spq = c.steps_per_quarter
        onset = np.maximum(np.floor(start * spq + 0.5).astype(np.int64), 0)
        dur = np.clip(np.floor(duration * spq + 0.5).astype(np.int64), 1, c.max_duration_steps)
        prog = program.astype(np.int64)
        if not c.programs:
            prog = np.where(prog == DRUM_PROGRAM, DRUM_PROGRAM, 0)
        return onset, dur, pitch.astype(np.int64), self.velocity_bin(velocity), prog

    def quantize(self, piece: Piece) -> QuantizedNotes:
        """The piece on the grid, in canonical order: what decoding gives back exactly."""
        keep = np.ones(len(piece), dtype=bool) if self.config.drums else ~piece.is_drum
        onset, dur, pitch, vel, prog = self._grid(piece.start[keep], piece.duration[keep], piece.pitch[keep],
                                                  piece.velocity[keep], piece.program[keep])
        order = np.lexsort((vel, dur, pitch, prog, onset))
        return QuantizedNotes(onset[order], dur[order], pitch[order], vel[order], prog[order], self.tempo_bin(piece.qpm))

    def encode(self, piece: Piece) -> np.ndarray:
        return self.encode_many([piece])[0]

    #: notes per vectorized pass of encode_batch's NumPy path: enough to amortize NumPy's per-call cost,
    #: few enough that the working columns stay in a core's cache (measured on the shared corpora: 32K
    #: notes ~1.3x faster than 8K or 128K)
    CHUNK_NOTES = 32768

    def encode_many(self, pieces: list[Piece]) -> list[np.ndarray]:
        """``[self.encode(p) for p in pieces]``: :meth:`encode_batch` of them, split per piece."""
        if not pieces:
            return []
        ids, offsets = self.encode_batch(PieceBatch.from_pieces(pieces))
        return np.split(ids, offsets[1:-1])

    def encode_batch(self, batch: PieceBatch) -> tuple[np.ndarray, np.ndarray]:
        """The ids of every piece of ``batch``, one after the other (int32), and where each piece's
        ids start: piece ``i`` is ``ids[offsets[i]:offsets[i + 1]]``.

        With the compiled module, all of it runs in C, piece by piece.  Otherwise (or for a batch
        with a note the C code declines, such as a pitch outside 0..127) it runs in NumPy, where
        for many small pieces the per-call cost dominates: the notes of a chunk of pieces are one
        set of columns with a piece index as the first sort key, and every rule starts over at a
        piece's first note.
        """
        n = len(batch)
        if _native is not None and self.native:
            done = self._encode_native(batch)
            if done is not None:
                return done
        parts, lengths = [], []
        ends = batch.offsets[1:]
        a = 0
        while a < n:  # chunks of whole pieces, about CHUNK_NOTES notes each
            b = max(a + 1, int(np.searchsorted(ends, batch.offsets[a] + self.CHUNK_NOTES, side="right")))
            ids, per_piece = self._encode_chunk(batch.slice(a, b))
            parts.append(ids)
            lengths.append(per_piece)
            a = b
        offsets = np.zeros(n + 1, dtype=np.int64)
        if parts:
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
        return (np.concatenate(parts) if parts else np.zeros(0, np.int32)), offsets

    def _encode_chunk(self, batch: PieceBatch) -> tuple[np.ndarray, np.ndarray]:
        n_pieces = len(batch)
        c = self.config
        seg = np.repeat(np.arange(n_pieces), batch.lengths)
        program = batch.program
        keep = None if c.drums else program != DRUM_PROGRAM

        def column(name):
            col = getattr(batch, name)
            return col if keep is None else col[keep]

        if keep is not None:
            seg, program = seg[keep], program[keep]
        onset, dur, pitch, vel, prog = self._grid(column("start"), column("duration"), column("pitch"),
                                                  column("velocity"), program)
        order = _batch_order(seg, onset, prog, pitch, dur, vel, c.max_duration_steps, c.velocity_bins)
        seg, on, dur, pitch, vel, prog = seg[order], onset[order], dur[order], pitch[order], vel[order], prog[order]
        steps = self._bar_steps(batch.time_signature) if c.bars else None
        return self._emit_numpy(seg, on, dur, pitch, vel, prog, n_pieces, 1 + (c.tempo_bins > 0),
                                self._tempo_ids(batch), steps)

    def _tempo_ids(self, batch: PieceBatch) -> np.ndarray:
        """The TEMPO id of every piece (tempo_bin() at once; zeros without tempo tokens)."""
        c = self.config
        if not c.tempo_bins:
            return np.zeros(len(batch), dtype=np.int64)
        qpm = np.minimum(np.maximum(batch.qpm, c.tempo_min), c.tempo_max)
        tempo = np.minimum(np.searchsorted(self._tempo_edges, qpm, side="right") - 1, c.tempo_bins - 1)
        return (self.tempo_base + tempo).astype(np.int64)

    def _bar_steps(self, time_signatures: np.ndarray) -> np.ndarray:
        """Grid steps in a bar of each time signature (rows of numerator, denominator), at least 1."""
        num, den = time_signatures[:, 0], time_signatures[:, 1]
        return np.maximum(1, np.round(num * 4 * self.config.steps_per_quarter / np.maximum(den, 1))).astype(np.int64)

    #: use the compiled encoder (midiforge.music._events) when it is built; False: the NumPy code,
    #: which is the reference
    native = True

    def _encode_native(self, batch: PieceBatch):
        """encode_batch in C; None if a note does not fit its packed sort key (the NumPy code then)."""
        c = self.config
        n = len(batch)
        steps = self._bar_steps(batch.time_signature) if c.bars else np.zeros(0, np.int64)
        per_piece = np.empty(n, dtype=np.int64)
        grid = (c.steps_per_quarter, c.max_duration_steps, c.velocity_bins, int(c.programs), int(c.drums))
        rule = (c.max_shift_steps, self.shift_base, self.bar_id, c.velocity_bins, self.velocity_base, self.pitch_base,
                self.duration_base, int(bool((self.instrument_ids >= 0).any())), int(c.bars), 1 + (c.tempo_bins > 0),
                self.instrument_ids)
        cols = [np.ascontiguousarray(batch.offsets, dtype=np.int64),
                np.ascontiguousarray(batch.start, dtype=np.float64), np.ascontiguousarray(batch.duration, dtype=np.float64),
                *(np.ascontiguousarray(getattr(batch, k), dtype=np.int16) for k in ("pitch", "velocity", "program"))]
        ids = _native.encode(*cols, self._tempo_ids(batch), steps, grid, rule, per_piece)
        if ids is None:
            return None
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(per_piece, out=offsets[1:])
        return np.frombuffer(ids, dtype=np.int32), offsets

    def _emit_numpy(self, seg, on, dur, pitch, vel, prog, n_pieces, head, tempo_ids, steps):
        """Token ids of notes in canonical order (``seg``: each note's piece), and each piece's count."""
        c = self.config
        M = c.max_shift_steps
        n = len(seg)
        # tokens per note: bars, chained time shifts, instrument/velocity changes, pitch, duration;
        # a piece's first note starts from a fresh state (time 0, no instrument, no velocity)
        first = np.ones(n, dtype=bool)
        first[1:] = seg[1:] != seg[:-1]
        prev_on = np.concatenate(([0], on[:-1]))
        prev_on[first] = 0
        if c.bars:
            steps = steps[seg]
            bar = on // steps
            prev_bar = np.concatenate(([-1], bar[:-1]))
            prev_bar[first] = -1
            n_bar = bar - prev_bar
            rest = np.where(n_bar > 0, on - bar * steps, on - prev_on)
        else:
            n_bar = np.zeros(n, dtype=np.int64)
            rest = on - prev_on
        n_shift = -(-rest // M)  # ceil
        has_ins = np.zeros(n, dtype=np.int64)
        ins_tok = self.instrument_ids[prog]
        if (self.instrument_ids >= 0).any():
            has_ins = (first | np.concatenate(([True], prog[1:] != prog[:-1]))).astype(np.int64)
        has_vel = np.zeros(n, dtype=np.int64)
        if c.velocity_bins:
            has_vel = (first | np.concatenate(([True], vel[1:] != vel[:-1]))).astype(np.int64)
        count = n_bar + n_shift + has_ins + has_vel + 2
        per_piece = np.bincount(seg, weights=count, minlength=n_pieces).astype(np.int64) + head + 1
        piece_start = np.concatenate(([0], np.cumsum(per_piece)[:-1]))
        out = np.empty(int(per_piece.sum()), dtype=np.int32)
        out[piece_start] = BOS_ID
        if head == 2:
            out[piece_start + 1] = tempo_ids
        out[piece_start + per_piece - 1] = EOS_ID
        # every piece before a note's own adds its head and EOS; the note's own piece its head
        start = np.concatenate(([0], np.cumsum(count)[:-1])) + seg * (head + 1) + head
        if c.bars:
            out[np.repeat(start, n_bar) + _ragged_arange(n_bar)] = self.bar_id
        sh0 = start + n_bar
        out[np.repeat(sh0, n_shift) + _ragged_arange(n_shift)] = self.shift_base + M
        last = n_shift > 0
        out[(sh0 + n_shift - 1)[last]] = self.shift_base + (rest - M * (n_shift - 1))[last]
        pos = sh0 + n_shift
        sel = has_ins.astype(bool)
        out[pos[sel]] = ins_tok[sel]
        pos = pos + has_ins
        sel = has_vel.astype(bool)
        out[pos[sel]] = self.velocity_base + vel[sel]
        pos = pos + has_vel
        out[pos] = self.pitch_base + pitch
        out[pos + 1] = self.duration_base + dur
        return out, per_piece

    # -- decode -----------------------------------------------------------------------------
    def clock(self, time_signature: tuple[int, int] = (4, 4), keep_notes: bool = False) -> "EventsClock":
        return EventsClock(self, time_signature, keep_notes)

    def decode_quantized(self, ids, time_signature: tuple[int, int] = (4, 4)) -> QuantizedNotes:
        """Notes on the grid from token ids (the rules of :class:`EventsClock`)."""
        return self.clock(time_signature, keep_notes=True).feed_all(ids).quantized()

    # -- tokenizer.json ---------------------------------------------------------------------
    def config_dict(self) -> dict:
        return asdict(self.config)

    @classmethod
    def from_dict(cls, d: dict) -> "EventsTokenizer":
        tok = cls(EventsConfig(**d["config"]))
        if tok.vocab != d["vocab"]:
            raise MidiforgeError(f"tokenizer.json {d.get('id')}: vocabulary does not match its settings")
        return tok


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


# ---------------------------------------------------------------------------------------------
# classic (the tutorial's encoding)
# ---------------------------------------------------------------------------------------------
def normal_order(pitch_classes) -> list[int]:
    """Normal order of a pitch-class set, as music21's ``Chord.normalOrder`` gives it.

    The rotation with the smallest span wins; ties go to the rotation packed most
    to the left (smallest interval from the first note to the second, then the third...),
    then to the lowest first pitch class.
    """
    pcs = sorted(set(int(p) % 12 for p in pitch_classes))
    if len(pcs) <= 1:
        return pcs
    best_key, best = None, None
    k = len(pcs)
    for r in range(k):
        rot = pcs[r:] + pcs[:r]
        ints = [(p - rot[0]) % 12 for p in rot]
        key = (ints[-1], *ints[1:-1], rot[0])
        if best_key is None or key < best_key:
            best_key, best = key, rot
    return best


@dataclass(frozen=True)
class ClassicConfig:
    grid: tuple[int, ...] = (4, 3)   # music21's quarterLengthDivisors for grouping onsets
    drums: bool = False
    step: float = 0.5                # decoding: the tutorial's fixed offset between tokens
    duration: float = 1.0            # decoding: music21's default note length in the tutorial


def _classic_pitches(token: str) -> tuple[str, tuple[int, ...]] | None:
    """("note", (midi,)) or ("chord", pitch classes) of a classic token; None if not musical."""
    if token in _NAME_TO_MIDI:
        return "note", (_NAME_TO_MIDI[token],)
    try:
        return "chord", tuple(int(p) % 12 for p in token.split("."))
    except ValueError:
        return None


@dataclass
class ClassicTokenizer(Tokenizer):
    """Pitch names for single notes, dot-joined normal order for chords, one token per onset.

    The vocabulary comes from the data: :meth:`encode_text` gives strings; a global pass
    builds ``vocab`` (:meth:`with_vocab`) and only then are there ids.
    """

    config: ClassicConfig = field(default_factory=ClassicConfig)
    vocab: list[str] = field(default_factory=lambda: list(SPECIALS))
    kind = "classic"
    vocab_from_data = True

    def __post_init__(self) -> None:
        self.config = ClassicConfig(**{**asdict(self.config), "grid": tuple(self.config.grid)})
        self._index = {t: i for i, t in enumerate(self.vocab)}
        self._parsed = [None if i < len(SPECIALS) else _classic_pitches(t) for i, t in enumerate(self.vocab)]
        # what each id sounds as when decoded: a note's pitch, a chord's pitch classes in octave 4
        self.pitches = [() if p is None else p[1] if p[0] == "note" else tuple(60 + pc for pc in p[1])
                        for p in self._parsed]

    @property
    def id(self) -> str:
        return f"classic-{_short_hash({'kind': self.kind, 'config': asdict(self.config), 'vocab': self.vocab})}"

    def with_vocab(self, tokens) -> "ClassicTokenizer":
        return ClassicTokenizer(self.config, list(SPECIALS) + sorted(set(tokens) - set(SPECIALS)))

    def snap(self, start: np.ndarray) -> np.ndarray:
        """Offsets snapped like music21's quantize: nearest multiple of 1/d for d in ``grid``."""
        best = None
        for d in self.config.grid:
            q = np.floor(start * d + 0.5) / d
            best = q if best is None else np.where(np.abs(q - start) < np.abs(best - start) - 1e-9, q, best)
        return start if best is None else best

    def encode_text(self, piece: Piece) -> list[str]:
        """The tutorial's tokens, one per onset: the notes of all kept tracks whose onsets snap to
        the same grid point form one chord (music21's readings are already on that grid)."""
        keep = np.ones(len(piece), dtype=bool) if self.config.drums else ~piece.is_drum
        pitch = piece.pitch[keep]
        if len(pitch) == 0:
            return []
        key = self.snap(piece.start[keep])
        order = np.lexsort((pitch, key))
        key, pitch = key[order], pitch[order]
        bounds = np.flatnonzero(np.diff(key) != 0) + 1
        out = []
        for group in np.split(pitch, bounds):
            if len(group) == 1:
                out.append(PITCH_NAMES[int(group[0])])
            else:
                out.append(".".join(str(p) for p in normal_order(group)))
        return out

    def ids_of(self, tokens: list[str]) -> np.ndarray:
        idx = self._index
        return np.array([BOS_ID] + [idx.get(t, UNK_ID) for t in tokens] + [EOS_ID], dtype=np.int32)

    def encode(self, piece: Piece) -> np.ndarray:
        return self.ids_of(self.encode_text(piece))

    def nearest_known(self, token: str) -> int | None:
        """Id of the known token closest to ``token``: for a note, the known note with the nearest
        pitch (ties: the lower); for a chord, the known chord with the largest overlap of pitch
        classes (Jaccard; ties: the lowest id).  When the vocabulary lacks that kind, a note is
        matched to a chord holding its pitch class and a chord to the note nearest its lowest pitch
        class in octave 4.  None when the vocabulary holds nothing musical."""
        parsed = _classic_pitches(token)
        if parsed is None:
            return None
        kind, pitches = parsed[0], set(parsed[1])
        notes = [(i, p[1][0]) for i, p in enumerate(self._parsed) if p is not None and p[0] == "note"]
        chords = [(i, set(p[1])) for i, p in enumerate(self._parsed) if p is not None and p[0] == "chord"]
        if kind == "note" and not notes and chords:
            kind, pitches = "chord", {next(iter(pitches)) % 12}
        if kind == "chord" and not chords and notes:
            kind, pitches = "note", {60 + min(pitches)}
        if kind == "note" and notes:
            m = next(iter(pitches))
            return min(notes, key=lambda c: (abs(c[1] - m), c[1]))[0]
        if kind == "chord" and chords:
            return min(chords, key=lambda c: (-len(c[1] & pitches) / len(c[1] | pitches), c[0]))[0]
        return None

    def encode_known(self, piece: Piece) -> tuple[np.ndarray, int]:
        ids, mapped = [BOS_ID], 0
        for t in self.encode_text(piece):
            i = self._index.get(t)
            if i is None:
                i = self.nearest_known(t)
                mapped += 1
                if i is None:
                    continue
            ids.append(i)
        return np.array(ids + [EOS_ID], dtype=np.int32), mapped

    def clock(self, time_signature: tuple[int, int] = (4, 4), keep_notes: bool = False) -> "ClassicClock":
        return ClassicClock(self, time_signature, keep_notes)

    def config_dict(self) -> dict:
        return {**asdict(self.config), "grid": list(self.config.grid)}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassicTokenizer":
        return cls(ClassicConfig(**{**d["config"], "grid": tuple(d["config"]["grid"])}), list(d["vocab"]))


class ClassicClock(Clock):
    """The tutorial's decoding: each known musical id is a note or chord ``step`` quarters after the
    previous one, every note ``duration`` long, chords in octave 4; other ids are skipped; EOS ends."""

    __slots__ = ("tokenizer", "time_signature", "pitches", "step", "duration", "notes", "t", "end", "done")

    def __init__(self, tokenizer: ClassicTokenizer, time_signature: tuple[int, int], keep_notes: bool) -> None:
        self.tokenizer = tokenizer
        self.time_signature = (int(time_signature[0]), int(time_signature[1]))
        self.pitches = tokenizer.pitches
        self.step, self.duration = tokenizer.config.step, tokenizer.config.duration
        self.notes: list[tuple[int, float]] | None = [] if keep_notes else None
        self.t = 0.0    # onset of the next note or chord
        self.end = 0.0  # quarters: end of the last note
        self.done = False

    def feed(self, token: int) -> None:
        if self.done:
            return
        if token == EOS_ID:
            self.done = True
            return
        pitches = self.pitches[token] if 0 <= token < len(self.pitches) else ()
        if not pitches:
            return
        if self.notes is not None:
            self.notes.extend((p, self.t) for p in pitches)
        self.end = max(self.end, self.t + self.duration)  # as Piece.end() adds start and duration
        self.t += self.step

    def quarters(self) -> float:
        return self.end

    @property
    def qpm(self) -> float:
        return DEFAULT_QPM

    def piece(self) -> Piece:
        if self.notes is None:
            raise ValueError("piece(): a clock made without keep_notes")
        n = len(self.notes)
        pitch, start = [p for p, _ in self.notes], [t for _, t in self.notes]
        return Piece.from_columns(pitch, start, [self.duration] * n, [100] * n, [0] * n, qpm=self.qpm,
                                  time_signature=self.time_signature, seconds=self.seconds())


_KINDS: dict[str, tuple[type[Tokenizer], type]] = {"events": (EventsTokenizer, EventsConfig),
                                                   "classic": (ClassicTokenizer, ClassicConfig)}


def make_tokenizer(kind: str, **settings) -> Tokenizer:
    """A tokenizer by name with settings (unknown settings are an error)."""
    if kind not in _KINDS:
        raise MidiforgeError(f"unknown tokenizer {kind!r} ({' or '.join(_KINDS)})")
    cls, cfg = _KINDS[kind]
    known = {f.name for f in fields(cfg)}
    bad = set(settings) - known
    if bad:
        raise MidiforgeError(f"{kind} tokenizer: unknown settings {sorted(bad)} (known: {sorted(known)})")
    return cls(cfg(**settings))


def load_tokenizer(source: str | bytes | dict) -> Tokenizer:
    """The tokenizer a ``tokenizer.json`` describes (its text, bytes or parsed dict)."""
    d = source if isinstance(source, dict) else json.loads(source)
    if d.get("format") != FORMAT or d.get("version") != FORMAT_VERSION:
        raise MidiforgeError("not a midiforge tokenizer.json (format/version missing or newer)")
    if d.get("kind") not in _KINDS:
        raise MidiforgeError(f"unknown tokenizer kind {d.get('kind')!r}")
    tok = _KINDS[d["kind"]][0].from_dict(d)
    if d.get("id") and d["id"] != tok.id:
        raise MidiforgeError(f"tokenizer.json: id {d['id']} does not match its content ({tok.id})")
    return tok

"""The events tokenizer (time-aware, the default): time shifts, bars, tempo, instrument and velocity
changes, pitch and duration tokens on a grid of ``steps_per_quarter``; the vocabulary depends on the
settings only.  Its decoding rules are :class:`~midiforge.music.tokenizers.events_clock.EventsClock`."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from midiforge.errors import MidiforgeError
from midiforge.music.piece import DEFAULT_QPM, DRUM_PROGRAM, Piece, PieceBatch
from midiforge.music.tokenizers.base import BOS_ID, EOS_ID, SPECIALS, Tokenizer, _short_hash
from midiforge.music.tokenizers.events_clock import (
    _BAR, _DURATION, _EOS, _INSTRUMENT, _PITCH, _SHIFT, _SKIP, _TEMPO, _VELOCITY, EventsClock, QuantizedNotes,
)

try:  # EventsTokenizer.encode_batch compiled (optional: the NumPy code does the same, slower)
    from midiforge.music import _events as _native
except ImportError:  # not built (no C compiler when installed): the NumPy path
    _native = None



def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    """[0..c0-1, 0..c1-1, ...] for non-negative counts."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    return np.arange(total) - np.repeat(ends - counts, counts)


def _check_finite(start: np.ndarray, duration: np.ndarray) -> None:
    """The compiled encoder's check, for the NumPy path: a start or duration that is NaN or inf is a
    ValueError (cast to int64 it would become an arbitrary onset), the same error, the same words."""
    if np.isfinite(start).all() and np.isfinite(duration).all():
        return
    bad = int(np.flatnonzero(~(np.isfinite(start) & np.isfinite(duration)))[0])
    raise ValueError(f"encode: note {bad}: its start or duration is not finite (NaN or inf)")


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
        _check_finite(batch.start, batch.duration)
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


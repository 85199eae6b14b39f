"""The classic tokenizer: the Keras tutorial's encoding (pitch names for single notes, dot-joined
normal order for chords, one token per onset); its vocabulary comes from the corpus."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from midiforge.music.piece import DEFAULT_QPM, Piece
from midiforge.music.tokenizers.base import BOS_ID, EOS_ID, SPECIALS, UNK_ID, Clock, Tokenizer, _short_hash

# music21's spelling of MIDI numbers (pitch.Pitch(midi=m)), which the tutorial's tokens use.
_NAMES = ("C", "C#", "D", "E-", "E", "F", "F#", "G", "G#", "A", "B-", "B")
PITCH_NAMES = tuple(f"{_NAMES[m % 12]}{m // 12 - 1}" for m in range(128))
_NAME_TO_MIDI = {n: m for m, n in enumerate(PITCH_NAMES)}


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

"""Music metrics of a :class:`~midiforge.music.piece.Piece` and repetition metrics of token ids.

Pure NumPy, usable on generated pieces and on real corpora alike.  The note metrics follow
MusPy's definitions (``muspy.metrics``, Dong et al., ISMIR 2020 LBD), computed on a tick grid of
``resolution`` ticks per quarter note (MusPy's default 24): ``start`` and ``end`` of each note are
rounded to ticks, a "beat" is a quarter note.  As in MusPy, drum notes are ignored by every
note metric except ``empty_beat_rate``; a metric that has no notes to look at is NaN (``pitch_range``
is 0).

===================== ==============================================================================
pitch_class_entropy   Shannon entropy (bits) of the histogram of pitch classes (pitch % 12) of the
                      notes; 0 for one pitch class, log2(12) = 3.585 for all twelve equally often.
scale_consistency     the largest fraction of notes whose pitch class lies in one scale, over the 24
                      major and natural-minor scales.
pitch_range           highest minus lowest pitch, in semitones.
polyphony             mean number of pitches sounding at the time steps where at least one sounds
                      (a binary piano roll: a pitch doubled by two tracks counts once).
empty_beat_rate       fraction of the beats 0 .. end // resolution where no note sounds; a note
                      touches beats start // res .. end // res inclusive (MusPy's convention, so a
                      note ending on a beat line also touches the next beat).
longest_repeat        longest run of one token repeated back to back (token ids).
distinct_4gram_ratio  distinct 4-grams of token ids / all 4-grams (NaN under 4 tokens); 1 means no
                      4-gram repeats, small values mean loops.
===================== ==============================================================================
"""
from __future__ import annotations

import math

import numpy as np

from midiforge.music.piece import Piece

DEFAULT_RESOLUTION = 24  # ticks per quarter note, as MusPy's default
_MAJOR = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1], dtype=bool)
_MINOR = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0], dtype=bool)
#: [24, 12] membership of each pitch class in the 12 major then the 12 minor scales.
SCALES = np.stack([np.roll(_MAJOR, r) for r in range(12)] + [np.roll(_MINOR, r) for r in range(12)])

NOTE_METRICS = ("pitch_class_entropy", "scale_consistency", "pitch_range", "polyphony", "empty_beat_rate")
TOKEN_METRICS = ("longest_repeat", "distinct_4gram_ratio")
METRICS = NOTE_METRICS + TOKEN_METRICS


def _pitched(piece: Piece) -> np.ndarray:
    return piece.pitch[~piece.is_drum].astype(np.int64)


def _ticks(piece: Piece, resolution: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    start = piece.start if mask is None else piece.start[mask]
    dur = piece.duration if mask is None else piece.duration[mask]
    s = np.floor(start * resolution + 0.5).astype(np.int64)
    e = np.floor((start + dur) * resolution + 0.5).astype(np.int64)
    return s, np.maximum(e, s)


def pitch_class_entropy(piece: Piece) -> float:
    pc = _pitched(piece) % 12
    if len(pc) == 0:
        return math.nan
    counts = np.bincount(pc, minlength=12).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0


def scale_consistency(piece: Piece) -> float:
    pc = _pitched(piece) % 12
    if len(pc) == 0:
        return math.nan
    counts = np.bincount(pc, minlength=12)
    return float((SCALES @ counts).max() / len(pc))


def pitch_range(piece: Piece) -> int:
    p = _pitched(piece)
    return int(p.max() - p.min()) if len(p) else 0


def polyphony(piece: Piece, resolution: int = DEFAULT_RESOLUTION) -> float:
    pitched = ~piece.is_drum
    s, e = _ticks(piece, resolution, pitched)
    pitch = piece.pitch[pitched].astype(np.int64)
    keep = e > s
    s, e, pitch = s[keep], e[keep], pitch[keep]
    if len(s) == 0:
        return math.nan
    # merge overlapping notes of the same pitch (a piano roll is binary), then sweep.  Each pitch's
    # times are shifted into a band of its own so that one running maximum serves every pitch.
    band = int(e.max()) + 1
    order = np.lexsort((s, pitch))
    off = pitch[order] * band
    ps, pe = s[order] + off, e[order] + off
    reach = np.maximum.accumulate(pe)
    new = np.ones(len(ps), dtype=bool)
    new[1:] = ps[1:] > reach[:-1]          # starts after every earlier note of its pitch ended
    first = np.flatnonzero(new)
    ms = ps[first] - off[first]
    me = np.maximum.reduceat(pe, first) - off[first]
    on_pitch_steps = int((me - ms).sum())
    length = int(me.max())
    diff = np.zeros(length + 1, dtype=np.int64)
    np.add.at(diff, ms, 1)
    np.add.at(diff, me, -1)
    sounding = np.count_nonzero(np.cumsum(diff)[:length] > 0)
    return float(on_pitch_steps / sounding) if sounding else math.nan


def empty_beat_rate(piece: Piece, resolution: int = DEFAULT_RESOLUTION) -> float:
    if len(piece) == 0:
        return math.nan
    s, e = _ticks(piece, resolution)
    length = int(e.max())
    if length < 1:
        return math.nan
    n_beats = length // resolution + 1
    diff = np.zeros(n_beats + 1, dtype=np.int64)
    np.add.at(diff, s // resolution, 1)
    np.add.at(diff, e // resolution + 1, -1)
    touched = np.count_nonzero(np.cumsum(diff)[:n_beats] > 0)
    return float(1.0 - touched / n_beats)


def longest_repeat(tokens) -> int:
    t = np.asarray(tokens)
    if len(t) == 0:
        return 0
    change = np.flatnonzero(np.diff(t) != 0)
    bounds = np.concatenate(([-1], change, [len(t) - 1]))
    return int(np.diff(bounds).max())


def distinct_ngram_ratio(tokens, n: int = 4) -> float:
    t = np.asarray(tokens, dtype=np.int64)
    if len(t) < n:
        return math.nan
    grams = np.lib.stride_tricks.sliding_window_view(t, n)
    base = int(t.max()) + 1 if t.min() >= 0 else 0
    if base and base ** n < 2**62:  # pack each n-gram into one integer: a 1-D unique is much faster
        packed = (grams * (base ** np.arange(n - 1, -1, -1, dtype=np.int64))).sum(axis=1)
        return float(len(np.unique(packed)) / len(grams))
    return float(len(np.unique(grams, axis=0)) / len(grams))


def distinct_4gram_ratio(tokens) -> float:
    return distinct_ngram_ratio(tokens, 4)


def piece_metrics(piece: Piece, resolution: int = DEFAULT_RESOLUTION) -> dict[str, float]:
    """The note metrics of ``piece`` (see the module docstring)."""
    return {
        "pitch_class_entropy": pitch_class_entropy(piece),
        "scale_consistency": scale_consistency(piece),
        "pitch_range": float(pitch_range(piece)),
        "polyphony": polyphony(piece, resolution),
        "empty_beat_rate": empty_beat_rate(piece, resolution),
    }


def token_metrics(tokens) -> dict[str, float]:
    """The repetition metrics of a token id sequence."""
    return {"longest_repeat": float(longest_repeat(tokens)), "distinct_4gram_ratio": distinct_4gram_ratio(tokens)}


def all_metrics(piece: Piece, tokens, resolution: int = DEFAULT_RESOLUTION) -> dict[str, float]:
    return {**piece_metrics(piece, resolution), **token_metrics(tokens)}

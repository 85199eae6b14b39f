"""Primers for generation: the token ids a piece starts from.  Pure (no I/O, no model).

* :func:`start_primer`: BOS (and, for events tokenizers with tempo tokens, the tempo token of ``qpm``).
* :func:`encode_primer`: a piece (e.g. a MIDI file) in the model's vocabulary; tokens the
  vocabulary lacks (classic tokenizers build theirs from the corpus) become the nearest known token.
* :func:`window_primer`: a random window of a tokenized piece, the Keras tutorial's way.

A primer never ends with EOS.
"""
from __future__ import annotations

import numpy as np

from midiforge.music.piece import Piece
from midiforge.music.tokenizers import (
    BOS_ID, EOS_ID, PITCH_NAMES, SPECIALS, ClassicTokenizer, EventsTokenizer, Tokenizer,
)

_NAME_TO_MIDI = {n: m for m, n in enumerate(PITCH_NAMES)}


def start_primer(tokenizer: Tokenizer, qpm: float | None = None) -> np.ndarray:
    """``[BOS]``, plus ``TEMPO_i`` of ``qpm`` when the tokenizer has tempo tokens."""
    ids = [BOS_ID]
    if qpm is not None and isinstance(tokenizer, EventsTokenizer) and tokenizer.config.tempo_bins:
        ids.append(tokenizer.tempo_base + tokenizer.tempo_bin(qpm))
    return np.array(ids, dtype=np.int32)


def set_tempo(tokenizer: Tokenizer, ids: np.ndarray, qpm: float) -> np.ndarray:
    """``ids`` (starting with BOS) with its leading tempo token set to ``qpm``'s (events only)."""
    if not (isinstance(tokenizer, EventsTokenizer) and tokenizer.config.tempo_bins) or len(ids) == 0 \
            or ids[0] != BOS_ID:
        return ids
    tempo = tokenizer.tempo_base + tokenizer.tempo_bin(qpm)
    lo, hi = tokenizer.tempo_base, tokenizer.tempo_base + tokenizer.config.tempo_bins
    if len(ids) > 1 and lo <= ids[1] < hi:
        out = ids.copy()
        out[1] = tempo
        return out
    return np.concatenate([ids[:1], [tempo], ids[1:]]).astype(np.int32)


def _classic_pitches(token: str) -> tuple[str, set[int]] | None:
    """("note", {midi}) or ("chord", {pitch classes}) of a classic token; None if not musical."""
    if token in _NAME_TO_MIDI:
        return "note", {_NAME_TO_MIDI[token]}
    try:
        pcs = {int(p) % 12 for p in token.split(".")}
    except ValueError:
        return None
    return "chord", pcs


def nearest_classic_token(token: str, vocab: list[str]) -> int | None:
    """Id of the known token closest to ``token``: for a note, the known note with the nearest
    pitch (ties: the lower); for a chord, the known chord with the largest overlap of pitch classes
    (Jaccard; ties: the lowest id).  When the vocabulary lacks that kind, a note is matched to a
    chord holding its pitch class and a chord to the note nearest its lowest pitch class in octave 4.
    None when the vocabulary holds nothing musical."""
    parsed = _classic_pitches(token)
    if parsed is None:
        return None
    kind, pitches = parsed
    notes, chords = [], []
    for i, t in enumerate(vocab):
        if i < len(SPECIALS):
            continue
        p = _classic_pitches(t)
        if p is None:
            continue
        (notes if p[0] == "note" else chords).append((i, p[1]))
    if kind == "note" and not notes and chords:
        kind, pitches = "chord", {next(iter(pitches)) % 12}
    if kind == "chord" and not chords and notes:
        kind, pitches = "note", {60 + min(pitches)}
    if kind == "note" and notes:
        m = next(iter(pitches))
        return min(notes, key=lambda c: (abs(next(iter(c[1])) - m), next(iter(c[1]))))[0]
    if kind == "chord" and chords:
        return min(chords, key=lambda c: (-len(c[1] & pitches) / len(c[1] | pitches), c[0]))[0]
    return None


def encode_primer(tokenizer: Tokenizer, piece: Piece, qpm: float | None = None) -> tuple[np.ndarray, int]:
    """(ids without EOS, number of tokens mapped to their nearest known token)."""
    if isinstance(tokenizer, ClassicTokenizer):
        index = {t: i for i, t in enumerate(tokenizer.vocab)}
        ids, mapped = [BOS_ID], 0
        for t in tokenizer.encode_text(piece):
            i = index.get(t)
            if i is None:
                i = nearest_classic_token(t, tokenizer.vocab)
                mapped += 1
                if i is None:
                    continue
            ids.append(i)
        out = np.array(ids, dtype=np.int32)
    else:
        out = tokenizer.encode(piece).astype(np.int32)
        if len(out) and out[-1] == EOS_ID:
            out = out[:-1]
        mapped = 0
    if qpm is not None:
        out = set_tempo(tokenizer, out, qpm)
    return out, mapped


def window_primer(tokens: np.ndarray, rng: np.random.Generator, length: int) -> np.ndarray:
    """A random window of at most ``length`` tokens of a tokenized piece (its EOS left out)."""
    t = np.asarray(tokens, dtype=np.int32)
    if len(t) and t[-1] == EOS_ID:
        t = t[:-1]
    if len(t) <= length:
        return t.copy() if len(t) else np.array([BOS_ID], dtype=np.int32)
    start = int(rng.integers(0, len(t) - length + 1))
    return t[start:start + length].copy()

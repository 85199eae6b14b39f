"""Primers for generation: the token ids a piece starts from.  Pure (no I/O, no model).

* :func:`start_primer`: the tokenizer's head (BOS, and the tempo token of ``qpm`` if it has one).
* :func:`encode_primer`: a piece (e.g. a MIDI file) in the model's vocabulary; tokens the
  vocabulary lacks (classic tokenizers build theirs from the corpus) become the nearest known token.
* :func:`window_primer`: a random window of a tokenized piece, the Keras tutorial's way.

A primer never ends with EOS.
"""
from __future__ import annotations

import numpy as np

from midiforge.music.piece import Piece
from midiforge.music.tokenizers import BOS_ID, EOS_ID, Tokenizer


def start_primer(tokenizer: Tokenizer, qpm: float | None = None) -> np.ndarray:
    """``[BOS]``, plus what states ``qpm`` when the tokenizer has tempo tokens."""
    return tokenizer.head(qpm)


def encode_primer(tokenizer: Tokenizer, piece: Piece, qpm: float | None = None) -> tuple[np.ndarray, int]:
    """(ids without EOS, number of tokens mapped to their nearest known token)."""
    out, mapped = tokenizer.encode_known(piece)
    out = np.asarray(out, dtype=np.int32)
    if len(out) and out[-1] == EOS_ID:
        out = out[:-1]
    if qpm is not None:
        out = tokenizer.with_tempo(out, qpm)
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

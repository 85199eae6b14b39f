"""The interface every tokenizer offers (:class:`Tokenizer`, its decoding rules as a :class:`Clock`),
the special ids and the ``tokenizer.json`` format.

Ids 0..3 are always PAD, BOS, EOS, UNK.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod

import numpy as np

from midiforge.music.piece import Piece, PieceBatch, quarters_to_seconds

SPECIALS = ("PAD", "BOS", "EOS", "UNK")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
FORMAT = "midiforge-tokenizer"
FORMAT_VERSION = 1


def _short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


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


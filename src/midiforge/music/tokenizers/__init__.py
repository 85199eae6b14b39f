"""Tokenizers: :class:`EventsTokenizer` (time-aware, the default) and :class:`ClassicTokenizer`
(the Keras-tutorial encoding), both a :class:`Tokenizer`: they read a
:class:`~midiforge.music.piece.Piece`, decode through their own :class:`Clock` (the decoding
rules, read one id at a time) and are fully described by their ``tokenizer.json``
(:meth:`Tokenizer.to_json` / :func:`load_tokenizer`).

Ids 0..3 are always PAD, BOS, EOS, UNK.

The package's modules: :mod:`.base` (the interface, the special ids, ``tokenizer.json``),
:mod:`.events` and :mod:`.events_clock` (the events tokenizer and its decoding rules),
:mod:`.classic` (the tutorial's encoding); this module is the registry (:func:`make_tokenizer`,
:func:`load_tokenizer`) and re-exports every public name.
"""
from __future__ import annotations

import json
from dataclasses import fields

from midiforge.errors import MidiforgeError
from midiforge.music.tokenizers.base import (
    BOS_ID, EOS_ID, FORMAT, FORMAT_VERSION, PAD_ID, SPECIALS, UNK_ID, Clock, Tokenizer,
)
from midiforge.music.tokenizers.classic import (
    PITCH_NAMES, ClassicClock, ClassicConfig, ClassicTokenizer, normal_order,
)
from midiforge.music.tokenizers.events import EventsConfig, EventsTokenizer, _native
from midiforge.music.tokenizers.events_clock import EventsClock, QuantizedNotes

__all__ = [
    "BOS_ID", "EOS_ID", "FORMAT", "FORMAT_VERSION", "PAD_ID", "SPECIALS", "UNK_ID", "PITCH_NAMES",
    "Clock", "Tokenizer", "ClassicClock", "ClassicConfig", "ClassicTokenizer", "EventsClock", "EventsConfig",
    "EventsTokenizer", "QuantizedNotes", "load_tokenizer", "make_tokenizer", "normal_order", "_native",
]

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

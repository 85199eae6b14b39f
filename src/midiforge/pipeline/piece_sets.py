"""The sets of pieces :mod:`midiforge.pipeline.evaluate` compares, each a :class:`PieceSet`: notes,
tokens in the evaluation tokenizer and MIDI bytes of every piece, and where they came from.

* :func:`load_generated`: a generate output (its pieces shards, :mod:`midiforge.pipeline.pieces`),
  or else a folder of MIDI files (:func:`load_midi_folder`).
* :func:`load_token_set`: one split of a preprocess output, read through the token-shard format's
  owner, :mod:`midiforge.pipeline.tokens` (:func:`read_token_split`).
* :func:`load_reference`: either of the last two, in the evaluation's tokenizer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from midiforge.errors import MidiforgeError, PieceError
from midiforge.music.tokenizers import Tokenizer
from midiforge.storage import StorageOptions, open_store

MIDI_SUFFIXES = (".mid", ".midi")


@dataclass
class PieceSet:
    """Pieces with their notes, their tokens in the evaluation tokenizer, and where they came from."""

    uri: str
    kind: str                                   # "pieces" (generate output), "midi" (folder), "tokens" (preprocess)
    names: list[str] = field(default_factory=list)
    pieces: list = field(default_factory=list)  # Piece
    tokens: list = field(default_factory=list)  # np.ndarray of the evaluation tokenizer's ids
    midi: list = field(default_factory=list)    # MIDI bytes (None for token sets)
    split: str | None = None                    # the preprocess split (token sets)
    checkpoint: str | None = None               # the checkpoint whose pieces these are (generate outputs)
    tokens_from: str = ""                       # how the tokens were obtained
    skipped: list = field(default_factory=list)  # (name, reason) of inputs that gave no piece

    def __len__(self) -> int:
        return len(self.names)


def _read_pieces_table(uri: str, storage: StorageOptions | None):
    """The pieces of a finished generate output (:func:`midiforge.pipeline.pieces.read_pieces`), or
    None when ``uri`` is not a generate output (then it is read as a folder of MIDI files)."""
    from midiforge.pipeline.pieces import list_shards, read_pieces

    store = open_store(uri, storage)
    if store.exists("manifest.json"):
        try:
            stage = json.loads(store.read_bytes("manifest.json")).get("stage")
        except (json.JSONDecodeError, AttributeError):
            raise MidiforgeError(f"{store.url('manifest.json')}: not a valid manifest") from None
        if stage == "generate":
            return read_pieces(store, columns=["piece_id", "checkpoint", "tokens", "midi_path", "midi"])
        return None
    if list_shards(store):
        raise MidiforgeError(f"{store.uri}: a generate output without manifest.json (the run did not finish); "
                             f"finish it with generate --resume")
    return None


def _notes(piece) -> list[list]:
    """The notes of ``piece`` (start, duration, pitch, velocity, program), in one canonical order."""
    order = np.lexsort((piece.velocity, piece.duration, piece.pitch, piece.program, piece.start))
    return [np.asarray(a)[order].tolist() for a in (piece.start, piece.duration, piece.pitch, piece.velocity,
                                                    piece.program)]


def _tokens_match(tokenizer: Tokenizer, tokens: np.ndarray, piece) -> bool:
    """Whether ``tokens`` are ``tokenizer``'s tokens of ``piece``: decoding them gives the notes that
    decoding the tokenizer's own encoding of ``piece`` gives (the tempo aside)."""
    try:
        mine = np.asarray(tokenizer.encode(piece), dtype=np.int64)
        if np.array_equal(mine, tokens):
            return True
        theirs = tokenizer.decode(tokens, piece.time_signature)
        return _notes(tokenizer.decode(mine, piece.time_signature)) == _notes(theirs)
    except Exception:  # noqa: BLE001 - a foreign id that this tokenizer cannot decode
        return False


def _encode(tokenizer, piece) -> np.ndarray:
    return np.asarray(tokenizer.encode(piece), dtype=np.int64)


def load_generated(uri: str, tokenizer, storage: StorageOptions | None = None,
                   checkpoint: str | None = None) -> PieceSet:
    """A generate output (its pieces shards: notes from each row's MIDI bytes, tokens from its
    ``tokens`` when they are the evaluation tokenizer's) or a folder of MIDI files."""
    from midiforge.music.readers import read_piece

    table = _read_pieces_table(uri, storage)
    if table is None:
        return load_midi_folder(uri, tokenizer, storage)
    store = open_store(uri, storage)
    labels = table["checkpoint"].to_pylist()
    if checkpoint is None and labels:
        checkpoint = "final" if "final" in labels else labels[-1]
    rows = [r for r in range(table.num_rows) if labels[r] == checkpoint]
    if not rows:
        raise MidiforgeError(f"{store.uri}: no pieces of checkpoint {checkpoint!r} (it has {sorted(set(labels))})")
    out = PieceSet(store.uri, "pieces")
    own_tokens = 0
    for r in rows:
        path = table["midi_path"][r].as_py()
        data = table["midi"][r].as_py()
        name = table["piece_id"][r].as_py()
        if data is None:
            raise MidiforgeError(f"{store.uri}: piece {name} has no MIDI bytes")
        try:
            piece = read_piece(path or f"{name}.mid", data)
        except PieceError as exc:
            if exc.reason != "no_notes":
                out.skipped.append((name, f"{exc.reason}: {exc}"))
                continue
            from midiforge.music.piece import Piece

            piece = Piece.from_columns([], [], [], [], [])
        tokens = np.asarray(table["tokens"][r].as_py() or [], dtype=np.int64)
        if _tokens_match(tokenizer, tokens, piece):
            own_tokens += 1
        else:  # another tokenizer's ids: the notes, encoded with the evaluation's
            tokens = _encode(tokenizer, piece)
        out.names.append(name)
        out.pieces.append(piece)
        out.tokens.append(tokens)
        out.midi.append(data)
    out.checkpoint = checkpoint
    out.tokens_from = ("the pieces table" if own_tokens == len(out) else
                       f"{tokenizer.id} encoding of the notes" if own_tokens == 0 else
                       f"the pieces table ({own_tokens}) and {tokenizer.id} encoding of the notes")
    return out


def load_midi_folder(uri: str, tokenizer, storage: StorageOptions | None = None) -> PieceSet:
    """Every .mid/.midi file under ``uri`` (recursively), read as preprocess reads them."""
    from midiforge.music.readers import read_piece

    store = open_store(uri, storage)
    files = [o for o in store.list() if o.path.lower().endswith(MIDI_SUFFIXES)]
    if not files:
        raise MidiforgeError(f"{store.uri}: no MIDI files, no pieces table and no preprocess manifest here")
    out = PieceSet(store.uri, "midi", tokens_from=f"{tokenizer.id} encoding of the notes")
    for o in files:
        data = store.read_bytes(o.path)
        try:
            piece = read_piece(o.path, data)
        except PieceError as exc:
            out.skipped.append((o.path, f"{exc.reason}: {exc}"))
            continue
        out.names.append(o.path)
        out.pieces.append(piece)
        out.tokens.append(_encode(tokenizer, piece))
        out.midi.append(data)
    if not out.names:
        raise MidiforgeError(f"{store.uri}: none of its {len(files)} MIDI files has notes ({out.skipped[0][1]})")
    return out


def is_token_output(uri: str, storage: StorageOptions | None = None) -> bool:
    """Whether ``uri`` is a preprocess output (a manifest listing token shards)."""
    from midiforge.pipeline.tokens import MANIFEST, TOKENIZER

    store = open_store(uri, storage)
    if not store.exists(MANIFEST):
        return False
    try:
        manifest = json.loads(store.read_bytes(MANIFEST))
    except json.JSONDecodeError:
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("shards"), list) and store.exists(TOKENIZER)


def _read_tokenizer(store, entries: dict) -> Tokenizer:
    """The ``tokenizer.json`` of a preprocess output (verified against its manifest entry, if any)."""
    from midiforge.music.tokenizers import load_tokenizer
    from midiforge.pipeline.tokens import TOKENIZER

    data = store.read_verified(TOKENIZER, entries[TOKENIZER]) if TOKENIZER in entries else store.read_bytes(TOKENIZER)
    try:
        return load_tokenizer(data)
    except (KeyError, TypeError, ValueError, MidiforgeError) as exc:
        raise MidiforgeError(f"{store.url(TOKENIZER)}: not a tokenizer ({exc})") from None


def read_token_split(uri: str, split: str | None, storage: StorageOptions | None = None, *,
                     originals_only: bool = True, meters: bool = False):
    """(tokenizer, split used, [(source, tokens)]) of a preprocess output; ``split`` None: test if it
    has pieces, else validation.  ``originals_only`` leaves out transposed copies; ``meters`` adds each
    piece's first time signature, (source, tokens, (numerator, denominator)).  The shards are read (and
    verified against the manifest) by :func:`midiforge.pipeline.tokens.read_shard`."""
    from midiforge.pipeline.tokens import (
        MANIFEST,
        manifest_shards,
        read_output_manifest,
        read_shard,
    )
    from midiforge.storage.manifest import manifest_entries

    store = open_store(uri, storage)
    manifest = read_output_manifest(store)
    entries = manifest_entries(manifest, store.url(MANIFEST))
    tokenizer = _read_tokenizer(store, entries)
    rows: dict[str, list] = {}
    for s in manifest_shards(manifest, store.url(MANIFEST)):
        t = read_shard(store, s["path"], ["source", "split", "transpose", "tokens", "ts_numerator",
                                          "ts_denominator"], entries.get(s["path"]))
        src, spl, tr = t["source"].to_pylist(), t["split"].to_pylist(), t["transpose"].to_pylist()
        meter = list(zip(t["ts_numerator"].to_pylist(), t["ts_denominator"].to_pylist()))
        toks = t["tokens"]
        for i in range(t.num_rows):
            if originals_only and tr[i] != 0:
                continue
            row = (src[i], np.asarray(toks[i].as_py(), dtype=np.int64))
            rows.setdefault(spl[i], []).append((*row, meter[i]) if meters else row)
    if split is None:
        split = "test" if rows.get("test") else "validation"
    if not rows.get(split):
        have = {k: len(v) for k, v in rows.items()}
        raise MidiforgeError(f"{store.uri}: no pieces in split {split!r} (it has {have})")
    return tokenizer, split, sorted(rows[split], key=lambda r: r[0])


def load_token_set(uri: str, split: str | None, storage: StorageOptions | None = None,
                   max_pieces: int | None = None) -> tuple[PieceSet, object]:
    """The pieces of one split of a preprocess output, decoded with its tokenizer in each piece's meter."""
    tokenizer, split, rows = read_token_split(uri, split, storage, meters=True)
    if max_pieces:
        rows = rows[:max_pieces]
    out = PieceSet(open_store(uri, storage).uri, "tokens", split=split, tokens_from=f"the shards ({tokenizer.id})")
    for source, tokens, meter in rows:
        out.names.append(source)
        out.pieces.append(tokenizer.decode(tokens, meter))
        out.tokens.append(tokens)
        out.midi.append(None)
    return out, tokenizer


def load_reference(uri: str, tokenizer, split: str | None, storage: StorageOptions | None = None,
                   max_pieces: int | None = None) -> PieceSet:
    if is_token_output(uri, storage):
        ref, tok = load_token_set(uri, split, storage, max_pieces)
        if tok.id != tokenizer.id:
            raise MidiforgeError(f"{ref.uri}: tokenizer {tok.id} differs from the evaluation's {tokenizer.id}")
        return ref
    ref = load_midi_folder(uri, tokenizer, storage)
    if max_pieces:
        for name in ("names", "pieces", "tokens", "midi"):
            setattr(ref, name, getattr(ref, name)[:max_pieces])
    return ref


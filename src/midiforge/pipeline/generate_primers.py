"""generate's primers: how each piece starts (:class:`PrimerPlan`): at BOS, from one MIDI file, or from
a random window of a piece of a preprocess output (``--primer-shards``, one window per piece, drawn
from the piece's own generator)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from midiforge.errors import MidiforgeError, PieceError
from midiforge.model.sampling import PRIMER_STREAM, piece_rng
from midiforge.pipeline.generate_models import ModelSpec, _float_or_none
from midiforge.storage import StorageOptions, open_store, split_uri

if TYPE_CHECKING:
    from midiforge.pipeline.generate import GenerateSettings


@dataclass
class PrimerPlan:
    """How piece ``i`` starts: shared (none, midi) or one shard window per piece."""

    kind: str
    source: str = ""
    piece: object = None                                   # midi: the primer Piece
    time_signature: tuple[int, int] = (4, 4)
    qpm: float | None = None                               # midi: the file's tempo
    windows: object = None                                 # shards: index -> (ids, qpm, source, time signature)
    mapped: int = 0                                        # midi: tokens mapped to the nearest known
    _encoded: dict = field(default_factory=dict, repr=False)  # midi: (tokenizer id, qpm) -> ids

    def for_piece(self, tokenizer, index: int, qpm_setting: float | None, qpm_median: float | None):
        """(primer ids, qpm, time signature, primer source) of piece ``index``."""
        from midiforge.music.primer import encode_primer, start_primer

        if self.kind == "shards":
            ids, row_qpm, source, ts = self.windows(index)
            return np.asarray(ids, dtype=np.int32), float(qpm_setting or row_qpm or qpm_median or 120.0), ts, source
        if self.kind == "midi":
            qpm = float(qpm_setting or self.qpm or qpm_median or 120.0)
            key = (tokenizer.id, qpm)
            if key not in self._encoded:
                self._encoded[key] = encode_primer(tokenizer, self.piece, qpm)[0]
            return self._encoded[key].copy(), qpm, self.time_signature, self.source
        qpm = float(qpm_setting or qpm_median or 120.0)
        return start_primer(tokenizer, qpm), qpm, (4, 4), ""


def read_uri_bytes(uri: str, storage: StorageOptions | None, what: str) -> bytes:
    scheme, where = split_uri(uri)
    try:
        if scheme == "file":
            with open(where, "rb") as fh:
                return fh.read()
        parent, _, key = uri.rstrip("/").rpartition("/")
        return open_store(parent, storage).read_bytes(key)
    except OSError as exc:
        raise MidiforgeError(f"{uri}: cannot read the {what} ({exc.strerror or exc})") from None


def plan_primers(settings: GenerateSettings, models: list[ModelSpec], seed: int,
                 storage: StorageOptions | None) -> PrimerPlan:
    from midiforge.music.readers import read_piece
    from midiforge.music.primer import encode_primer

    if settings.primer == "none":
        return PrimerPlan("none")
    if settings.primer == "midi":
        path = settings.primer_path
        data = read_uri_bytes(path, storage, "primer")
        try:
            piece = read_piece(path.rsplit("/", 1)[-1], data)
        except PieceError as exc:
            raise MidiforgeError(f"{path}: cannot read the primer ({exc})") from None
        mapped = 0
        for m in models:
            ids, n = encode_primer(m.tokenizer, piece)
            mapped = max(mapped, n)
            if len(ids) < 2:
                raise MidiforgeError(f"{path}: the primer has no notes the model's tokenizer keeps")
        return PrimerPlan("midi", source=path, piece=piece, time_signature=piece.time_signature, qpm=piece.qpm,
                          mapped=mapped)
    return _shard_windows(settings, models, seed, storage)


def _shard_windows(settings: GenerateSettings, models: list[ModelSpec], seed: int,
                   storage: StorageOptions | None) -> PrimerPlan:
    """One random window per piece from the pieces of a preprocess output (the tutorial's primer),
    each with the time signature of the piece it comes from."""
    from midiforge.music.primer import window_primer
    from midiforge.pipeline import tokens

    uri = settings.primer_path
    store = open_store(uri, storage)
    manifest = tokens.read_output_manifest(store)
    for m in models:
        model_tok = m.tokenizer.id
        if manifest.get("tokenizer") != model_tok:
            raise MidiforgeError(
                f"{store.url(tokens.MANIFEST)}: tokenizer {manifest.get('tokenizer')} differs from the model's "
                f"tokenizer {model_tok} ({m.uri}); its token ids would not match the model's vocabulary")
    rows = tokens.primer_rows(store, manifest, settings.primer_split, min_tokens=3)
    if not len(rows):
        raise MidiforgeError(f"{store.uri}: no piece of split {settings.primer_split!r} to take primers from")

    def window(i: int):  # piece i's window, when its batch is sent (not N of them held at once)
        rng = piece_rng(seed, i, PRIMER_STREAM)
        ids, qpm, source, ts = rows.get(int(rng.integers(0, len(rows))))
        return window_primer(ids, rng, settings.primer_length), _float_or_none(qpm), source, ts

    return PrimerPlan("shards", source=store.uri, windows=window)

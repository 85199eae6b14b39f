"""Parquet tables as objects in a store: build, write atomically with their sha256, read back.

Generic: the formats' schemas live with their owners (token shards: :mod:`midiforge.pipeline.tokens`,
generated pieces: :mod:`midiforge.pipeline.pieces`)."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from midiforge.errors import MidiforgeError
from midiforge.storage.manifest import sha256_hex
from midiforge.storage.store import Store


def int_lists(arrays: list[np.ndarray]) -> pa.ListArray:
    """A list<int32> column from NumPy arrays, without going through Python lists."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


#: Columns worth a Parquet dictionary (few distinct values); token lists are not, and cost time.
DICTIONARY_COLUMNS = ("split", "tokenizer", "status", "reason")


def table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd",
                   use_dictionary=[c for c in DICTIONARY_COLUMNS if c in table.column_names])
    return sink.getvalue()


def write_table(store: Store, rel: str, table: pa.Table) -> dict:
    """Write ``table`` atomically to ``rel``; its manifest entry {path, rows, bytes, sha256}."""
    data = table_bytes(table)
    store.write_bytes(rel, data)
    return {"path": rel, "rows": table.num_rows, "bytes": len(data), "sha256": sha256_hex(data)}


def read_table(store: Store, rel: str, columns: list[str] | None = None) -> pa.Table:
    return table_from_bytes(store.read_bytes(rel), store.url(rel), columns)


def table_from_bytes(data: bytes, where: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet table from bytes already read; ``where`` names it in errors."""
    try:
        return pq.read_table(io.BytesIO(data), columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise MidiforgeError(f"{where}: not a readable Parquet file ({exc})") from None

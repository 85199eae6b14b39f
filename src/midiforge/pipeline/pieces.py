"""The generated-pieces format: Parquet shards under ``pieces/``, one row per piece.

A ``midiforge generate`` DEST holds its pieces in shards, one per finished batch of a worker::

    pieces/<checkpoint>/part-<first index:09d>.parquet

(``first index`` is the index of the shard's first piece; a batch always holds consecutive pieces
of one checkpoint.)  The name depends only on what the batch holds, so a batch done twice (a worker
that died after writing, a late writer of a killed run) writes the same object again, with the
same bytes.  Every row has the columns of :data:`SCHEMA`: the piece's identity and settings, its
tokens, its metrics, ``midi`` (the MIDI file's bytes) and ``png`` (the piano roll's PNG with
``--piano-roll``, else null).  ``midi_path``/``png_path`` name the per-piece objects when the run
wrote them (``--midi-files``, the default), else they are null; ``midi_bytes``/``midi_sha256``
always describe the ``midi`` bytes.

``manifest.json`` (written last) lists the shards under ``shards`` ({path, checkpoint, first, rows,
bytes, sha256}, in checkpoint then index order) and under ``files`` with every other object.
Read a finished output with :func:`read_pieces` (one table, piece order) or :func:`iter_pieces`
(record batches, shard by shard, for outputs larger than memory).
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from midiforge.errors import MidiforgeError
from midiforge.storage.manifest import read_manifest, sha256_hex
from midiforge.storage.shards import int_lists, table_bytes
from midiforge.storage.store import LocalStore, Store, StorageOptions, map_parallel, open_store

PIECES_DIR = "pieces"
_SHARD_RE = re.compile(r"^pieces/([^/]+)/part-(\d+)\.parquet$")

_f64, _i32, _i64, _s = pa.float64(), pa.int32(), pa.int64(), pa.string()

#: One row per generated piece.
SCHEMA = pa.schema([
    ("piece_id", _s), ("checkpoint", _s), ("seed", _i64), ("index", _i64), ("bundle_sha256", _s), ("engine", _s),
    ("temperature", _f64), ("top_k", _i32), ("top_p", _f64), ("repetition_penalty", _f64),
    ("repetition_window", _i32), ("greedy", pa.bool_()), ("max_tokens", _i32), ("max_seconds", _f64),
    ("qpm", _f64), ("primer", _s), ("primer_source", _s), ("primer_length", _i32),
    ("tokens", pa.list_(pa.int32())), ("n_tokens", _i32), ("generated_tokens", _i32), ("stop_reason", _s),
    ("n_notes", _i32), ("seconds", _f64),
    ("midi_path", _s), ("midi_bytes", _i64), ("midi_sha256", _s),
    ("png_path", _s), ("png_bytes", _i64), ("png_sha256", _s),
    ("pitch_class_entropy", _f64), ("scale_consistency", _f64), ("pitch_range", _f64), ("polyphony", _f64),
    ("empty_beat_rate", _f64), ("longest_repeat", _f64), ("distinct_4gram_ratio", _f64),
    ("midi", pa.binary()), ("png", pa.binary()),
])
COLUMNS = tuple(SCHEMA.names)
#: What finalize and --resume read of a shard: which pieces it holds and the per-piece objects they name.
SMALL_COLUMNS = ("checkpoint", "index", "generated_tokens", "stop_reason", "midi_path", "midi_bytes", "midi_sha256",
                 "png_path", "png_bytes", "png_sha256")


# -------------------------------------------------------------------------------------------
# names
# -------------------------------------------------------------------------------------------
def piece_name(seed: int, index: int) -> str:
    """The stable file stem of piece ``index`` of seed ``seed``."""
    return f"s{seed}-{index:06d}"


def midi_rel(label: str, seed: int, index: int) -> str:
    return f"midi/{label}/{piece_name(seed, index)}.mid"


def png_rel(label: str, seed: int, index: int) -> str:
    return f"png/{label}/{piece_name(seed, index)}.png"


def shard_rel(first: int, checkpoint: str = "final") -> str:
    """The shard of the batch of ``checkpoint`` whose first piece is ``first``."""
    return f"{PIECES_DIR}/{checkpoint}/part-{int(first):09d}.parquet"


def is_shard(rel: str) -> bool:
    return _SHARD_RE.match(rel) is not None


# -------------------------------------------------------------------------------------------
# writing
# -------------------------------------------------------------------------------------------
def rows_table(rows: dict[str, list]) -> pa.Table:
    """A table of :data:`SCHEMA` from column lists (``tokens``: NumPy arrays)."""
    missing = [c for c in COLUMNS if c not in rows]
    if missing:
        raise ValueError(f"pieces rows lack columns {missing}")
    cols = [int_lists(rows[f.name]) if f.name == "tokens" else pa.array(rows[f.name], type=f.type)
            for f in SCHEMA]
    return pa.Table.from_arrays(cols, schema=SCHEMA)


def check_table(table: pa.Table, where: str = "pieces table") -> None:
    if not table.schema.equals(SCHEMA):
        theirs = {f.name: f.type for f in table.schema}
        diff = [f"{f.name} ({theirs.get(f.name, 'missing')}, not {f.type})" for f in SCHEMA
                if theirs.get(f.name) != f.type] + [f"{n} (not in the schema)" for n in theirs if n not in COLUMNS]
        raise MidiforgeError(f"{where}: not a pieces table: {', '.join(diff) or 'column order differs'}")


def write_shard(store: Store, rel: str, table: pa.Table) -> dict:
    """Write one shard (checked against :data:`SCHEMA`) atomically; its entry {path, rows, bytes, sha256}."""
    check_table(table, store.url(rel))
    data = table_bytes(table)
    store.write_bytes(rel, data)
    return {"path": rel, "rows": table.num_rows, "bytes": len(data), "sha256": sha256_hex(data)}


# -------------------------------------------------------------------------------------------
# what the shards of a DEST hold (resume, finalize)
# -------------------------------------------------------------------------------------------
@dataclass
class ShardInfo:
    """A shard as stored: its manifest entry and its small columns (which pieces, which objects)."""

    entry: dict              # {path, rows, bytes, sha256} of the bytes read
    checkpoints: pa.Array    # one per row
    indices: np.ndarray      # int64, one per row
    small: pa.Table          # all of SMALL_COLUMNS (the per-piece objects the rows name, stop reasons...)

    @property
    def path(self) -> str:
        return self.entry["path"]


def _info(rel: str, data: bytes, table: pa.Table) -> ShardInfo:
    t = table.select(list(SMALL_COLUMNS))
    return ShardInfo({"path": rel, "rows": t.num_rows, "bytes": len(data), "sha256": sha256_hex(data)},
                     t["checkpoint"].combine_chunks(), t["index"].to_numpy().astype(np.int64), t)


def read_shard_info(store: Store, rel: str) -> ShardInfo:
    """Read a shard once: sha256 of its bytes, and only its small columns decoded."""
    data = store.read_bytes(rel)
    try:
        return _info(rel, data, _parquet(data, store.url(rel), list(SMALL_COLUMNS)))
    except MidiforgeError as exc:
        raise MidiforgeError(f"{exc} (delete it and rerun with --resume to make its pieces again)") from None


def list_shards(store: Store) -> dict[str, int]:
    """{shard path: size} of every shard under ``pieces/``."""
    return {o.path: o.size for o in store.list(PIECES_DIR) if is_shard(o.path)}


def scan_shards(store: Store, known: dict[str, ShardInfo] | None = None) -> dict[str, ShardInfo]:
    """Every shard of ``store``; those in ``known`` with the same size are not read again."""
    known = known or {}
    listed = list_shards(store)
    todo = [rel for rel, size in listed.items() if rel not in known or known[rel].entry["bytes"] != size]
    out = {rel: known[rel] for rel in listed.keys() - set(todo)}
    for info in map_parallel(lambda rel: read_shard_info(store, rel), todo, store.transfers):
        out[info.path] = info
    return out


def held(infos, labels: list[str], num_pieces: int) -> dict[str, np.ndarray]:
    """{checkpoint: bool array of length ``num_pieces``}: which pieces some shard of ``infos`` holds."""
    out = {lab: np.zeros(num_pieces, dtype=bool) for lab in labels}
    for info in infos:
        own = info.checkpoints.to_numpy(zero_copy_only=False)
        for lab in out:
            idx = info.indices[own == lab]
            out[lab][idx[(idx >= 0) & (idx < num_pieces)]] = True
    return out


def settle(store: Store, infos: dict[str, ShardInfo], labels: list[str], num_pieces: int) -> list[ShardInfo]:
    """The shards that hold every piece (checkpoint in ``labels``, index < ``num_pieces``) exactly once.

    Shards are taken in (checkpoint, first index) order.  A row already held by an earlier shard (a
    batch written again by a late writer of an earlier run, cut differently), or outside the run
    (index >= N after a resume with a smaller N) is dropped: a shard left without rows is deleted,
    one that keeps some is written again without the others (rare: never in a run without a crash).
    Raises when pieces are missing.
    """
    pos = {lab: k for k, lab in enumerate(labels)}
    covered = {lab: np.zeros(num_pieces, dtype=bool) for lab in labels}

    def first(info: ShardInfo):
        if not len(info.indices):
            return (len(labels), 0, info.path)
        k = int(np.argmin(info.indices))
        return (pos.get(info.checkpoints[k].as_py(), len(labels)), int(info.indices[k]), info.path)

    kept: list[ShardInfo] = []
    for info in sorted(infos.values(), key=first):
        keep = np.zeros(len(info.indices), dtype=bool)
        own = info.checkpoints.to_numpy(zero_copy_only=False)
        for lab in covered:
            rows = np.flatnonzero(own == lab)
            idx = info.indices[rows]
            ok = (idx >= 0) & (idx < num_pieces)
            rows, idx = rows[ok], idx[ok]
            _, firsts = np.unique(idx, return_index=True)     # one row per piece inside the shard too
            rows, idx = rows[firsts], idx[firsts]
            new = ~covered[lab][idx]
            covered[lab][idx[new]] = True
            keep[rows[new]] = True
        if keep.all() and len(keep):
            kept.append(info)
            continue
        _drop_objects(store, info, keep, covered)
        if not keep.any():
            store.delete(info.path)
            continue
        table = _parquet(store.read_bytes(info.path), store.url(info.path)).filter(pa.array(keep))
        check_table(table, store.url(info.path))
        data = table_bytes(table)
        store.write_bytes(info.path, data)
        kept.append(_info(info.path, data, table))
    missing = sum(int((~c).sum()) for c in covered.values())
    if missing:
        expected = num_pieces * len(labels)
        raise MidiforgeError(f"{store.uri}: {expected - missing} pieces finished of {expected}; rerun with --resume")
    return kept


def _drop_objects(store: Store, info: ShardInfo, keep: np.ndarray, covered: dict) -> None:
    """Delete the per-piece objects of dropped rows that no kept row names (pieces outside the run)."""
    own = info.checkpoints.to_pylist()
    for r in np.flatnonzero(~keep):
        lab, idx = own[r], int(info.indices[r])
        if lab in covered and 0 <= idx < len(covered[lab]):
            continue  # a duplicate: the row kept elsewhere names the same objects
        for col in ("midi_path", "png_path"):
            rel = info.small[col][int(r)].as_py()
            if rel:
                store.delete(rel)


def file_entries(infos: list[ShardInfo]) -> list[dict]:
    """Manifest entries of the per-piece objects (MIDI, PNG) the shards' rows name, then of the shards."""
    out = []
    for info in infos:
        f = info.small.select([f"{k}_{c}" for k in ("midi", "png") for c in ("path", "bytes", "sha256")]).to_pydict()
        for kind in ("midi", "png"):
            for path, size, digest in zip(f[f"{kind}_path"], f[f"{kind}_bytes"], f[f"{kind}_sha256"]):
                if path:
                    out.append({"path": path, "bytes": int(size), "sha256": digest})
    return out + [{k: i.entry[k] for k in ("path", "bytes", "sha256")} for i in infos]


def shard_entries(infos: list[ShardInfo]) -> list[dict]:
    """The manifest's ``shards`` list, in (checkpoint, first index) order as ``infos`` come."""
    out = []
    for i in infos:
        k = int(np.argmin(i.indices))
        out.append({"path": i.path, "checkpoint": i.checkpoints[k].as_py(), "first": int(i.indices[k]),
                    **{key: i.entry[key] for key in ("rows", "bytes", "sha256")}})
    return out


# -------------------------------------------------------------------------------------------
# reading a finished output
# -------------------------------------------------------------------------------------------
def _store(dest: str | Store, storage: StorageOptions | None) -> Store:
    return open_store(dest, storage) if isinstance(dest, str) else dest


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _parquet(data: bytes, where: str, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(io.BytesIO(data), columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise MidiforgeError(f"{where}: not a readable pieces shard ({_why(exc)})") from None


def _shards(store: Store) -> tuple[dict, list[dict]]:
    """The manifest of a finished generate output and its ``shards`` list (validated)."""
    manifest = read_manifest(store)
    where = store.url("manifest.json")
    shards = manifest.get("shards")
    if manifest.get("stage") != "generate" or not isinstance(shards, list):
        raise MidiforgeError(f"{where}: not a generate output with pieces shards (an output written before "
                             f"pieces/ shards: generate it again)")
    for k, s in enumerate(shards):
        if not (isinstance(s, dict) and isinstance(s.get("path"), str) and is_shard(s["path"])
                and isinstance(s.get("rows"), int)):
            raise MidiforgeError(f"{where}: shards[{k}] is not a {{path: pieces/.../part-N.parquet, rows}} entry")
    return manifest, shards


def _columns(columns) -> list[str] | None:
    if columns is None:
        return None
    columns = list(columns)
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise MidiforgeError(f"pieces: no column {', '.join(map(repr, unknown))} (columns: {', '.join(COLUMNS)})")
    return columns


def _open_shard(store: Store, entry: dict) -> pq.ParquetFile:
    """A shard to read columns from: a local file is read in place (only the columns asked for)."""
    rel = entry["path"]
    try:
        if isinstance(store, LocalStore):
            path = store.path(rel)
            if not path.is_file():
                raise MidiforgeError(f"{path}: no such file (listed in the manifest)")
            f = pq.ParquetFile(str(path))
        else:
            f = pq.ParquetFile(io.BytesIO(store.read_bytes(rel)))
    except (pa.ArrowInvalid, OSError) as exc:
        raise MidiforgeError(f"{store.url(rel)}: not a readable pieces shard ({_why(exc)})") from None
    if f.metadata.num_rows != entry["rows"]:
        raise MidiforgeError(f"{store.url(rel)}: {f.metadata.num_rows} rows, the manifest says {entry['rows']} "
                             f"(replaced or damaged)")
    return f


def iter_pieces(dest: str | Store, storage: StorageOptions | None = None,
                columns=None) -> Iterator[pa.RecordBatch]:
    """The pieces of a finished generate output as record batches, shard by shard in the manifest's
    order (checkpoint, then first index: piece order), one shard in memory at a time."""
    store = _store(dest, storage)
    _manifest, shards = _shards(store)
    cols = _columns(columns)
    for entry in shards:
        try:
            with _open_shard(store, entry) as f:
                yield from f.iter_batches(columns=cols)
        except (pa.ArrowInvalid, OSError) as exc:
            raise MidiforgeError(f"{store.url(entry['path'])}: not a readable pieces shard ({_why(exc)})") from None


def read_pieces(dest: str | Store, storage: StorageOptions | None = None, columns=None) -> pa.Table:
    """Every piece of a finished generate output as one table (all shards), in piece order:
    checkpoint (as the manifest's ``bundles`` list them), then index.  ``columns``: only these."""
    store = _store(dest, storage)
    manifest, shards = _shards(store)
    cols = _columns(columns)
    read = None if cols is None else list(dict.fromkeys([*cols, "checkpoint", "index"]))
    tables = []
    for entry in shards:
        try:
            with _open_shard(store, entry) as f:
                tables.append(f.read(columns=read))
        except (pa.ArrowInvalid, OSError) as exc:
            raise MidiforgeError(f"{store.url(entry['path'])}: not a readable pieces shard ({_why(exc)})") from None
    if tables:
        table = pa.concat_tables(tables)
    else:
        table = SCHEMA.empty_table() if read is None else pa.schema([SCHEMA.field(c) for c in read]).empty_table()
    labels = [b.get("checkpoint") for b in manifest.get("bundles", []) if isinstance(b, dict)]
    pos = pc.index_in(table["checkpoint"], value_set=pa.array(labels, pa.string())).fill_null(len(labels))
    order = np.lexsort((table["index"].to_numpy(), pos.to_numpy()))
    if len(order) and np.any(np.diff(order) != 1):
        table = table.take(pa.array(order))
    return table if cols is None else table.select(cols)


def export_midi(dest: str | Store, out: str | Store, storage: StorageOptions | None = None,
                out_storage: StorageOptions | None = None, checkpoints=None) -> int:
    """Write the MIDI file of every piece (of ``checkpoints``, default all) from the shards to
    ``out/midi/<checkpoint>/s<seed>-<index>.mid`` (the names ``--midi-files`` gives them); returns how many."""
    src = _store(dest, storage)
    target = _store(out, out_storage if out_storage is not None else storage)
    wanted = None if checkpoints is None else set(checkpoints)
    n = 0
    for batch in iter_pieces(src, columns=["checkpoint", "seed", "index", "midi"]):
        d = batch.to_pydict()
        writes = [(midi_rel(c, s, i), m) for c, s, i, m in zip(d["checkpoint"], d["seed"], d["index"], d["midi"])
                  if wanted is None or c in wanted]
        map_parallel(lambda w: target.write_bytes(*w), writes, target.transfers)
        n += len(writes)
    return n

"""The token-shard format: what ``midiforge preprocess`` writes and train and generate read.

A preprocess DEST holds::

    shards/part-<part:05d>.parquet   one row per piece (and per transposed copy of a train piece)
    tokenizer.json                   the tokenizer that made the ids (its vocabulary, for classic)
    manifest.json                    written last: ``shards`` [{path, rows, bytes, sha256}], ``files``
                                     (every object with its sha256), ``splits``, ``qpm_median``, ``tokenizer``...
    _work/                           preprocess's own (settings, batch journals, classic raw tables)

Every shard row has the columns of :data:`SCHEMA`: the piece's identity (``piece_id``: sha256 of
its bytes; ``source``), its ``split`` (one of :data:`SPLITS`), ``transpose`` (semitones; 0 for the
piece as read), its ``tokens`` (BOS ... EOS) and their count, facts of the piece (notes, seconds,
qpm, its first time signature ``ts_numerator``/``ts_denominator``) and the tokenizer's id.  Shards
written before the time signature was kept lack its two columns: the readers here give them 4/4.

Every table is checked against its schema before it is written (:func:`write_shard`,
:func:`write_raw`), and read through this module: :func:`read_shard` (one shard, verified against
its manifest entry when given one), :func:`open_shards` (a finished output for training: local
files, their rows and tokens per split) and :class:`SplitReader` (the token ids of one split, a
Parquet row batch at a time: what ``model/data.py`` cuts into windows).
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from midiforge.errors import MidiforgeError
from midiforge.model.data import default_cache_dir
from midiforge.music.tokenizers import Tokenizer, load_tokenizer
from midiforge.storage.manifest import file_entry, manifest_entries, sha256_hex
from midiforge.storage.shards import table_bytes
from midiforge.storage.store import LocalStore, Store, StorageOptions, open_store

SHARDS_DIR = "shards"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
#: preprocess's work folder; a classic run keeps its text tokens there until the vocabulary is known
RAW_DIR = "_work"
#: Every split a row can be in (``--split`` ratios in this order); training reads the first two.
SPLITS = ("train", "validation", "test")
TRAIN_SPLITS = ("train", "validation")
#: A piece without a time signature, and the rows of shards written before the column existed.
DEFAULT_TIME_SIGNATURE = (4, 4)
#: Parquet rows per batch of :class:`SplitReader`.
ROWS_PER_BATCH = 256

_SHARD_RE = re.compile(r"^shards/part-(\d{5,})\.parquet$")
_RAW_RE = re.compile(r"^_work/raw-(\d{5,})\.parquet$")
_s, _i8, _i16, _i32, _f64 = pa.string(), pa.int8(), pa.int16(), pa.int32(), pa.float64()


def _schema(tokens: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema([
        ("piece_id", _s), ("source", _s), ("split", _s), ("transpose", _i8), tokens,
        ("n_tokens", _i32), ("n_notes", _i32), ("seconds", _f64), ("qpm", _f64), ("tokenizer", _s),
        ("ts_numerator", _i16), ("ts_denominator", _i16),
    ])


#: The columns of ``shards/part-NNNNN.parquet``.
SCHEMA = _schema(("tokens", pa.list_(pa.int32())))
COLUMNS = tuple(SCHEMA.names)
#: A classic run's raw table (``_work/raw-NNNNN.parquet``): the tokens as text, made ids by finalize.
RAW_SCHEMA = _schema(("tokens_text", pa.list_(pa.string())))
#: Columns a shard of an older version may lack, and the value its rows have.
DEFAULTS = {"ts_numerator": DEFAULT_TIME_SIGNATURE[0], "ts_denominator": DEFAULT_TIME_SIGNATURE[1]}


# -------------------------------------------------------------------------------------------
# names
# -------------------------------------------------------------------------------------------
def shard_rel(part: int) -> str:
    """The shard of batch ``part``."""
    return f"{SHARDS_DIR}/part-{int(part):05d}.parquet"


def raw_rel(part: int) -> str:
    """The raw (text tokens) table of batch ``part`` of a classic run."""
    return f"{RAW_DIR}/raw-{int(part):05d}.parquet"


def part_of(rel: str) -> int | None:
    """The batch number of a shard or raw table path, else None."""
    m = _SHARD_RE.match(rel) or _RAW_RE.match(rel)
    return int(m.group(1)) if m else None


def is_shard(rel: str) -> bool:
    return _SHARD_RE.match(rel) is not None


# -------------------------------------------------------------------------------------------
# writing
# -------------------------------------------------------------------------------------------
def time_signature_columns(time_signatures) -> tuple[np.ndarray, np.ndarray]:
    """(numerators, denominators) int16 of rows of (numerator, denominator); a signature that is not
    two positive numbers that fit (none, or a reader's nonsense) is stored as 4/4."""
    ts = np.asarray(time_signatures, dtype=np.int64).reshape(-1, 2)
    ok = (ts[:, 0] >= 1) & (ts[:, 1] >= 1) & (ts[:, 0] <= np.iinfo(np.int16).max) & (ts[:, 1] <= np.iinfo(np.int16).max)
    num = np.where(ok, ts[:, 0], DEFAULT_TIME_SIGNATURE[0]).astype(np.int16)
    den = np.where(ok, ts[:, 1], DEFAULT_TIME_SIGNATURE[1]).astype(np.int16)
    return num, den


def rows_table(columns: dict, schema: pa.Schema = SCHEMA) -> pa.Table:
    """A table of ``schema`` (:data:`SCHEMA` or :data:`RAW_SCHEMA`) from its columns (Arrow arrays, or
    anything ``pa.array`` takes); the token column as an Arrow list array (or lists)."""
    missing = [f.name for f in schema if f.name not in columns]
    extra = [c for c in columns if c not in schema.names]
    if missing or extra:
        raise MidiforgeError("token shard rows: " + "; ".join(
            ([f"missing columns {missing}"] if missing else []) + ([f"unknown columns {extra}"] if extra else [])))
    arrays = []
    for f in schema:
        v = columns[f.name]
        if not isinstance(v, (pa.Array, pa.ChunkedArray)):
            v = pa.array(v, type=f.type)
        elif v.type != f.type:
            v = v.cast(f.type)
        arrays.append(v)
    return pa.Table.from_arrays(arrays, schema=schema)


def check_table(table: pa.Table, where: str, schema: pa.Schema = SCHEMA) -> None:
    """Raise (naming ``where`` and every column that differs) unless ``table`` has exactly ``schema``."""
    if table.schema.equals(schema):
        return
    what = "token shard" if schema is SCHEMA else "raw token table"
    theirs = {f.name: f.type for f in table.schema}
    diff = [f"{f.name} ({theirs[f.name]}, not {f.type})" if f.name in theirs else f"{f.name} (missing)"
            for f in schema if theirs.get(f.name) != f.type]
    diff += [f"{n} (not in the schema)" for n in theirs if n not in schema.names]
    raise MidiforgeError(f"{where}: not a {what}: {', '.join(diff) or 'column order differs'}")


def _write(store: Store, rel: str, table: pa.Table, schema: pa.Schema) -> dict:
    check_table(table, store.url(rel), schema)
    data = table_bytes(table)
    store.write_bytes(rel, data)
    return {"path": rel, "rows": table.num_rows, "bytes": len(data), "sha256": sha256_hex(data)}


def write_shard(store: Store, part: int, table: pa.Table) -> dict:
    """Write shard ``part`` (checked against :data:`SCHEMA`) atomically; its entry {path, rows, bytes, sha256}."""
    return _write(store, shard_rel(part), table, SCHEMA)


def write_raw(store: Store, part: int, table: pa.Table) -> dict:
    """Write the raw table of batch ``part`` (checked against :data:`RAW_SCHEMA`); its entry."""
    return _write(store, raw_rel(part), table, RAW_SCHEMA)


# -------------------------------------------------------------------------------------------
# reading
# -------------------------------------------------------------------------------------------
def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def conform(table: pa.Table, where: str, schema: pa.Schema = SCHEMA) -> pa.Table:
    """``table`` (some columns of ``schema``, as read) after checking each column's type; raises
    naming ``where`` and the columns of another type."""
    bad = []
    for name in table.column_names:
        if name not in schema.names:
            continue
        want = schema.field(name).type
        if table.schema.field(name).type != want:
            bad.append(f"{name} ({table.schema.field(name).type}, not {want})")
    if bad:
        raise MidiforgeError(f"{where}: not a token shard: {', '.join(bad)}")
    return table


def _fill(table: pa.Table, wanted: list[str], schema: pa.Schema) -> pa.Table:
    """``table`` with every column of ``wanted`` in that order, the absent ones from :data:`DEFAULTS`."""
    for name in wanted:
        if name not in table.column_names:
            table = table.append_column(schema.field(name), pa.array(np.full(table.num_rows, DEFAULTS[name]),
                                                                     schema.field(name).type))
    return table.select(wanted)


def table_from_bytes(data: bytes, where: str, columns=None, schema: pa.Schema = SCHEMA) -> pa.Table:
    """A token shard (or raw table) from its bytes: ``columns`` of ``schema`` (default all), the
    time signature 4/4 in a shard written before it was kept; types checked."""
    wanted = list(schema.names if columns is None else columns)
    unknown = [c for c in wanted if c not in schema.names]
    if unknown:
        raise MidiforgeError(f"{where}: token shards have no column {', '.join(unknown)}")
    try:
        f = pq.ParquetFile(io.BytesIO(data))
        present = [c for c in wanted if c in f.schema_arrow.names]
        table = f.read(columns=present)
    except (pa.ArrowInvalid, OSError) as exc:
        raise MidiforgeError(f"{where}: not a readable token shard ({_why(exc)})") from None
    lacking = [c for c in wanted if c not in present and c not in DEFAULTS]
    if lacking:
        raise MidiforgeError(f"{where}: not a token shard: no column {', '.join(lacking)}")
    return _fill(conform(table, where, schema), wanted, schema)


def read_shard(store: Store, part_or_rel, columns=None, entry: dict | None = None) -> pa.Table:
    """A shard (by batch number or path), ``columns`` of it (default all); checked against the
    manifest ``entry`` when given (bytes and sha256)."""
    return read_shard_entry(store, part_or_rel, columns, entry)[1]


def read_shard_entry(store: Store, part_or_rel, columns=None, entry: dict | None = None) -> tuple[dict, pa.Table]:
    """(its {path, rows, bytes, sha256}, its table) of a shard: what a manifest lists of it, read once."""
    rel = part_or_rel if isinstance(part_or_rel, str) else shard_rel(part_or_rel)
    data = store.read_verified(rel, entry) if entry else store.read_bytes(rel)
    table = table_from_bytes(data, store.url(rel), columns)
    return {**file_entry(rel, data), "rows": table.num_rows}, table


def read_raw(store: Store, part: int, columns=None) -> pa.Table:
    """The raw table of batch ``part`` of a classic run (a run from before the time signature: 4/4)."""
    rel = raw_rel(part)
    return table_from_bytes(store.read_bytes(rel), store.url(rel), columns, RAW_SCHEMA)


def manifest_shards(manifest: dict, where: str) -> list[dict]:
    """The manifest's ``shards`` list, each a {path: shards/part-N.parquet, rows, bytes, sha256} entry."""
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list) or not shards:
        raise MidiforgeError(f"{where}: lists no shards (was preprocess run on an empty input?)")
    for k, s in enumerate(shards):
        if not (isinstance(s, dict) and isinstance(s.get("path"), str) and is_shard(s["path"])
                and isinstance(s.get("bytes"), int) and isinstance(s.get("sha256"), str)):
            raise MidiforgeError(f"{where}: shards[{k}] is not a {{path: shards/part-N.parquet, rows, bytes, "
                                 f"sha256}} entry")
    return shards


def read_output_manifest(store: Store) -> dict:
    """The manifest of a finished preprocess output (its shards list checked)."""
    return _output_manifest(store)[0]


def _output_manifest(store: Store) -> tuple[dict, bytes]:
    import json

    where = store.url(MANIFEST)
    if not store.exists(MANIFEST):
        hint = " (pass preprocess's DEST, not its shards/ folder)" if store.uri.rstrip("/").endswith(SHARDS_DIR) else ""
        raise MidiforgeError(f"{where}: no manifest: preprocess did not finish here, or this is not a preprocess "
                             f"output{hint}")
    data = store.read_bytes(MANIFEST)
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as exc:
        raise MidiforgeError(f"{where}: not valid JSON ({exc})") from None
    manifest_shards(manifest, where)
    return manifest, data


# -------------------------------------------------------------------------------------------
# a finished output, for training
# -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardFile:
    rel: str                  # path inside the output (shards/part-00000.parquet)
    local: str                # readable local path (the file itself, or its verified cached copy)
    rows: dict = field(default_factory=dict)    # split -> rows
    tokens: dict = field(default_factory=dict)  # split -> tokens


@dataclass
class ShardSet:
    """A finished preprocess output, checked and readable locally."""

    uri: str
    manifest: dict
    manifest_sha256: str
    tokenizer: Tokenizer
    tokenizer_json: bytes
    files: list[ShardFile]

    @property
    def qpm_median(self) -> float:
        return float(self.manifest.get("qpm_median") or 120.0)

    def tokens(self, split: str) -> int:
        return sum(f.tokens.get(split, 0) for f in self.files)

    def rows(self, split: str) -> int:
        return sum(f.rows.get(split, 0) for f in self.files)

    def with_split(self, split: str) -> list[ShardFile]:
        return [f for f in self.files if f.tokens.get(split, 0) > 0]

    def reader(self, split: str, paths: list[str] | None = None) -> "SplitReader":
        """The token ids of ``split`` in ``paths`` (local paths of :attr:`files`; default: every file holding it)."""
        return SplitReader([f.local for f in self.with_split(split)] if paths is None else paths, split)


def open_shards(uri: str, options: StorageOptions | None = None, cache_dir: str | None = None) -> ShardSet:
    """Read and check a preprocess output (``DEST`` of ``midiforge preprocess``).

    Object-store shards are downloaded once into ``cache_dir`` (content-addressed by sha256,
    verified); local shards are read in place.
    """
    store = open_store(uri, options)
    manifest, manifest_bytes = _output_manifest(store)
    shards = manifest_shards(manifest, store.url(MANIFEST))
    tok_entry = next((e for e in manifest.get("files", []) if isinstance(e, dict) and e.get("path") == TOKENIZER),
                     None)
    tok_bytes = store.read_verified(TOKENIZER, tok_entry) if tok_entry else store.read_bytes(TOKENIZER)
    try:
        tokenizer = load_tokenizer(tok_bytes)
    except (KeyError, TypeError, ValueError) as exc:
        raise MidiforgeError(f"{store.url(TOKENIZER)}: not a tokenizer ({exc})") from None
    except MidiforgeError as exc:
        raise MidiforgeError(f"{store.url(TOKENIZER)}: {exc}") from None
    if manifest.get("tokenizer") not in (None, tokenizer.id):
        raise MidiforgeError(f"{store.url(MANIFEST)}: says tokenizer {manifest['tokenizer']} but "
                             f"{TOKENIZER} is {tokenizer.id}")
    files = []
    cache = Path(cache_dir or default_cache_dir()) / "shards"
    for entry in shards:
        rel = entry["path"]
        if isinstance(store, LocalStore):
            local = store.path(rel)
            if not local.is_file():
                raise MidiforgeError(f"{store.url(rel)}: missing (listed in the shards manifest)")
            if local.stat().st_size != entry["bytes"]:
                raise MidiforgeError(f"{store.url(rel)}: {local.stat().st_size} bytes, the manifest says "
                                     f"{entry['bytes']} (truncated or replaced)")
        else:
            local = cache / f"{entry['sha256']}.parquet"
            if not (local.is_file() and local.stat().st_size == entry["bytes"]):
                store.get_file_verified(rel, local, entry)
        files.append(_scan(store.url(rel), rel, str(local), tokenizer.id))
    return ShardSet(store.uri, manifest, sha256_hex(manifest_bytes), tokenizer, tok_bytes, files)


def _scan(url: str, rel: str, local: str, tokenizer_id: str) -> ShardFile:
    try:
        t = pq.read_table(local, columns=["split", "n_tokens", "tokenizer"])
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise MidiforgeError(f"{url}: not a readable token shard ({_why(exc)})") from None
    t = conform(t, url)
    bad = [x for x in pc.unique(t["tokenizer"]).to_pylist() if x != tokenizer_id]
    if bad:
        raise MidiforgeError(f"{url}: rows made with tokenizer {bad[0]}, but the shards' {TOKENIZER} is "
                             f"{tokenizer_id}; mixed outputs of different preprocess runs cannot be trained together")
    split = np.asarray(t["split"].to_numpy(zero_copy_only=False)).astype(str)
    n_tok = np.asarray(t["n_tokens"].to_numpy(zero_copy_only=False), dtype=np.int64)
    rows = {s: int((split == s).sum()) for s in SPLITS}
    tokens = {s: int(n_tok[split == s].sum()) for s in SPLITS}
    return ShardFile(rel, local, rows, tokens)


class SplitReader:
    """The token ids of the ``split`` rows of local shard files, one Parquet row batch at a time.

    Calling it (``reader(rng)``) yields flat int32 arrays: the rows of a batch laid end to end, each
    ``BOS ... EOS``; with ``rng`` the file order and the row order inside each batch are shuffled.
    What :mod:`midiforge.model.data` cuts into training windows (it never opens a file itself).
    """

    def __init__(self, paths: list[str], split: str, rows_per_batch: int = ROWS_PER_BATCH) -> None:
        self.paths, self.split, self.rows_per_batch = list(paths), split, rows_per_batch

    @property
    def what(self) -> str:
        return f"{self.split} split of {len(self.paths)} shard file(s)"

    def __call__(self, rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
        order = self.paths if rng is None else [self.paths[i] for i in rng.permutation(len(self.paths))]
        for path in order:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=self.rows_per_batch, columns=["split", "tokens"]):
                lists = pc.filter(batch.column(1), pc.equal(batch.column(0), self.split))
                if len(lists) == 0:
                    continue
                if rng is not None and len(lists) > 1:
                    lists = lists.take(rng.permutation(len(lists)))
                yield np.asarray(lists.flatten().to_numpy(zero_copy_only=False), dtype=np.int32)


# -------------------------------------------------------------------------------------------
# primers (generate --primer-shards)
# -------------------------------------------------------------------------------------------
@dataclass
class PrimerRows:
    """The rows of one split a primer window may come from: untransposed, at least ``min_tokens``."""

    tables: list[pa.Table]
    shard: np.ndarray         # per candidate: index in ``tables``
    row: np.ndarray           # per candidate: row in its table

    def __len__(self) -> int:
        return len(self.row)

    def get(self, c: int) -> tuple[np.ndarray, float | None, str, tuple[int, int]]:
        """(token ids, qpm, source, time signature) of candidate ``c``."""
        t, r = self.tables[int(self.shard[c])], int(self.row[c])
        tokens = np.asarray(t["tokens"][r].values.to_numpy(), dtype=np.int32)
        ts = (int(t["ts_numerator"][r].as_py()), int(t["ts_denominator"][r].as_py()))
        return tokens, t["qpm"][r].as_py(), str(t["source"][r].as_py()), ts


_PRIMER_COLUMNS = ["source", "split", "transpose", "n_tokens", "qpm", "tokens", "ts_numerator", "ts_denominator"]


def primer_rows(store: Store, manifest: dict, split: str, min_tokens: int = 3) -> PrimerRows:
    """The candidate primer rows of ``split`` in every shard of a finished output (verified against
    the manifest's ``files`` entries)."""
    where = store.url(MANIFEST)
    entries = manifest_entries(manifest, where)
    tables, shard, row = [], [], []
    for k, s in enumerate(manifest_shards(manifest, where)):
        t = read_shard(store, s["path"], _PRIMER_COLUMNS, entries.get(s["path"]))
        ok = ((np.asarray(t["split"].to_pylist()) == split) & (np.asarray(t["transpose"]) == 0)
              & (np.asarray(t["n_tokens"]) >= min_tokens))
        rows = np.flatnonzero(ok)
        tables.append(t)
        shard.extend([k] * len(rows))
        row.extend(rows.tolist())
    return PrimerRows(tables, np.asarray(shard, np.int64), np.asarray(row, np.int64))

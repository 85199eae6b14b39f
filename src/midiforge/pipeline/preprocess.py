"""Turn a corpus of MIDI and score files into Parquet token shards, in parallel on Ray.

Every input unit (a file, or one tune of a multi-tune ABC file) ends as exactly one piece,
duplicate or failure; manifest.json is written last and ``inputs == pieces + duplicates + failures``.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import socket
import statistics
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from midiforge.errors import MidiforgeError, PieceError
from midiforge.music.piece import PieceBatch
from midiforge.music.readers import SUFFIXES, ReadOptions, file_format, read_pieces, split_units
from midiforge.music.tokenizers import EventsConfig, make_tokenizer
from midiforge.storage import (
    StorageOptions, StorageUnavailableError, file_entry, map_parallel, open_store, read_manifest, split_uri, write_manifest,
)
from midiforge.pipeline import tokens as T
from midiforge.pipeline.ray_runtime import start_ray
from midiforge.pipeline.tokens import SPLITS
from midiforge.storage.shards import int_lists, write_table

WORK = T.RAW_DIR
JOURNAL_SCHEMA = pa.schema([
    ("input", pa.string()), ("source", pa.string()), ("piece_id", pa.string()),
    ("status", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
])


class InputRef(NamedTuple):
    """One input file: ``source`` is its name relative to SRC; ``key`` its path in store ``root``;
    ``size`` its bytes as listed (-1: not known, e.g. from a list file).  A named tuple: a listing
    makes one per file."""

    source: str
    root: str
    key: str
    size: int = -1


@dataclass(frozen=True)
class PreprocessSettings:
    tokenizer: str = "events"
    tokenizer_settings: dict = field(default_factory=dict)
    read: ReadOptions = ReadOptions()
    splits: tuple[float, float, float] = (0.9, 0.05, 0.05)
    transpose: tuple[int, ...] = ()
    sample: int | None = None
    seed: int = 0

    def identity(self) -> dict:
        """What a resumed run must share with the run it continues."""
        d = asdict(self)
        d["tokenizer_settings"] = self.make_tokenizer().to_dict()["config"]  # resolved, defaults included
        return json.loads(json.dumps(d))  # the canonical JSON form, as saved

    def make_tokenizer(self):
        """The tokenizer of these settings (one per process and settings: tokenizers are never changed in place)."""
        return _tokenizer(self.tokenizer, json.dumps(self.tokenizer_settings, sort_keys=True))


def split_of(piece_id: str, ratios: tuple[float, float, float]) -> str:
    """train/validation/test from the piece's sha256: stable whatever the batching or corpus order."""
    h = int(piece_id[:13], 16) / float(16**13)
    if h < ratios[0]:
        return "train"
    if h < ratios[0] + ratios[1]:
        return "validation"
    return "test"


# -------------------------------------------------------------------------------------------
# listing
# -------------------------------------------------------------------------------------------
def list_inputs(src: str, options: StorageOptions | None = None, *,
                allow_absolute_paths: bool = False) -> list[InputRef]:
    """Every input under SRC (a folder or prefix, searched recursively), or listed in a text file.

    A local folder's entries that are not regular files (FIFOs, devices, sockets, link loops) are
    listed too (size -1): the batch that reads them records the failure ``not_regular``.  A list
    file names files relative to its own folder, see :func:`_list_file`.
    """
    scheme, where = split_uri(src)
    if scheme == "file" and os.path.isfile(where):
        return _list_file(where, allow_absolute_paths)
    if scheme == "file" and not os.path.isdir(where):
        raise MidiforgeError(f"{src}: no such folder or list file")
    store = open_store(src, options)
    listed = store.list(special=True) if scheme == "file" else store.list()  # S3 objects are always regular
    refs = [InputRef(o.path, store.uri, o.path, o.size) for o in listed if o.path.lower().endswith(SUFFIXES)
            and not o.path.split("/")[-1].startswith(".")]
    return sorted(refs, key=lambda r: r.source)


def src_uri(src: str) -> str:
    """SRC as one comparable string: ``file://`` + the real path (links resolved, no trailing '/'), or the
    ``s3://bucket/prefix`` without a trailing '/'."""
    scheme, where = split_uri(src)
    if scheme == "file":
        return "file://" + os.path.realpath(where)
    return where.rstrip("/")


def _utc(t: float) -> str:
    import datetime as _dt

    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def _list_file(path: str, allow_absolute_paths: bool = False) -> list[InputRef]:
    """The inputs a list file names, one per line (blank lines and ``#`` comments skipped).

    Each is a path relative to the list's folder and must stay inside it once resolved (``..`` and
    symbolic links included); an absolute path, a ``file://`` or ``s3://`` URI, or an escape is refused
    with an error naming the line, unless ``allow_absolute_paths``.  Entries are read as resolved
    here (a link swapped afterwards cannot lead outside).
    """
    base = os.path.dirname(os.path.abspath(path))
    real_base = os.path.realpath(base)
    refs = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError as exc:
        raise MidiforgeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); a list file "
                             f"names one path per line") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\0" in line:
            raise MidiforgeError(f"{path}:{n}: a NUL character in {line!r}")
        absolute = "://" in line or os.path.isabs(line)
        if absolute and not allow_absolute_paths:
            raise MidiforgeError(f"{path}:{n}: {line!r} is an absolute path or URI; a list file names files "
                                 f"relative to its folder {base} (--allow-absolute-paths reads it anyway)")
        scheme, where = split_uri(line if absolute else os.path.join(base, line))
        if scheme == "file":
            if not allow_absolute_paths:
                where = os.path.realpath(where)
                if os.path.commonpath([where, real_base]) != real_base:
                    raise MidiforgeError(f"{path}:{n}: {line!r} leads outside the list's folder {base} (to {where}); "
                                         f"--allow-absolute-paths reads it anyway")
            refs.append(InputRef(line, os.path.dirname(where), os.path.basename(where)))
        else:
            bucket_prefix, _, key = where[len("s3://"):].rpartition("/")
            refs.append(InputRef(line, f"s3://{bucket_prefix}", key))
    seen = set()
    unique = [r for r in refs if not (r.source in seen or seen.add(r.source))]
    return sorted(unique, key=lambda r: r.source)


def sample_inputs(refs: list[InputRef], n: int | None, seed: int) -> list[InputRef]:
    if n is None or n >= len(refs):
        return refs
    if n <= 0:
        raise MidiforgeError("--sample must be positive")
    pick = np.random.default_rng(seed).choice(len(refs), size=n, replace=False)
    return [refs[i] for i in sorted(pick)]


# -------------------------------------------------------------------------------------------
# the Ray task: a batch of files -> one shard and one journal
# -------------------------------------------------------------------------------------------
def _write_piece_table(dest, part: int, classic: bool, table: pa.Table) -> dict:
    """The batch's rows: a shard, or (classic: text tokens until finalize knows the vocabulary) a raw table."""
    return T.write_raw(dest, part, table) if classic else T.write_shard(dest, part, table)


def _read_piece_table(dest, part: int, classic: bool) -> pa.Table:
    return T.read_raw(dest, part) if classic else T.read_shard(dest, part)


def process_batch(part: int, inputs: list[InputRef], dest_uri: str, storage: StorageOptions,
                  settings: PreprocessSettings, progress=None) -> dict:
    """Read, parse and tokenize ``inputs``; write their rows and their journal; return a summary.

    Three passes over the batch: the bytes of every unit (and its sha256, so that an identical copy
    in the batch is read once); every unit parsed at once (:func:`read_pieces`); every row (a piece,
    and its transpositions in the train split) tokenized at once.  ``progress``: a :class:`_ProgressBoard`
    actor that hears how far the parse is, after every unit music21 reads (about a second each).
    """
    started = time.perf_counter()
    dest = open_store(dest_uri, storage)
    tok = settings.make_tokenizer()
    classic = tok.vocab_from_data
    stores: dict[str, object] = {}
    # the journal, in input order: (input, source, piece_id, status, reason, detail); a unit to read
    # is entered with status None and gets its outcome after the parse
    entries: list[list] = []
    units: list[tuple[str, bytes]] = []   # the distinct units to read
    unit_entry: list[int] = []            # the journal entry of each
    unit_of: dict[str, int] = {}          # piece_id -> its unit
    copies: list[tuple[int, int]] = []    # (journal entry, unit) of identical copies in this batch
    max_bytes = settings.read.max_bytes
    for ref in inputs:
        try:
            store = stores.get(ref.root) or stores.setdefault(ref.root, open_store(ref.root, storage))
            size = ref.size if ref.size >= 0 else _local_size(store, ref.key)
            if size > max_bytes:  # refused by its listed size: never read (a 200 MB file costs nothing)
                entries.append([ref.source, ref.source, "", "failure", "too_long", f"{size} bytes > max {max_bytes}"])
                continue
            data = store.read_bytes(ref.key)
        except StorageUnavailableError:  # the service is down (after retries): the task fails, no file is blamed
            raise
        except PieceError as exc:  # e.g. not_regular: a FIFO, a device, a link loop; never read
            entries.append([ref.source, ref.source, "", "failure", exc.reason, exc.detail])
            continue
        except Exception as exc:  # any storage failure: recorded as read_error, the job goes on
            entries.append([ref.source, ref.source, "", "failure", "read_error", f"{type(exc).__name__}: {exc}"])
            continue
        for src, unit in split_units(ref.source, data):
            if not unit:
                entries.append([ref.source, src, "", "failure", "empty", "0 bytes"])
                continue
            pid = hashlib.sha256(unit).hexdigest()
            entries.append([ref.source, src, pid, None, "", ""])
            if pid in unit_of:
                copies.append((len(entries) - 1, unit_of[pid]))
            else:
                unit_of[pid] = len(units)
                units.append((src, unit))
                unit_entry.append(len(entries) - 1)

    batch, errors = _read_units(units, settings.read, part, progress)
    good = [u for u, e in enumerate(errors) if e is None]  # the unit of each piece of the batch
    if len(errors) != len(units) or len(batch) != len(good):  # a reader bug: never pair pieces with wrong sources
        raise MidiforgeError(f"batch {part}: the reader returned {len(batch)} pieces and {len(errors)} outcomes "
                             f"for {len(units)} units ({len(good)} without error)")
    for u, e in enumerate(errors):
        if e is not None:
            entries[unit_entry[u]][3:] = ["failure", e.reason, e.detail]
    rows, row_batch = _rows(batch, [entries[unit_entry[u]][2] for u in good], [units[u][0] for u in good], settings)
    if classic:
        tokens, bad = _classic_texts(tok, row_batch, rows["piece_id"])
    else:
        tokens, bad = _encode_rows(tok, row_batch, rows["piece_id"])
    for u in good:
        e = entries[unit_entry[u]]
        e[3:] = ["failure", "parser_error", bad[e[2]]] if e[2] in bad else ["piece", "", ""]
    for entry, u in copies:
        first = entries[unit_entry[u]]
        entries[entry][3:] = ["duplicate", "", ""] if first[3] == "piece" else first[3:]
    if bad:
        keep = [pid not in bad for pid in rows["piece_id"]]
        rows = {k: [v for v, ok in zip(col, keep) if ok] for k, col in rows.items()}
        tokens = tokens.filter(pa.array(keep)) if not classic else [t for t, ok in zip(tokens, keep) if ok]

    piece_table = None
    n_rows = len(rows["piece_id"])
    n_tokens = np.asarray(tokens.value_lengths()) if not classic else np.array([len(t) + 2 for t in tokens], np.int64)
    if n_rows:
        cols = {k: rows[k] for k in ("piece_id", "source", "split", "transpose", "n_notes", "seconds", "qpm")}
        cols["tokens_text" if classic else "tokens"] = tokens
        cols["n_tokens"] = n_tokens
        cols["tokenizer"] = [tok.id] * n_rows
        cols["ts_numerator"], cols["ts_denominator"] = T.time_signature_columns(rows["time_signature"])
        table = T.rows_table(cols, T.RAW_SCHEMA if classic else T.SCHEMA)
        piece_table = _write_piece_table(dest, part, classic, table)
        piece_table["stats"] = _table_stats(rows["split"], rows["transpose"], rows["qpm"], n_tokens.tolist())
    # the journal is written last: its presence says the batch is complete
    if any(e[3] is None for e in entries):  # every unit is a piece, a duplicate or a failure
        raise MidiforgeError(f"batch {part}: a unit has no outcome")
    journal = {k: [e[i] for e in entries] for i, k in enumerate(JOURNAL_SCHEMA.names)}
    journal["detail"] = [d[:2000] for d in journal["detail"]]
    _write_journal(dest, _journal_path(part), journal)
    status = journal["status"]
    return {
        "part": part, "files": len(inputs), "units": len(status),
        "pieces": status.count("piece"), "duplicates": status.count("duplicate"),
        "failures": status.count("failure"), "tokens": int(n_tokens.sum()),
        # the journal as plain lists: a pa.Table costs ~3 ms more per Ray round trip
        "table": piece_table, "journal": journal, "seconds": time.perf_counter() - started,
        "host": socket.gethostname(),  # where the batch ran (the manifest's timing.batch_hosts)
    }


def _is_fast(source: str, options: ReadOptions) -> bool:
    """A unit read in one pass with the whole batch (symusic MIDI: microseconds); the others (music21) take ~1 s."""
    return options.parser == "symusic" and file_format(source.split("#", 1)[0]) == "midi"


def _read_units(units: list[tuple[str, bytes]], options: ReadOptions, part: int, progress) -> tuple[PieceBatch, list]:
    """:func:`read_pieces` of ``units``; with ``progress``, the slow units one by one, each followed by the
    fraction of the batch's units read so far on the board (the MIDI files of the batch together, first)."""
    slow = [i for i, (src, _data) in enumerate(units) if not _is_fast(src, options)]
    if progress is None or not slow:
        return read_pieces(units, options)
    fast = [i for i in range(len(units)) if i not in set(slow)]
    chunks = ([fast] if fast else []) + [[i] for i in slow]
    batches, order, errors = [], [], [None] * len(units)
    done = 0
    for chunk in chunks:
        b, errs = read_pieces([units[i] for i in chunk], options)
        batches.append(b)
        for i, e in zip(chunk, errs):
            errors[i] = e
            if e is None:
                order.append(i)  # read_pieces keeps the order of its input units
        done += len(chunk)
        progress.set.remote(part, done / len(units))
    batch = PieceBatch.concat(batches)
    return batch.take(np.argsort(order, kind="stable")), errors


class _ProgressBoard:
    """A Ray actor: the fraction of each running batch's units parsed, for the driver's progress bar."""

    def __init__(self) -> None:
        self.fractions: dict[int, float] = {}

    def set(self, part: int, fraction: float) -> None:
        self.fractions[part] = fraction

    def get(self) -> dict[int, float]:
        return dict(self.fractions)


@functools.lru_cache(maxsize=8)
def _tokenizer(kind: str, settings_json: str):
    """A tokenizer, made once per process and settings (building a vocabulary costs ~1 ms)."""
    return make_tokenizer(kind, **json.loads(settings_json))


def _rows(batch: PieceBatch, pids: list[str], sources: list[str],
          settings: PreprocessSettings) -> tuple[dict, PieceBatch]:
    """The shard's rows of the pieces of ``batch``: each piece, then its transpositions if it is in
    the train split (those that keep every pitch in 0..127); and the batch of their notes."""
    split = [split_of(pid, settings.splits) for pid in pids]
    lengths = batch.lengths.tolist()
    shifts = [k for k in settings.transpose if k != 0]
    if not shifts:
        which, moves = range(len(pids)), [0] * len(pids)
        row_batch = batch
    else:
        low, high = batch.pitch_range()
        which, moves = [], []
        for i, sp in enumerate(split):
            which.append(i)
            moves.append(0)
            if sp == "train":
                for k in shifts:
                    if low[i] + k >= 0 and high[i] + k <= 127:
                        which.append(i)
                        moves.append(k)
        row_batch = batch.take(which).transposed(np.array(moves))
    which = list(which)
    rows = {"piece_id": [pids[i] for i in which], "source": [sources[i] for i in which],
            "split": [split[i] for i in which], "transpose": list(moves), "n_notes": [lengths[i] for i in which],
            "seconds": batch.seconds[which].tolist(), "qpm": batch.qpm[which].tolist(),
            "time_signature": batch.time_signature[which].tolist()}  # (numerator, denominator): the piece's first
    return rows, row_batch


#: the columns of a shard that _table_stats reads
_STATS_COLUMNS = ("split", "transpose", "qpm", "n_tokens")


def _shard_info(entry: dict, table: pa.Table) -> dict:
    """A shard's manifest entry ({path, rows, bytes, sha256}) with its stats, from its table."""
    return {**entry, "stats": _table_stats(*(table[k].to_pylist() for k in _STATS_COLUMNS))}


def _table_stats(split, transpose, qpm, n_tokens) -> dict:
    """What the manifest needs of one shard: rows, tokens, and per split/qpm of the untransposed rows."""
    originals = [i for i, k in enumerate(transpose) if k == 0]
    splits = dict.fromkeys(SPLITS, 0)
    for i in originals:
        splits[split[i]] += 1
    return {"rows": len(split), "tokens": int(sum(n_tokens)), "splits": splits,
            "qpm": [float(qpm[i]) for i in originals]}


def _encode_rows(tok, batch: PieceBatch, pids: list[str]) -> tuple[pa.ListArray, dict[str, str]]:
    """The ids of every row, all in one ``encode_batch`` call, as a list<int32> column; and the
    pieces that could not be encoded ({piece_id: reason}).

    If the batch fails, the rows are encoded one by one, so that only the piece that cannot be
    encoded fails (a parser_error, with its in-batch duplicates); the others keep their rows.
    """
    bad: dict[str, str] = {}
    try:
        ids, offsets = tok.encode_batch(batch)
    except Exception:  # some piece cannot be encoded: find which, one by one
        parts = []
        for i, pid in enumerate(pids):
            try:
                parts.append(tok.encode(batch.piece(i)))
            except Exception as exc:  # recorded in the journal by the caller, with its reason
                bad.setdefault(pid, f"{type(exc).__name__}: {exc}")
                parts.append(np.zeros(0, np.int32))
        return int_lists(parts), bad
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids)), bad


def _classic_texts(tok, batch: PieceBatch, pids: list[str]) -> tuple[list[list[str]], dict[str, str]]:
    """The classic tokens (text) of every row, and the pieces that could not be encoded."""
    texts, bad = [], {}
    for i, pid in enumerate(pids):
        try:
            texts.append(tok.encode_text(batch.piece(i)))
        except Exception as exc:  # recorded in the journal by the caller, with its reason
            bad.setdefault(pid, f"{type(exc).__name__}: {exc}")
            texts.append([])
    return texts, bad


# -------------------------------------------------------------------------------------------
# the driver
# -------------------------------------------------------------------------------------------
#: files per batch: a batch costs ~5 ms of its own (a Ray task, two Parquet files and their fsyncs), which
#: is ~20% of a batch of 32 MIDI files here but ~3% of one of 128; 1024 keeps a batch under a second or so
MIN_BATCH, MAX_BATCH = 128, 1024
#: batches per worker when the corpus is small enough for that to leave them under MAX_BATCH files: two,
#: so that a worker that finishes early takes the next batch, and the per-batch cost is paid few times
BATCHES_PER_WORKER = 2
#: what a file costs beyond its bytes (opening, hashing, a row), in bytes of parsing: ~30 us against
#: ~30 us per kB of MIDI here
FILE_COST_BYTES = 1024


def _batch_count(files: int, workers: int) -> int:
    """BATCHES_PER_WORKER batches per worker, of MIN_BATCH..MAX_BATCH files on average, their count a
    multiple of ``workers`` (so that no worker is left idle with a tail batch running on another)."""
    size = max(MIN_BATCH, min(MAX_BATCH, math.ceil(files / (workers * BATCHES_PER_WORKER))))
    return max(1, math.ceil(math.ceil(files / size) / workers) * workers) if files else 0


def _plan_batches(refs: list[InputRef], workers: int, batch_files: int | None = None) -> list[list[InputRef]]:
    """``refs`` cut into batches: consecutive runs of :func:`_same_sizes_together`, each of about the
    same work (bytes, plus FILE_COST_BYTES a file; a file of unknown size counts as the mean), and
    none over MAX_BATCH files.  ``batch_files`` asks for runs of that many files instead."""
    order = _same_sizes_together(refs)
    if not order:
        return []
    if batch_files:
        return [order[i:i + batch_files] for i in range(0, len(order), batch_files)]
    known = [r.size for r in order if r.size >= 0]
    mean = sum(known) / len(known) if known else 0
    cost = np.cumsum([(r.size if r.size >= 0 else mean) + FILE_COST_BYTES for r in order])
    count = _batch_count(len(order), workers)
    # the k-th cut after the first file whose cumulative cost reaches k/count of the total
    cuts = np.searchsorted(cost, cost[-1] * np.arange(1, count) / count, side="left") + 1
    bounds = [0, *sorted(set(int(c) for c in cuts if 0 < c < len(order))), len(order)]
    batches = []
    for a, b in zip(bounds, bounds[1:]):
        n = math.ceil((b - a) / MAX_BATCH)  # many small files in one stretch: split it evenly
        step = math.ceil((b - a) / n)
        batches.extend(order[i:min(i + step, b)] for i in range(a, b, step))
    return batches


def _same_sizes_together(refs: list[InputRef]) -> list[InputRef]:
    """``refs`` with the files of one size next to each other (by source within a size), the sizes
    in a fixed pseudo-random order: identical files, which always share a size, then mostly fall in
    one batch, where the second copy is recognised by its sha256 and never parsed (and finalize has
    no shard to rewrite), while every batch still gets a mix of small and large files."""
    groups: dict = {}
    for r in refs:
        groups.setdefault(r.size if r.size >= 0 else ("?", r.source), []).append(r)
    order = sorted(groups, key=lambda k: (zlib.crc32(repr(k).encode()), repr(k)))
    return [r for k in order for r in sorted(groups[k], key=lambda r: r.source)]


@functools.cache
def _batch_task():
    """process_batch as a Ray task, made once per process: Ray exports a remote function to the
    cluster the first time it runs in a job (~30 ms here), not on every run_preprocess call."""
    import ray

    # no retries by Ray: the driver splits a batch whose worker died (see _BatchRunner), which also
    # retries the files of a batch lost with its node
    return ray.remote(num_cpus=1, max_retries=0)(_process_packed)


def _pack(inputs: list[InputRef]) -> tuple[list[str], list[tuple[str, int, str, int]]]:
    """A batch's inputs as plain strings and tuples (to pickle and unpickle, ~3 us an InputRef, ~0.7 us as packed)."""
    roots: dict[str, int] = {}
    rows = [(r.source, roots.setdefault(r.root, len(roots)), r.key, r.size) for r in inputs]
    return list(roots), rows


def _process_packed(part: int, packed, dest_uri: str, storage: StorageOptions, settings: PreprocessSettings,
                    progress=None) -> dict:
    roots, rows = packed
    return process_batch(part, [InputRef(src, roots[i], key, size) for src, i, key, size in rows], dest_uri, storage,
                         settings, progress)


def _local_size(store, key: str) -> int:
    """A local file's size (an input of a list file, whose listing has none), else -1 (unknown: it is read)."""
    from midiforge.storage.store import LocalStore

    if isinstance(store, LocalStore):
        try:
            return store.path(key).stat().st_size
        except OSError:  # reading it says what is wrong
            return -1
    return -1


# a batch's journal: {column of JOURNAL_SCHEMA: values}, as JSON (a Parquet file costs ~1 ms of its own
# to write, and journals are only read back by a run that resumes)
def _journal_path(part: int) -> str:
    return f"{WORK}/part-{part:05d}.json"


def _write_journal(dest, rel: str, journal: dict) -> None:
    dest.write_bytes(rel, json.dumps(journal, separators=(",", ":")).encode())


def _read_journal(dest, rel: str) -> dict:
    try:
        journal = json.loads(dest.read_bytes(rel))
        if not isinstance(journal, dict) or sorted(journal) != sorted(JOURNAL_SCHEMA.names):
            raise ValueError(f"columns {sorted(journal) if isinstance(journal, dict) else type(journal).__name__}")
        if not all(isinstance(v, list) for v in journal.values()) or len({len(v) for v in journal.values()}) != 1:
            raise ValueError("columns that are not lists of one length")
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MidiforgeError(f"{dest.url(rel)}: not a readable batch journal ({exc}); delete it to redo its batch") from None
    return journal


def _journal_parts(dest) -> dict[int, str]:
    out = {}
    for o in dest.list(f"{WORK}/"):
        name = o.path.rsplit("/", 1)[-1]
        if name.startswith("part-") and name.endswith(".json") and name[5:-5].isdigit():
            out[int(name[5:-5])] = o.path
    return out


# Fencing.  Every start of the driver on a DEST is a run with its own epoch: 0 for the run that made DEST,
# then one more than any run before (each later run leaves a marker _work/run-<epoch>.json before its first
# batch).  A run numbers its batches epoch * PARTS_PER_RUN + k, so the journal and the shard of a batch
# name the run that made them, and a worker of a killed run that lives on (and writes its batch after a
# resumed run took stock) can never write a name the resumed run uses.  finalize takes only the journals
# the run took stock of and those its own batches returned (any other is a late writer's, or a batch this
# run gave up on: deleted with its shard); where two runs' journals hold the same input, the newer run's
# journal keeps it and the older one loses it (rows and entries).  So the manifest counts every input unit
# exactly once and no shard holds a row twice.
PARTS_PER_RUN = 1_000_000


def _run_marker(epoch: int) -> str:
    return f"{WORK}/run-{epoch:05d}.json"


def _next_epoch(dest, journals: dict[int, str]) -> int:
    """The epoch of a run that continues DEST: one more than any run before (their markers, and the
    batches of runs from before markers existed)."""
    seen = [0] + [p // PARTS_PER_RUN for p in journals]
    for o in dest.list(f"{WORK}/"):
        name = o.path.rsplit("/", 1)[-1]
        if name.startswith("run-") and name.endswith(".json") and name[4:-5].isdigit():
            seen.append(int(name[4:-5]))
    return max(seen) + 1


def _drop_journals_without_rows(dest, journals: dict[int, str], earlier: dict[int, dict], classic: bool) -> None:
    """A batch writes its rows, then its journal: a journal with pieces whose rows are gone (deleted as a
    leftover while a worker of a killed run was still writing) does not count; its inputs run again."""
    parts = {p for p, j in earlier.items() if "piece" in j["status"]}
    if not parts:
        return
    tables = set()
    for o in dest.list(f"{WORK}/" if classic else T.SHARDS_DIR + "/"):
        if T.is_shard(o.path) != classic:
            tables.add(T.part_of(o.path))
    for p in sorted(parts - tables):
        dest.delete(journals.pop(p))
        del earlier[p]


#: --file-timeout: the seconds one file may take beyond what its size predicts.  A batch is given
#: file_timeout + TIME_SLACK x its predicted seconds (PER_FILE_SECONDS a file, plus its bytes at FAST_BYTES_PER_SECOND
#: for MIDI on symusic, SLOW_BYTES_PER_SECOND for what music21 reads), counted from when it may start; then its
#: worker is killed and the batch cut (a file alone that runs out of time fails as ``timeout``).
FILE_TIMEOUT = 120.0
TIME_SLACK = 10
PER_FILE_SECONDS = 0.005
FAST_BYTES_PER_SECOND, SLOW_BYTES_PER_SECOND = 2e6, 2e3
#: a lost batch (worker died, or out of time) is cut into this many batches, down to single files
SPLIT_WAYS = 8
#: the bytes of one batch, at most (a file over it is a batch of its own; a file over --max-bytes counts 0:
#: it is refused by its listed size, never read)
MAX_BATCH_BYTES = 64 << 20
#: a batch reserves Ray's ``memory`` resource, MEMORY_BASE + MEMORY_FACTOR x its bytes (at most 90% of the
#: largest node's), so that the batches running at once on a node fit in its memory.  Measured (peak RSS
#: of process_batch over a warm worker's, one file): 9.9x a 20 MB lyric-only MIDI, 10.1x a 20 MB MIDI of
#: 2.5 M notes, 12.1x one of 3.3 M notes in running status (the worst found); 16 leaves a margin.  Ray's
#: memory monitor kills a task that goes beyond its node's memory anyway: its batch is then cut like a crash.
MEMORY_FACTOR = 16
MEMORY_BASE = 64 << 20


class _Job:
    """A batch sent (or to send) to Ray: its part number, files, deaths so far (single files), time limit."""

    __slots__ = ("part", "batch", "tries", "limit", "start")

    def __init__(self, part: int, batch: list, tries: int, limit: float) -> None:
        self.part, self.batch, self.tries, self.limit, self.start = part, batch, tries, limit, None


def _batch_bytes(batch: list[InputRef], max_bytes: int) -> int:
    """The bytes a batch reads: files of unknown size count 0, files over ``max_bytes`` too (never read)."""
    return sum(r.size for r in batch if 0 <= r.size <= max_bytes)


def _cap_bytes(batches: list[list[InputRef]], max_bytes: int, cap: int = MAX_BATCH_BYTES) -> list[list[InputRef]]:
    """``batches`` with every one over ``cap`` bytes cut into consecutive runs of at most ``cap``."""
    out = []
    for batch in batches:
        if _batch_bytes(batch, max_bytes) <= cap:
            out.append(batch)
            continue
        run, size = [], 0
        for r in batch:
            n = r.size if 0 <= r.size <= max_bytes else 0
            if run and size + n > cap:
                out.append(run)
                run, size = [], 0
            run.append(r)
            size += n
        out.append(run)
    return out


def _time_limit(batch: list[InputRef], options: ReadOptions, file_timeout: float) -> float:
    """Seconds a batch may take (see FILE_TIMEOUT); a file of unknown size counts as 64 kB."""
    predicted = 0.0
    for r in batch:
        size = 65536 if r.size < 0 else r.size if r.size <= options.max_bytes else 0
        predicted += PER_FILE_SECONDS + size / (FAST_BYTES_PER_SECOND if _is_fast(r.source, options)
                                                else SLOW_BYTES_PER_SECOND)
    return file_timeout + TIME_SLACK * predicted


def _memory_cap(ray, resources: dict, nodes: int) -> int:
    """90% of the largest node's ``memory`` resource (a batch asking more could never start), 0 if unknown."""
    if nodes > 1:
        memory = max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    else:
        memory = resources.get("memory", 0)
    return int(0.9 * memory)


def _failed_file(dest, part: int, ref: InputRef, reason: str, detail: str) -> dict:
    """The journal of a file given up on (parser_crash, timeout), written by the driver under a part number
    of its own, and its batch summary."""
    journal = {"input": [ref.source], "source": [ref.source], "piece_id": [""], "status": ["failure"],
               "reason": [reason], "detail": [detail[:2000]]}
    _write_journal(dest, _journal_path(part), journal)
    return {"part": part, "files": 1, "units": 1, "pieces": 0, "duplicates": 0, "failures": 1, "tokens": 0,
            "table": None, "journal": journal, "seconds": 0.0, "host": socket.gethostname()}


def run_preprocess(src: str, dest_uri: str, settings: PreprocessSettings, *, resume: bool = False,
                   workers: int | None = None, batch_files: int | None = None, address: str | None = None,
                   storage: StorageOptions | None = None, progress: bool = True, add_inputs: bool = False,
                   allow_absolute_paths: bool = False, allow_empty: bool = False,
                   file_timeout: float | None = None) -> dict:
    """The whole stage; returns the manifest it wrote.

    ``resume`` continues the run in DEST from the same SRC (compared as a normalized URI, see
    :func:`src_uri`); ``add_inputs`` (implies ``resume``) adds another SRC's inputs to it deliberately,
    recorded in the manifest's ``sources``.  ``allow_absolute_paths``: a list file may name files outside
    its folder.  ``allow_empty``: an SRC without inputs makes an empty run instead of an error.
    """
    import ray

    storage = storage or StorageOptions()
    started = time.time()
    clock = _Clock()
    dest = open_store(dest_uri, storage)
    settings.make_tokenizer()  # bad tokenizer settings fail here, before any work
    if abs(sum(settings.splits) - 1.0) > 1e-6 or min(settings.splits) < 0:
        raise MidiforgeError(f"--split ratios must be >= 0 and sum to 1, got {settings.splits}")

    refs = sample_inputs(list_inputs(src, storage, allow_absolute_paths=allow_absolute_paths), settings.sample,
                         settings.seed)
    if not refs and not allow_empty:
        raise MidiforgeError(f"{src}: no input files (a folder is searched for {'/'.join(SUFFIXES)}; a list file "
                             f"names them); nothing to do. --allow-empty makes an empty run")
    clock.lap("listing")
    resume = resume or add_inputs
    this_src = src_uri(src)
    sources = [{"src": this_src, "added": _utc(started)}]  # the SRCs this run's inputs come from
    settings_doc = {"src": src, "settings": settings.identity(), "sources": sources}
    existing = dest.exists(f"{WORK}/settings.json") or dest.exists("manifest.json")
    if existing and not resume:
        raise MidiforgeError(f"{dest.uri}: already holds a preprocess run; pass --resume to continue it, or use a new DEST")
    if existing:
        saved = json.loads(dest.read_bytes(f"{WORK}/settings.json"))
        if saved["settings"] != settings_doc["settings"]:
            raise MidiforgeError(f"{dest.uri}: --resume with different settings than the run it continues "
                                 f"(was {saved['settings']})")
        # a run from before sources were recorded: its SRC as given (a relative path: from here)
        sources = saved.get("sources") or [{"src": src_uri(saved["src"]), "added": None}]
        if this_src not in {s["src"] for s in sources} and not add_inputs:
            raise MidiforgeError(f"{dest.uri}: --resume from SRC {this_src}, but this run's inputs come from "
                                 f"{', '.join(s['src'] for s in sources)}; resume with that SRC, use a new DEST, "
                                 f"or pass --add-inputs to add {this_src}'s inputs to this run deliberately")
    else:
        dest.write_bytes(f"{WORK}/settings.json", json.dumps(settings_doc, indent=1).encode())

    journals = _journal_parts(dest)
    earlier = {p: _read_journal(dest, rel) for p, rel in journals.items()}  # finalize reuses them
    _drop_journals_without_rows(dest, journals, earlier, settings.make_tokenizer().vocab_from_data)
    done: set[str] = set()
    for journal in earlier.values():
        done.update(journal["input"])
    if this_src not in {s["src"] for s in sources}:  # --add-inputs: a new SRC joins the run
        clash = sorted(done.intersection(r.source for r in refs))
        if clash:  # sources are relative to their SRC: the same name would be taken for the same input
            raise MidiforgeError(f"{src}: --add-inputs: {len(clash)} inputs have the names of inputs already in "
                                 f"the run (for example {clash[:3]}); rename them or use a new DEST")
        sources = [*sources, {"src": this_src, "added": _utc(started)}]
        dest.write_bytes(f"{WORK}/settings.json", json.dumps({**saved, "sources": sources}, indent=1).encode())
    # piece tables without a journal (leftovers of a killed batch: their inputs run again) are deleted by finalize
    todo = [r for r in refs if r.source not in done]
    if not todo and dest.exists("manifest.json"):  # a finished run, nothing new in SRC: keep its result
        return read_manifest(dest)
    if todo:
        dest.delete("manifest.json")  # the stage is incomplete again until it finishes
    clock.lap("setup")

    if todo:
        try:
            start_ray(address, workers)
        except BaseException:
            if not existing and not journals:  # nothing was done: leave DEST as it was, so a retry needs no --resume
                dest.delete(f"{WORK}/settings.json")
            raise
        resources = ray.cluster_resources()
        clock.lap("ray_start")
        cpus = int(resources.get("CPU", 1))
        nodes = sum(1 for k in resources if k.startswith("node:") and k != "node:__internal_head__")
        workers = max(1, min(workers or cpus, cpus))
        batches = _cap_bytes(_plan_batches(todo, workers, batch_files), settings.read.max_bytes)
        epoch = _next_epoch(dest, journals) if existing else 0  # see PARTS_PER_RUN
        if epoch:  # before any batch: a later run takes a higher epoch even if this one leaves no journal
            dest.write_bytes(_run_marker(epoch), json.dumps({"epoch": epoch, "started": started, "pid": os.getpid(),
                                                             "host": socket.gethostname()}).encode())
        part_numbers = iter(range(epoch * PARTS_PER_RUN, (epoch + 1) * PARTS_PER_RUN))
        task, in_flight = _batch_task(), workers * 2
        # Ray itself caps the tasks running at once by the CPUs they hold, so a second task per worker can
        # wait queued, ready to start the moment a batch ends.  With every CPU in use a task holds one; with
        # fewer workers than CPUs on one node, a task holds cpus/workers of them (so no more than `workers`
        # run).  On several nodes each node gets its share of the tasks out (by its CPUs), pinned to it: Ray's
        # own scheduling fills the driver's node first and leaves the others idle on short tasks
        base_options = {"num_cpus": cpus / workers} if workers < cpus and nodes == 1 else {}
        place = _Placement.of_cluster(ray, workers if workers < cpus else 2 * cpus) if nodes > 1 else None
        memory_cap = _memory_cap(ray, resources, nodes)
        timeout = FILE_TIMEOUT if file_timeout is None else file_timeout
        pending, results = [], []
        bar = _progress(len(refs), len(refs) - len(todo), progress)
        # music21's formats take ~1 s a unit: then the bar moves per file or tune, not per batch
        board = None
        if progress and bar.disable is False and any(not _is_fast(r.source, settings.read) for r in todo):
            board = ray.remote(num_cpus=0)(_ProgressBoard).remote()
        running: dict = {}  # ref -> (part, files)
        jobs: dict = {}     # ref -> its _Job
        files_done = float(bar.n)
        failures = 0

        def job(batch: list[InputRef], tries: int = 0) -> _Job:
            part = next(part_numbers, None)
            if part is None:
                raise MidiforgeError(f"more than {PARTS_PER_RUN} batches in one run; pass a larger --batch-files")
            return _Job(part, batch, tries, _time_limit(batch, settings.read, timeout))

        def lost(j: _Job, reason: str, detail: str) -> None:
            """A batch without a result (its worker died, or it ran out of time): the files that are fine must
            not pay for the one that is not.  Cut into SPLIT_WAYS batches down to single files; a single file
            whose worker died is read once more (a node can die under any file), then it is a failure."""
            nonlocal failures, files_done
            if len(j.batch) > 1:
                step = math.ceil(len(j.batch) / SPLIT_WAYS)
                queue[0:0] = [job(j.batch[i:i + step]) for i in range(0, len(j.batch), step)]
            elif reason == "parser_crash" and j.tries == 0:
                queue.insert(0, job(j.batch, 1))
            else:
                results.append(_failed_file(dest, job([]).part, j.batch[0], reason, detail))
                failures += 1
                files_done += 1
                bar.update(files_done - bar.n)
                bar.set_postfix(failures=failures, refresh=False)

        def forget(ref) -> _Job:
            pending.remove(ref)
            running.pop(ref, None)
            if place:
                place.done(ref)
            return jobs.pop(ref)

        queue = [job(b) for b in batches]
        while queue or pending:
            while queue and (place.has_room() if place else len(pending) < in_flight):
                j = queue.pop(0)
                options = dict(base_options)
                if memory_cap:  # Ray starts a batch only where its memory is free (see MEMORY_FACTOR)
                    options["memory"] = min(memory_cap, MEMORY_BASE + MEMORY_FACTOR * _batch_bytes(j.batch, settings.read.max_bytes))
                if place:
                    options["scheduling_strategy"] = place.strategy()
                ref = task.options(**options).remote(j.part, _pack(j.batch), dest.uri, storage, settings, board)
                pending.append(ref)
                jobs[ref] = j
                running[ref] = (j.part, len(j.batch))
                if place:
                    place.started(ref)
            # a batch's time runs from when it may start: Ray runs the tasks out in the order they were sent,
            # so the first `workers` of them are running (the next starts when one of those ends)
            now = time.monotonic()
            for ref in pending[:workers]:
                jobs[ref].start = jobs[ref].start or now
            late = [ref for ref in pending[:workers] if now > jobs[ref].start + jobs[ref].limit]
            for ref in late:  # a file hangs (native code no alarm interrupts): kill the worker, cut the batch
                ray.cancel(ref, force=True)
                j = forget(ref)
                lost(j, "timeout", f"no result within {j.limit:.0f} s (--file-timeout {timeout:g})")
            if late or not pending:
                continue
            wait = min(jobs[ref].start + jobs[ref].limit for ref in pending[:workers]) - now
            ready, _ = ray.wait(pending, num_returns=1, timeout=max(0.01, min(wait, 0.5) if board is not None else wait))
            if not ready:  # the units parsed so far in the running batches
                if board is not None:
                    fractions = ray.get(board.get.remote())
                    bar.n = round(files_done + sum(min(fractions.get(p, 0.0), 0.95) * n for p, n in running.values()), 1)
                    bar.refresh()
                continue
            j = forget(ready[0])
            try:
                res = ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:  # stop the rest; report the cause in one line
                for ref in pending:
                    ray.cancel(ref, force=True)
                if isinstance(exc.cause, MidiforgeError):
                    raise exc.cause from None
                raise
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError,
                    ray.exceptions.NodeDiedError) as exc:  # the process died: a native crash, Ray's OOM killer, a lost node
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                lost(j, "parser_crash", f"{type(exc).__name__} (twice): {first}")
                continue
            results.append(res)
            failures += res["failures"]
            files_done += res["files"]
            bar.update(files_done - bar.n)
            bar.set_postfix(failures=failures, refresh=False)
        bar.refresh()
        bar.close()
        if board is not None:
            ray.kill(board)
        known = {r["part"]: r["table"] for r in results if r["table"] is not None}
        known_journals = {**earlier, **{r["part"]: r["journal"] for r in results}}
        clock.lap("batches")
        clock.add("batch_busy", sum(r["seconds"] for r in results))
        clock.add("batch_count", len(results))
        hosts: dict[str, int] = {}
        for r in results:
            hosts[r["host"]] = hosts.get(r["host"], 0) + 1
        clock.add("batch_hosts", dict(sorted(hosts.items())))
    else:
        known, known_journals = {}, earlier
    return finalize(dest, settings, src_count=len(refs), started=started, known=known, known_journals=known_journals,
                    clock=clock, expected_inputs={r.source for r in refs}, sources=sources)


class _Placement:
    """Which node the next batch goes to, on a cluster of several nodes: ``slots`` tasks out at once, shared
    among the nodes by their CPUs, each task pinned (softly: elsewhere if its node is lost) to the node with
    the most free slots for its size."""

    def __init__(self, nodes: dict[str, int], slots: int) -> None:
        total = sum(nodes.values())
        self.cap = {n: max(1, round(slots * c / total)) for n, c in nodes.items()}
        self.out = {n: 0 for n in nodes}
        self._where: dict = {}
        self._next: str | None = None

    @classmethod
    def of_cluster(cls, ray, slots: int) -> "_Placement":
        nodes = {n["NodeID"]: int(n["Resources"].get("CPU", 0)) for n in ray.nodes()
                 if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1}
        return cls(nodes, slots)

    def has_room(self) -> bool:
        node = max(self.cap, key=lambda n: ((self.cap[n] - self.out[n]) / self.cap[n], n))
        self._next = node if self.out[node] < self.cap[node] else None
        return self._next is not None

    def strategy(self):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(self._next, soft=True)

    def started(self, ref) -> None:
        self._where[ref] = self._next
        self.out[self._next] += 1

    def done(self, ref) -> None:
        self.out[self._where.pop(ref)] -= 1


class _Clock:
    """Where the driver's time went, for the manifest's ``timing``: seconds per phase (laps of the
    driver's clock), plus what the phases do not show (the workers' busy seconds, summed)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now

    def add(self, key: str, value: float) -> None:
        self.phases[key] = value

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.phases.items()}


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="file", desc="preprocess", disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)


def _fence(dest, logs: dict[int, dict], known: dict[int, dict], classic: bool) -> None:
    """One journal per input: where journals of several runs hold an input (a worker of a killed run wrote
    its batch after the next run took stock, and that run did the inputs again), the newest run's journal
    (the highest part) keeps it; the others lose its entries and rows (a journal left without any is
    deleted with its rows).  ``logs`` and ``known`` are updated."""
    owner: dict[str, int] = {}
    for part in sorted(logs):
        for name in logs[part]["input"]:
            owner[name] = part
    for part in sorted(logs):
        j = logs[part]
        keep = [owner[name] == part for name in j["input"]]
        if all(keep):
            continue
        gone = {src for src, k in zip(j["source"], keep) if not k}
        if "piece" in j["status"]:  # the rows first: a journal never names rows that are not there
            table = _read_piece_table(dest, part, classic)
            table = table.filter(pa.array([src not in gone for src in table["source"].to_pylist()]))
            if table.num_rows:
                known[part] = _shard_info(_write_piece_table(dest, part, classic, table), table)
            else:
                dest.delete(T.raw_rel(part) if classic else T.shard_rel(part))
                known.pop(part, None)
        if any(keep):
            logs[part] = {k: [v for v, ok in zip(col, keep) if ok] for k, col in j.items()}
            _write_journal(dest, _journal_path(part), logs[part])
        else:
            dest.delete(_journal_path(part))
            del logs[part]


def finalize(dest, settings: PreprocessSettings, *, src_count: int, started: float,
             known: dict[int, dict] | None = None, known_journals: dict[int, dict] | None = None,
             clock: _Clock | None = None, expected_inputs: set[str] | None = None,
             sources: list[dict] | None = None) -> dict:
    """Resolve duplicates across batches, build the classic vocabulary, write the outputs and the manifest.

    ``known`` maps a part to what its task reported of the shard it wrote ({path, rows, bytes, sha256,
    stats}), ``known_journals`` to its journal ({column: values}: as a task of this run wrote it, or as
    this run read it from an earlier one); shards not in ``known``, or rewritten here, are read back once.
    ``known_journals`` are the run's journals: any other journal in DEST (a worker of a killed run that
    wrote late, a batch this run gave up on) is deleted, as is every shard or raw table without a journal;
    None: every journal in DEST.  Where two journals hold one input, the newer run's keeps it (see
    PARTS_PER_RUN).  ``expected_inputs``: the inputs (sources) of this run, each of which must have its
    outcome in some journal.
    """
    clock = clock or _Clock()
    known = dict(known or {})
    dest.delete("manifest.json")  # whatever happens below, no manifest may name an object being rewritten
    tok = settings.make_tokenizer()
    classic = tok.vocab_from_data
    journals = _journal_parts(dest)
    if known_journals is None:
        logs = {p: _read_journal(dest, rel) for p, rel in journals.items()}
    else:
        logs = dict(known_journals)
        for p in sorted(set(journals) - set(logs)):
            dest.delete(journals[p])
    _fence(dest, logs, known, classic)
    for folder in (T.SHARDS_DIR + "/", f"{WORK}/"):  # rows without a journal of the run: leftovers, never counted
        for o in dest.list(folder):
            part = T.part_of(o.path)
            if part is not None and part not in logs:
                dest.delete(o.path)
    if expected_inputs:  # every input of the run has its outcome (a piece, a duplicate or a failure) somewhere
        missing = expected_inputs.difference(*(j["input"] for j in logs.values()))
        if missing:
            raise MidiforgeError(f"{dest.uri}: {len(missing)} inputs have no outcome in any batch journal "
                                 f"(for example {sorted(missing)[:3]}); run again with --resume")
    # duplicates across batches: the copy with the smallest source is the piece, wherever it was read
    keeper: dict[str, tuple[str, int]] = {}
    for part, j in sorted(logs.items()):
        for src, pid, status in zip(j["source"], j["piece_id"], j["status"]):
            if status == "piece" and (pid not in keeper or src < keeper[pid][0]):
                keeper[pid] = (src, part)
    drops: dict[int, set] = {}
    for part, j in sorted(logs.items()):
        drop = {(s, p) for s, p, st in zip(j["source"], j["piece_id"], j["status"]) if st == "piece" and keeper[p][0] != s}
        if drop:
            drops[part] = drop

    def rewrite(part: int):  # the shard without the rows of copies kept elsewhere; the journal says so
        j, drop = logs[part], drops[part]
        status = ["duplicate" if (s, p) in drop else st for s, p, st in zip(j["source"], j["piece_id"], j["status"])]
        j = {**j, "status": status}
        pt = _read_piece_table(dest, part, classic)   # one of an earlier run may lack the time signature: 4/4
        keep = [(s, p) not in drop for s, p in zip(pt["source"].to_pylist(), pt["piece_id"].to_pylist())]
        pt = pt.filter(pa.array(keep))
        info = _shard_info(_write_piece_table(dest, part, classic, pt), pt)  # a classic one is rewritten below anyway
        _write_journal(dest, _journal_path(part), j)
        return part, j, info

    for part, j, info in map_parallel(rewrite, sorted(drops), max_workers=min(4, dest.transfers)):
        logs[part] = j
        known[part] = info

    piece_parts = sorted(p for p, j in logs.items() if "piece" in j["status"])
    if classic:
        vocab_tokens: set[str] = set()
        raws = {p: T.read_raw(dest, p) for p in piece_parts}
        for t in raws.values():
            vocab_tokens.update(pc.list_flatten(t["tokens_text"]).unique().to_pylist())
        tok = tok.with_vocab(vocab_tokens)
        known = {}  # every shard is written here from its raw table
        for p, t in raws.items():
            ids = [tok.ids_of(x) for x in t["tokens_text"].to_pylist()]
            t = t.drop_columns(["tokens_text"]).append_column("tokens", int_lists(ids))
            t = t.set_column(t.schema.get_field_index("tokenizer"), "tokenizer", pa.array([tok.id] * t.num_rows))
            t = t.select(T.COLUMNS).cast(T.SCHEMA)
            known[p] = _shard_info(T.write_shard(dest, p, t), t)

    def read_back(p: int) -> dict:  # a shard of an earlier run: read it back, once
        return _shard_info(*T.read_shard_entry(dest, p, _STATS_COLUMNS))

    unknown = [p for p in piece_parts if p not in known]
    known.update(zip(unknown, map_parallel(read_back, unknown, max_workers=min(4, dest.transfers))))
    shards, qpms, split_counts, rows_total, tokens_total = [], [], dict.fromkeys(SPLITS, 0), 0, 0
    for p in piece_parts:
        rel = T.shard_rel(p)
        info = known[p]
        if sum(info["stats"]["splits"].values()) != logs[p]["status"].count("piece"):  # rows of another writer
            raise MidiforgeError(f"{dest.url(rel)}: {sum(info['stats']['splits'].values())} pieces, but its batch "
                                 f"journal says {logs[p]['status'].count('piece')}; delete both to redo the batch")
        shards.append({"path": rel, "rows": info["rows"], "bytes": info["bytes"], "sha256": info["sha256"]})
        stats = info["stats"]
        qpms.extend(stats["qpm"])
        for split, n in stats["splits"].items():
            split_counts[split] += n
        rows_total += stats["rows"]
        tokens_total += stats["tokens"]

    journal_all = pa.table({k: [v for p in sorted(logs) for v in logs[p][k]] for k in JOURNAL_SCHEMA.names},
                           schema=JOURNAL_SCHEMA)
    status = journal_all["status"].to_pylist()
    fail = journal_all.filter(pc.equal(journal_all["status"], "failure"))
    failures_t = fail.select(["source", "reason", "detail"])
    reasons: dict[str, int] = {}
    for r in failures_t["reason"].to_pylist():
        reasons[r] = reasons.get(r, 0) + 1
    tok_bytes = tok.to_json().encode()
    outputs = [("tokenizer.json", tok_bytes), ("failures.parquet", failures_t),
               ("inputs.parquet", journal_all.select(["input", "source", "piece_id", "status", "reason"]))]

    def write(item):  # the three at once if the store gains by it
        name, what = item
        if isinstance(what, bytes):
            dest.write_bytes(name, what)
            return file_entry(name, what)
        return {k: v for k, v in write_table(dest, name, what).items() if k in ("path", "bytes", "sha256")}

    files = map_parallel(write, outputs, max_workers=dest.transfers)
    files.extend({k: s[k] for k in ("path", "bytes", "sha256")} for s in shards)
    elapsed = time.time() - started
    clock.lap("finalize")
    n_inputs = len(status)
    manifest = {
        "stage": "preprocess",
        "input_files": src_count,
        "inputs": n_inputs,
        "pieces": status.count("piece"),
        "duplicates": status.count("duplicate"),
        "failures": status.count("failure"),
        "failure_reasons": reasons,
        "splits": split_counts,
        "rows": rows_total,
        "tokens": tokens_total,
        "qpm_median": float(statistics.median(qpms)) if qpms else 120.0,
        "tokenizer": tok.id,
        "tokenizer_kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "settings": settings.identity(),
        # the SRCs of the run's inputs ({src: normalized URI, added: UTC time}), more than one with --add-inputs
        **({"sources": sources} if sources else {}),
        "shards": shards,
        "files": files,
        "seconds": round(elapsed, 3),
        "files_per_second": round(src_count / elapsed, 3) if elapsed > 0 else None,
        "tokens_per_second": round(tokens_total / elapsed, 1) if elapsed > 0 else None,
        # seconds of this run's phases (listing, setup, ray_start, batches, finalize: the manifest's own
        # write is not in it) and the workers' busy seconds, summed over them (batch_busy)
        "timing": clock.as_dict(),
    }
    units = len(set(journal_all["source"].to_pylist()))  # a unit's source names it: input, or input#tune
    if units != n_inputs:  # a unit counted twice (a bug: no manifest)
        raise MidiforgeError(f"{dest.uri}: {n_inputs} inputs in the journals but {units} input units")
    if manifest["inputs"] != manifest["pieces"] + manifest["duplicates"] + manifest["failures"]:  # a bug: no manifest
        raise MidiforgeError(f"{dest.uri}: {manifest['inputs']} inputs but {manifest['pieces']} pieces + "
                             f"{manifest['duplicates']} duplicates + {manifest['failures']} failures")
    write_manifest(dest, manifest)
    return manifest


# -------------------------------------------------------------------------------------------
# CLI
# -------------------------------------------------------------------------------------------
def _int_range(text: str) -> tuple[int, ...]:
    try:
        if ".." in text:
            a, b = text.split("..")
            return tuple(range(int(a), int(b) + 1))
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a range like -3..3 or a list like -2,0,2") from None


def _ratios(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three ratios like 0.9,0.05,0.05")
    return parts  # type: ignore[return-value]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="folder or s3:// prefix (searched recursively), or a text file listing paths")
    p.add_argument("dest", metavar="DEST", help="output folder or s3:// prefix")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", choices=("events", "classic"), default="events",
                   help="events: note events, a vocabulary fixed by its settings; classic: the tutorial's one token "
                        "per onset, the vocabulary from the data (default: %(default)s)")
    d = EventsConfig()
    g.add_argument("--steps-per-quarter", type=int, default=d.steps_per_quarter, help="events: onset grid, steps per quarter note (default: %(default)s)")
    g.add_argument("--max-shift-steps", type=int, default=d.max_shift_steps,
                   help="events: longest TIME_SHIFT in grid steps; longer rests chain several (default: %(default)s)")
    g.add_argument("--max-duration-steps", type=int, default=d.max_duration_steps,
                   help="events: longest DURATION in grid steps; longer notes are clipped (default: %(default)s)")
    g.add_argument("--velocity-bins", type=int, default=d.velocity_bins, help="events: velocity bins, 0 turns velocity off (default: %(default)s)")
    g.add_argument("--tempo-bins", type=int, default=d.tempo_bins, help="events: tempo bins, 0 turns the tempo token off (default: %(default)s)")
    g.add_argument("--programs", action="store_true", help="events: keep instruments apart (PROGRAM tokens)")
    g.add_argument("--bars", action="store_true", help="events: BAR tokens")
    g.add_argument("--drums", action="store_true", help="keep drum tracks (dropped by default)")
    r = p.add_argument_group("reading")
    r.add_argument("--parser", choices=("symusic", "music21"), default="symusic", help="the reader of MIDI files (default: %(default)s; music21 is ~1,000x slower)")
    r.add_argument("--tracks", choices=("all", "first"), default="all",
                   help="all: merge all tracks (piano reduction); first: the first instrument, like the tutorial (default: %(default)s)")
    r.add_argument("--max-notes", type=int, default=ReadOptions.max_notes, help="files with more notes fail as too_long (default: %(default)s)")
    r.add_argument("--max-quarters", type=float, default=ReadOptions.max_quarters,
                   help="longer pieces (in quarter notes) fail as too_long (default: %(default)s)")
    r.add_argument("--max-bytes", type=int, default=ReadOptions.max_bytes,
                   help="larger files fail as too_long, unread (default: %(default)s)")
    s = p.add_argument_group("corpus")
    s.add_argument("--split", type=_ratios, default=(0.9, 0.05, 0.05), metavar="TRAIN,VAL,TEST",
                   help="shares of the train/validation/test splits, each piece's by its sha256 (default: 0.9,0.05,0.05)")
    s.add_argument("--transpose", type=_int_range, default=(), metavar="A..B",
                   help="also write train pieces transposed by each of these semitones, e.g. -3..3 (default: none)")
    s.add_argument("--sample", type=int, help="take a reproducible random subset of N files (default: all)")
    s.add_argument("--seed", type=int, default=0, help="the seed of --sample (default: %(default)s)")
    x = p.add_argument_group("execution")
    x.add_argument("--resume", action="store_true", help="continue a run in DEST, skipping inputs already done "
                                                           "(from the same SRC: another SRC is refused)")
    x.add_argument("--add-inputs", action="store_true",
                   help="add SRC's inputs to the run in DEST although it was made from another SRC (implies "
                        "--resume; the manifest's sources records each SRC and when it was added)")
    x.add_argument("--allow-absolute-paths", action="store_true",
                   help="a list file may name absolute paths, URIs and paths leading outside its folder")
    x.add_argument("--allow-empty", action="store_true", help="an SRC without input files makes an empty run "
                                                               "(default: an error)")
    x.add_argument("--address", help="Ray cluster address HEAD:PORT (default: RAY_ADDRESS, else a private local Ray "
                                      "on 127.0.0.1)")
    x.add_argument("--cluster", choices=("none", "slurm"), default="none",
                   help="slurm: start a Ray cluster across this Slurm job's nodes for the run and stop it after "
                        "(run inside sbatch: slurm/preprocess.sbatch); default none")
    x.add_argument("--workers", type=int, help="parallel tasks (default: every CPU of the cluster)")
    x.add_argument("--batch-files", type=int, help="files per Ray task (default: automatic)")
    x.add_argument("--file-timeout", type=float, default=FILE_TIMEOUT, metavar="SECONDS",
                   help="seconds one file may take beyond what its size predicts; a batch gets that plus 10x its "
                        "predicted time, then it is cut down to the file that hangs, which fails as timeout "
                        f"(default {FILE_TIMEOUT:g})")
    x.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on stderr)")
    from midiforge.storage.cli_options import add_storage_arguments

    add_storage_arguments(p)


def settings_from_args(args) -> PreprocessSettings:
    if args.tokenizer == "events":
        tk = {"steps_per_quarter": args.steps_per_quarter, "max_shift_steps": args.max_shift_steps,
              "max_duration_steps": args.max_duration_steps, "velocity_bins": args.velocity_bins,
              "tempo_bins": args.tempo_bins, "programs": args.programs, "bars": args.bars, "drums": args.drums}
    else:
        tk = {"drums": args.drums}
    read = ReadOptions(parser=args.parser, tracks=args.tracks, max_notes=args.max_notes,
                       max_quarters=args.max_quarters, max_bytes=args.max_bytes)
    return PreprocessSettings(args.tokenizer, tk, read, tuple(args.split), tuple(args.transpose),
                              args.sample, args.seed)


def main(args) -> int:
    from midiforge.storage.cli_options import options_from_args

    from midiforge.pipeline.slurm_ray import run_with_cluster

    settings = settings_from_args(args)
    manifest = run_with_cluster(args.cluster, args.address, lambda address: run_preprocess(
        args.src, args.dest, settings, resume=args.resume, workers=args.workers, batch_files=args.batch_files,
        address=address, storage=options_from_args(args), progress=not args.no_progress, add_inputs=args.add_inputs,
        allow_absolute_paths=args.allow_absolute_paths, allow_empty=args.allow_empty, file_timeout=args.file_timeout))
    shown = ("inputs", "pieces", "duplicates", "failures", "failure_reasons", "rows", "tokens", "tokenizer", "seconds",
             "files_per_second", "timing")  # timing: not in the manifest of a run from before it existed
    print(json.dumps({k: manifest[k] for k in shown if k in manifest}))
    if manifest.get("shards"):
        print(f"shards: {open_store(args.dest).url('shards/')}")
    else:  # no folder to name
        print(f"shards: none (no {'pieces' if manifest.get('inputs') else 'inputs'})")
    return 0

"""What one Ray task of the preprocess stage does: read, parse and tokenize a batch of input files, write
their rows (a shard, or for the classic tokenizer a raw table) and then their journal; and the settings
of a run, which every batch shares."""
from __future__ import annotations

import functools
import hashlib
import json
import socket
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from midiforge.errors import MidiforgeError, PieceError
from midiforge.music.piece import PieceBatch
from midiforge.music.readers import ReadOptions, file_format, read_pieces, split_units
from midiforge.music.tokenizers import make_tokenizer
from midiforge.pipeline import tokens as T
from midiforge.pipeline.preprocess_inputs import InputRef
from midiforge.pipeline.preprocess_journal import Journal, Outcome, write_journal
from midiforge.pipeline.tokens import SPLITS
from midiforge.storage import StorageOptions, StorageUnavailableError, open_store
from midiforge.storage.shards import int_lists


@dataclass(frozen=True)
class PreprocessSettings:
    tokenizer: str = "events"
    tokenizer_settings: dict = field(default_factory=dict)
    read: ReadOptions = ReadOptions()  # noqa: RUF009 - frozen: one shared default is safe
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


@functools.lru_cache(maxsize=8)
def _tokenizer(kind: str, settings_json: str):
    """A tokenizer, made once per process and settings (building a vocabulary costs ~1 ms)."""
    return make_tokenizer(kind, **json.loads(settings_json))


def write_piece_table(dest, part: int, classic: bool, table: pa.Table) -> dict:
    """The batch's rows: a shard, or (classic: text tokens until finalize knows the vocabulary) a raw table."""
    return T.write_raw(dest, part, table) if classic else T.write_shard(dest, part, table)


def read_piece_table(dest, part: int, classic: bool) -> pa.Table:
    return T.read_raw(dest, part) if classic else T.read_shard(dest, part)


def process_batch(part: int, inputs: list[InputRef], dest_uri: str, storage: StorageOptions,
                  settings: PreprocessSettings, progress=None) -> dict:
    """Read, parse and tokenize ``inputs``; write their rows and their journal; return a summary.

    Three passes over the batch: the bytes of every unit (and its sha256, so that an identical copy
    in the batch is read once); every unit parsed at once (:func:`read_pieces`); every row (a piece,
    and its transpositions in the train split) tokenized at once.  ``progress``: a :class:`ProgressBoard`
    actor that hears how far the parse is, after every unit music21 reads (about a second each).
    """
    started = time.perf_counter()
    dest = open_store(dest_uri, storage)
    tok = settings.make_tokenizer()
    classic = tok.vocab_from_data
    found = _gather(inputs, storage, settings.read.max_bytes)
    batch, good = _parse(part, found, settings.read, progress)
    rows, row_batch = _rows(batch, [o.piece_id for o in good], [o.source for o in good], settings)
    if classic:
        tokens, bad = _classic_texts(tok, row_batch, rows["piece_id"])
    else:
        tokens, bad = _encode_rows(tok, row_batch, rows["piece_id"])
    _settle(good, found.copies, bad)
    if bad:
        rows, tokens = _drop_rows(rows, tokens, bad, classic)
    piece_table, n_tokens = _write_rows(dest, part, tok, rows, tokens)
    # the journal is written last: its presence says the batch is complete
    if any(o.status is None for o in found.outcomes):  # every unit is a piece, a duplicate or a failure
        raise MidiforgeError(f"batch {part}: a unit has no outcome")
    journal = Journal.of(found.outcomes)
    write_journal(dest, part, journal)
    return batch_summary(part, len(inputs), journal, piece_table, int(n_tokens.sum()), time.perf_counter() - started)


def batch_summary(part: int, files: int, journal: Journal, table: dict | None, tokens: int, seconds: float) -> dict:
    """What the driver hears of a batch: its counts, the shard it wrote (None: no rows) and its journal
    ({column: values}: :meth:`Journal.columns`)."""
    status = journal.status
    return {
        "part": part, "files": files, "units": len(status),
        "pieces": status.count("piece"), "duplicates": status.count("duplicate"),
        "failures": status.count("failure"), "tokens": tokens,
        # the journal as plain lists: a pa.Table costs ~3 ms more per Ray round trip
        "table": table, "journal": journal.columns(), "seconds": seconds,
        "host": socket.gethostname(),  # where the batch ran (the manifest's timing.batch_hosts)
    }


@dataclass
class _Units:
    """A batch's input units: ``outcomes`` is the journal in input order (a unit to read is entered with
    status None and gets its outcome after the parse); ``units`` the distinct units to read, ``first`` the
    outcome of each; ``copies`` (outcome, outcome of the unit it copies) of identical units in the batch."""

    outcomes: list[Outcome] = field(default_factory=list)
    units: list[tuple[str, bytes]] = field(default_factory=list)
    first: list[Outcome] = field(default_factory=list)
    copies: list[tuple[Outcome, Outcome]] = field(default_factory=list)
    first_of: dict[str, Outcome] = field(default_factory=dict)  # piece_id -> the outcome of its unit

    def add(self, source: str, data: bytes) -> None:
        """The units of input ``source`` (one, or a tune each of a multi-tune ABC file)."""
        for src, unit in split_units(source, data):
            if not unit:
                self.outcomes.append(Outcome.failure(source, src, "empty", "0 bytes"))
                continue
            pid = hashlib.sha256(unit).hexdigest()
            outcome = Outcome(source, src, pid)
            self.outcomes.append(outcome)
            first = self.first_of.get(pid)
            if first is not None:
                self.copies.append((outcome, first))
            else:
                self.first_of[pid] = outcome
                self.units.append((src, unit))
                self.first.append(outcome)


def _gather(inputs: list[InputRef], storage: StorageOptions, max_bytes: int) -> _Units:
    """The first pass: the bytes of every input, cut into units (a file that cannot be read is a failure)."""
    found = _Units()
    stores: dict[str, object] = {}
    for ref in inputs:
        data = _read_input(ref, stores, storage, max_bytes)
        if isinstance(data, Outcome):
            found.outcomes.append(data)
        else:
            found.add(ref.source, data)
    return found


def _read_input(ref: InputRef, stores: dict, storage: StorageOptions, max_bytes: int) -> bytes | Outcome:
    """The bytes of one input, or the outcome of a file that cannot be read (the job goes on)."""
    try:
        store = stores.get(ref.root) or stores.setdefault(ref.root, open_store(ref.root, storage))
        size = ref.size if ref.size >= 0 else _local_size(store, ref.key)
        if size > max_bytes:  # refused by its listed size: never read (a 200 MB file costs nothing)
            return Outcome.failure(ref.source, ref.source, "too_long", f"{size} bytes > max {max_bytes}")
        return store.read_bytes(ref.key)
    except StorageUnavailableError:  # the service is down (after retries): the task fails, no file is blamed
        raise
    except PieceError as exc:  # e.g. not_regular: a FIFO, a device, a link loop; never read
        return Outcome.failure(ref.source, ref.source, exc.reason, exc.detail)
    except Exception as exc:  # noqa: BLE001 - any storage failure: recorded as read_error, the job goes on
        return Outcome.failure(ref.source, ref.source, "read_error", f"{type(exc).__name__}: {exc}")


def _parse(part: int, found: _Units, options: ReadOptions, progress) -> tuple[PieceBatch, list[Outcome]]:
    """The second pass: every unit parsed at once.  A unit that fails gets its outcome; returns the batch of
    the pieces read and their outcomes (still open: tokenizing may fail)."""
    batch, errors = _read_units(found.units, options, part, progress)
    ok = [u for u, e in enumerate(errors) if e is None]  # the unit of each piece of the batch
    if len(errors) != len(found.units) or len(batch) != len(ok):  # a reader bug: never pair pieces with wrong sources
        raise MidiforgeError(f"batch {part}: the reader returned {len(batch)} pieces and {len(errors)} outcomes "
                             f"for {len(found.units)} units ({len(ok)} without error)")
    for outcome, e in zip(found.first, errors):
        if e is not None:
            outcome.settle("failure", e.reason, e.detail)
    return batch, [found.first[u] for u in ok]


def _settle(good: list[Outcome], copies: list[tuple[Outcome, Outcome]], bad: dict[str, str]) -> None:
    """The outcome of each piece read (one that could not be tokenized is a parser_error), and of its copies."""
    for outcome in good:
        if outcome.piece_id in bad:
            outcome.settle("failure", "parser_error", bad[outcome.piece_id])
        else:
            outcome.settle("piece")
    for copy, first in copies:
        if first.status == "piece":
            copy.settle("duplicate")
        else:
            copy.settle(first.status, first.reason, first.detail)


def _drop_rows(rows: dict, tokens, bad: dict[str, str], classic: bool) -> tuple[dict, object]:
    """``rows`` and ``tokens`` without the rows of the pieces in ``bad``."""
    keep = [pid not in bad for pid in rows["piece_id"]]
    rows = {k: [v for v, ok in zip(col, keep) if ok] for k, col in rows.items()}
    tokens = tokens.filter(pa.array(keep)) if not classic else [t for t, ok in zip(tokens, keep) if ok]
    return rows, tokens


def _write_rows(dest, part: int, tok, rows: dict, tokens) -> tuple[dict | None, np.ndarray]:
    """The batch's piece table written (None: no rows) with its stats, and the tokens of each row."""
    classic = tok.vocab_from_data
    n_rows = len(rows["piece_id"])
    n_tokens = np.asarray(tokens.value_lengths()) if not classic else np.array([len(t) + 2 for t in tokens], np.int64)
    if not n_rows:
        return None, n_tokens
    cols = {k: rows[k] for k in ("piece_id", "source", "split", "transpose", "n_notes", "seconds", "qpm")}
    cols["tokens_text" if classic else "tokens"] = tokens
    cols["n_tokens"] = n_tokens
    cols["tokenizer"] = [tok.id] * n_rows
    cols["ts_numerator"], cols["ts_denominator"] = T.time_signature_columns(rows["time_signature"])
    table = T.rows_table(cols, T.RAW_SCHEMA if classic else T.SCHEMA)
    piece_table = write_piece_table(dest, part, classic, table)
    piece_table["stats"] = _table_stats(rows["split"], rows["transpose"], rows["qpm"], n_tokens.tolist())
    return piece_table, n_tokens


def is_fast(source: str, options: ReadOptions) -> bool:
    """A unit read in one pass with the whole batch (symusic MIDI: microseconds); the others (music21) take ~1 s."""
    return options.parser == "symusic" and file_format(source.split("#", 1)[0]) == "midi"


def _read_units(units: list[tuple[str, bytes]], options: ReadOptions, part: int, progress) -> tuple[PieceBatch, list]:
    """:func:`read_pieces` of ``units``; with ``progress``, the slow units one by one, each followed by the
    fraction of the batch's units read so far on the board (the MIDI files of the batch together, first)."""
    slow = [i for i, (src, _data) in enumerate(units) if not is_fast(src, options)]
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


class ProgressBoard:
    """A Ray actor: the fraction of each running batch's units parsed, for the driver's progress bar."""

    def __init__(self) -> None:
        self.fractions: dict[int, float] = {}

    def set(self, part: int, fraction: float) -> None:
        self.fractions[part] = fraction

    def get(self) -> dict[int, float]:
        return dict(self.fractions)


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
STATS_COLUMNS = ("split", "transpose", "qpm", "n_tokens")


def shard_info(entry: dict, table: pa.Table) -> dict:
    """A shard's manifest entry ({path, rows, bytes, sha256}) with its stats, from its table."""
    return {**entry, "stats": _table_stats(*(table[k].to_pylist() for k in STATS_COLUMNS))}


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
    except Exception:  # noqa: BLE001 - some piece cannot be encoded: find which, one by one
        parts = []
        for i, pid in enumerate(pids):
            try:
                parts.append(tok.encode(batch.piece(i)))
            except Exception as exc:  # noqa: BLE001 - recorded in the journal by the caller, with its reason
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
        except Exception as exc:  # noqa: BLE001 - recorded in the journal by the caller, with its reason
            bad.setdefault(pid, f"{type(exc).__name__}: {exc}")
            texts.append([])
    return texts, bad


def _local_size(store, key: str) -> int:
    """A local file's size (an input of a list file, whose listing has none), else -1 (unknown: it is read)."""
    from midiforge.storage.store import LocalStore

    if isinstance(store, LocalStore):
        try:
            return store.path(key).stat().st_size
        except OSError:  # reading it says what is wrong
            return -1
    return -1

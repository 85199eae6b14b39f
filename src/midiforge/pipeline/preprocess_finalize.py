"""The end of a preprocess run: its journals taken (one per input, see PARTS_PER_RUN), duplicates across
batches resolved, the classic vocabulary built, and the outputs and manifest written, where
``inputs == pieces + duplicates + failures``."""
from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from midiforge.errors import MidiforgeError
from midiforge.pipeline import tokens as T
from midiforge.pipeline.preprocess_batch import (
    STATS_COLUMNS,
    PreprocessSettings,
    read_piece_table,
    shard_info,
    write_piece_table,
)
from midiforge.pipeline.preprocess_journal import (
    JOURNAL_SCHEMA,
    WORK,
    Journal,
    journal_parts,
    journal_path,
    read_journal,
    write_journal,
)
from midiforge.pipeline.tokens import SPLITS
from midiforge.storage import file_entry, map_parallel, write_manifest
from midiforge.storage.shards import int_lists, write_table


class Clock:
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


def _fence(dest, logs: dict[int, Journal], known: dict[int, dict], classic: bool) -> None:
    """One journal per input: where journals of several runs hold an input (a worker of a killed run wrote
    its batch after the next run took stock, and that run did the inputs again), the newest run's journal
    (the highest part) keeps it; the others lose its entries and rows (a journal left without any is
    deleted with its rows).  ``logs`` and ``known`` are updated."""
    owner: dict[str, int] = {}
    for part in sorted(logs):
        for name in logs[part].input:
            owner[name] = part
    for part in sorted(logs):
        j = logs[part]
        keep = [owner[name] == part for name in j.input]
        if all(keep):
            continue
        gone = {src for src, k in zip(j.source, keep) if not k}
        if "piece" in j.status:  # the rows first: a journal never names rows that are not there
            table = read_piece_table(dest, part, classic)
            table = table.filter(pa.array([src not in gone for src in table["source"].to_pylist()]))
            if table.num_rows:
                known[part] = shard_info(write_piece_table(dest, part, classic, table), table)
            else:
                dest.delete(T.raw_rel(part) if classic else T.shard_rel(part))
                known.pop(part, None)
        if any(keep):
            logs[part] = j.select(keep)
            write_journal(dest, part, logs[part])
        else:
            dest.delete(journal_path(part))
            del logs[part]


def finalize(dest, settings: PreprocessSettings, *, src_count: int, started: float,
             known: dict[int, dict] | None = None, known_journals: dict[int, Journal] | None = None,
             clock: Clock | None = None, expected_inputs: set[str] | None = None,
             sources: list[dict] | None = None) -> dict:
    """Resolve duplicates across batches, build the classic vocabulary, write the outputs and the manifest.

    ``known`` maps a part to what its task reported of the shard it wrote ({path, rows, bytes, sha256,
    stats}), ``known_journals`` to its :class:`Journal` (as a task of this run wrote it, or as this run
    read it from an earlier one); shards not in ``known``, or rewritten here, are read back once.
    ``known_journals`` are the run's journals: any other journal in DEST (a worker of a killed run that
    wrote late, a batch this run gave up on) is deleted, as is every shard or raw table without a journal;
    None: every journal in DEST.  Where two journals hold one input, the newer run's keeps it (see
    PARTS_PER_RUN).  ``expected_inputs``: the inputs (sources) of this run, each of which must have its
    outcome in some journal.
    """
    clock = clock or Clock()
    known = dict(known or {})
    dest.delete("manifest.json")  # whatever happens below, no manifest may name an object being rewritten
    tok = settings.make_tokenizer()
    classic = tok.vocab_from_data
    logs = _run_journals(dest, known_journals)
    _fence(dest, logs, known, classic)
    _delete_leftovers(dest, logs)
    _check_outcomes(dest, logs, expected_inputs)
    _drop_duplicates(dest, logs, known, classic)
    piece_parts = sorted(p for p, j in logs.items() if "piece" in j.status)
    if classic:
        tok, known = _classic_shards(dest, tok, piece_parts)
    unknown = [p for p in piece_parts if p not in known]
    known.update(zip(unknown, map_parallel(functools.partial(_read_back, dest), unknown,
                                           max_workers=min(4, dest.transfers))))
    totals = _Totals.of(dest, logs, known, piece_parts)
    journal_all = pa.table({k: [v for p in sorted(logs) for v in getattr(logs[p], k)] for k in JOURNAL_SCHEMA.names},
                           schema=JOURNAL_SCHEMA)
    files, reasons = _write_outputs(dest, tok, journal_all)
    files.extend({k: s[k] for k in ("path", "bytes", "sha256")} for s in totals.shards)
    elapsed = time.time() - started
    clock.lap("finalize")
    status = journal_all["status"].to_pylist()
    manifest = _manifest(settings, tok, src_count, status, reasons, totals, files, elapsed, clock, sources)
    _check_counts(dest, manifest, journal_all)
    write_manifest(dest, manifest)
    return manifest


def _run_journals(dest, known_journals: dict[int, Journal] | None) -> dict[int, Journal]:
    """The run's journals (every one in DEST if ``known_journals`` is None); any other is deleted."""
    journals = journal_parts(dest)
    if known_journals is None:
        return {p: read_journal(dest, rel) for p, rel in journals.items()}
    logs = dict(known_journals)
    for p in sorted(set(journals) - set(logs)):
        dest.delete(journals[p])
    return logs


def _delete_leftovers(dest, logs: dict[int, Journal]) -> None:
    """Rows without a journal of the run: leftovers (of a killed batch, whose inputs ran again), never counted."""
    for folder in (T.SHARDS_DIR + "/", f"{WORK}/"):
        for o in dest.list(folder):
            part = T.part_of(o.path)
            if part is not None and part not in logs:
                dest.delete(o.path)


def _check_outcomes(dest, logs: dict[int, Journal], expected_inputs: set[str] | None) -> None:
    """Every input of the run has its outcome (a piece, a duplicate or a failure) somewhere."""
    if not expected_inputs:
        return
    missing = expected_inputs.difference(*(j.input for j in logs.values()))
    if missing:
        raise MidiforgeError(f"{dest.uri}: {len(missing)} inputs have no outcome in any batch journal "
                             f"(for example {sorted(missing)[:3]}); run again with --resume")


def _drop_duplicates(dest, logs: dict[int, Journal], known: dict[int, dict], classic: bool) -> None:
    """Duplicates across batches: the copy with the smallest source is the piece, wherever it was read; the
    others become duplicates, their rows dropped from their shards.  ``logs`` and ``known`` are updated."""
    keeper: dict[str, tuple[str, int]] = {}
    for part, j in sorted(logs.items()):
        for src, pid, status in zip(j.source, j.piece_id, j.status):
            if status == "piece" and (pid not in keeper or src < keeper[pid][0]):
                keeper[pid] = (src, part)
    drops: dict[int, set] = {}
    for part, j in sorted(logs.items()):
        drop = {(s, p) for s, p, st in zip(j.source, j.piece_id, j.status) if st == "piece" and keeper[p][0] != s}
        if drop:
            drops[part] = drop

    def rewrite(part: int):  # the shard without the rows of copies kept elsewhere; the journal says so
        j, drop = logs[part], drops[part]
        j = j.with_status(["duplicate" if (s, p) in drop else st for s, p, st in zip(j.source, j.piece_id, j.status)])
        pt = read_piece_table(dest, part, classic)   # one of an earlier run may lack the time signature: 4/4
        keep = [(s, p) not in drop for s, p in zip(pt["source"].to_pylist(), pt["piece_id"].to_pylist())]
        pt = pt.filter(pa.array(keep))
        info = shard_info(write_piece_table(dest, part, classic, pt), pt)  # a classic one is rewritten below anyway
        write_journal(dest, part, j)
        return part, j, info

    for part, j, info in map_parallel(rewrite, sorted(drops), max_workers=min(4, dest.transfers)):
        logs[part] = j
        known[part] = info


def _classic_shards(dest, tok, piece_parts: list[int]) -> tuple[object, dict[int, dict]]:
    """The classic tokenizer with the vocabulary of the run's raw tables, and the shards written from them."""
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
        known[p] = shard_info(T.write_shard(dest, p, t), t)
    return tok, known


def _read_back(dest, p: int) -> dict:
    """A shard of an earlier run: read it back, once."""
    return shard_info(*T.read_shard_entry(dest, p, STATS_COLUMNS))


@dataclass
class _Totals:
    """The manifest's shard entries and what it sums over the shards."""

    shards: list[dict] = field(default_factory=list)
    qpms: list[float] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    rows: int = 0
    tokens: int = 0

    @classmethod
    def of(cls, dest, logs: dict[int, Journal], known: dict[int, dict], piece_parts: list[int]) -> _Totals:
        totals = cls()
        for p in piece_parts:
            rel = T.shard_rel(p)
            info = known[p]
            if sum(info["stats"]["splits"].values()) != logs[p].status.count("piece"):  # rows of another writer
                raise MidiforgeError(f"{dest.url(rel)}: {sum(info['stats']['splits'].values())} pieces, but its batch "
                                     f"journal says {logs[p].status.count('piece')}; delete both to redo the batch")
            totals.shards.append({"path": rel, "rows": info["rows"], "bytes": info["bytes"], "sha256": info["sha256"]})
            stats = info["stats"]
            totals.qpms.extend(stats["qpm"])
            for split, n in stats["splits"].items():
                totals.splits[split] += n
            totals.rows += stats["rows"]
            totals.tokens += stats["tokens"]
        return totals


def _write_outputs(dest, tok, journal_all: pa.Table) -> tuple[list[dict], dict[str, int]]:
    """tokenizer.json, failures.parquet and inputs.parquet written (their file entries), and the failures' reasons."""
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

    return map_parallel(write, outputs, max_workers=dest.transfers), reasons


def _manifest(settings: PreprocessSettings, tok, src_count: int, status: list[str], reasons: dict[str, int],
              totals: _Totals, files: list[dict], elapsed: float, clock: Clock, sources: list[dict] | None) -> dict:
    return {
        "stage": "preprocess",
        "input_files": src_count,
        "inputs": len(status),
        "pieces": status.count("piece"),
        "duplicates": status.count("duplicate"),
        "failures": status.count("failure"),
        "failure_reasons": reasons,
        "splits": totals.splits,
        "rows": totals.rows,
        "tokens": totals.tokens,
        "qpm_median": float(statistics.median(totals.qpms)) if totals.qpms else 120.0,
        "tokenizer": tok.id,
        "tokenizer_kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "settings": settings.identity(),
        # the SRCs of the run's inputs ({src: normalized URI, added: UTC time}), more than one with --add-inputs
        **({"sources": sources} if sources else {}),
        "shards": totals.shards,
        "files": files,
        "seconds": round(elapsed, 3),
        "files_per_second": round(src_count / elapsed, 3) if elapsed > 0 else None,
        "tokens_per_second": round(totals.tokens / elapsed, 1) if elapsed > 0 else None,
        # seconds of this run's phases (listing, setup, ray_start, batches, finalize: the manifest's own
        # write is not in it) and the workers' busy seconds, summed over them (batch_busy)
        "timing": clock.as_dict(),
    }


def _check_counts(dest, manifest: dict, journal_all: pa.Table) -> None:
    """Every input unit counted once, as a piece, a duplicate or a failure (else a bug: no manifest)."""
    n_inputs = manifest["inputs"]
    units = len(set(journal_all["source"].to_pylist()))  # a unit's source names it: input, or input#tune
    if units != n_inputs:  # a unit counted twice (a bug: no manifest)
        raise MidiforgeError(f"{dest.uri}: {n_inputs} inputs in the journals but {units} input units")
    if manifest["inputs"] != manifest["pieces"] + manifest["duplicates"] + manifest["failures"]:  # a bug: no manifest
        raise MidiforgeError(f"{dest.uri}: {manifest['inputs']} inputs but {manifest['pieces']} pieces + "
                             f"{manifest['duplicates']} duplicates + {manifest['failures']} failures")

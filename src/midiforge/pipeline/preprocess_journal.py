"""A batch's journal: the outcome of every input unit it read (a piece, a duplicate or a failure).

A batch writes its rows first, then its journal ``_work/part-NNNNN.json``: the journal's presence says the
batch is complete.  The file is JSON, one list per column of JOURNAL_SCHEMA (a Parquet file costs ~1 ms
of its own to write, and journals are only read back by a run that resumes or finalizes).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields

import pyarrow as pa

from midiforge.errors import MidiforgeError
from midiforge.pipeline import tokens as T

WORK = T.RAW_DIR
JOURNAL_SCHEMA = pa.schema([
    ("input", pa.string()), ("source", pa.string()), ("piece_id", pa.string()),
    ("status", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
])
#: the longest detail a journal keeps
MAX_DETAIL = 2000


@dataclass(slots=True)
class Outcome:
    """One input unit of a batch: its input file, its source (the file, or ``file#tune``), its sha256, and
    what became of it.  ``status`` is None while the unit waits to be parsed."""

    input: str
    source: str
    piece_id: str = ""
    status: str | None = None  # "piece", "duplicate" or "failure"
    reason: str = ""
    detail: str = ""

    def settle(self, status: str, reason: str = "", detail: str = "") -> None:
        self.status, self.reason, self.detail = status, reason, detail

    @classmethod
    def failure(cls, input: str, source: str, reason: str, detail: str) -> Outcome:
        return cls(input, source, "", "failure", reason, detail)


@dataclass
class Journal:
    """A batch's journal, column by column (the columns of JOURNAL_SCHEMA, in its order): entry i is
    ``input[i], source[i], ...``.  Plain lists: they cross a Ray round trip ~3 ms cheaper than a pa.Table."""

    input: list[str]
    source: list[str]
    piece_id: list[str]
    status: list[str]
    reason: list[str]
    detail: list[str]

    @classmethod
    def of(cls, outcomes: list[Outcome]) -> Journal:
        """The journal of ``outcomes`` (each settled), details cut to MAX_DETAIL characters."""
        return cls([o.input for o in outcomes], [o.source for o in outcomes], [o.piece_id for o in outcomes],
                   [o.status for o in outcomes], [o.reason for o in outcomes],
                   [o.detail[:MAX_DETAIL] for o in outcomes])

    def columns(self) -> dict[str, list]:
        """{column: values}, in JOURNAL_SCHEMA's order: the JSON form."""
        return {k: getattr(self, k) for k in COLUMNS}

    def to_json(self) -> bytes:
        return json.dumps(self.columns(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Journal:
        """A journal as :meth:`to_json` wrote it; ValueError if it is not one."""
        doc = json.loads(data)
        if not isinstance(doc, dict) or sorted(doc) != sorted(COLUMNS):
            raise ValueError(f"columns {sorted(doc) if isinstance(doc, dict) else type(doc).__name__}")
        if not all(isinstance(v, list) for v in doc.values()) or len({len(v) for v in doc.values()}) != 1:
            raise ValueError("columns that are not lists of one length")
        return cls(**doc)

    def select(self, keep: list[bool]) -> Journal:
        """The entries where ``keep`` is true."""
        return Journal(*([v for v, ok in zip(col, keep) if ok] for col in self.columns().values()))

    def with_status(self, status: list[str]) -> Journal:
        return Journal(self.input, self.source, self.piece_id, status, self.reason, self.detail)

    def __len__(self) -> int:
        return len(self.input)


COLUMNS = tuple(f.name for f in fields(Journal))
assert COLUMNS == tuple(JOURNAL_SCHEMA.names) == tuple(f.name for f in fields(Outcome))


def journal_path(part: int) -> str:
    return f"{WORK}/part-{part:05d}.json"


def write_journal(dest, part: int, journal: Journal) -> None:
    dest.write_bytes(journal_path(part), journal.to_json())


def read_journal(dest, rel: str) -> Journal:
    try:
        return Journal.from_json(dest.read_bytes(rel))
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MidiforgeError(f"{dest.url(rel)}: not a readable batch journal ({exc}); delete it to redo its batch") from None


def journal_parts(dest) -> dict[int, str]:
    """{part: path} of every batch journal in DEST."""
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


def run_marker(epoch: int) -> str:
    return f"{WORK}/run-{epoch:05d}.json"


def next_epoch(dest, journals: dict[int, str]) -> int:
    """The epoch of a run that continues DEST: one more than any run before (their markers, and the
    batches of runs from before markers existed)."""
    seen = [0] + [p // PARTS_PER_RUN for p in journals]
    for o in dest.list(f"{WORK}/"):
        name = o.path.rsplit("/", 1)[-1]
        if name.startswith("run-") and name.endswith(".json") and name[4:-5].isdigit():
            seen.append(int(name[4:-5]))
    return max(seen) + 1


def drop_journals_without_rows(dest, journals: dict[int, str], earlier: dict[int, Journal], classic: bool) -> None:
    """A batch writes its rows, then its journal: a journal with pieces whose rows are gone (deleted as a
    leftover while a worker of a killed run was still writing) does not count; its inputs run again."""
    parts = {p for p, j in earlier.items() if "piece" in j.status}
    if not parts:
        return
    tables = set()
    for o in dest.list(f"{WORK}/" if classic else T.SHARDS_DIR + "/"):
        if T.is_shard(o.path) != classic:
            tables.add(T.part_of(o.path))
    for p in sorted(parts - tables):
        dest.delete(journals.pop(p))
        del earlier[p]

"""A batch's journal as a record (issue 12): the same JSON as the column lists written before it, both ways."""
from __future__ import annotations

import json

import pytest

from midiforge.errors import MidiforgeError
from midiforge.pipeline.preprocess_journal import (
    JOURNAL_SCHEMA,
    Journal,
    Outcome,
    journal_path,
    read_journal,
    write_journal,
)
from midiforge.storage import open_store

#: a journal as the driver wrote it before the record existed: {column: values}, compact JSON
OLD = (b'{"input":["a.mid","b.abc","b.abc","c.mid"],"source":["a.mid","b.abc#1","b.abc#2","c.mid"],'
       b'"piece_id":["aa","bb","aa",""],"status":["piece","piece","duplicate","failure"],'
       b'"reason":["","","","read_error"],"detail":["","","","OSError: gone"]}')


def test_an_old_journal_reads_and_writes_back_byte_for_byte(tmp_path):
    dest = open_store(str(tmp_path))
    dest.write_bytes(journal_path(7), OLD)
    j = read_journal(dest, journal_path(7))
    assert j.source == ["a.mid", "b.abc#1", "b.abc#2", "c.mid"] and j.status[3] == "failure" and len(j) == 4
    assert j.to_json() == OLD
    write_journal(dest, 8, j)
    assert (tmp_path / "_work" / "part-00008.json").read_bytes() == OLD
    assert list(json.loads(OLD)) == JOURNAL_SCHEMA.names == list(j.columns())


def test_outcomes_make_the_journal_a_batch_wrote():
    outcomes = [Outcome("a.mid", "a.mid", "aa"), Outcome.failure("c.mid", "c.mid", "too_long", "x" * 5000)]
    outcomes[0].settle("piece")
    j = Journal.of(outcomes)
    assert j.status == ["piece", "failure"] and j.reason == ["", "too_long"] and len(j.detail[1]) == 2000
    assert j.select([False, True]).input == ["c.mid"]
    assert j.with_status(["duplicate", "failure"]).status == ["duplicate", "failure"] and j.status[0] == "piece"


@pytest.mark.parametrize("data", [b'{"input": ["a.mid"], "sou', b'[1, 2]', b'{"input": []}',
                                  OLD.replace(b'"c.mid"],"source"', b'"c.mid","d.mid"],"source"')])
def test_a_damaged_journal_is_named(tmp_path, data):
    dest = open_store(str(tmp_path))
    dest.write_bytes(journal_path(0), data)
    with pytest.raises(MidiforgeError, match=r"part-00000\.json: not a readable batch journal"):
        read_journal(dest, journal_path(0))

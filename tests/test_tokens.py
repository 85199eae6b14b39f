"""The token-shard format's owner (midiforge.pipeline.tokens): schema, paths, writer and readers.

Round trips through the writer and every reader, a table of the wrong types refused with a clear
error, shards of the format before the time signature (no ts_* columns) still read as 4/4, and a
preprocess run on real 3/4 and 6/8 tunes that keeps each tune's time signature; its --resume on a
DEST of the old format.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpora import corpus
from midiforge.errors import MidiforgeError
from midiforge.model.data import window_chunks
from midiforge.music.tokenizers import make_tokenizer
from midiforge.pipeline import tokens
from midiforge.pipeline.preprocess import PreprocessSettings, run_preprocess
from midiforge.storage import file_entry, open_store, read_manifest, verify_store, write_manifest
from midiforge.storage.shards import int_lists, table_bytes

#: the columns of a shard written before the time signature was kept
OLD_COLUMNS = [c for c in tokens.COLUMNS if not c.startswith("ts_")]


def _columns(n: int, seed: int = 0, split=None, ts=None) -> dict:
    rng = np.random.default_rng(seed)
    ids = [np.concatenate([[1], rng.integers(4, 90, int(rng.integers(3, 40))), [2]]).astype(np.int32)
           for _ in range(n)]
    num, den = tokens.time_signature_columns(ts if ts is not None else [(3, 4), (6, 8)] * (n // 2) + [(4, 4)] * (n % 2))
    return {
        "piece_id": [f"{seed}-{i:064d}"[-64:] for i in range(n)], "source": [f"x/{i}.mid" for i in range(n)],
        "split": split or [tokens.SPLITS[i % 3] for i in range(n)], "transpose": np.zeros(n, np.int8),
        "tokens": int_lists(ids), "n_tokens": [len(x) for x in ids], "n_notes": [(len(x) - 2) // 3 for x in ids],
        "seconds": rng.random(n) * 60, "qpm": rng.choice([90.0, 120.0], n), "tokenizer": ["events-test"] * n,
        "ts_numerator": num, "ts_denominator": den,
    }


def _output(root, tables: list[pa.Table], tok=None) -> str:
    """A finished preprocess output of ``tables`` (written by the format's writer), with a real tokenizer."""
    store = open_store(str(root))
    tok = tok or make_tokenizer("events")
    shards = []
    for part, t in enumerate(tables):
        t = t.set_column(t.schema.get_field_index("tokenizer"), "tokenizer", pa.array([tok.id] * t.num_rows))
        shards.append(tokens.write_shard(store, part, t))
    tok_bytes = tok.to_json().encode()
    store.write_bytes(tokens.TOKENIZER, tok_bytes)
    write_manifest(store, {"stage": "preprocess", "tokenizer": tok.id, "shards": shards,
                           "files": [file_entry(tokens.TOKENIZER, tok_bytes)]
                           + [{k: s[k] for k in ("path", "bytes", "sha256")} for s in shards]})
    return str(root)


def test_names():
    assert tokens.shard_rel(7) == "shards/part-00007.parquet" and tokens.raw_rel(7) == "_work/raw-00007.parquet"
    assert tokens.part_of(tokens.shard_rel(123)) == 123 and tokens.part_of(tokens.raw_rel(4)) == 4
    assert tokens.part_of("shards/part-1.parquet") is None and tokens.part_of("_work/part-00001.json") is None
    assert tokens.is_shard("shards/part-00000.parquet") and not tokens.is_shard("_work/raw-00000.parquet")
    assert tokens.SPLITS == ("train", "validation", "test") and set(tokens.TRAIN_SPLITS) < set(tokens.SPLITS)


def test_round_trip_through_the_writer_and_every_reader(tmp_path):
    cols = _columns(9)
    table = tokens.rows_table(cols)
    assert table.schema.equals(tokens.SCHEMA)
    store = open_store(str(tmp_path))
    entry = tokens.write_shard(store, 3, table)
    assert entry["path"] == "shards/part-00003.parquet" and entry["rows"] == 9
    back = tokens.read_shard(store, 3, entry=entry)
    assert back.equals(table)
    assert tokens.read_shard(store, entry["path"], ["tokens", "ts_denominator"]).equals(
        table.select(["tokens", "ts_denominator"]))
    read_entry, _ = tokens.read_shard_entry(store, 3, ["split"])
    assert read_entry == {**entry, "rows": 9}
    assert list(zip(back["ts_numerator"].to_pylist(), back["ts_denominator"].to_pylist()))[:3] == [(3, 4), (6, 8), (3, 4)]

    # the raw table of a classic run: its own schema, its own path
    raw = tokens.rows_table({**{k: v for k, v in cols.items() if k != "tokens"},
                             "tokens_text": [["a", "b"]] * 9}, tokens.RAW_SCHEMA)
    tokens.write_raw(store, 3, raw)
    assert tokens.read_raw(store, 3).equals(raw)
    with pytest.raises(MidiforgeError, match=r"raw-00003\.parquet: not a raw token table: tokens_text \(missing\)"):
        tokens.write_raw(store, 3, table)


def test_training_and_primer_readers_see_what_was_written(tmp_path):
    a, b = tokens.rows_table(_columns(10, 1)), tokens.rows_table(_columns(7, 2))
    root = _output(tmp_path / "out", [a, b])
    s = tokens.open_shards(root)
    assert [f.rel for f in s.files] == ["shards/part-00000.parquet", "shards/part-00001.parquet"]
    for split in tokens.SPLITS:
        want = [np.asarray(x, np.int32) for t in (a, b) for x, sp in zip(t["tokens"].to_pylist(), t["split"].to_pylist())
                if sp == split]
        assert s.rows(split) == len(want) and s.tokens(split) == sum(len(x) for x in want)
        got = list(s.reader(split)(None))   # one Parquet row batch per file here, in file order
        assert np.array_equal(np.concatenate(got), np.concatenate(want))
    # the training windows of model/data.py are cut from that stream (no file opened there)
    wins = np.concatenate(list(window_chunks(s.reader("train"), 8)))
    assert np.array_equal(wins[:, :-1].ravel(), np.concatenate(list(s.reader("train")(None)))[:wins.size - len(wins)])
    # primers: untransposed rows of the split, each with its time signature
    store = open_store(root)
    rows = tokens.primer_rows(store, read_manifest(store), "validation")
    assert len(rows) == s.rows("validation")
    got = {(src, ts) for src, ts in (rows.get(c)[2:] for c in range(len(rows)))}
    want = {(src, (n, d)) for t in (a, b) for src, sp, n, d in zip(
        t["source"].to_pylist(), t["split"].to_pylist(), t["ts_numerator"].to_pylist(), t["ts_denominator"].to_pylist())
        if sp == "validation"}
    assert got == want and {ts for _src, ts in got} >= {(3, 4), (6, 8)}


def test_a_table_of_the_wrong_types_is_refused_by_name(tmp_path):
    store = open_store(str(tmp_path))
    table = tokens.rows_table(_columns(4))
    wrong = table.set_column(table.schema.get_field_index("n_tokens"), "n_tokens", table["n_tokens"].cast(pa.int64()))
    with pytest.raises(MidiforgeError, match=r"part-00000\.parquet: not a token shard: n_tokens \(int64, not int32\)$"):
        tokens.write_shard(store, 0, wrong)
    with pytest.raises(MidiforgeError, match=r"ts_numerator \(missing\), ts_denominator \(missing\)"):
        tokens.write_shard(store, 0, table.select(OLD_COLUMNS))
    with pytest.raises(MidiforgeError, match=r"extra \(not in the schema\)"):
        tokens.write_shard(store, 0, table.append_column("extra", pa.array([1] * 4)))
    with pytest.raises(MidiforgeError, match=r"column order differs"):
        tokens.write_shard(store, 0, table.select(list(reversed(tokens.COLUMNS))))
    assert not store.exists(tokens.shard_rel(0))   # nothing was written
    with pytest.raises(MidiforgeError, match=r"missing columns \['ts_denominator'\]"):
        tokens.rows_table({k: v for k, v in _columns(2).items() if k != "ts_denominator"})
    with pytest.raises(pa.ArrowInvalid):
        tokens.rows_table({**_columns(2), "transpose": [300, 0]})  # does not fit int8
    # a reader refuses a shard of the wrong types, naming the file and the column
    store.write_bytes(tokens.shard_rel(1), table_bytes(wrong))
    with pytest.raises(MidiforgeError, match=r"part-00001\.parquet: not a token shard: n_tokens \(int64, not int32\)"):
        tokens.read_shard(store, 1)
    store.write_bytes(tokens.shard_rel(2), b"not parquet at all")
    with pytest.raises(MidiforgeError, match=r"part-00002\.parquet: not a readable token shard"):
        tokens.read_shard(store, 2)
    store.write_bytes(tokens.shard_rel(3), table_bytes(table.drop_columns(["tokens"])))
    with pytest.raises(MidiforgeError, match=r"part-00003\.parquet: not a token shard: no column tokens"):
        tokens.read_shard(store, 3)


def test_time_signature_columns_keep_what_fits_and_make_the_rest_4_4():
    num, den = tokens.time_signature_columns([(3, 4), (6, 8), (0, 4), (5, 0), (40000, 4), (7, 16)])
    assert num.dtype == np.int16 and den.dtype == np.int16
    assert list(zip(num.tolist(), den.tolist())) == [(3, 4), (6, 8), (4, 4), (4, 4), (4, 4), (7, 16)]
    assert [len(x) for x in tokens.time_signature_columns(np.zeros((0, 2), np.int64))] == [0, 0]


def test_old_shards_without_a_time_signature_read_as_4_4(tmp_path):
    """Shards of the format before the time signature (SHARD_SCHEMA of then) read through every reader."""
    new = tokens.rows_table(_columns(8, 3))
    old = new.select(OLD_COLUMNS)
    store = open_store(str(tmp_path / "raw"))
    store.write_bytes(tokens.shard_rel(0), table_bytes(old))
    t = tokens.read_shard(store, 0)
    assert t.schema.equals(tokens.SCHEMA)
    assert set(t["ts_numerator"].to_pylist()) == {4} and set(t["ts_denominator"].to_pylist()) == {4}
    assert t.select(OLD_COLUMNS).equals(old)
    # a whole old output: training and primers
    root = tmp_path / "old"
    _output(root, [new])
    ostore = open_store(str(root))
    data = table_bytes(pq.read_table(io.BytesIO(ostore.read_bytes(tokens.shard_rel(0)))).select(OLD_COLUMNS))
    ostore.write_bytes(tokens.shard_rel(0), data)
    manifest = read_manifest(ostore)
    manifest["shards"] = [{**file_entry(tokens.shard_rel(0), data), "rows": 8}]
    manifest["files"] = [e for e in manifest["files"] if e["path"] == tokens.TOKENIZER] + [file_entry(tokens.shard_rel(0), data)]
    write_manifest(ostore, manifest)
    s = tokens.open_shards(str(root))
    assert s.rows("train") == 3 and len(np.concatenate(list(s.reader("train")(None)))) == s.tokens("train")
    rows = tokens.primer_rows(ostore, manifest, "train")
    assert {rows.get(c)[3] for c in range(len(rows))} == {(4, 4)}


def test_manifest_readers_name_the_problem(tmp_path):
    store = open_store(str(tmp_path / "shards"))
    with pytest.raises(MidiforgeError, match=r"no manifest: .*pass preprocess's DEST, not its shards/ folder"):
        tokens.open_shards(str(tmp_path / "shards"))
    store.write_bytes(tokens.MANIFEST, json.dumps({"shards": []}).encode())
    with pytest.raises(MidiforgeError, match="lists no shards"):
        tokens.open_shards(str(tmp_path / "shards"))
    store.write_bytes(tokens.MANIFEST, json.dumps({"shards": [{"path": "elsewhere/x.parquet"}]}).encode())
    with pytest.raises(MidiforgeError, match=r"shards\[0\] is not a \{path: shards/part-N.parquet"):
        tokens.open_shards(str(tmp_path / "shards"))


# ---------------------------------------------------------------------------------------------
# preprocess: the time signature written, and a --resume on a DEST of the old format
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


#: real tunes in four meters (what the reader gives: their first time signature)
METERS = {"ashover1.mid": (3, 4), "ashover11.mid": (6, 8), "ashover10.mid": (4, 4), "ashover2.mid": (2, 2),
          "ashover16.mid": (2, 4)}


def _strip_time_signature(path: Path) -> None:
    """Make a table what a preprocess of before the time signature wrote: the same rows without ts_*."""
    t = pq.read_table(path)
    path.write_bytes(table_bytes(t.drop_columns(["ts_numerator", "ts_denominator"])))


@pytest.mark.parametrize("tokenizer", ["events", "classic"])
def test_resume_on_a_dest_of_the_old_format(tmp_path, ray_local, tokenizer):
    """Preprocess writes each tune's time signature; a DEST whose shards (and classic raw tables) lack
    it resumes with new inputs: the old rows read as 4/4, the new ones keep theirs, an old shard that
    loses a row to a new duplicate is rewritten in the new format, and the output verifies."""
    nott = corpus("nottingham")
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    for name in METERS:
        shutil.copy(nott / name, src / name)
    settings = PreprocessSettings(tokenizer=tokenizer)
    first = run_preprocess(str(src), str(dest), settings, batch_files=2, progress=False)
    assert first["pieces"] == len(METERS) and len(first["shards"]) >= 2
    store = open_store(str(dest))
    rows = [r for s in first["shards"] for r in tokens.read_shard(store, s["path"], entry=s).to_pylist()]
    assert {r["source"]: (r["ts_numerator"], r["ts_denominator"]) for r in rows} == METERS

    # the DEST of an older version: no ts_* columns anywhere; then a new input, a copy of a 3/4 tune
    # whose name sorts first (it becomes the piece, the old row a duplicate)
    old = sorted((dest / "shards").glob("part-*.parquet")) + sorted((dest / "_work").glob("raw-*.parquet"))
    for path in old:
        _strip_time_signature(path)
    assert tokenizer == "events" or (dest / "_work" / "raw-00000.parquet").exists()
    shutil.copy(nott / "ashover1.mid", src / "0-copy.mid")
    m = run_preprocess(str(src), str(dest), settings, resume=True, batch_files=2, progress=False)
    assert m["pieces"] == len(METERS) and m["duplicates"] == 1 and m["failures"] == 0
    assert verify_store(store).ok
    got = {}
    for s in m["shards"]:
        t = tokens.read_shard(store, s["path"], entry=s)
        got.update({r["source"]: (r["ts_numerator"], r["ts_denominator"]) for r in t.to_pylist()})
    assert "ashover1.mid" not in got and got.pop("0-copy.mid") == (3, 4)   # new: its own meter
    assert got == {k: (4, 4) for k in METERS if k != "ashover1.mid"}      # old rows: 4/4
    if tokenizer == "classic":  # every shard is made again from the raw tables: all in the new format
        assert all(tokens.read_shard(store, s["path"]).schema.equals(tokens.SCHEMA) for s in m["shards"])
    shards = tokens.open_shards(str(dest))
    assert sum(shards.rows(sp) for sp in tokens.SPLITS) == len(METERS)
    assert sum(len(x) for sp in tokens.SPLITS for x in shards.reader(sp)(None)) == m["tokens"]

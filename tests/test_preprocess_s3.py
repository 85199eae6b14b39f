"""preprocess from s3:// to s3:// on a real S3 server (moto on 127.0.0.1), with --resume and an outage."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from midiforge.cli import main as cli_main
from midiforge.storage import open_store, read_manifest, verify_store

FF = Path(__file__).resolve().parents[1].parent / "shared" / "corpora" / "ff"
N_MIDI = 20
GARBAGE = {"corpus/garbage.mid": b"this is not a MIDI file at all" * 10, "corpus/sub/empty.mid": b""}


@pytest.fixture(scope="module")
def ray_with_s3_env(s3_server):
    """Ray started while the fake credentials are in the environment, so its workers have them.

    (Ray workers inherit the environment of the process that started Ray; a Ray started
    earlier by another test module would not know the test credentials.)
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _corpus_bucket(s3_server) -> str:
    files = sorted(FF.glob("*.mid"))[:N_MIDI]
    if len(files) < N_MIDI:
        pytest.skip(f"shared corpus {FF} is absent (a fresh clone without ../shared)")
    bucket = s3_server.new_bucket()
    client, name = s3_server.client(), bucket[len("s3://"):]
    for f in files:
        client.put_object(Bucket=name, Key=f"corpus/{f.name}", Body=f.read_bytes())
    for key, data in GARBAGE.items():
        client.put_object(Bucket=name, Key=key, Body=data)
    client.put_object(Bucket=name, Key="corpus/README.txt", Body=b"not an input (suffix)")
    return bucket


def _run(argv, capsys) -> tuple[int, str, str]:
    code = cli_main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _assert_no_manifest_lies(store) -> bool:
    """Wherever a manifest exists, every object it names is present and intact. True if one exists."""
    if not store.exists("manifest.json"):
        return False
    report = verify_store(store)
    assert report.ok, f"manifest names missing {report.missing} / mismatched {report.mismatched}"
    return True


def test_preprocess_s3_to_s3_resume_and_verify(s3_server, ray_with_s3_env, capsys):
    bucket = _corpus_bucket(s3_server)
    src, dest = f"{bucket}/corpus/", f"{bucket}/runs/x/"
    ep = ["--endpoint-url", s3_server.endpoint_url]
    code, out, err = _run(["preprocess", src, dest, *ep, "--no-progress", "--batch-files", "6"], capsys)
    assert code == 0, err

    store = open_store(dest, s3_server.options())
    manifest = read_manifest(store)
    assert manifest["inputs"] == N_MIDI + len(GARBAGE)
    assert manifest["failures"] == len(GARBAGE)
    assert set(manifest["failure_reasons"]) <= {"not_midi", "empty"}
    assert manifest["pieces"] + manifest["duplicates"] == N_MIDI and manifest["pieces"] > 0
    listed = {e["path"] for e in manifest["files"]}
    assert {"tokenizer.json", "failures.parquet"} <= listed
    assert {s["path"] for s in manifest["shards"]} <= listed and manifest["shards"]
    # the shards are real Parquet token shards, readable back through the verified path
    import io

    import pyarrow.parquet as pq

    rows = 0
    for entry in manifest["shards"]:
        table = pq.read_table(io.BytesIO(store.read_verified(entry["path"], entry)))
        assert table.num_rows == entry["rows"]
        assert all(t[0] == 1 and t[-1] == 2 for t in table["tokens"].to_pylist())
        rows += table.num_rows
    assert rows == manifest["rows"] == manifest["pieces"]

    code, out, err = _run(["verify", dest, *ep], capsys)
    assert code == 0 and "-> OK" in out, out + err

    # a second run into the same DEST needs --resume; with it, nothing is redone and the output still verifies
    code, out, err = _run(["preprocess", src, dest, *ep, "--no-progress"], capsys)
    assert code == 2 and "--resume" in err
    code, out, err = _run(["preprocess", src, dest, *ep, "--no-progress", "--resume"], capsys)
    assert code == 0, err
    again = read_manifest(store)
    assert {k: again[k] for k in ("inputs", "pieces", "duplicates", "failures")} == \
        {k: manifest[k] for k in ("inputs", "pieces", "duplicates", "failures")}
    assert _assert_no_manifest_lies(store)

    # tampering after the fact is caught
    first = manifest["shards"][0]["path"]
    store.write_bytes(first, store.read_bytes(first)[:-1] + b"\0")
    code, out, _ = _run(["verify", dest, *ep], capsys)
    assert code == 1 and f"mismatched: {first}" in out


def test_preprocess_survives_or_fails_cleanly_across_an_outage(s3_server, ray_with_s3_env, capsys):
    """The server goes away mid-run.  A short outage: the run completes after retries.  An outage
    longer than the retry budget: the run fails with a clear error, and --resume then completes it.
    Either way no manifest ever names an object that is missing or wrong."""
    import ray

    bucket = _corpus_bucket(s3_server)
    src = f"{bucket}/corpus/"
    store_opts = s3_server.options()
    run = ["--endpoint-url", s3_server.endpoint_url, "--no-progress", "--batch-files", "2"]

    # 1. a 2 s outage, well inside the retry budget (--s3-retry-seconds: 120 s by default)
    dest = f"{bucket}/runs/short/"
    outage = s3_server.outage(2.0, after_requests=15)
    started = time.monotonic()
    code, out, err = _run(["preprocess", src, dest, *run, "--s3-max-attempts", "10"], capsys)
    ended = time.monotonic()
    outage.join(timeout=60)
    assert s3_server.running and not outage.is_alive()
    assert outage.stopped_at is not None and started < outage.stopped_at < ended, "the outage missed the run"
    store = open_store(dest, store_opts)
    if code == 0:
        manifest = read_manifest(store)
        assert manifest["inputs"] == N_MIDI + len(GARBAGE)
        assert manifest["failures"] == len(GARBAGE), f"the outage cost inputs: {manifest['failure_reasons']}"
        assert _assert_no_manifest_lies(store)
    else:  # allowed, if the retries ran out: then the message must say what happened
        _assert_clear_storage_error(err, s3_server)
        _assert_no_manifest_lies(store)

    # 2. an outage much longer than the retry budget (2 s here): the run must fail, clearly
    dest = f"{bucket}/runs/long/"
    outage = s3_server.outage(12.0, after_requests=15)
    started = time.monotonic()
    code, out, err = _run(["preprocess", src, dest, *run, "--s3-max-attempts", "2", "--s3-retry-seconds", "2"],
                          capsys)
    assert outage.stopped_at is not None and started < outage.stopped_at < time.monotonic()
    assert code != 0, "the run cannot have completed with the server down"
    _assert_clear_storage_error(err, s3_server)
    ray.shutdown()  # what the end of the failed CLI process does: its orphaned tasks go with it
    outage.join(timeout=60)
    assert s3_server.running
    store = open_store(dest, store_opts)
    _assert_no_manifest_lies(store)
    code, out, err = _run(["preprocess", src, dest, *run, "--resume"], capsys)
    assert code == 0, err
    manifest = read_manifest(store)
    assert manifest["inputs"] == N_MIDI + len(GARBAGE) and manifest["failures"] == len(GARBAGE)
    assert _assert_no_manifest_lies(store)


def _assert_clear_storage_error(err: str, s3_server) -> None:
    """One line (no remote traceback): 'midiforge preprocess: error: s3://...: ... failed: <reason>'."""
    lines = [line for line in err.strip().splitlines() if line.startswith("midiforge preprocess: error:")]
    assert len(lines) == 1, err
    line = lines[0]
    assert "s3://" in line and "cannot reach the S3 endpoint" in line, err
    assert "Traceback" not in err and 'File "' not in err, err
    assert s3_server.secret_key not in err and s3_server.access_key not in err

"""Storage layer against the local file system and a real S3 server on 127.0.0.1 (moto)."""
from __future__ import annotations

import io
import json
import os
import pickle
import time

import pytest

from midiforge.cli import main as cli_main
from midiforge.errors import MidiforgeError
from midiforge.storage import (
    LocalStore, StorageOptions, StorageUnavailableError, file_entry, map_parallel, open_store, sha256_hex, verify_store, write_manifest,
)
from midiforge.storage.s3 import S3Store, redact

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """An empty store of each kind."""
    if request.param == "local":
        return open_store(str(tmp_path / "out"))
    server = request.getfixturevalue("s3_server")
    return open_store(server.new_bucket() + "/runs/x/", server.options())


def _cli(argv, capsys) -> tuple[int, str, str]:
    code = cli_main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _endpoint_args(store) -> list[str]:
    return ["--endpoint-url", store.endpoint_url] if isinstance(store, S3Store) else []


# -- round trips ---------------------------------------------------------------------------------

def test_round_trip_bytes_list_delete(store):
    store.write_bytes("a.bin", b"alpha")
    store.write_bytes("shards/part-00000.parquet", b"x" * 100)
    store.write_bytes("shards/part-00001.parquet", b"")
    store.write_bytes("shards2/other", b"o")
    assert store.read_bytes("a.bin") == b"alpha"
    assert store.read_bytes("shards/part-00001.parquet") == b""
    assert store.exists("a.bin") and not store.exists("nope.bin")
    assert [(o.path, o.size) for o in store.list()] == [
        ("a.bin", 5), ("shards/part-00000.parquet", 100), ("shards/part-00001.parquet", 0), ("shards2/other", 1)]
    # a prefix names a directory (or a file), never a string prefix of a sibling
    assert [o.path for o in store.list("shards")] == ["shards/part-00000.parquet", "shards/part-00001.parquet"]
    assert [o.path for o in store.list("a.bin")] == ["a.bin"]
    store.write_bytes("a.bin", b"beta")  # overwrite
    assert store.read_bytes("a.bin") == b"beta"
    store.delete("a.bin")
    store.delete("a.bin")  # deleting twice is fine
    assert not store.exists("a.bin")
    with pytest.raises(MidiforgeError, match="a.bin"):
        store.read_bytes("a.bin")
    with pytest.raises(MidiforgeError, match="leaves the store"):
        store.read_bytes("../escape")


def test_put_get_file_and_verified_reads(store, tmp_path):
    src = tmp_path / "src.bin"
    payload = os.urandom(300_000)
    src.write_bytes(payload)
    store.put_file(src, "dir/f.bin")
    dest = tmp_path / "back" / "f.bin"
    store.get_file("dir/f.bin", dest)
    assert dest.read_bytes() == payload
    entry = file_entry("dir/f.bin", payload)
    assert store.read_verified("dir/f.bin", entry) == payload
    store.get_file_verified("dir/f.bin", tmp_path / "v.bin", entry)
    assert (tmp_path / "v.bin").read_bytes() == payload

    bad = dict(entry, sha256=sha256_hex(b"something else"))
    with pytest.raises(MidiforgeError) as exc:
        store.read_verified("dir/f.bin", bad)
    assert store.url("dir/f.bin") in str(exc.value) and "sha256" in str(exc.value)
    with pytest.raises(MidiforgeError, match="dir/f.bin"):
        store.get_file_verified("dir/f.bin", tmp_path / "w.bin", dict(entry, bytes=1))
    assert not (tmp_path / "w.bin").exists(), "a download that fails verification is removed"
    with pytest.raises(MidiforgeError, match="missing.bin"):
        store.get_file("missing.bin", tmp_path / "m.bin")


def test_file_uri_and_plain_path_are_the_same_store(tmp_path):
    plain = open_store(str(tmp_path))
    uri = open_store(f"file://{tmp_path}")
    assert isinstance(uri, LocalStore) and uri.uri == plain.uri
    plain.write_bytes("x/y.txt", b"hi")
    assert uri.read_bytes("x/y.txt") == b"hi"
    assert open_store(f"file://localhost{tmp_path}").read_bytes("x/y.txt") == b"hi"
    with pytest.raises(MidiforgeError, match="local path"):
        open_store("file://otherhost/data")
    with pytest.raises(MidiforgeError, match="unsupported scheme"):
        open_store("gs://bucket/x")


def test_s3_list_follows_pagination(s3_server):
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    name = bucket[len("s3://"):]
    map_parallel(lambda i: client.put_object(Bucket=name, Key=f"p/k{i:03d}", Body=b"." * i), range(53), 8)
    client.put_object(Bucket=name, Key="p/dir/", Body=b"")  # a console-made "directory" marker
    store = open_store(bucket + "/p", s3_server.options())
    store.list_page_size = 10  # S3 pages at 1000 keys; small pages exercise the continuation tokens quickly
    pages = []
    store.client.meta.events.register("after-call.s3.ListObjectsV2", lambda **kw: pages.append(1))
    listed = store.list()
    assert len(pages) == 6
    assert [(o.path, o.size) for o in listed] == [(f"k{i:03d}", i) for i in range(53)]


def test_store_pickles_without_its_client(s3_server):
    store = open_store(s3_server.new_bucket() + "/pk", s3_server.options())
    store.write_bytes("a", b"1")  # builds the client
    blob = pickle.dumps(store)
    assert s3_server.secret_key.encode() not in blob and s3_server.access_key.encode() not in blob
    clone = pickle.loads(blob)
    assert clone._client_obj is None and clone.uri == store.uri and clone.options == store.options
    assert clone.read_bytes("a") == b"1"


# -- multipart and atomicity -------------------------------------------------------------------

def test_s3_multipart_put_get_and_write(s3_server, tmp_path):
    options = s3_server.options(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)
    store = open_store(s3_server.new_bucket() + "/big", options)
    payload = os.urandom(11 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(payload)
    store.put_file(src, "big.bin")
    client = s3_server.client()
    head = client.head_object(Bucket=store.bucket, Key=store.key("big.bin"))
    assert head["ContentLength"] == len(payload)
    assert head["ETag"].strip('"').endswith("-3"), f"expected a 3-part upload, ETag {head['ETag']}"
    store.get_file_verified("big.bin", tmp_path / "back.bin", file_entry("big.bin", payload))
    # write_bytes of a large object goes multipart too
    store.write_bytes("big2.bin", payload[: 6 * MiB])
    head = client.head_object(Bucket=store.bucket, Key=store.key("big2.bin"))
    assert head["ETag"].strip('"').endswith("-2")
    assert store.read_bytes("big2.bin") == payload[: 6 * MiB]


class _BreaksAfter(io.RawIOBase):
    """A source that fails after ``limit`` bytes (a disk error halfway through an upload)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.pos = limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.pos >= self.limit:
            raise OSError("simulated read error in the source")
        n = min(len(buf), self.limit - self.pos)
        buf[:n] = b"z" * n
        self.pos += n
        return n


def test_s3_failed_multipart_upload_leaves_nothing(s3_server):
    options = s3_server.options(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2)
    store = open_store(s3_server.new_bucket() + "/atomic", options)
    with pytest.raises(MidiforgeError) as exc:
        store.upload_fileobj(_BreaksAfter(12 * MiB), "half.bin")
    assert store.url("half.bin") in str(exc.value)
    assert not store.exists("half.bin") and store.list() == []
    uploads = s3_server.client().list_multipart_uploads(Bucket=store.bucket)
    assert not uploads.get("Uploads"), "the failed multipart upload was not aborted"


def test_local_failed_write_leaves_nothing(tmp_path):
    store = LocalStore(tmp_path)
    store.write_bytes("keep.bin", b"old")

    with pytest.raises(TypeError):  # the write fails after the temporary file was opened
        store.write_bytes("keep.bin", "text, not bytes")
    assert store.read_bytes("keep.bin") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.bin"], "no temporary file is left behind"


# -- manifests and verify ------------------------------------------------------------------------

def _write_stage(store) -> dict:
    files = []
    for rel, data in [("shards/part-00000.parquet", os.urandom(2000)), ("shards/part-00001.parquet", os.urandom(3000)),
                      ("tokenizer.json", b'{"kind": "events"}'), ("failures.parquet", b"PAR1")]:
        store.write_bytes(rel, data)
        files.append(file_entry(rel, data))
    manifest = {"stage": "test", "files": files}
    write_manifest(store, manifest)
    return manifest


def test_verify_passes_then_catches_tampered_and_missing(store, capsys):
    _write_stage(store)
    code, out, err = _cli(["verify", store.uri, *_endpoint_args(store)], capsys)
    assert code == 0, out + err
    assert "4 objects listed" in out and "0 missing, 0 mismatched -> OK" in out

    original = store.read_bytes("shards/part-00001.parquet")
    store.write_bytes("shards/part-00001.parquet", bytes(b ^ 1 for b in original[:10]) + original[10:])  # same size
    store.delete("tokenizer.json")
    store.write_bytes("stray.tmp-leftover", b"junk")
    code, out, err = _cli(["verify", store.uri, *_endpoint_args(store)], capsys)
    assert code == 1
    assert "1 missing, 1 mismatched -> FAILED" in out
    assert "missing:    tokenizer.json" in out
    assert "mismatched: shards/part-00001.parquet: sha256" in out
    assert "stray.tmp-leftover" in out  # reported, not failed on

    code, out, _ = _cli(["verify", store.uri, "--json", *_endpoint_args(store)], capsys)
    report = json.loads(out)
    assert code == 1 and report["missing"] == ["tokenizer.json"] and report["mismatched"] == ["shards/part-00001.parquet"]

    store.write_bytes("failures.parquet", b"PAR1PAR1")  # different size
    report = verify_store(store)
    assert "failures.parquet" in report.mismatched and "bytes" in report.reasons["failures.parquet"]


def test_verify_without_manifest_is_a_clear_error(store, capsys):
    store.write_bytes("a", b"1")
    code, out, err = _cli(["verify", store.uri, *_endpoint_args(store)], capsys)
    assert code == 2 and "no manifest" in err and store.url("manifest.json") in err
    store.write_bytes("manifest.json", b'{"files": [{"path": "a"}]}')
    code, out, err = _cli(["verify", store.uri, *_endpoint_args(store)], capsys)
    assert code == 2 and "files[0]" in err


def test_verify_nested_manifest(store, capsys):
    store.write_bytes("model/weights.bin", b"w" * 10)
    write_manifest(store, {"files": [file_entry("weights.bin", b"w" * 10)]}, "model/manifest.json")
    code, out, _ = _cli(["verify", store.uri, "--manifest", "model/manifest.json", *_endpoint_args(store)], capsys)
    assert code == 0, out


# -- credentials and error messages ----------------------------------------------------------------

@pytest.mark.parametrize("uri", [
    "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY@bucket/corpus",
    "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY@bucket/corpus",
    "s3://AKIAIOSFODNN7EXAMPLE@bucket/corpus",
    "s3://bucket/corpus?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE&X-Amz-Signature=wJalrXUtnFEMI",
    "s3://bucket/corpus?secret=wJalrXUtnFEMIK7MDENG",
])
def test_uris_with_credentials_are_refused_without_echo(uri, capsys):
    with pytest.raises(MidiforgeError) as exc:
        open_store(uri)
    message = str(exc.value)
    assert "AKIAIOSFODNN7EXAMPLE" not in message and "wJalrXUtnFEMI" not in message
    assert "refusing" in message and "credential" in message
    code, out, err = _cli(["verify", uri], capsys)
    assert code == 2 and "refusing" in err and "wJalrXUtnFEMI" not in err + out


def test_endpoint_with_credentials_refused():
    with pytest.raises(MidiforgeError) as exc:
        open_store("s3://bucket/x", StorageOptions(endpoint_url="http://minio:SeCrEtVaLuE@127.0.0.1:9000"))
    assert "SeCrEtVaLuE" not in str(exc.value) and "refusing" in str(exc.value)
    with pytest.raises(MidiforgeError, match="http:// or https://"):
        open_store("s3://bucket/x", StorageOptions(endpoint_url="127.0.0.1:9000"))


@pytest.mark.parametrize("bucket", ["ab", "Upper", "under_score", "a" * 64, "-dash", "dots..dots", "192.168.1.1"])
def test_invalid_bucket_names(bucket):
    with pytest.raises(MidiforgeError, match="bucket name"):
        open_store(f"s3://{bucket}/x")


def test_errors_name_the_object_never_the_credentials(s3_server, monkeypatch):
    secrets = (s3_server.secret_key, s3_server.access_key)
    store = open_store(s3_server.new_bucket() + "/e", s3_server.options())
    with pytest.raises(MidiforgeError) as exc:
        store.read_bytes("no/such.bin")
    assert not isinstance(exc.value, StorageUnavailableError), "a missing object concerns that object only"
    assert str(exc.value).startswith(store.url("no/such.bin")) and "no such object" in str(exc.value)
    missing_bucket = open_store("s3://mf-does-not-exist-0/x", s3_server.options())
    with pytest.raises(StorageUnavailableError, match="no such bucket"):
        missing_bucket.write_bytes("a", b"1")
    # a dead endpoint: given up after the retry budget (1 s here)
    from conftest import _free_port

    dead = open_store("s3://bucket-x/y", StorageOptions(endpoint_url=f"http://127.0.0.1:{_free_port()}", max_attempts=2,
                                                       retry_seconds=1))
    with pytest.raises(StorageUnavailableError) as dead_exc:  # the job must stop, not blame one file
        dead.read_bytes("k")
    assert "cannot reach the S3 endpoint" in str(dead_exc.value) and "s3://bucket-x/y/k" in str(dead_exc.value)
    # no credentials at all
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    fresh = open_store(store.uri, s3_server.options())
    with pytest.raises(StorageUnavailableError, match="no usable AWS credentials"):
        fresh.read_bytes("x")
    for message in (str(exc.value), str(dead_exc.value)):
        assert not any(s in message for s in secrets)


def test_redact_scrubs_credential_shaped_text(s3_server):
    text = ("GET /b/k?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20250101&X-Amz-Signature=abc123 "
            "Authorization: AWS4-HMAC-SHA256 Credential=AKIAZZZZZZZZZZZZZZZZ/2025, Signature=deadbeef "
            f"http://user:pw@host/ {s3_server.secret_key}")
    clean = redact(text)
    for leak in ("AKIAIOSFODNN7EXAMPLE", "abc123", "AKIAZZZZZZZZZZZZZZZZ", "deadbeef", "user:pw", s3_server.secret_key):
        assert leak not in clean


# -- options --------------------------------------------------------------------------------------

def test_checksum_when_required_and_env_endpoint(s3_server, monkeypatch, capsys):
    store = open_store(s3_server.new_bucket() + "/cs", StorageOptions(checksum="when_required"))
    assert store.endpoint_url is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    store = open_store(store.uri, StorageOptions(checksum="when_required"))
    assert store.endpoint_url == s3_server.endpoint_url
    _write_stage(store)
    code, out, _ = _cli(["verify", store.uri, "--s3-checksum", "when_required", "--s3-max-attempts", "3"], capsys)
    assert code == 0, out
    with pytest.raises(MidiforgeError, match="checksum"):
        open_store(store.uri, StorageOptions(checksum="always"))
    with pytest.raises(SystemExit):
        cli_main(["verify", store.uri, "--s3-max-attempts", "0"])


# -- outages: every operation retries an unreachable endpoint for up to retry_seconds ------------------

def _wait_down(s3_server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while s3_server.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not s3_server.running, "the outage did not start"


def test_s3_operations_ride_out_an_outage_and_say_so_once(s3_server, capfd):
    # one attempt per request: the waiting is all this layer's (botocore's own retries may bridge a short outage)
    store = open_store(s3_server.new_bucket() + "/o", s3_server.options(retry_seconds=30, max_attempts=1))
    store.write_bytes("a.bin", b"alpha")
    capfd.readouterr()
    outage = s3_server.outage(3.0)
    try:
        _wait_down(s3_server)
        started = time.monotonic()
        assert store.read_bytes("a.bin") == b"alpha"   # waits for the endpoint, then reads
        ended = time.monotonic()
        store.write_bytes("b.bin", b"beta")
        assert [o.path for o in store.list()] == ["a.bin", "b.bin"]
    finally:
        outage.join(timeout=60)
    assert s3_server.running
    assert started < outage.restarted_at < ended, "the read did not wait through the outage"
    err = capfd.readouterr().err
    waiting = [line for line in err.splitlines() if "retrying for up to 30 s" in line]
    assert len(waiting) == 1, err  # one line per waiting period, not one per retry
    assert waiting[0].startswith(f"s3: endpoint {s3_server.endpoint_url} unreachable") and store.url("a.bin") in waiting[0]
    assert "answers again" in err
    assert s3_server.secret_key not in err and s3_server.access_key not in err


def test_s3_budget_shorter_than_the_outage_fails_clearly_naming_the_object(s3_server, capfd):
    store = open_store(s3_server.new_bucket() + "/o", s3_server.options(retry_seconds=1.5, max_attempts=2))
    store.write_bytes("a.bin", b"alpha")
    outage = s3_server.outage(6.0)
    try:
        _wait_down(s3_server)
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError) as exc:
            store.read_bytes("a.bin")
        took = time.monotonic() - started
    finally:
        outage.join(timeout=60)
    message = str(exc.value)
    assert "\n" not in message and message.startswith(store.url("a.bin") + ": read failed: cannot reach the S3 endpoint")
    assert "after retrying for 1.5 s" in message, message
    assert 1.5 <= took, took  # it did wait its budget (an upper bound would be a timing assert)
    assert "retrying for up to 1.5 s" in capfd.readouterr().err
    assert store.read_bytes("a.bin") == b"alpha"  # the endpoint is back: the same store works again


def test_s3_multipart_upload_across_an_outage_is_all_or_nothing(s3_server, tmp_path):
    """A multipart upload cut by an outage starts over: the object appears once, whole; with a budget
    shorter than the outage it never appears."""
    options = s3_server.options(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=1,
                                retry_seconds=30, max_attempts=1)
    store = open_store(s3_server.new_bucket() + "/mp", options)
    payload = os.urandom(12 * MiB)
    client = s3_server.client()
    # the outage starts after CreateMultipartUpload and one part
    outage = s3_server.outage(3.0, after_requests=2)
    try:
        store.write_bytes("big.bin", payload)
    finally:
        outage.join(timeout=60)
    assert outage.stopped_at is not None and s3_server.running
    head = client.head_object(Bucket=store.bucket, Key=store.key("big.bin"))
    assert head["ContentLength"] == len(payload) and head["ETag"].strip('"').endswith("-3")
    assert store.read_bytes("big.bin") == payload
    # the same from a file object (rewound for the new upload), then a download across an outage
    outage = s3_server.outage(3.0, after_requests=2)
    try:
        store.upload_fileobj(io.BytesIO(payload[::-1]), "rev.bin")
    finally:
        outage.join(timeout=60)
    assert store.read_bytes("rev.bin") == payload[::-1]
    outage = s3_server.outage(3.0, after_requests=1)
    try:
        store.get_file_verified("rev.bin", tmp_path / "rev.bin", file_entry("rev.bin", payload[::-1]))
    finally:
        outage.join(timeout=60)

    short = open_store(store.uri, s3_server.options(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB,
                                                    max_concurrency=1, retry_seconds=1, max_attempts=2))
    outage = s3_server.outage(6.0, after_requests=2)
    try:
        with pytest.raises(StorageUnavailableError) as exc:
            short.write_bytes("never.bin", payload)
    finally:
        outage.join(timeout=60)
    assert str(exc.value).startswith(short.url("never.bin") + ": write failed: cannot reach the S3 endpoint"), exc.value
    assert not short.exists("never.bin"), "half an upload became visible"
    assert [o.path for o in short.list()] == ["big.bin", "rev.bin"]


def test_retry_seconds_flag_and_environment(monkeypatch):
    import argparse

    from midiforge.storage.cli_options import add_storage_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_storage_arguments(parser)
    assert options_from_args(parser.parse_args([])).retry_seconds == 120
    monkeypatch.setenv("MIDIFORGE_S3_RETRY_SECONDS", "7.5")
    assert options_from_args(parser.parse_args([])).retry_seconds == 7.5
    assert options_from_args(parser.parse_args(["--s3-retry-seconds", "0"])).retry_seconds == 0
    monkeypatch.setenv("MIDIFORGE_S3_RETRY_SECONDS", "soon")
    with pytest.raises(MidiforgeError, match="MIDIFORGE_S3_RETRY_SECONDS"):
        options_from_args(parser.parse_args([]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--s3-retry-seconds", "-1"])
    with pytest.raises(MidiforgeError, match="retry seconds"):
        open_store("s3://bucket-x/y", StorageOptions(retry_seconds=-1))

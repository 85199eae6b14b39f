"""``s3://bucket/prefix`` stores: AWS S3 and S3-compatible servers (MinIO, Ceph RGW, R2, ...).

* Credentials come only from boto3's standard chain (environment, ``AWS_PROFILE`` and
  ``~/.aws``, container/instance roles).  URIs and endpoint URLs that embed secrets are
  refused, and every error that leaves this module is a :class:`MidiforgeError` naming the
  object and the reason, scrubbed of anything that looks like a key, secret, token or
  signature.
* The endpoint is ``StorageOptions.endpoint_url``, else ``AWS_ENDPOINT_URL_S3`` /
  ``AWS_ENDPOINT_URL``, else AWS itself.
* botocore's ``standard`` retry mode with ``StorageOptions.max_attempts`` per request (it also
  handles throttling); around that, every store operation is retried while the endpoint is
  unreachable, cuts connections or answers 5xx, with exponential backoff and jitter, for up to
  ``StorageOptions.retry_seconds`` (``--s3-retry-seconds``, default 120 s): a short outage costs
  a wait, not a multi-hour job.  One line on stderr says when a process starts waiting
  (``s3: endpoint ... unreachable ..., retrying for up to N s ...``) and one when the endpoint
  answers again.  The boto3 1.36+ default request checksums (which some S3-compatible servers
  reject) can be switched to ``when_required`` with ``StorageOptions.checksum``.
* Large objects go through boto3's managed transfers (multipart, parallel parts).  An S3
  object becomes visible only when its PUT or CompleteMultipartUpload succeeds, so writes
  are all-or-nothing; failed multipart uploads are aborted, and a retried upload starts over
  (from the start of the data) as a new upload.
* The boto3 client is built lazily, once per process, and is never pickled: a store
  travels to Ray workers as its URI and options only.
"""
from __future__ import annotations

import io
import ipaddress
import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from midiforge.errors import MidiforgeError
from midiforge.storage.s3_errors import (
    CREDENTIALS_HELP,
    MAX_BACKOFF,
    Waiting,
    code_status,
    jitter,
    note_recovered,
    note_waiting,
    redact,
    stop_waiting,
    transient,
    translate,
)
from midiforge.storage.store import ObjectInfo, StorageOptions, VerifiedReads, check_rel

CHECKSUM_MODES = ("when_supported", "when_required")

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SAFE_TEXT_RE = re.compile(r"^[A-Za-z0-9._-]*$")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key prefix ending in '/' or empty) for ``s3://bucket[/prefix]``.

    Refuses URIs that embed credentials or carry a query string, without echoing them.
    """
    uri = str(uri)
    if not uri.startswith("s3://"):
        raise MidiforgeError(f"{uri.split(':', 1)[0]}:...: not an s3:// URI")
    rest = uri[len("s3://"):]
    authority = rest.split("/", 1)[0]
    if "@" in authority or ("@" in rest and ":" in rest.split("@", 1)[0]):
        shown = "s3://<credentials>@" + rest.rsplit("@", 1)[1]
        raise MidiforgeError(
            f"{redact(shown)}: refusing an s3:// URI that embeds credentials (user:secret@bucket); "
            f"{CREDENTIALS_HELP}. The endpoint of an S3-compatible store goes in --endpoint-url "
            "or AWS_ENDPOINT_URL."
        )
    parts = urlsplit(uri)
    if parts.query or parts.fragment or "?" in uri or "#" in uri:
        shown = redact(uri.split("?", 1)[0].split("#", 1)[0])
        raise MidiforgeError(
            f"{shown}: refusing an s3:// URI with a query string or fragment (it may carry "
            f"credentials or a signature, and object keys with '?' or '#' are not supported); {CREDENTIALS_HELP}"
        )
    bucket = parts.netloc
    _check_bucket(bucket)
    prefix = parts.path.lstrip("/")
    if prefix:
        if any(p in (".", "..") for p in prefix.rstrip("/").split("/")):
            raise MidiforgeError(f"s3://{bucket}/{prefix}: '.' and '..' are not allowed in an s3:// prefix")
        if "//" in prefix:
            raise MidiforgeError(f"s3://{bucket}/{prefix}: empty path segment ('//') in the prefix")
        prefix = prefix.rstrip("/") + "/"
    return bucket, prefix


def _check_bucket(bucket: str) -> None:
    shown = bucket if _SAFE_TEXT_RE.match(bucket) else "<bucket>"
    why = None
    if not bucket:
        why = "the bucket name is missing (s3://bucket/prefix)"
    elif not _BUCKET_RE.match(bucket):
        why = ("not a valid S3 bucket name: 3-63 characters, lowercase letters, digits, '.' and '-', "
               "starting and ending with a letter or digit")
    elif ".." in bucket or ".-" in bucket or "-." in bucket:
        why = "not a valid S3 bucket name: no '..', '.-' or '-.'"
    elif bucket.startswith("xn--") or bucket.endswith(("-s3alias", "--ol-s3")):
        why = "not a valid S3 bucket name: reserved prefix or suffix"
    else:
        try:
            ipaddress.IPv4Address(bucket)
            why = "not a valid S3 bucket name: looks like an IP address"
        except ValueError:
            pass
    if why:
        raise MidiforgeError(f"s3://{shown}: {why}")


def resolve_endpoint(options: StorageOptions) -> str | None:
    """The endpoint URL to use (None means AWS), validated: http(s), no credentials, no query."""
    endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return None
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        shown = parts.scheme or "<no scheme>"
        raise MidiforgeError(
            f"endpoint URL ({shown}://...): must be http:// or https:// with a host, e.g. http://127.0.0.1:9000"
        )
    if "@" in parts.netloc:
        raise MidiforgeError(
            f"endpoint URL {parts.scheme}://<credentials>@{parts.hostname}: refusing an endpoint URL that embeds "
            f"credentials; {CREDENTIALS_HELP}"
        )
    if parts.query or parts.fragment:
        raise MidiforgeError(
            f"endpoint URL {parts.scheme}://{parts.netloc}{parts.path}: refusing an endpoint URL with a query string "
            "(it may carry credentials)"
        )
    return endpoint


def check_options(options: StorageOptions) -> None:
    if options.checksum not in CHECKSUM_MODES:
        raise MidiforgeError(f"S3 checksum mode {options.checksum!r}: use one of {', '.join(CHECKSUM_MODES)}")
    if int(options.max_attempts) < 1:
        raise MidiforgeError(f"S3 max attempts {options.max_attempts}: must be at least 1")
    try:
        retry_seconds = float(options.retry_seconds)
    except (TypeError, ValueError):
        retry_seconds = float("nan")
    if not retry_seconds >= 0 or retry_seconds == float("inf"):
        raise MidiforgeError(f"S3 retry seconds {options.retry_seconds!r}: must be a number of seconds >= 0")
    if int(options.max_concurrency) < 1:
        raise MidiforgeError(f"S3 max concurrency {options.max_concurrency}: must be at least 1")


class S3Store(VerifiedReads):
    """A key prefix in an S3 bucket; paths are relative keys below it."""

    list_page_size = 1000  # keys per ListObjectsV2 page (S3's maximum)
    transfers = 8  # requests at once: each mostly waits on the network

    def __init__(self, where: str, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions()
        check_options(self.options)
        self.bucket, self.prefix = parse_s3_uri(where)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = resolve_endpoint(self.options)
        self._client_obj = None
        self._client_pid: int | None = None
        self._secrets: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    def __reduce__(self):  # travels as URI and options; each process builds its own client
        return (S3Store, (self.uri, self.options))

    # -- addressing ---------------------------------------------------------------------
    def key(self, rel: str) -> str:
        return self.prefix + check_rel(rel)

    def url(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self.key(rel)}"

    # -- the client -----------------------------------------------------------------------
    @property
    def client(self):
        """The boto3 S3 client of this process (built on first use; thread-safe)."""
        pid = os.getpid()
        if self._client_obj is None or self._client_pid != pid:
            with self._lock:
                if self._client_obj is None or self._client_pid != pid:
                    self._client_obj = self._make_client()
                    self._client_pid = pid
        return self._client_obj

    def _make_client(self):
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"mode": "standard", "max_attempts": int(self.options.max_attempts)},
            request_checksum_calculation=self.options.checksum,
            response_checksum_validation=self.options.checksum,
            max_pool_connections=max(10, int(self.options.max_concurrency) * 2),
            connect_timeout=10,
            read_timeout=60,
        )
        session = boto3.session.Session()
        try:
            creds = session.get_credentials()
            if creds is not None:
                frozen = creds.get_frozen_credentials()
                self._secrets = tuple(v for v in (frozen.access_key, frozen.secret_key, frozen.token) if v)
        except Exception as exc:  # noqa: BLE001 - a broken profile/role: say so without the details' secrets
            raise MidiforgeError(f"{self.uri}: cannot load AWS credentials ({redact(str(exc))})") from None
        return session.client("s3", endpoint_url=self.endpoint_url, config=config)

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=int(self.options.multipart_threshold),
            multipart_chunksize=int(self.options.multipart_chunksize),
            max_concurrency=int(self.options.max_concurrency),
            num_download_attempts=max(1, int(self.options.max_attempts)),
            preferred_transfer_client="classic",
        )

    # -- errors and retries ---------------------------------------------------------------
    def _retrying(self, what: str, rel: str, fn, retry: bool = True):
        """``fn()``, tried again while the endpoint is unreachable or answers 5xx, with exponential backoff
        and jitter, for up to ``options.retry_seconds`` from the start of the first failing call (a call in
        flight ends its own botocore retries before the budget is checked); any failure that leaves is a
        MidiforgeError naming the object (:class:`StorageUnavailableError` when it concerns the whole job)."""
        budget = float(self.options.retry_seconds) if retry else 0.0
        deadline = None
        delay = 0.5
        while True:
            started = time.monotonic()
            try:
                result = fn()
            except MidiforgeError:
                raise
            except Exception as exc:
                if budget > 0 and transient(exc):
                    now = time.monotonic()
                    # the budget counts from the start of the first failing call: botocore's own retries
                    # (max_attempts, with backoff) inside that call are part of the wait
                    deadline = deadline if deadline is not None else started + budget
                    if now < deadline:
                        note_waiting(self.endpoint_url, what, self.url(rel), exc, budget, self._secrets)
                        time.sleep(min(deadline - now, jitter.uniform(delay / 2, delay)))
                        delay = min(2 * delay, MAX_BACKOFF)
                        continue
                    stop_waiting()  # gave up: a later outage is announced again
                translated = self._translate(exc, what, rel, waited=budget if deadline is not None else 0.0)
                if translated is None:
                    raise
                raise translated from None
            if Waiting.since is not None:
                note_recovered(self.endpoint_url)
            return result

    def _translate(self, exc: BaseException, what: str, rel: str, waited: float = 0.0) -> MidiforgeError | None:
        """The MidiforgeError naming the object for a boto/OS failure (None: not a storage failure)."""
        return translate(exc, what, self.url(rel), bucket=self.bucket, endpoint_url=self.endpoint_url,
                         max_attempts=self.options.max_attempts, secrets=self._secrets, waited=waited)

    # -- the Store protocol -----------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        key = self.key(rel)

        def read() -> bytes:  # a body that breaks off (not retried by botocore) is read again from the start
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

        return self._retrying("read", rel, read)

    def write_bytes(self, rel: str, data: bytes) -> None:
        data = bytes(data)
        key = self.key(rel)

        def write() -> None:
            if len(data) >= int(self.options.multipart_threshold):
                self.client.upload_fileobj(io.BytesIO(data), self.bucket, key, Config=self._transfer_config())
            else:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

        self._retrying("write", rel, write)

    def upload_fileobj(self, fileobj, rel: str) -> None:
        """Upload a readable binary file object (multipart when large); all-or-nothing.  A seekable one is
        uploaded again from where it started when the endpoint goes away; another one is not retried."""
        key = self.key(rel)
        start = fileobj.tell() if getattr(fileobj, "seekable", lambda: False)() else None

        def upload() -> None:
            if start is not None:
                fileobj.seek(start)
            self.client.upload_fileobj(fileobj, self.bucket, key, Config=self._transfer_config())

        self._retrying("upload", rel, upload, retry=start is not None)

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        key = self.key(rel)

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=key)
                return True
            except ClientError as exc:
                if code_status(exc)[0] in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return self._retrying("exists", rel, head)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        rel_prefix = check_rel(prefix) if prefix else ""

        def listing() -> list[ObjectInfo]:  # a listing cut short is started again
            out: list[ObjectInfo] = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + rel_prefix,
                                           PaginationConfig={"PageSize": self.list_page_size}):
                for obj in page.get("Contents", []) or []:
                    rel = obj["Key"][len(self.prefix):]
                    if not rel or rel.endswith("/"):  # "directory" markers made by consoles
                        continue
                    if rel_prefix and not rel_prefix.endswith("/") and rel != rel_prefix \
                            and not rel.startswith(rel_prefix + "/"):
                        continue  # same semantics as LocalStore: a prefix names a file or a directory
                    out.append(ObjectInfo(rel, int(obj["Size"])))
            return out

        return sorted(self._retrying("list", rel_prefix, listing), key=lambda o: o.path)

    def delete(self, rel: str) -> None:
        key = self.key(rel)
        self._retrying("delete", rel, lambda: self.client.delete_object(Bucket=self.bucket, Key=key))

    def put_file(self, local_path: str | os.PathLike, rel: str) -> None:
        if not Path(local_path).is_file():
            raise MidiforgeError(f"{local_path}: no such file to upload to {self.url(rel)}")
        key = self.key(rel)
        self._retrying("upload", rel, lambda: self.client.upload_file(
            str(local_path), self.bucket, key, Config=self._transfer_config()))

    def get_file(self, rel: str, local_path: str | os.PathLike) -> None:
        # s3transfer downloads into a temporary name and renames it: no half-written file.
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        key = self.key(rel)
        self._retrying("download", rel, lambda: self.client.download_file(
            self.bucket, key, str(local_path), Config=self._transfer_config()))

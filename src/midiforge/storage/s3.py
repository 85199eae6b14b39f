"""``s3://bucket/prefix`` stores: AWS S3 and S3-compatible servers (MinIO, Ceph RGW, R2, ...).

* Credentials come only from boto3's standard chain (environment, ``AWS_PROFILE`` and
  ``~/.aws``, container/instance roles).  URIs and endpoint URLs that embed secrets are
  refused, and every error that leaves this module is a :class:`MidiforgeError` naming the
  object and the reason, scrubbed of anything that looks like a key, secret, token or
  signature.
* The endpoint is ``StorageOptions.endpoint_url``, else ``AWS_ENDPOINT_URL_S3`` /
  ``AWS_ENDPOINT_URL``, else AWS itself.
* botocore's ``standard`` retry mode with ``StorageOptions.max_attempts``; the boto3 1.36+
  default request checksums (which some S3-compatible servers reject) can be switched to
  ``when_required`` with ``StorageOptions.checksum``.
* Large objects go through boto3's managed transfers (multipart, parallel parts).  An S3
  object becomes visible only when its PUT or CompleteMultipartUpload succeeds, so writes
  are all-or-nothing; failed multipart uploads are aborted.
* The boto3 client is built lazily, once per process, and is never pickled: a store
  travels to Ray workers as its URI and options only.
"""
from __future__ import annotations

import io
import ipaddress
import os
import random
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from midiforge.errors import MidiforgeError
from midiforge.storage.store import ObjectInfo, StorageOptions, StorageUnavailableError, VerifiedReads, check_rel

CHECKSUM_MODES = ("when_supported", "when_required")

_CREDENTIALS_HELP = (
    "use the standard AWS credential chain instead: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
    "(and AWS_SESSION_TOKEN), AWS_PROFILE with ~/.aws/credentials, or an instance/container role"
)
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SAFE_TEXT_RE = re.compile(r"^[A-Za-z0-9._-]*$")
# Things that must never reach a log line or an error message, whatever botocore put there.
_SECRET_PATTERNS = [
    (re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA|ANPA|ANVA|AGPA|AIPA)[A-Z0-9]{12,}\b"), "<access-key-id>"),
    (re.compile(r"(X-Amz-(?:Credential|Signature|Security-Token)=)[^&\s\"'<>]+", re.I), r"\1<redacted>"),
    (re.compile(r"(Credential=)[^,\s\"'<>]+"), r"\1<redacted>"),
    (re.compile(r"(Signature=)[0-9a-fA-F]+"), r"\1<redacted>"),
    (re.compile(r"(AWSAccessKeyId=)[^&\s\"'<>]+"), r"\1<redacted>"),
    (re.compile(r"//[^/@\s]*:[^/@\s]*@"), "//<credentials>@"),
]
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` with credential values and credential-shaped strings replaced."""
    values = [v for v in secrets if v and len(v) >= 4]
    values += [os.environ[k] for k in _SECRET_ENV if len(os.environ.get(k, "")) >= 4]
    for value in sorted(set(values), key=len, reverse=True):
        text = text.replace(value, "<redacted>")
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


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
            f"{_CREDENTIALS_HELP}. The endpoint of an S3-compatible store goes in --endpoint-url "
            "or AWS_ENDPOINT_URL."
        )
    parts = urlsplit(uri)
    if parts.query or parts.fragment or "?" in uri or "#" in uri:
        shown = redact(uri.split("?", 1)[0].split("#", 1)[0])
        raise MidiforgeError(
            f"{shown}: refusing an s3:// URI with a query string or fragment (it may carry "
            f"credentials or a signature, and object keys with '?' or '#' are not supported); {_CREDENTIALS_HELP}"
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
    elif bucket.startswith("xn--") or bucket.endswith("-s3alias") or bucket.endswith("--ol-s3"):
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
            f"credentials; {_CREDENTIALS_HELP}"
        )
    if parts.query or parts.fragment:
        raise MidiforgeError(
            f"endpoint URL {parts.scheme}://{parts.netloc}{parts.path}: refusing an endpoint URL with a query string "
            "(it may carry credentials)"
        )
    return endpoint


_JOB_WIDE_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidClientTokenId",
    "NoSuchBucket", "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
    "InternalError", "500", "502", "503", "504",
}


def _job_wide(exc: BaseException) -> bool:
    """True for failures of the service or the credentials (after retries), not of one object."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        ConnectionError as BotoConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ResponseStreamingError,
    )

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
        status = (exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0) \
            if isinstance(exc.response, dict) else 0
        return str(err.get("Code", "")) in _JOB_WIDE_CODES or (isinstance(status, int) and status >= 500)
    if isinstance(exc, (BotoConnectionError, NoCredentialsError, PartialCredentialsError, ResponseStreamingError,
                        RetriesExceededError)):
        return True
    if isinstance(exc, S3UploadFailedError):  # boto3 flattens the cause into the message
        return any(f"({code})" in str(exc) for code in _JOB_WIDE_CODES) or "Could not connect" in str(exc)
    return False


def check_options(options: StorageOptions) -> None:
    if options.checksum not in CHECKSUM_MODES:
        raise MidiforgeError(f"S3 checksum mode {options.checksum!r}: use one of {', '.join(CHECKSUM_MODES)}")
    if int(options.max_attempts) < 1:
        raise MidiforgeError(f"S3 max attempts {options.max_attempts}: must be at least 1")
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
        except Exception as exc:  # a broken profile/role: say so without the details' secrets
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

    # -- errors ---------------------------------------------------------------------------
    @contextmanager
    def _errors(self, what: str, rel: str) -> Iterator[None]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except MidiforgeError:
            raise
        except ClientError as exc:
            cls = StorageUnavailableError if _job_wide(exc) else MidiforgeError
            raise cls(f"{self.url(rel)}: {what} failed: {self._client_reason(exc)}") from None
        except (BotoCoreError, Boto3Error, OSError) as exc:
            cls = StorageUnavailableError if _job_wide(exc) else MidiforgeError
            raise cls(f"{self.url(rel)}: {what} failed: {self._other_reason(exc)}") from None

    def _client_reason(self, exc) -> str:
        err = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
        meta = exc.response.get("ResponseMetadata", {}) if isinstance(exc.response, dict) else {}
        code = str(err.get("Code", "") or meta.get("HTTPStatusCode", ""))
        message = str(err.get("Message", "") or "")
        retries = meta.get("RetryAttempts") or 0
        if code in ("NoSuchKey", "404", "NotFound"):
            reason = "no such object"
        elif code == "NoSuchBucket":
            reason = f"no such bucket {self.bucket!r}"
        elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidClientTokenId"):
            reason = f"the S3 server rejected the credentials ({code})"
        elif code in ("AccessDenied", "403", "Forbidden"):
            reason = "access denied (check the credentials' permissions on this bucket and prefix)"
        else:
            reason = f"{code}: {message}" if message else code or type(exc).__name__
        if retries:
            reason += f" (after {retries} retries)"
        return redact(reason, self._secrets)

    def _other_reason(self, exc) -> str:
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            reason = f"no usable AWS credentials ({type(exc).__name__}); {_CREDENTIALS_HELP}"
        elif isinstance(exc, BotoConnectionError):
            where = self.endpoint_url or "AWS S3"
            reason = (f"cannot reach the S3 endpoint {where} after {self.options.max_attempts} attempts "
                      f"({type(exc).__name__}); is the server up and the endpoint right?")
        else:
            detail = str(exc)
            # boto3 wraps ClientErrors of managed transfers into S3UploadFailedError & co.
            if "An error occurred (" in detail:
                detail = detail[detail.index("An error occurred ("):]
            reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        return redact(reason, self._secrets)

    # -- the Store protocol -----------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        from botocore.exceptions import (
            ConnectionClosedError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        key = self.key(rel)
        attempts = max(1, int(self.options.max_attempts))
        for attempt in range(1, attempts + 1):
            with self._errors("read", rel):
                response = self.client.get_object(Bucket=self.bucket, Key=key)
                try:
                    return response["Body"].read()
                except (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError):
                    # the request succeeded but the body broke off: botocore does not retry that
                    if attempt == attempts:
                        raise
                time.sleep(min(20.0, random.random() * 2 ** attempt))
        raise AssertionError("unreachable")

    def write_bytes(self, rel: str, data: bytes) -> None:
        data = bytes(data)
        with self._errors("write", rel):
            if len(data) >= int(self.options.multipart_threshold):
                self.client.upload_fileobj(io.BytesIO(data), self.bucket, self.key(rel), Config=self._transfer_config())
            else:
                self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data)

    def upload_fileobj(self, fileobj, rel: str) -> None:
        """Upload a readable binary file object (multipart when large); all-or-nothing."""
        with self._errors("upload", rel):
            self.client.upload_fileobj(fileobj, self.bucket, self.key(rel), Config=self._transfer_config())

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors("exists", rel):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self.key(rel))
                return True
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        rel_prefix = check_rel(prefix) if prefix else ""
        out: list[ObjectInfo] = []
        with self._errors("list", rel_prefix):
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
        return sorted(out, key=lambda o: o.path)

    def delete(self, rel: str) -> None:
        with self._errors("delete", rel):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(rel))

    def put_file(self, local_path: str | os.PathLike, rel: str) -> None:
        if not Path(local_path).is_file():
            raise MidiforgeError(f"{local_path}: no such file to upload to {self.url(rel)}")
        with self._errors("upload", rel):
            self.client.upload_file(str(local_path), self.bucket, self.key(rel), Config=self._transfer_config())

    def get_file(self, rel: str, local_path: str | os.PathLike) -> None:
        # s3transfer downloads into a temporary name and renames it: no half-written file.
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        with self._errors("download", rel):
            self.client.download_file(self.bucket, self.key(rel), str(local_path), Config=self._transfer_config())

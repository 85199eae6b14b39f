"""What :mod:`midiforge.storage.s3` makes of a failure: whether waiting can cure it, whether it
concerns the whole job, the :class:`MidiforgeError` that names the object and the reason (scrubbed
of credentials by :func:`redact`), and the one line on stderr when a process starts (and stops)
waiting for the endpoint.  The retry loop itself is ``S3Store._retrying``.
"""
from __future__ import annotations

import os
import random
import re
import sys
import threading
import time

from midiforge.errors import MidiforgeError
from midiforge.storage.store import StorageUnavailableError

CREDENTIALS_HELP = (
    "use the standard AWS credential chain instead: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
    "(and AWS_SESSION_TOKEN), AWS_PROFILE with ~/.aws/credentials, or an instance/container role"
)
# Things that must never reach a log line or an error message, whatever botocore put there.
_SECRET_PATTERNS = [
    (re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA|ANPA|ANVA|AGPA|AIPA)[A-Z0-9]{12,}\b"), "<access-key-id>"),
    (re.compile(r"(X-Amz-(?:Credential|Signature|Security-Token)=)[^&\s\"'<>]+", re.IGNORECASE), r"\1<redacted>"),
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


# -------------------------------------------------------------------------------------------
# what a failure is
# -------------------------------------------------------------------------------------------
_JOB_WIDE_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidClientTokenId",
    "NoSuchBucket", "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
    "InternalError", "500", "502", "503", "504",
}


_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable", "InternalError",
    "500", "502", "503", "504",
}
_TRANSIENT_TEXT = ("Could not connect", "Connection was closed", "Read timeout", "Connect timeout",
                   "Connection aborted", "Connection reset")
#: the longest single wait between two tries of an operation (the backoff doubles up to this)
MAX_BACKOFF = 8.0
jitter = random.Random()  # its own generator: never touches the global random state of a stage


def code_status(exc) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError ("" and 0 where it has none)."""
    response = exc.response if isinstance(getattr(exc, "response", None), dict) else {}
    status = (response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0)
    return str((response.get("Error", {}) or {}).get("Code", "")), status if isinstance(status, int) else 0


def transient(exc: BaseException) -> bool:
    """True for a failure that waiting can cure: the endpoint unreachable, a connection cut or timed
    out, a 5xx or throttling answer (after botocore's own retries)."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        IncompleteReadError,
        SSLError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        code, status = code_status(exc)
        return code in _TRANSIENT_CODES or status >= 500
    if isinstance(exc, SSLError):  # a certificate or TLS mismatch: waiting does not cure it
        return False
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, RetriesExceededError,
                        ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, S3UploadFailedError):  # boto3 flattens the cause into the message
        text = str(exc)
        return any(f"({code})" in text for code in _TRANSIENT_CODES) or any(t in text for t in _TRANSIENT_TEXT)
    return False


def job_wide(exc: BaseException) -> bool:
    """True for failures of the service or the credentials (after retries), not of one object."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        NoCredentialsError,
        PartialCredentialsError,
        ResponseStreamingError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

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
    return isinstance(exc, (ConnectionError, TimeoutError))  # a socket error that got past botocore


# -------------------------------------------------------------------------------------------
# waiting for the endpoint (one line when a process starts, one when it answers again)
# -------------------------------------------------------------------------------------------
class Waiting:
    """Process-wide: when this process started waiting for the endpoint (None: it is not waiting)."""

    lock = threading.Lock()
    since: float | None = None


def note_waiting(endpoint_url: str | None, what: str, url: str, exc: BaseException, budget: float,
                 secrets: tuple[str, ...] = ()) -> None:
    """One line on stderr when this process starts waiting (not one per operation or retry)."""
    with Waiting.lock:
        if Waiting.since is not None:
            return
        Waiting.since = time.monotonic()
    from botocore.exceptions import ClientError

    where = endpoint_url or "AWS S3"
    if isinstance(exc, ClientError):
        code, status = code_status(exc)
        state = f"unavailable ({code or status})"
    else:
        state = f"unreachable ({type(exc).__name__})"
    line = (f"s3: endpoint {where} {state} on {what} {url}, retrying for up to {budget:g} s "
            f"(--s3-retry-seconds) ...")
    print(redact(line, secrets), file=sys.stderr, flush=True)


def note_recovered(endpoint_url: str | None) -> None:
    with Waiting.lock:
        since, Waiting.since = Waiting.since, None
    if since is not None:
        where = endpoint_url or "AWS S3"
        print(f"s3: endpoint {where} answers again (waited {time.monotonic() - since:.0f} s)",
              file=sys.stderr, flush=True)


def stop_waiting() -> None:
    """Gave up: a later outage is announced again."""
    with Waiting.lock:
        Waiting.since = None


# -------------------------------------------------------------------------------------------
# the error that leaves the store
# -------------------------------------------------------------------------------------------
def translate(exc: BaseException, what: str, url: str, *, bucket: str, endpoint_url: str | None,
              max_attempts: int, secrets: tuple[str, ...] = (), waited: float = 0.0) -> MidiforgeError | None:
    """The MidiforgeError naming the object ``url`` for a boto/OS failure (None: not a storage failure)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    cls = StorageUnavailableError if job_wide(exc) else MidiforgeError
    if isinstance(exc, ClientError):
        reason = client_reason(exc, bucket, secrets)
    elif isinstance(exc, (BotoCoreError, Boto3Error, OSError)):
        reason = other_reason(exc, endpoint_url, max_attempts, secrets, waited)
    else:
        return None
    if waited and isinstance(exc, ClientError):
        reason += f" (still failing after retrying for {waited:g} s; --s3-retry-seconds waits longer)"
    return cls(f"{url}: {what} failed: {reason}")


def client_reason(exc, bucket: str, secrets: tuple[str, ...] = ()) -> str:
    """Why a request was answered with an error (the S3 error code in words)."""
    err = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
    meta = exc.response.get("ResponseMetadata", {}) if isinstance(exc.response, dict) else {}
    code = str(err.get("Code", "") or meta.get("HTTPStatusCode", ""))
    message = str(err.get("Message", "") or "")
    retries = meta.get("RetryAttempts") or 0
    if code in ("NoSuchKey", "404", "NotFound"):
        reason = "no such object"
    elif code == "NoSuchBucket":
        reason = f"no such bucket {bucket!r}"
    elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidClientTokenId"):
        reason = f"the S3 server rejected the credentials ({code})"
    elif code in ("AccessDenied", "403", "Forbidden"):
        reason = "access denied (check the credentials' permissions on this bucket and prefix)"
    else:
        reason = f"{code}: {message}" if message else code or type(exc).__name__
    if retries:
        reason += f" (after {retries} retries)"
    return redact(reason, secrets)


def other_reason(exc, endpoint_url: str | None, max_attempts: int, secrets: tuple[str, ...] = (),
                 waited: float = 0.0) -> str:
    """Why a request got no answer, or failed before or after one (credentials, connection, transfer)."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import (
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        reason = f"no usable AWS credentials ({type(exc).__name__}); {CREDENTIALS_HELP}"
    elif isinstance(exc, BotoConnectionError):
        where = endpoint_url or "AWS S3"
        tried = (f"after retrying for {waited:g} s (--s3-retry-seconds)" if waited
                 else f"after {max_attempts} attempts")
        reason = (f"cannot reach the S3 endpoint {where} {tried} ({type(exc).__name__}); "
                  "is the server up and the endpoint right?")
    else:
        detail = str(exc)
        # boto3 wraps ClientErrors of managed transfers into S3UploadFailedError & co.
        if "An error occurred (" in detail:
            detail = detail[detail.index("An error occurred ("):]
        reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        if waited:
            reason += f" (still failing after retrying for {waited:g} s; --s3-retry-seconds waits longer)"
    return redact(reason, secrets)

"""The object-storage flags every stage shares.

In a stage module::

    from midiforge.storage.cli_options import add_storage_arguments, options_from_args

    def add_arguments(parser):
        ...
        add_storage_arguments(parser)

    def main(args):
        options = options_from_args(args)
        src = open_store(args.src, options)
"""
from __future__ import annotations

import argparse
import os

from midiforge.errors import MidiforgeError
from midiforge.storage.store import StorageOptions

_DEFAULTS = StorageOptions()
#: environment override of the default --s3-retry-seconds
RETRY_ENV = "MIDIFORGE_S3_RETRY_SECONDS"


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--endpoint-url``, ``--s3-max-attempts``, ``--s3-retry-seconds`` and ``--s3-checksum`` (idempotent)."""
    if any("--endpoint-url" in a.option_strings for a in parser._actions):
        return
    group = parser.add_argument_group(
        "object storage",
        "Paths may be local, file:// or s3://bucket/prefix. Credentials come from the standard AWS chain "
        "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance role), never from the URI.",
    )
    group.add_argument(
        "--endpoint-url", default=None, metavar="URL",
        help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 for MinIO "
             "(default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS)",
    )
    group.add_argument(
        "--s3-max-attempts", type=positive_int, default=None, metavar="N",
        help=f"attempts per S3 request in boto3's standard retry mode (default: {_DEFAULTS.max_attempts})",
    )
    group.add_argument(
        "--s3-retry-seconds", type=_seconds, default=None, metavar="S",
        help="how long each S3 operation keeps retrying while the endpoint is unreachable or answers 5xx, "
             "with exponential backoff, before the job stops (0: only the per-request attempts; default: "
             f"${RETRY_ENV} or {_DEFAULTS.retry_seconds:g})",
    )
    group.add_argument(
        "--s3-checksum", choices=("when_supported", "when_required"), default=None,
        help="request checksums/response validation; 'when_required' for S3-compatible stores that reject "
             f"the boto3 1.36+ default checksums (default: $AWS_REQUEST_CHECKSUM_CALCULATION or {_DEFAULTS.checksum})",
    )


def options_from_args(args: argparse.Namespace) -> StorageOptions:
    """The :class:`StorageOptions` for parsed args (works when the flags were never added)."""
    checksum = (getattr(args, "s3_checksum", None)
                or os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION", "").strip().lower()
                or _DEFAULTS.checksum)
    attempts = getattr(args, "s3_max_attempts", None) or _DEFAULTS.max_attempts
    retry_seconds = getattr(args, "s3_retry_seconds", None)
    if retry_seconds is None:
        retry_seconds = retry_seconds_from_env()
    return StorageOptions(
        endpoint_url=getattr(args, "endpoint_url", None) or None,
        max_attempts=int(attempts),
        retry_seconds=float(retry_seconds),
        checksum=checksum,
    )


def retry_seconds_from_env() -> float:
    """``$MIDIFORGE_S3_RETRY_SECONDS`` if set, else the default (a bad value is a clear error)."""
    text = os.environ.get(RETRY_ENV, "").strip()
    if not text:
        return _DEFAULTS.retry_seconds
    try:
        return _seconds(text)
    except argparse.ArgumentTypeError as exc:
        raise MidiforgeError(f"${RETRY_ENV}: {exc}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds >= 0")
    return value

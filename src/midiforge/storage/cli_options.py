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

from midiforge.storage.store import StorageOptions

_DEFAULTS = StorageOptions()


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--endpoint-url``, ``--s3-max-attempts`` and ``--s3-checksum`` (idempotent)."""
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
        "--s3-max-attempts", type=_positive_int, default=None, metavar="N",
        help=f"attempts per S3 request in boto3's standard retry mode (default: {_DEFAULTS.max_attempts})",
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
    return StorageOptions(
        endpoint_url=getattr(args, "endpoint_url", None) or None,
        max_attempts=int(attempts),
        checksum=checksum,
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value

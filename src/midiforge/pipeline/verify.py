"""Check a stage's output against its manifest.json: every listed object present, same size, same sha256.

Works on local directories, file:// and s3:// URIs.  Exit status: 0 when every object
matches, 1 when any is missing or mismatched, 2 when there is no readable manifest.
"""
from __future__ import annotations

import argparse
import json

from midiforge.storage.cli_options import add_storage_arguments, options_from_args
from midiforge.storage.manifest import MANIFEST, VerifyReport, verify_store
from midiforge.storage.store import open_store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uri", metavar="URI", help="a stage's output: directory, file:// or s3://bucket/prefix")
    parser.add_argument("--manifest", default=MANIFEST, metavar="REL",
                        help=f"the manifest, relative to URI (default: {MANIFEST})")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_storage_arguments(parser)


def main(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    store = open_store(args.uri, options)
    report = verify_store(store, args.manifest, max_workers=options.max_concurrency)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0 if report.ok else 1


def format_report(report: VerifyReport) -> str:
    lines = [
        f"{report.uri} ({report.manifest}): {report.checked} objects listed, {report.bytes} bytes re-read; "
        f"{len(report.missing)} missing, {len(report.mismatched)} mismatched -> {'OK' if report.ok else 'FAILED'}"
    ]
    lines += [f"  missing:    {path}" for path in report.missing]
    lines += [f"  mismatched: {path}: {report.reasons.get(path, '')}" for path in report.mismatched]
    if report.unlisted:
        shown = ", ".join(report.unlisted[:5]) + (" ..." if len(report.unlisted) > 5 else "")
        lines.append(f"  note: {len(report.unlisted)} objects not in the manifest (not checked): {shown}")
    return "\n".join(lines)

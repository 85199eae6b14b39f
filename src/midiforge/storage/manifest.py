"""sha256 manifests: every stage lists each object it wrote, and writes the manifest last."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from midiforge.errors import MidiforgeError
from midiforge.storage.store import Store

MANIFEST = "manifest.json"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entry(path: str, data: bytes) -> dict:
    """The manifest entry of one object: {path, bytes, sha256}."""
    return {"path": path, "bytes": len(data), "sha256": sha256_hex(data)}


def write_manifest(store: Store, manifest: dict, rel: str = MANIFEST) -> bytes:
    """Write ``manifest`` (which must list its objects under ``files``) atomically, last."""
    if "files" not in manifest:
        raise ValueError("a manifest must list its objects under 'files'")
    data = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    store.write_bytes(rel, data)
    return data


def read_manifest(store: Store, rel: str = MANIFEST) -> dict:
    if not store.exists(rel):
        raise MidiforgeError(f"{store.url(rel)}: no manifest (the stage did not finish, or this is not a stage output)")
    try:
        return json.loads(store.read_bytes(rel))
    except json.JSONDecodeError as exc:
        raise MidiforgeError(f"{store.url(rel)}: manifest is not valid JSON ({exc})") from None


@dataclass
class VerifyReport:
    uri: str
    checked: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched


def verify_store(store: Store, rel: str = MANIFEST) -> VerifyReport:
    """Re-read every object the manifest lists and compare size and sha256."""
    manifest = read_manifest(store, rel)
    prefix = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
    report = VerifyReport(store.uri)
    for entry in manifest["files"]:
        path = prefix + entry["path"]
        report.checked += 1
        if not store.exists(path):
            report.missing.append(entry["path"])
            continue
        data = store.read_bytes(path)
        report.bytes += len(data)
        if len(data) != entry["bytes"] or sha256_hex(data) != entry["sha256"]:
            report.mismatched.append(entry["path"])
    return report

"""sha256 manifests: every stage lists each object it wrote, and writes the manifest last."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from midiforge.errors import MidiforgeError

if TYPE_CHECKING:  # store.py imports this module (verified reads), so only for typing
    from midiforge.storage.store import Store

MANIFEST = "manifest.json"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entry(path: str, data: bytes) -> dict:
    """The manifest entry of one object: {path, bytes, sha256}."""
    return {"path": path, "bytes": len(data), "sha256": sha256_hex(data)}


def file_sha256(local_path: str | os.PathLike) -> tuple[int, str]:
    """(size, sha256 hex) of a local file, streamed."""
    h = hashlib.sha256()
    size = 0
    with open(local_path, "rb") as fh:
        while chunk := fh.read(4 * 1024 * 1024):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def local_file_entry(path: str, local_path: str | os.PathLike) -> dict:
    """The manifest entry {path, bytes, sha256} of a local file about to be uploaded as ``path``."""
    size, digest = file_sha256(local_path)
    return {"path": path, "bytes": size, "sha256": digest}


def _mismatch(url: str, size: int, digest: str, entry: dict) -> str | None:
    """Why (size, digest) does not match ``entry``, or None when it does."""
    if size != int(entry["bytes"]):
        return f"{size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
    if digest != entry["sha256"]:
        return f"sha256 {digest[:16]}... differs from the manifest's {str(entry['sha256'])[:16]}... (corrupt or replaced)"
    return None


def check_entry(url: str, data: bytes, entry: dict) -> None:
    """Raise MidiforgeError naming ``url`` unless ``data`` matches the manifest ``entry``."""
    why = _mismatch(url, len(data), sha256_hex(data), entry)
    if why:
        raise MidiforgeError(f"{url}: does not match its manifest entry: {why}")


def check_file(url: str, local_path: str | os.PathLike, entry: dict) -> None:
    """Like :func:`check_entry` for a downloaded file; a mismatching file is removed."""
    size, digest = file_sha256(local_path)
    why = _mismatch(url, size, digest, entry)
    if why:
        Path(local_path).unlink(missing_ok=True)
        raise MidiforgeError(f"{url}: does not match its manifest entry: {why}")


def manifest_entries(manifest: dict, where: str = MANIFEST) -> dict[str, dict]:
    """The manifest's ``files`` as {path: entry}, validated (path, bytes, sha256 on each)."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list):
        raise MidiforgeError(f"{where}: the manifest has no 'files' list")
    out: dict[str, dict] = {}
    for i, entry in enumerate(files):
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"]
                and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
                and len(entry["sha256"]) == 64):
            raise MidiforgeError(f"{where}: files[{i}] is not a {{path, bytes, sha256}} entry")
        out[entry["path"]] = entry
    return out


def write_manifest(store: Store, manifest: dict, rel: str = MANIFEST) -> bytes:
    """Write ``manifest`` (which must list its objects under ``files``) atomically, last."""
    if "files" not in manifest:
        raise ValueError("a manifest must list its objects under 'files'")
    manifest_entries(manifest, store.url(rel))
    data = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    store.write_bytes(rel, data)
    return data


def read_json(store: Store, rel: str, what: str = "file") -> dict:
    """The JSON object stored at ``rel``; a MidiforgeError naming the object (and ``what`` it is) when it
    is missing, not JSON, or not an object."""
    data = store.read_bytes(rel)
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MidiforgeError(f"{store.url(rel)}: {what} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise MidiforgeError(f"{store.url(rel)}: {what} is not a JSON object")
    return value


def read_manifest(store: Store, rel: str = MANIFEST) -> dict:
    if not store.exists(rel):
        raise MidiforgeError(f"{store.url(rel)}: no manifest (the stage did not finish, or this is not a stage output)")
    return read_json(store, rel, "manifest")


@dataclass
class VerifyReport:
    uri: str
    manifest: str = MANIFEST
    checked: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)   # path -> why it mismatched
    unlisted: list[str] = field(default_factory=list)       # present, not in the manifest (informational)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched

    def to_dict(self) -> dict:
        return {
            "uri": self.uri, "manifest": self.manifest, "ok": self.ok, "checked": self.checked,
            "bytes": self.bytes, "missing": self.missing, "mismatched": self.mismatched,
            "reasons": self.reasons, "unlisted": self.unlisted,
        }


def verify_store(store: Store, rel: str = MANIFEST, max_workers: int = 8) -> VerifyReport:
    """Re-read every object the manifest lists and compare size and sha256.

    One listing finds missing objects and wrong sizes; the rest are read back (on a
    thread pool) and hashed.  Objects present but not listed are reported as
    ``unlisted`` and do not fail verification.
    """
    from midiforge.storage.store import map_parallel

    manifest = read_manifest(store, rel)
    entries = manifest_entries(manifest, store.url(rel))
    prefix = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
    present = {o.path[len(prefix):]: o.size for o in store.list(prefix.rstrip("/")) if o.path.startswith(prefix)}
    report = VerifyReport(store.uri, rel)
    report.checked = len(entries)
    to_read = []
    for path, entry in entries.items():
        if path not in present:
            report.missing.append(path)
        elif present[path] != entry["bytes"]:
            report.mismatched.append(path)
            report.reasons[path] = _mismatch(path, present[path], "", entry) or "size differs"
        else:
            to_read.append(path)

    def check(path: str) -> tuple[str, int, str | None]:
        try:
            data = store.read_bytes(prefix + path)
        except MidiforgeError:  # vanished between the listing and the read
            return path, -1, None
        return path, len(data), _mismatch(path, len(data), sha256_hex(data), entries[path])

    for path, size, why in map_parallel(check, to_read, max_workers):
        if size < 0:
            report.missing.append(path)
            continue
        report.bytes += size
        if why:
            report.mismatched.append(path)
            report.reasons[path] = why
    listed = set(entries) | {rel[len(prefix):]}
    report.unlisted = sorted(p for p in present if p not in listed and not p.startswith("."))
    report.missing.sort()
    report.mismatched.sort()
    return report

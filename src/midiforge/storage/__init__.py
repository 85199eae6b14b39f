"""Moving bytes: local paths, file:// and s3:// URIs, atomic writes, sha256 manifests.

Nothing here knows about music.  Every stage opens its input and output with
:func:`open_store` and writes its ``manifest.json`` last with
:func:`write_manifest`.
"""
from midiforge.storage.manifest import (
    check_entry, check_file, file_entry, file_sha256, local_file_entry, manifest_entries, read_json,
    read_manifest, sha256_hex, verify_store, write_manifest,
)
from midiforge.storage.store import (
    LocalStore, ObjectInfo, Store, StorageOptions, StorageUnavailableError, check_rel, map_parallel, open_store,
    split_uri,
)

__all__ = [
    "LocalStore", "ObjectInfo", "Store", "StorageOptions", "StorageUnavailableError", "check_rel", "map_parallel",
    "open_store", "split_uri",
    "check_entry", "check_file", "file_entry", "file_sha256", "local_file_entry", "manifest_entries",
    "read_json", "read_manifest", "sha256_hex", "verify_store", "write_manifest",
]

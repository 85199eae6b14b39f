"""Moving bytes: local paths, file:// and s3:// URIs, atomic writes, sha256 manifests.

Nothing here knows about music.  Every stage opens its input and output with
:func:`open_store` and writes its ``manifest.json`` last with
:func:`write_manifest`.
"""
from midiforge.storage.store import LocalStore, ObjectInfo, Store, StorageOptions, open_store, split_uri
from midiforge.storage.manifest import file_entry, read_manifest, sha256_hex, verify_store, write_manifest

__all__ = [
    "LocalStore", "ObjectInfo", "Store", "StorageOptions", "open_store", "split_uri",
    "file_entry", "read_manifest", "sha256_hex", "verify_store", "write_manifest",
]

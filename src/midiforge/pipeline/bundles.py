"""Model bundles in a ``MODEL_DIR``: reading and writing them through a store.

The format (files, manifest, index, weights) is :mod:`midiforge.model.bundle`'s, which works on
bytes; this module does the I/O: it lists and reads the files of a bundle, checks each one against
the bundle's manifest with the storage layer's verification (size and sha256, before anything is
parsed; a mismatch is a :class:`MidiforgeError` naming the file), and writes a bundle's files with
its manifest last.

    b = load_bundle("s3://bucket/model", checkpoint="final")   # or "best", "latest", an epoch number

``load_bundle`` accepts a ``MODEL_DIR`` or the directory of one bundle (``MODEL_DIR/bundle``,
``MODEL_DIR/checkpoints/epoch-0003``), as a URI or an open :class:`~midiforge.storage.Store`.
"""
from __future__ import annotations

from midiforge.errors import MidiforgeError
from midiforge.model.bundle import (
    BUNDLE_FORMAT, FINAL_DIR, INDEX, MANIFEST, OPTIMIZER, Bundle, bundle_files, empty_index, join, parse_bundle,
    parse_index, parse_manifest, pick_checkpoint,
)
from midiforge.model.lstm import ModelConfig
from midiforge.storage import Store, StorageOptions, open_store, read_json


def _store(model_dir: str | Store, options: StorageOptions | None) -> Store:
    return open_store(model_dir, options) if isinstance(model_dir, str) else model_dir


def write_bundle(store: Store, prefix: str, *, config: ModelConfig, tokenizer_json: str | bytes,
                 training: dict, weights: bytes, extra: dict[str, bytes] | None = None) -> bytes:
    """Write one bundle under ``prefix`` of ``store``, the manifest last.  Returns the manifest bytes."""
    files = bundle_files(config=config, tokenizer_json=tokenizer_json, training=training, weights=weights,
                         extra=extra)
    for name, data in files.items():  # manifest.json is the last item
        store.write_bytes(join(prefix, name), data)
    return files[MANIFEST]


def read_index(store: Store) -> dict:
    """``checkpoints/index.json`` of a MODEL_DIR store ({"checkpoints": []} when absent)."""
    if not store.exists(INDEX):
        return empty_index()
    return parse_index(store.read_bytes(INDEX), store.url(INDEX))


def list_checkpoints(model_dir: str | Store, options: StorageOptions | None = None) -> list[dict]:
    """The checkpoints of ``MODEL_DIR`` in epoch order: [{epoch, val_loss, val_accuracy, path, sha256}].

    ``path`` is relative to ``MODEL_DIR`` (``checkpoints/epoch-0003``).
    """
    return sorted(read_index(_store(model_dir, options))["checkpoints"], key=lambda c: c["epoch"])


def is_single_bundle(store: Store) -> bool:
    """Whether ``store`` is one bundle's directory (its manifest.json is a bundle manifest)."""
    return store.exists(MANIFEST) and read_json(store, MANIFEST, "manifest").get("format") == BUNDLE_FORMAT


def resolve(store: Store, checkpoint: str | int | None) -> tuple[str, str]:
    """(prefix of the bundle inside ``store``, label) for a MODEL_DIR or a bundle directory."""
    if is_single_bundle(store):
        if checkpoint not in ("final", None):
            raise MidiforgeError(f"{store.uri}: is a single bundle; checkpoint={checkpoint!r} needs a MODEL_DIR")
        label = store.uri.rstrip("/").rsplit("/", 1)[-1]
        return "", "final" if label == FINAL_DIR else label
    if checkpoint in ("final", None):
        if not store.exists(join(FINAL_DIR, MANIFEST)):
            raise MidiforgeError(f"{store.url(FINAL_DIR)}: no final bundle (training has not finished there); "
                                 f"load checkpoint='latest' or 'best' instead")
        return FINAL_DIR, "final"
    index = read_index(store)
    if not index["checkpoints"]:
        raise MidiforgeError(f"{store.url(INDEX)}: no checkpoints in {store.uri}")
    entry = pick_checkpoint(index, checkpoint, store.url(INDEX))
    return entry["path"], entry["path"].rsplit("/", 1)[-1]


def load_bundle(model_dir: str | Store, *, checkpoint: str | int = "final",
                options: StorageOptions | None = None) -> Bundle:
    """Load and verify a bundle: ``checkpoint`` is "final", "best", "latest" or an epoch number.

    One listing of the bundle's directory, one read of each file, each checked against the
    bundle manifest (``optimizer.h5``, resume state only, must be present but is not read).
    """
    store = _store(model_dir, options)
    prefix, label = resolve(store, checkpoint)
    manifest_rel = join(prefix, MANIFEST)
    if not store.exists(manifest_rel):
        raise MidiforgeError(f"{store.url(manifest_rel)}: no bundle manifest (incomplete or not a bundle)")
    manifest_bytes = store.read_bytes(manifest_rel)
    _manifest, listed = parse_manifest(manifest_bytes, store.url(manifest_rel))
    base = f"{prefix.rstrip('/')}/" if prefix else ""
    present = {o.path[len(base):] for o in store.list(prefix) if o.path.startswith(base)}
    files: dict[str, bytes] = {MANIFEST: manifest_bytes}
    for name, entry in listed.items():
        rel = join(prefix, name)
        if name not in present:
            raise MidiforgeError(f"{store.url(rel)}: missing (listed in the bundle manifest)")
        if name == OPTIMIZER:  # resume state only; verified by the trainer when it uses it
            continue
        files[name] = store.read_verified(rel, entry)
    return parse_bundle(files, uri=store.url(prefix) if prefix else store.uri, checkpoint=label)

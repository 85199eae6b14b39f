"""Model bundles: everything needed to rebuild a trained model, verified by sha256, no pickle.

Layout of a training output directory ``MODEL_DIR`` (local path, file:// or s3://)::

    MODEL_DIR/
      run.json                      settings of the run (written when training starts)
      bundle/                       the final bundle (written when training ends)
        config.json                 ModelConfig (midiforge.model.lstm), JSON
        tokenizer.json              the shards' tokenizer (midiforge.music.tokenizers.load_tokenizer)
        training.json               training settings, incl. qpm_median and the shards' manifest sha256
        model.weights.h5            tf_keras ``save_weights`` (HDF5, no pickle)
        manifest.json               {format: "midiforge-bundle", files: [{path, bytes, sha256}], ...}, last
      checkpoints/epoch-0003/       the same files after epoch 3, plus optimizer.h5 (resume state)
      checkpoints/index.json        {"checkpoints": [{epoch, val_loss, val_accuracy, path, sha256}], best, latest}
      metrics.jsonl                 one JSON object per epoch
      tensorboard/                  TensorBoard event files
      backup/                       only while training with MODEL_DIR in object storage (resume state)
      manifest.json                 {format: "midiforge-train", files: [...every object...]}, written last

Reading (the contract generate builds on)::

    b = load_bundle("s3://bucket/model", checkpoint="final")   # or "best", "latest", an epoch number
    b.config       # ModelConfig
    b.tokenizer    # Tokenizer
    b.training     # dict: training settings, qpm_median, tokenizer id, epochs, ...
    b.sha256       # sha256 of the bundle's manifest.json bytes: the bundle's identity
    b.checkpoint   # what was loaded: "final" or "epoch-0003"
    model = b.build(batch_size=8, stateful=True, seq_len=1)   # weights loaded; outputs logits
    b.check_tokenizer(shards_tokenizer_id, "DEST/tokenizer.json")   # MidiforgeError on mismatch

``load_bundle`` accepts a ``MODEL_DIR`` or the directory of one bundle (``MODEL_DIR/bundle``,
``MODEL_DIR/checkpoints/epoch-0003``).  Every file is checked against the bundle's manifest
(size and sha256) before anything is parsed; a mismatch is a :class:`MidiforgeError` naming
the file.  The model's outputs are logits (see :mod:`midiforge.model.lstm`).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

from midiforge.errors import MidiforgeError
from midiforge.model.lstm import ModelConfig, build_model
from midiforge.music.tokenizers import Tokenizer, load_tokenizer
from midiforge.storage.manifest import sha256_hex
from midiforge.storage.store import Store, StorageOptions, open_store

BUNDLE_FORMAT = "midiforge-bundle"
BUNDLE_VERSION = 1
TRAIN_FORMAT = "midiforge-train"

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TRAINING = "training.json"
WEIGHTS = "model.weights.h5"
OPTIMIZER = "optimizer.h5"
MANIFEST = "manifest.json"
REQUIRED = (CONFIG, TOKENIZER, TRAINING, WEIGHTS)

FINAL_DIR = "bundle"
CHECKPOINTS_DIR = "checkpoints"
INDEX = "checkpoints/index.json"


def checkpoint_dir(epoch: int) -> str:
    """``checkpoints/epoch-0003`` for epoch 3 (epochs count from 1)."""
    return f"{CHECKPOINTS_DIR}/epoch-{int(epoch):04d}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if prefix else name


def write_bundle(store: Store, prefix: str, *, config: ModelConfig, tokenizer_json: str | bytes,
                 training: dict, weights: bytes, extra: dict[str, bytes] | None = None) -> bytes:
    """Write one bundle under ``prefix`` of ``store``; the manifest last.  Returns the manifest bytes."""
    tok_bytes = tokenizer_json.encode() if isinstance(tokenizer_json, str) else bytes(tokenizer_json)
    tok = load_tokenizer(tok_bytes)
    if tok.id != config.tokenizer_id:
        raise MidiforgeError(f"bundle: tokenizer {tok.id} is not the model's tokenizer {config.tokenizer_id}")
    files: dict[str, bytes] = {
        CONFIG: (json.dumps(config.to_dict(), indent=1) + "\n").encode(),
        TOKENIZER: tok_bytes,
        TRAINING: (json.dumps(training, indent=1, sort_keys=True) + "\n").encode(),
        WEIGHTS: bytes(weights),
        **(extra or {}),
    }
    entries = []
    for name, data in files.items():
        store.write_bytes(_join(prefix, name), data)
        entries.append({"path": name, "bytes": len(data), "sha256": sha256_hex(data)})
    manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "tokenizer": tok.id,
                "model": config.to_dict(), "epoch": training.get("epochs_done"), "files": entries}
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    store.write_bytes(_join(prefix, MANIFEST), data)
    return data


@dataclass
class Bundle:
    """A verified bundle held in memory; :meth:`build` makes a model with its weights."""

    uri: str                     # where the bundle directory is
    checkpoint: str              # "final" or "epoch-0003"
    config: ModelConfig
    tokenizer: Tokenizer
    training: dict
    sha256: str                  # sha256 of manifest.json's bytes
    manifest: dict
    files: dict[str, bytes] = field(repr=False, default_factory=dict)

    @property
    def epoch(self) -> int | None:
        return self.training.get("epochs_done")

    def check_tokenizer(self, tokenizer_id: str, where: str = "the data") -> None:
        """Refuse data made with another tokenizer (ids would mean different tokens)."""
        if tokenizer_id != self.config.tokenizer_id:
            raise MidiforgeError(
                f"{where}: tokenizer {tokenizer_id} differs from the model's tokenizer {self.config.tokenizer_id} "
                f"({self.uri}); token ids would not match the model's vocabulary. Preprocess with the bundle's "
                f"tokenizer.json, or train a new model on this data")

    def weights_file(self, directory: str | os.PathLike) -> str:
        """Write the weights to ``directory`` and return the file's path (for tf_keras)."""
        path = os.path.join(directory, WEIGHTS)
        with open(path, "wb") as fh:
            fh.write(self.files[WEIGHTS])
        return path

    def build(self, batch_size: int | None = None, stateful: bool = False, seq_len: int | None = None,
              mixed_precision: bool = False):
        """The model (see :func:`midiforge.model.lstm.build_model`) with this bundle's weights; outputs logits."""
        model = build_model(self.config, batch_size=batch_size, stateful=stateful, seq_len=seq_len,
                            mixed_precision=mixed_precision)
        with tempfile.TemporaryDirectory(prefix="midiforge-weights-") as tmp:
            try:
                model.load_weights(self.weights_file(tmp))
            except (ValueError, OSError) as exc:
                raise MidiforgeError(f"{self.uri}/{WEIGHTS}: weights do not fit the model config ({exc})") from None
        return model


def _read_json(store: Store, rel: str) -> dict:
    try:
        return json.loads(store.read_bytes(rel))
    except json.JSONDecodeError as exc:
        raise MidiforgeError(f"{store.url(rel)}: not valid JSON ({exc})") from None


def read_index(store: Store) -> dict:
    """``checkpoints/index.json`` of a MODEL_DIR store ({"checkpoints": []} when absent)."""
    if not store.exists(INDEX):
        return {"checkpoints": [], "best": None, "latest": None}
    d = _read_json(store, INDEX)
    if not isinstance(d.get("checkpoints"), list):
        raise MidiforgeError(f"{store.url(INDEX)}: no 'checkpoints' list")
    return d


def list_checkpoints(uri: str, options: StorageOptions | None = None) -> list[dict]:
    """The checkpoints of ``MODEL_DIR`` in epoch order: [{epoch, val_loss, val_accuracy, path, sha256}].

    ``path`` is relative to ``MODEL_DIR`` (``checkpoints/epoch-0003``).
    """
    store = open_store(uri, options)
    return sorted(read_index(store)["checkpoints"], key=lambda c: c["epoch"])


def _resolve(store: Store, checkpoint: str | int) -> tuple[str, str]:
    """(prefix of the bundle inside ``store``, label) for a MODEL_DIR or a bundle directory."""
    if store.exists(MANIFEST):
        top = _read_json(store, MANIFEST)
        if top.get("format") == BUNDLE_FORMAT:  # the URI is one bundle's directory
            if checkpoint not in ("final", None):
                raise MidiforgeError(f"{store.uri}: is a single bundle; checkpoint={checkpoint!r} needs a MODEL_DIR")
            label = store.uri.rstrip("/").rsplit("/", 1)[-1]
            return "", "final" if label == FINAL_DIR else label
    if checkpoint in ("final", None):
        if not store.exists(_join(FINAL_DIR, MANIFEST)):
            raise MidiforgeError(f"{store.url(FINAL_DIR)}: no final bundle (training has not finished there); "
                                 f"load checkpoint='latest' or 'best' instead")
        return FINAL_DIR, "final"
    index = read_index(store)
    entries = {int(c["epoch"]): c for c in index["checkpoints"]}
    if not entries:
        raise MidiforgeError(f"{store.url(INDEX)}: no checkpoints in {store.uri}")
    if checkpoint == "latest":
        epoch = max(entries)
    elif checkpoint == "best":
        scored = [c for c in entries.values() if c.get("val_loss") is not None]
        if not scored:
            raise MidiforgeError(f"{store.url(INDEX)}: no checkpoint has a validation loss")
        epoch = int(min(scored, key=lambda c: (c["val_loss"], -c["epoch"]))["epoch"])
    else:
        try:
            epoch = int(checkpoint)
        except (TypeError, ValueError):
            raise MidiforgeError(f"checkpoint {checkpoint!r}: use 'final', 'best', 'latest' or an epoch number") from None
        if epoch not in entries:
            raise MidiforgeError(f"{store.uri}: no checkpoint for epoch {epoch} (kept: {sorted(entries)})")
    return entries[epoch]["path"], entries[epoch]["path"].rsplit("/", 1)[-1]


def load_bundle(uri: str, *, checkpoint: str | int = "final", options: StorageOptions | None = None) -> Bundle:
    """Load and verify a bundle: ``checkpoint`` is "final", "best", "latest" or an epoch number."""
    store = open_store(uri, options)
    prefix, label = _resolve(store, checkpoint)
    manifest_rel = _join(prefix, MANIFEST)
    if not store.exists(manifest_rel):
        raise MidiforgeError(f"{store.url(manifest_rel)}: no bundle manifest (incomplete or not a bundle)")
    manifest_bytes = store.read_bytes(manifest_rel)
    try:
        manifest = json.loads(manifest_bytes)
    except json.JSONDecodeError as exc:
        raise MidiforgeError(f"{store.url(manifest_rel)}: not valid JSON ({exc})") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise MidiforgeError(f"{store.url(manifest_rel)}: not a midiforge bundle manifest")
    if manifest.get("version") != BUNDLE_VERSION:
        raise MidiforgeError(f"{store.url(manifest_rel)}: bundle version {manifest.get('version')} is not supported")
    listed = {e.get("path"): e for e in manifest.get("files", []) if isinstance(e, dict)}
    for name in REQUIRED:
        if name not in listed:
            raise MidiforgeError(f"{store.url(manifest_rel)}: does not list {name}")
    files: dict[str, bytes] = {}
    for name, entry in listed.items():
        rel = _join(prefix, name)
        if not store.exists(rel):
            raise MidiforgeError(f"{store.url(rel)}: missing (listed in the bundle manifest)")
        if name == OPTIMIZER:  # resume state only; verified by the trainer when it uses it
            continue
        data = store.read_bytes(rel)
        if len(data) != entry.get("bytes") or sha256_hex(data) != entry.get("sha256"):
            raise MidiforgeError(f"{store.url(rel)}: does not match the bundle manifest "
                                 f"({len(data)} bytes, sha256 {sha256_hex(data)[:16]}...; manifest says "
                                 f"{entry.get('bytes')} bytes, {str(entry.get('sha256'))[:16]}...)")
        files[name] = data
    config = ModelConfig.from_dict(json.loads(files[CONFIG]), store.url(_join(prefix, CONFIG)))
    try:
        tokenizer = load_tokenizer(files[TOKENIZER])
    except (MidiforgeError, KeyError, TypeError, ValueError) as exc:
        raise MidiforgeError(f"{store.url(_join(prefix, TOKENIZER))}: {exc}") from None
    if tokenizer.id != config.tokenizer_id:
        raise MidiforgeError(f"{store.url(_join(prefix, TOKENIZER))}: tokenizer {tokenizer.id} is not the one "
                             f"the model was trained with ({config.tokenizer_id})")
    if tokenizer.vocab_size != config.vocab_size:
        raise MidiforgeError(f"{store.url(_join(prefix, CONFIG))}: vocab_size {config.vocab_size} differs from "
                             f"the tokenizer's {tokenizer.vocab_size}")
    training = json.loads(files[TRAINING])
    return Bundle(uri=store.url(prefix) if prefix else store.uri, checkpoint=label, config=config,
                  tokenizer=tokenizer, training=training, sha256=sha256_hex(manifest_bytes),
                  manifest=manifest, files=files)

"""Model bundles: everything needed to rebuild a trained model, verified by sha256, no pickle.

This module owns the format and works on bytes and objects only; reading and writing a
``MODEL_DIR`` through a store is :mod:`midiforge.pipeline.bundles`.

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

    from midiforge.pipeline.bundles import load_bundle
    b = load_bundle("s3://bucket/model", checkpoint="final")   # or "best", "latest", an epoch number
    b.config       # ModelConfig
    b.tokenizer    # Tokenizer
    b.training     # dict: training settings, qpm_median, tokenizer id, epochs, ...
    b.sha256       # sha256 of the bundle's manifest.json bytes: the bundle's identity
    b.checkpoint   # what was loaded: "final" or "epoch-0003"
    b.numpy_weights()                                         # LSTMWeights from the HDF5 bytes (h5py, no TensorFlow)
    model = b.build(batch_size=8, stateful=True, seq_len=1)   # tf_keras, weights loaded; outputs logits
    b.check_tokenizer(shards_tokenizer_id, "DEST/tokenizer.json")   # MidiforgeError on mismatch

Here: :func:`bundle_files` makes a bundle's files (manifest last), :func:`parse_manifest` checks a
bundle manifest and returns its entries, :func:`parse_bundle` turns the files (each already
checked against its entry by the reader) into a :class:`Bundle`, :func:`parse_index` and
:func:`pick_checkpoint` read ``checkpoints/index.json``.  The model's outputs are logits
(see :mod:`midiforge.model.lstm`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field

from midiforge.errors import MidiforgeError
from midiforge.model.lstm import ModelConfig, build_model
from midiforge.music.tokenizers import Tokenizer, load_tokenizer

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


def join(prefix: str, name: str) -> str:
    """``prefix/name`` (``name`` alone for the empty prefix)."""
    return f"{prefix.rstrip('/')}/{name}" if prefix else name


def json_object(data: bytes, where: str) -> dict:
    """``data`` parsed as a JSON object; a MidiforgeError naming ``where`` otherwise."""
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MidiforgeError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise MidiforgeError(f"{where}: not a JSON object")
    return value


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def bundle_files(*, config: ModelConfig, tokenizer_json: str | bytes, training: dict, weights: bytes,
                 extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """The files of one bundle, ``{name: bytes}`` in writing order: ``manifest.json`` last."""
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
    entries = [{"path": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
               for name, data in files.items()]
    manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "tokenizer": tok.id,
                "model": config.to_dict(), "epoch": training.get("epochs_done"), "files": entries}
    files[MANIFEST] = (json.dumps(manifest, indent=2) + "\n").encode()
    return files


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def parse_manifest(data: bytes, where: str = MANIFEST) -> tuple[dict, dict[str, dict]]:
    """(manifest, {name: {path, bytes, sha256}}) of a bundle's ``manifest.json`` bytes.

    Refuses another format or version, and a manifest that does not list the required files.
    """
    manifest = json_object(data, where)
    if manifest.get("format") != BUNDLE_FORMAT:
        raise MidiforgeError(f"{where}: not a midiforge bundle manifest")
    if manifest.get("version") != BUNDLE_VERSION:
        raise MidiforgeError(f"{where}: bundle version {manifest.get('version')} is not supported")
    files = manifest.get("files")
    if not isinstance(files, list):
        raise MidiforgeError(f"{where}: the manifest has no 'files' list")
    listed: dict[str, dict] = {}
    for i, e in enumerate(files):
        if not (isinstance(e, dict) and isinstance(e.get("path"), str) and e["path"]
                and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)):
            raise MidiforgeError(f"{where}: files[{i}] is not a {{path, bytes, sha256}} entry")
        if "/" in e["path"] or e["path"] in (".", "..", MANIFEST):
            raise MidiforgeError(f"{where}: files[{i}] names {e['path']!r}, not a file of this bundle")
        listed[e["path"]] = e
    for name in REQUIRED:
        if name not in listed:
            raise MidiforgeError(f"{where}: does not list {name}")
    return manifest, listed


@dataclass
class Bundle:
    """A verified bundle held in memory; :meth:`numpy_weights` and :meth:`build` give its weights."""

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

    def numpy_weights(self):
        """The weights as float64 :class:`~midiforge.model.decode.LSTMWeights`, read from the HDF5 bytes
        with h5py (no TensorFlow)."""
        return weights_from_h5(self.files[WEIGHTS], self.config, f"{self.uri}/{WEIGHTS}")

    def build(self, batch_size: int | None = None, stateful: bool = False, seq_len: int | None = None,
              mixed_precision: bool = False):
        """The model (see :func:`midiforge.model.lstm.build_model`) with this bundle's weights; outputs logits."""
        model = build_model(self.config, batch_size=batch_size, stateful=stateful, seq_len=seq_len,
                            mixed_precision=mixed_precision)
        # tf_keras reads weights from a path only: a private temporary copy of the bytes
        with tempfile.TemporaryDirectory(prefix="midiforge-weights-") as tmp:
            path = os.path.join(tmp, WEIGHTS)
            with open(path, "wb") as fh:
                fh.write(self.files[WEIGHTS])
            try:
                model.load_weights(path)
            except (ValueError, OSError) as exc:
                raise MidiforgeError(f"{self.uri}/{WEIGHTS}: weights do not fit the model config ({exc})") from None
        return model


def parse_bundle(files: dict[str, bytes], *, uri: str, checkpoint: str) -> Bundle:
    """A :class:`Bundle` from its files (``manifest.json`` and the files it lists but ``optimizer.h5``).

    The reader checks each file against its manifest entry (size and sha256) before it hands
    the bytes here; ``uri`` (the bundle's directory) names the files in error messages.
    """
    where = lambda name: f"{uri.rstrip('/')}/{name}"  # noqa: E731
    if MANIFEST not in files:
        raise MidiforgeError(f"{where(MANIFEST)}: no bundle manifest (incomplete or not a bundle)")
    manifest_bytes = files[MANIFEST]
    manifest, _listed = parse_manifest(manifest_bytes, where(MANIFEST))
    for name in REQUIRED:
        if name not in files:
            raise MidiforgeError(f"{where(name)}: missing (listed in the bundle manifest)")
    config = ModelConfig.from_dict(json_object(files[CONFIG], where(CONFIG)), where(CONFIG))
    try:
        tokenizer = load_tokenizer(files[TOKENIZER])
    except (MidiforgeError, KeyError, TypeError, ValueError) as exc:
        raise MidiforgeError(f"{where(TOKENIZER)}: {exc}") from None
    if tokenizer.id != config.tokenizer_id:
        raise MidiforgeError(f"{where(TOKENIZER)}: tokenizer {tokenizer.id} is not the one "
                             f"the model was trained with ({config.tokenizer_id})")
    if tokenizer.vocab_size != config.vocab_size:
        raise MidiforgeError(f"{where(CONFIG)}: vocab_size {config.vocab_size} differs from "
                             f"the tokenizer's {tokenizer.vocab_size}")
    training = json_object(files[TRAINING], where(TRAINING))
    return Bundle(uri=uri, checkpoint=checkpoint, config=config, tokenizer=tokenizer, training=training,
                  sha256=hashlib.sha256(manifest_bytes).hexdigest(), manifest=manifest,
                  files={k: v for k, v in files.items() if k != MANIFEST})


# ---------------------------------------------------------------------------------------------
# weights: the HDF5 file tf_keras's save_weights writes for a ``.weights.h5`` name
# ---------------------------------------------------------------------------------------------
def weight_paths(config: ModelConfig) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Where :func:`~midiforge.model.lstm.build_model`'s weights are in the ``.weights.h5`` file, with
    their shapes: ``{"embedding": [(path, shape)], "lstm_1": [kernel, recurrent, bias], ..., "logits": [...]}``.

    tf_keras (``saving_lib``) stores a model's layers in ``layers/<name>`` where ``<name>`` is the
    snake_case class name, numbered from the second layer of a class on (``lstm``, ``lstm_1``, ...),
    and a layer's variables in creation order as ``vars/0``, ``vars/1``, ... (an LSTM's under ``cell/``).
    """
    out: dict[str, list[tuple[str, tuple[int, ...]]]] = {
        "embedding": [("layers/embedding/vars/0", (config.vocab_size, config.embedding_dim))]}
    width = config.embedding_dim
    for i, u in enumerate(config.lstm_units):
        group = "layers/lstm" if i == 0 else f"layers/lstm_{i}"
        out[f"lstm_{i + 1}"] = [(f"{group}/cell/vars/0", (width, 4 * u)), (f"{group}/cell/vars/1", (u, 4 * u)),
                                (f"{group}/cell/vars/2", (4 * u,))]
        width = u
    out["logits"] = [("layers/dense/vars/0", (width, config.vocab_size)), ("layers/dense/vars/1", (config.vocab_size,))]
    return out


def weights_from_h5(data: bytes, config: ModelConfig, where: str = WEIGHTS):
    """The float64 :class:`~midiforge.model.decode.LSTMWeights` in a bundle's ``model.weights.h5`` bytes.

    Read with h5py (no TensorFlow); every array's shape is checked against ``config``.  The
    arrays are the ones tf_keras's ``load_weights`` would put in the model (the tests compare).
    """
    import h5py
    import numpy as np

    from midiforge.model.decode import LSTMWeights

    paths = weight_paths(config)
    arrays: dict[str, list] = {}
    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            for layer, items in paths.items():
                arrays[layer] = []
                for path, shape in items:
                    ds = f.get(path)
                    if not isinstance(ds, h5py.Dataset):
                        raise MidiforgeError(f"{where}: no {path} (not the weights of a midiforge LSTM saved by "
                                             f"tf_keras save_weights)")
                    if tuple(ds.shape) != shape:
                        raise MidiforgeError(f"{where}: weights do not fit the model config ({path} has shape "
                                             f"{tuple(ds.shape)}, the config needs {shape})")
                    arrays[layer].append(np.asarray(ds[()], dtype=np.float64))
    except OSError as exc:  # not HDF5, truncated
        raise MidiforgeError(f"{where}: not a readable HDF5 weights file ({exc})") from None
    lstm = [tuple(arrays[f"lstm_{i}"]) for i in range(1, len(config.lstm_units) + 1)]
    return LSTMWeights(arrays["embedding"][0], lstm, arrays["logits"][0], arrays["logits"][1])


# ---------------------------------------------------------------------------------------------
# checkpoints/index.json
# ---------------------------------------------------------------------------------------------
def empty_index() -> dict:
    return {"checkpoints": [], "best": None, "latest": None}


def parse_index(data: bytes, where: str = INDEX) -> dict:
    """``checkpoints/index.json`` bytes -> {"checkpoints": [...], "best", "latest"}."""
    d = json_object(data, where)
    if not isinstance(d.get("checkpoints"), list):
        raise MidiforgeError(f"{where}: no 'checkpoints' list")
    return d


def pick_checkpoint(index: dict, checkpoint: str | int, where: str = INDEX) -> dict:
    """The index entry ``checkpoint`` ("best", "latest" or an epoch number) names."""
    entries = {int(c["epoch"]): c for c in index["checkpoints"]}
    if not entries:
        raise MidiforgeError(f"{where}: no checkpoints")
    if checkpoint == "latest":
        epoch = max(entries)
    elif checkpoint == "best":
        scored = [c for c in entries.values() if c.get("val_loss") is not None]
        if not scored:
            raise MidiforgeError(f"{where}: no checkpoint has a validation loss")
        epoch = int(min(scored, key=lambda c: (c["val_loss"], -c["epoch"]))["epoch"])
    else:
        try:
            epoch = int(checkpoint)
        except (TypeError, ValueError):
            raise MidiforgeError(f"checkpoint {checkpoint!r}: use 'final', 'best', 'latest' or an epoch number") from None
        if epoch not in entries:
            raise MidiforgeError(f"{where}: no checkpoint for epoch {epoch} (kept: {sorted(entries)})")
    return entries[epoch]

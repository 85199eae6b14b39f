"""generate's models: what ``--checkpoint`` names in MODEL_DIR, each bundle loaded and verified once
as a :class:`ModelSpec` (plain data the workers receive: NumPy weights, or the bundle for keras)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from midiforge.errors import MidiforgeError
from midiforge.storage import StorageOptions, open_store


@dataclass
class ModelSpec:
    """One checkpoint as the workers need it (plain data: travels through Ray's object store)."""

    label: str                      # "final", "epoch-0003"
    uri: str
    sha256: str
    epoch: int | None
    tokenizer: object               # Tokenizer (parsed once, from the bundle's tokenizer.json)
    qpm_median: float | None
    weights: object = None          # LSTMWeights (numpy engine), read from the HDF5 bytes with h5py
    bundle: object = None           # Bundle (keras engine builds its stateful model from it)


def resolve_labels(store, checkpoint: str) -> list[str | int]:
    """What to load for ``--checkpoint``: "final", "best", "latest", an epoch, or every one ("all")."""
    from midiforge.model.bundle import FINAL_DIR, MANIFEST
    from midiforge.pipeline.bundles import is_single_bundle, list_checkpoints

    if checkpoint != "all":
        return [checkpoint]
    if is_single_bundle(store):
        return ["final"]
    out: list[str | int] = [int(c["epoch"]) for c in list_checkpoints(store)]
    if store.exists(f"{FINAL_DIR}/{MANIFEST}"):
        out.append("final")
    if not out:
        raise MidiforgeError(f"{store.uri}: no checkpoints and no final bundle to generate from")
    return out


def check_model_dir(model_dir: str, storage: StorageOptions | None) -> None:
    """A MODEL_DIR that does not exist is named as such (not as a training that has not finished)."""
    from midiforge.storage import LocalStore

    store = open_store(model_dir, storage)
    if isinstance(store, LocalStore):
        if not store.root.exists():
            raise MidiforgeError(f"{store.uri}: MODEL_DIR does not exist (no such folder)")
        if not store.root.is_dir():
            raise MidiforgeError(f"{store.uri}: MODEL_DIR is not a folder (give train's output folder or a "
                                 f"bundle's folder)")
        if not any(store.root.iterdir()):
            raise MidiforgeError(f"{store.uri}: MODEL_DIR is an empty folder (no training output there)")
    elif not store.list():
        raise MidiforgeError(f"{store.uri}: MODEL_DIR does not exist (no objects under this prefix)")


def load_models(model_dir: str, checkpoint: str, engine: str, storage: StorageOptions | None) -> list[ModelSpec]:
    """Load and verify every bundle ``--checkpoint`` names, reading each bundle's files once.

    The numpy engine gets its weights from the HDF5 bytes (h5py): no TensorFlow in the driver or
    the actors.  The keras engine gets the bundle (its actors build the tf_keras model).
    """
    from midiforge.pipeline.bundles import load_bundle

    check_model_dir(model_dir, storage)
    store = open_store(model_dir, storage)
    specs: list[ModelSpec] = []
    for what in resolve_labels(store, checkpoint):
        b = load_bundle(store, checkpoint=what)
        if any(s.label == b.checkpoint for s in specs):
            continue
        spec = ModelSpec(label=b.checkpoint, uri=b.uri, sha256=b.sha256, epoch=b.epoch, tokenizer=b.tokenizer,
                         qpm_median=_float_or_none(b.training.get("qpm_median")))
        if engine == "keras":
            spec.bundle = b
        else:
            spec.weights = numpy_weights(b)
        specs.append(spec)
    return specs


def numpy_weights(bundle):
    """The bundle's weights as float64 NumPy arrays, read from its HDF5 bytes with h5py (no TensorFlow)."""
    return bundle.numpy_weights()


def _float_or_none(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None

"""Model bundles: the format in memory (model/bundle.py: bytes in, bytes out, no storage), the I/O through
a store (pipeline/bundles.py: every file checked against the bundle manifest by the storage layer),
the NumPy weights read from the HDF5 bytes with h5py equal to what tf_keras loads, and model/ importing
no storage.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from midiforge.errors import MidiforgeError
from midiforge.model.bundle import (
    CONFIG, INDEX, MANIFEST, OPTIMIZER, TOKENIZER, TRAINING, WEIGHTS, bundle_files, checkpoint_dir, parse_bundle,
    parse_manifest, weights_from_h5,
)
from midiforge.model.decode import Limits, NumpyLSTM, PieceJob, decode, weights_from_keras
from midiforge.model.lstm import ModelConfig
from midiforge.model.sampling import SamplingSettings
from midiforge.music.tokenizers import make_tokenizer
from midiforge.pipeline.bundles import list_checkpoints, load_bundle, write_bundle
from midiforge.storage import open_store

SRC = Path(__file__).resolve().parents[1] / "src" / "midiforge"
TOK = make_tokenizer("events")


def _keras_model(cfg: ModelConfig, seed: int):
    """A model of ``cfg`` with random weights everywhere (biases too), and its save_weights bytes."""
    from midiforge.model.lstm import build_model

    model = build_model(cfg)
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, WEIGHTS)
        model.save_weights(path)
        return model, Path(path).read_bytes()


@pytest.fixture(scope="module")
def models():
    """(config, weights bytes, the weights as tf_keras loads them into a fresh model) for 1 and 3 LSTMs."""
    from midiforge.model.lstm import build_model, tf_keras

    tf_keras()
    out = []
    for units, seed in (((24,), 1), ((16, 12, 8), 2)):
        cfg = ModelConfig(vocab_size=TOK.vocab_size, embedding_dim=10, lstm_units=units, dropout=0.1,
                          tokenizer_id=TOK.id)
        _model, data = _keras_model(cfg, seed)
        fresh = build_model(cfg)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, WEIGHTS)
            Path(path).write_bytes(data)
            fresh.load_weights(path)
        out.append((cfg, data, weights_from_keras(fresh, len(units))))
    return out


def test_h5_weights_equal_what_tf_keras_loads(models):
    for cfg, data, keras_w in models:
        w = weights_from_h5(data, cfg)
        assert w.units == cfg.lstm_units and w.vocab_size == cfg.vocab_size
        pairs = [(w.embedding, keras_w.embedding), (w.dense_kernel, keras_w.dense_kernel),
                 (w.dense_bias, keras_w.dense_bias)]
        pairs += [(a, b) for la, lb in zip(w.lstm, keras_w.lstm, strict=True) for a, b in zip(la, lb, strict=True)]
        for a, b in pairs:
            assert a.dtype == np.float64 and a.shape == b.shape
            assert np.array_equal(a, b)
        # the same arrays, so the same tokens for a fixed seed (sampled, several rows, a lone row)
        jobs = [PieceJob(i, np.array([1], np.int32), 120.0) for i in range(5)]
        settings = SamplingSettings(temperature=1.0)
        ours = decode(NumpyLSTM(w), jobs, settings, 7, Limits(40), 4)
        theirs = decode(NumpyLSTM(keras_w), jobs, settings, 7, Limits(40), 4)
        for a, b in zip(ours, theirs, strict=True):
            assert np.array_equal(a.tokens, b.tokens) and a.stop == b.stop
        assert len({tuple(r.tokens) for r in ours}) > 1  # random weights and sampling: the pieces differ


def test_weights_that_do_not_fit_are_refused(models):
    cfg, data, _ = models[0]
    other = ModelConfig(vocab_size=cfg.vocab_size, embedding_dim=10, lstm_units=(25,), tokenizer_id=TOK.id)
    with pytest.raises(MidiforgeError, match=r"w\.h5: weights do not fit the model config \(layers/lstm/cell/vars/0"):
        weights_from_h5(data, other, "w.h5")
    deeper = ModelConfig(vocab_size=cfg.vocab_size, embedding_dim=10, lstm_units=(24, 24), tokenizer_id=TOK.id)
    with pytest.raises(MidiforgeError, match=r"w\.h5: no layers/lstm_1/cell/vars/0"):
        weights_from_h5(data, deeper, "w.h5")
    with pytest.raises(MidiforgeError, match=r"w\.h5: not a readable HDF5 weights file"):
        weights_from_h5(b"not hdf5 at all" * 10, cfg, "w.h5")
    with pytest.raises(MidiforgeError, match=r"w\.h5: not a readable HDF5 weights file"):
        weights_from_h5(data[: len(data) // 2], cfg, "w.h5")


def test_bundle_files_and_parse_bundle_in_memory(models):
    cfg, data, keras_w = models[1]
    files = bundle_files(config=cfg, tokenizer_json=TOK.to_json(), training={"epochs_done": 3, "qpm_median": 90.0},
                         weights=data, extra={OPTIMIZER: b"opt"})
    assert list(files)[-1] == MANIFEST
    manifest, listed = parse_manifest(files[MANIFEST])
    assert manifest["epoch"] == 3 and set(listed) == {CONFIG, TOKENIZER, TRAINING, WEIGHTS, OPTIMIZER}
    for name, e in listed.items():
        assert e["bytes"] == len(files[name]) and e["sha256"] == hashlib.sha256(files[name]).hexdigest()
    b = parse_bundle({k: v for k, v in files.items() if k != OPTIMIZER}, uri="mem://b", checkpoint="epoch-0003")
    assert b.config == cfg and b.tokenizer.id == TOK.id and b.epoch == 3 and b.checkpoint == "epoch-0003"
    assert b.sha256 == hashlib.sha256(files[MANIFEST]).hexdigest()
    assert np.array_equal(b.numpy_weights().dense_kernel, keras_w.dense_kernel)
    with pytest.raises(MidiforgeError, match="mem://b/model.weights.h5: missing"):
        parse_bundle({k: v for k, v in files.items() if k != WEIGHTS}, uri="mem://b", checkpoint="final")
    with pytest.raises(MidiforgeError, match="mem://b/training.json: not a JSON object"):
        parse_bundle({**files, TRAINING: b"[1, 2]"}, uri="mem://b", checkpoint="final")
    bad = json.loads(files[MANIFEST])
    bad["format"] = "something-else"
    with pytest.raises(MidiforgeError, match="x/manifest.json: not a midiforge bundle manifest"):
        parse_manifest(json.dumps(bad).encode(), "x/manifest.json")
    bad = json.loads(files[MANIFEST])
    bad["files"] = [e for e in bad["files"] if e["path"] != TOKENIZER]
    with pytest.raises(MidiforgeError, match="does not list tokenizer.json"):
        parse_manifest(json.dumps(bad).encode())
    bad = json.loads(files[MANIFEST])
    bad["files"][0]["path"] = "../run.json"
    with pytest.raises(MidiforgeError, match="not a file of this bundle"):
        parse_manifest(json.dumps(bad).encode())
    with pytest.raises(MidiforgeError, match="tokenizer .* is not the model's tokenizer"):
        bundle_files(config=cfg, tokenizer_json=make_tokenizer("events", bars=True).to_json(), training={},
                     weights=data)


@pytest.fixture()
def model_dir(models, tmp_path):
    """MODEL_DIR with checkpoints 1, 2 (optimizer.h5 in both), index.json and the final bundle."""
    cfg, data, _ = models[0]
    store = open_store(str(tmp_path / "model"))
    index = []
    for epoch, loss in ((1, 2.0), (2, 2.5)):
        m = write_bundle(store, checkpoint_dir(epoch), config=cfg, tokenizer_json=TOK.to_json(),
                         training={"epochs_done": epoch}, weights=data, extra={OPTIMIZER: b"o" * epoch})
        index.append({"epoch": epoch, "val_loss": loss, "val_accuracy": None, "path": checkpoint_dir(epoch),
                      "sha256": hashlib.sha256(m).hexdigest()})
    store.write_bytes(INDEX, json.dumps({"checkpoints": index, "best": 1, "latest": 2}).encode())
    write_bundle(store, "bundle", config=cfg, tokenizer_json=TOK.to_json(), training={"epochs_done": 2}, weights=data)
    return tmp_path / "model"


def test_load_bundle_resolves_checkpoints(model_dir):
    root = str(model_dir)
    assert load_bundle(root).checkpoint == "final"
    assert load_bundle(root, checkpoint="best").checkpoint == "epoch-0001"
    assert load_bundle(root, checkpoint="latest").checkpoint == "epoch-0002"
    assert load_bundle(open_store(root), checkpoint=2).uri == str(model_dir / "checkpoints" / "epoch-0002")
    assert [c["epoch"] for c in list_checkpoints(root)] == [1, 2]
    one = load_bundle(str(model_dir / "checkpoints" / "epoch-0001"))  # a bundle's own directory
    assert one.checkpoint == "epoch-0001" and one.epoch == 1 and OPTIMIZER not in one.files
    assert load_bundle(str(model_dir / "bundle")).checkpoint == "final"
    with pytest.raises(MidiforgeError, match="no checkpoint for epoch 9"):
        load_bundle(root, checkpoint=9)
    with pytest.raises(MidiforgeError, match="is a single bundle"):
        load_bundle(str(model_dir / "bundle"), checkpoint="best")


def test_load_bundle_checks_every_file_against_the_manifest(model_dir):
    root = str(model_dir)
    cfg = model_dir / "bundle" / CONFIG
    original = cfg.read_bytes()
    cfg.write_bytes(original.replace(b'"dropout": 0.1', b'"dropout": 0.2'))  # same size, other content
    with pytest.raises(MidiforgeError) as exc:
        load_bundle(root)
    assert str(exc.value).startswith(f"{cfg}: does not match its manifest entry: sha256")
    cfg.write_bytes(original + b" ")
    with pytest.raises(MidiforgeError, match=f"{cfg}: does not match its manifest entry: {len(original) + 1} bytes"):
        load_bundle(root)
    cfg.write_bytes(original)
    assert load_bundle(root).config.dropout == 0.1
    opt = model_dir / "checkpoints" / "epoch-0002" / OPTIMIZER
    opt.unlink()  # listed, so it must be there (resume state), though the reader does not read it
    with pytest.raises(MidiforgeError, match=f"{opt}: missing \\(listed in the bundle manifest\\)"):
        load_bundle(root, checkpoint="latest")
    (model_dir / "bundle" / MANIFEST).write_bytes(b"{not json")
    with pytest.raises(MidiforgeError, match="bundle/manifest.json: not valid JSON"):
        load_bundle(root)
    (model_dir / "bundle" / MANIFEST).unlink()
    with pytest.raises(MidiforgeError, match="no final bundle"):
        load_bundle(root)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_model_layer_does_no_storage_io():
    offenders = {p.name: sorted(m for m in _imports(p) if m.startswith("midiforge.storage") or m.startswith("boto"))
                 for p in sorted((SRC / "model").glob("*.py"))}
    assert not any(offenders.values()), offenders
    # and reading a bundle needs no TensorFlow (model/training.py is the trainer's: it is TensorFlow)
    code = ("import sys\nimport midiforge.model.bundle, midiforge.model.decode, midiforge.model.lstm, "
            "midiforge.model.sampling\n"
            "print(sorted(m for m in sys.modules if m.startswith(('midiforge.storage', 'tensorflow', 'tf_keras'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

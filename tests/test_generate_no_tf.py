"""generate with the NumPy engine imports no TensorFlow, in the driver or in the Ray actors.

``midiforge generate`` runs in a subprocess (the whole CLI, a private local Ray with one actor) whose
generate workers are the stage's own, with one addition: after each batch an actor writes down whether
``tensorflow`` / ``tf_keras`` are in its ``sys.modules``.  The same run with ``--engine keras`` shows
that the probe sees TensorFlow when an actor has it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from midiforge.model.bundle import WEIGHTS
from midiforge.model.lstm import ModelConfig
from midiforge.music.tokenizers import make_tokenizer
from midiforge.pipeline.bundles import write_bundle
from midiforge.storage import open_store

PROBE = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path

    import midiforge.pipeline.generate as G

    model_dir, dest, reports, engine = sys.argv[1:5]


    class ProbedWorker(G.GenerateWorker):  # travels to the actors by value (defined in __main__)
        def run(self, *args, **kwargs):
            out = super().run(*args, **kwargs)
            Path(reports, f"{engine}-{os.getpid()}.json").write_text(json.dumps({
                "engine": self.engine_name, "tensorflow": "tensorflow" in sys.modules,
                "tf_keras": "tf_keras" in sys.modules}))
            return out


    G.GenerateWorker = ProbedWorker
    from midiforge.cli import main

    code = main(["generate", model_dir, dest, "-n", "4", "--seed", "3", "--max-tokens", "12", "--workers", "1",
                 "--batch-size", "2", "--engine", engine, "--no-midi-files", "--no-progress"])
    print("RESULT " + json.dumps({"code": code, "tensorflow": "tensorflow" in sys.modules,
                                  "tf_keras": "tf_keras" in sys.modules}))
""")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from midiforge.model.lstm import build_model, tf_keras

    tf_keras()
    tok = make_tokenizer("events")
    cfg = ModelConfig(vocab_size=tok.vocab_size, embedding_dim=8, lstm_units=(16,), dropout=0.0, tokenizer_id=tok.id)
    model = build_model(cfg)
    with tempfile.TemporaryDirectory() as d:
        model.save_weights(os.path.join(d, WEIGHTS))
        weights = Path(d, WEIGHTS).read_bytes()
    root = tmp_path_factory.mktemp("model")
    write_bundle(open_store(str(root)), "bundle", config=cfg, tokenizer_json=tok.to_json(),
                 training={"qpm_median": 100.0, "epochs_done": 1}, weights=weights)
    return root


def _generate(model_dir: Path, tmp_path: Path, engine: str) -> tuple[dict, list[dict], Path]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    reports = tmp_path / f"reports-{engine}"
    reports.mkdir()
    dest = tmp_path / f"out-{engine}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, str(script), str(model_dir), str(dest), str(reports), engine],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    driver = json.loads(line[len("RESULT "):])
    assert driver["code"] == 0, err[-3000:]
    actors = [json.loads(p.read_text()) for p in sorted(reports.glob("*.json"))]
    return driver, actors, dest


def _tokens(dest: Path) -> list[tuple[int, list[int]]]:
    from midiforge.pipeline import pieces

    t = pieces.read_pieces(str(dest), columns=["index", "tokens"])
    return sorted((int(i), list(map(int, tok))) for i, tok in zip(t["index"].to_pylist(), t["tokens"].to_pylist()))


def test_numpy_engine_generates_without_tensorflow(model_dir, tmp_path):
    driver, actors, dest = _generate(model_dir, tmp_path, "numpy")
    assert actors, "no actor reported (the probe did not run in the actors)"
    assert all(a["engine"] == "numpy" for a in actors)
    assert not driver["tensorflow"] and not driver["tf_keras"], "the driver imported TensorFlow"
    assert not any(a["tensorflow"] or a["tf_keras"] for a in actors), f"an actor imported TensorFlow: {actors}"
    numpy_tokens = _tokens(dest)
    assert [i for i, _ in numpy_tokens] == [0, 1, 2, 3]

    # the probe sees TensorFlow where it is: the keras engine's actors build the tf_keras model
    _driver, keras_actors, keras_dest = _generate(model_dir, tmp_path, "keras")
    assert keras_actors and all(a["tensorflow"] and a["tf_keras"] for a in keras_actors), keras_actors
    assert [i for i, _ in _tokens(keras_dest)] == [0, 1, 2, 3]

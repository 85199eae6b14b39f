"""Training: the Keras tutorial's model and input layout against midiforge's default, in one run.

Same machine, same corpus (the shared ``ff`` corpus, classic tokenizer, first track as the
tutorial reads it), same wall-clock training budget for each model, spent in alternating
slices (``--rounds``) so that both see the same machine load:

* tutorial (Skuldur/Classical-Piano-Composer ``lstm.py``): every 100-token window of the
  concatenated training notes (stride 1) as normalised scalars ``id / n_vocab``, ONE target
  per window (the token after it, one-hot), LSTM(512) x3 with Dropout(0.3), Dense(256),
  Dropout(0.3), Dense(n_vocab), softmax, RMSprop, batch 64, shuffled.
* midiforge: the default model (:class:`midiforge.model.lstm.ModelConfig`) and the real input
  pipeline (:func:`midiforge.model.data.make_dataset` over the Parquet shards): windows of
  ``--seq-len`` tokens with a target at every position, batch 64, Adam.

Reported: target tokens per second (steady state, after the first step) and the held-out loss
and accuracy after the budget, both models scored on the SAME targets of the validation
split: ``--eval-windows`` positions, each predicted from the 100 tokens before it (the
tutorial's context; midiforge reads the same 100 tokens and is scored at the last position).

    .venv/bin/python benchmarks/train.py [--budget-seconds 120] [--shards DEST]

Without ``--shards`` the corpus is preprocessed first (``midiforge preprocess --tokenizer
classic --tracks first``) into a temporary directory.  Prints one JSON object.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpora" / "ff"
WINDOW = 100     # the tutorial's sequence_length
BATCH = 64       # the tutorial's batch_size


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def stream(shards, split: str) -> np.ndarray:
    return np.concatenate(list(shards.reader(split)(None)))


class Clock:
    """Training time and steps of one model across several fit() slices (interleaved rounds)."""

    def __init__(self, keras, targets_per_step: int):
        self.keras = keras
        self.targets_per_step = targets_per_step
        self.steps = 0
        self.seconds = 0.0          # all training time
        self.first_step = None      # seconds of the very first step (tracing), excluded from steady state

    def callback(self, seconds: float):
        clock = self

        class Slice(self.keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.t0 = self.last = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                now = time.perf_counter()
                clock.steps += 1
                if clock.first_step is None:
                    clock.first_step = now - self.t0
                clock.seconds += now - self.last
                self.last = now
                if now - self.t0 >= seconds:
                    self.model.stop_training = True

        return Slice()

    def report(self) -> dict:
        steady_steps = max(self.steps - 1, 1)
        steady = self.seconds - (self.first_step or 0.0)
        return {"steps": self.steps, "train_seconds": round(self.seconds, 2),
                "targets": self.steps * self.targets_per_step,
                "target_tokens_per_second": round(steady_steps * self.targets_per_step / steady, 2),
                "target_tokens_per_second_incl_first_step": round(self.steps * self.targets_per_step / self.seconds, 2),
                "seconds_per_step": round(steady / steady_steps, 4)}


def score(logp_at_targets: np.ndarray, predicted: np.ndarray, targets: np.ndarray) -> dict:
    return {"loss": round(float(-logp_at_targets.mean()), 4),
            "accuracy": round(float((predicted == targets).mean()), 4)}


class Tutorial:
    """prepare_sequences + create_network of the tutorial's lstm.py."""

    name = "LSTM(512)x3 + Dense(256), scalar inputs, one target per 100-token window"

    def __init__(self, keras, train: np.ndarray, vocab: int):
        n = len(train) - WINDOW
        idx = np.arange(n)[:, None] + np.arange(WINDOW)[None, :]
        self.x = (train[idx] / float(vocab)).astype(np.float32)[..., None]   # every window, stride 1, normalised
        self.y = keras.utils.to_categorical(train[WINDOW:], num_classes=vocab).astype(np.float32)
        self.vocab = vocab
        L = keras.layers
        self.model = keras.Sequential([
            L.LSTM(512, input_shape=(WINDOW, 1), return_sequences=True), L.Dropout(0.3),
            L.LSTM(512, return_sequences=True), L.Dropout(0.3),
            L.LSTM(512), L.Dense(256), L.Dropout(0.3), L.Dense(vocab), L.Activation("softmax"),
        ])
        self.model.compile(loss="categorical_crossentropy", optimizer="rmsprop")
        self.clock = Clock(keras, BATCH)  # one target per window

    def train(self, seconds: float) -> None:
        self.model.fit(self.x, self.y, epochs=10_000, batch_size=BATCH, shuffle=True,
                       callbacks=[self.clock.callback(seconds)], verbose=0)

    def report(self, contexts, targets) -> dict:
        probs = self.model.predict((contexts / float(self.vocab)).astype(np.float32)[..., None], batch_size=256, verbose=0)
        p = np.clip(probs[np.arange(len(targets)), targets], 1e-7, 1.0)
        return {"model": self.name, "parameters": int(self.model.count_params()), "windows": int(len(self.x)),
                **self.clock.report(), "heldout": score(np.log(p), probs.argmax(-1), targets)}


class Midiforge:
    """The default model and midiforge's input pipeline."""

    def __init__(self, keras, shards, seq_len: int):
        from midiforge.model.data import assign, make_dataset
        from midiforge.model.lstm import ModelConfig
        from midiforge.model.training import compile_model
        from midiforge.pipeline.train import DEFAULTS

        self.cfg = ModelConfig(vocab_size=shards.tokenizer.vocab_size, tokenizer_id=shards.tokenizer.id)
        self.model = compile_model(self.cfg, learning_rate=DEFAULTS["learning_rate"], clipnorm=DEFAULTS["clipnorm"],
                                   mixed_precision=False)
        paths, _ = assign(shards.files, "train", 0, 1)
        self.ds = make_dataset(shards.reader("train", paths), seq_len=seq_len, batch_size=BATCH, seed=[0, 0],
                               shuffle_buffer=DEFAULTS["shuffle_buffer"])
        val_paths, _ = assign(shards.files, "validation", 0, 1)
        self.val = make_dataset(shards.reader("validation", val_paths), seq_len=seq_len, batch_size=BATCH,
                                take=max(1, shards.tokens("validation") // (seq_len * BATCH)))
        self.seq_len = seq_len
        self.clock = Clock(keras, BATCH * seq_len)  # a target at every position

    def train(self, seconds: float) -> None:
        self.model.fit(self.ds, epochs=10_000, steps_per_epoch=50, callbacks=[self.clock.callback(seconds)], verbose=0)

    def report(self, contexts, targets) -> dict:
        own = self.model.evaluate(self.val, verbose=0, return_dict=True)
        logits = self.model.predict(contexts.astype(np.int32), batch_size=256, verbose=0)[:, -1, :].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return {"model": f"embedding {self.cfg.embedding_dim} + LSTM{self.cfg.lstm_units} (the default), token ids, "
                         f"a target at every position of {self.seq_len}-token windows",
                "parameters": self.cfg.parameters, "seq_len": self.seq_len, **self.clock.report(),
                "heldout": score(logp[np.arange(len(targets)), targets], logp.argmax(-1), targets),
                "validation_per_position": {"loss": round(own["loss"], 4), "accuracy": round(own["accuracy"], 4)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="a preprocess output (default: preprocess the ff corpus now)")
    parser.add_argument("--corpus", default=str(CORPUS))
    parser.add_argument("--budget-seconds", type=float, default=120.0, help="training time per model (default 120)")
    parser.add_argument("--eval-windows", type=int, default=512, help="held-out targets scored (default 512)")
    parser.add_argument("--seq-len", type=int, default=None, help="midiforge window (default: train's default)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="budget slices, alternating between the models so both see the same machine load")
    args = parser.parse_args()

    from midiforge.pipeline.tokens import open_shards
    from midiforge.model.lstm import tf_keras
    from midiforge.pipeline.train import DEFAULTS

    tmp = None
    shards_dir = args.shards
    t_pre = None
    if not shards_dir:
        if not Path(args.corpus).is_dir():
            print(json.dumps({"error": f"{args.corpus}: corpus not found"}))
            return 2
        tmp = tempfile.TemporaryDirectory(prefix="midiforge-bench-train-")
        shards_dir = os.path.join(tmp.name, "ff-classic")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "midiforge.cli", "preprocess", args.corpus, shards_dir,
                        "--tokenizer", "classic", "--tracks", "first", "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "RAY_ADDRESS": ""})
        t_pre = round(time.perf_counter() - t, 1)
    shards = open_shards(shards_dir)
    vocab = shards.tokenizer.vocab_size
    train = stream(shards, "train")
    val = stream(shards, "validation")
    if len(val) <= WINDOW:
        print(json.dumps({"error": "validation split shorter than one tutorial window"}))
        return 2
    pos = np.unique(np.linspace(0, len(val) - WINDOW - 1, args.eval_windows).astype(np.int64))
    contexts = val[pos[:, None] + np.arange(WINDOW)[None, :]]
    targets = val[pos + WINDOW].astype(np.int64)

    counts = np.bincount(train, minlength=vocab) + 1   # add-one unigram of the training targets: the floor to beat
    unigram = np.log(counts / counts.sum())
    baseline = score(unigram[targets], np.full(len(targets), unigram.argmax()), targets)

    tf, keras = tf_keras()
    seq_len = args.seq_len or DEFAULTS["seq_len"]
    load_before = load()
    tut, mf = Tutorial(keras, train, vocab), Midiforge(keras, shards, seq_len)
    for r in range(1, args.rounds + 1):
        share = args.budget_seconds * r / args.rounds   # each model's cumulative training time after round r
        for m in (tut, mf):
            if share - m.clock.seconds > 0:
                m.train(share - m.clock.seconds)
    tutorial, midiforge = tut.report(contexts, targets), mf.report(contexts, targets)
    out = {
        "benchmark": "train",
        "corpus": args.corpus if not args.shards else None, "shards": None if tmp else shards_dir,
        "preprocess_seconds": t_pre,
        "tokenizer": shards.tokenizer.id, "vocab_size": vocab,
        "train_tokens": int(len(train)), "validation_tokens": int(len(val)),
        "budget_seconds_each": args.budget_seconds, "rounds": args.rounds, "heldout_targets": int(len(targets)),
        "heldout_unigram_baseline": baseline,
        "tutorial": tutorial, "midiforge": midiforge,
        "ratio_target_tokens_per_second": round(midiforge["target_tokens_per_second"]
                                                / tutorial["target_tokens_per_second"], 1),
        "heldout_loss_lower": midiforge["heldout"]["loss"] < tutorial["heldout"]["loss"],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "tensorflow": tf.__version__,
                    "load_before": load_before, "load_after": load()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(json.dumps(out, indent=1))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

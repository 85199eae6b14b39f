"""The LSTM language model over token ids: config, builder, and the TensorFlow import.

Architecture (layer names are part of the bundle contract and never change)::

    tokens (int32, [batch, time])
      -> "embedding"   Embedding(vocab_size, embedding_dim)          (no masking: windows hold no PAD)
      -> "lstm_1"      LSTM(lstm_units[0], return_sequences=True)
      -> "dropout_1"   Dropout(dropout)
      -> "lstm_2" ...  one LSTM + Dropout pair per entry of lstm_units
      -> "logits"      Dense(vocab_size)                              (no activation)
      -> "output"      Activation("linear", dtype=float32)            (float32 even under mixed precision)

The model outputs **logits** (unnormalised, float32) of shape ``[batch, time, vocab_size]``:
position ``t`` scores the token that follows input token ``t``.  Sample with
``softmax(logits / temperature)``; train with ``SparseCategoricalCrossentropy(from_logits=True)``.

The same weights load into every variant :func:`build_model` makes: the training model
(``batch_size=None, seq_len=None``) and a stateful decoder (``batch_size=B, stateful=True``,
``seq_len=1`` or ``None``) that keeps each row's LSTM state between calls (reset with
``model.reset_states()``), so generation feeds one token per call.

GPU: every LSTM keeps TensorFlow's cuDNN conditions (tanh/sigmoid activations,
``recurrent_dropout=0``, ``unroll=False``, ``use_bias=True``, no mask), so on a GPU the fused
cuDNN kernel runs; dropout sits between layers, not inside them.  ``mixed_precision=True``
gives every layer the ``mixed_float16`` policy (float16 compute, float32 variables) except the
final ``output`` cast, so weights saved from a mixed-precision model load into a float32 one.

TensorFlow is imported only inside functions, through :func:`tf_keras`, which sets
``TF_USE_LEGACY_KERAS=1`` first (Keras 3 cannot run ``fit`` under MultiWorkerMirroredStrategy
here; tf_keras can).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field

from midiforge.errors import MidiforgeError

MODEL_FORMAT = "midiforge-lstm"
MODEL_FORMAT_VERSION = 1
#: What the model's output is: unnormalised scores over the vocabulary.
OUTPUT_KIND = "logits"


#: TensorFlow's start-up lines for a user who did nothing wrong (no GPU, oneDNN on, CUDA plugins
#: registered twice): written by its C++ logging straight to file descriptor 2 before Python's logging
#: exists, whatever TF_CPP_MIN_LOG_LEVEL says (TF 2.21).  They go to the debug log instead.
_TF_STARTUP_NOISE = re.compile(
    r"absl::InitializeLog|oneDNN custom operations|TF_ENABLE_ONEDNN_OPTS|Could not find cuda drivers|cuInit|"
    r"Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered|TF-TRT Warning|"
    r"This TensorFlow binary is optimized|rebuild TensorFlow with the appropriate compiler flags|"
    r"cuda_(platform|executor|diagnostics)\.cc|cudart_stub\.cc")


@contextlib.contextmanager
def _tf_startup_quiet():
    """File descriptor 2 into a temporary file while TensorFlow starts; its known start-up lines are
    logged at debug level, anything else is written back to stderr.  ``MIDIFORGE_TF_LOGS=1`` shows all."""
    if os.environ.get("MIDIFORGE_TF_LOGS", "") not in ("", "0"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                tmp.seek(0)
                log = logging.getLogger("midiforge.tensorflow")
                for line in tmp.read().decode("utf-8", "replace").splitlines():
                    if _TF_STARTUP_NOISE.search(line):
                        log.debug("%s", line)
                    elif line.strip():
                        print(line, file=sys.stderr)
    finally:
        os.close(saved)


class _StartupNoiseFilter(logging.Filter):
    """On TensorFlow's Python logger: its advice about running a strategy eagerly (said once per run, to
    every user of MultiWorkerMirroredStrategy; nothing they can act on) goes to the debug log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "Using CollectiveAllReduceStrategy eagerly has significant overhead" in record.getMessage():
            logging.getLogger("midiforge.tensorflow").debug("%s", record.getMessage())
            return False
        return True


def tf_keras():
    """``(tensorflow, tf_keras)``, imported with ``TF_USE_LEGACY_KERAS=1`` set beforehand; TensorFlow's
    start-up messages (and the CUDA probe of its first device query) go to the debug log."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tf_keras" not in sys.modules:
        with _tf_startup_quiet():
            import tensorflow as tf
            import tf_keras  # noqa: F401

            tf.config.list_physical_devices()  # the CUDA probe, which logs "failed call to cuInit" without a GPU
        tf.get_logger().addFilter(_StartupNoiseFilter())
    import tensorflow as tf
    import tf_keras as keras

    return tf, keras


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network (weights aside).  Stored as ``config.json``."""

    vocab_size: int
    embedding_dim: int = 128
    lstm_units: tuple[int, ...] = (256, 256)
    dropout: float = 0.2
    tokenizer_id: str = ""
    output: str = field(default=OUTPUT_KIND)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lstm_units", tuple(int(u) for u in self.lstm_units))
        if self.vocab_size < 5:
            raise MidiforgeError(f"model config: vocab_size {self.vocab_size} is too small (at least the 4 specials + 1)")
        if self.embedding_dim < 1:
            raise MidiforgeError("model config: embedding_dim must be >= 1")
        if not self.lstm_units or any(u < 1 for u in self.lstm_units):
            raise MidiforgeError(f"model config: lstm_units must be one or more positive sizes, got {self.lstm_units}")
        if not 0.0 <= self.dropout < 1.0:
            raise MidiforgeError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        if self.output != OUTPUT_KIND:
            raise MidiforgeError(f"model config: output {self.output!r} is not supported (only {OUTPUT_KIND!r})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lstm_units"] = list(self.lstm_units)
        return {"format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "ModelConfig":
        if not isinstance(d, dict) or d.get("format") != MODEL_FORMAT:
            raise MidiforgeError(f"{where}: not a midiforge model config (format {MODEL_FORMAT!r} missing)")
        if d.get("version") != MODEL_FORMAT_VERSION:
            raise MidiforgeError(f"{where}: model config version {d.get('version')} is not supported "
                                 f"(this midiforge reads {MODEL_FORMAT_VERSION})")
        known = {"vocab_size", "embedding_dim", "lstm_units", "dropout", "tokenizer_id", "output"}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as exc:
            raise MidiforgeError(f"{where}: bad model config ({exc})") from None

    @property
    def parameters(self) -> int:
        """Number of trainable parameters (no TensorFlow needed)."""
        n = self.vocab_size * self.embedding_dim
        width = self.embedding_dim
        for u in self.lstm_units:
            n += 4 * (u * (width + u) + u)
            width = u
        return n + width * self.vocab_size + self.vocab_size


def parse_units(text: str | list | tuple) -> tuple[int, ...]:
    """``"256,256"`` (or a list) -> ``(256, 256)``."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [p for p in str(text).replace(" ", "").split(",") if p]
    try:
        units = tuple(int(p) for p in items)
    except ValueError:
        raise MidiforgeError(f"lstm units {text!r}: expected comma-separated sizes such as 256,256") from None
    if not units or any(u < 1 for u in units):
        raise MidiforgeError(f"lstm units {text!r}: expected one or more positive sizes")
    return units


def build_model(cfg: ModelConfig, *, batch_size: int | None = None, stateful: bool = False,
                seq_len: int | None = None, mixed_precision: bool = False):
    """The tf_keras model for ``cfg`` (see the module docstring for layers and output).

    ``stateful=True`` needs a fixed ``batch_size``; its LSTMs carry state across calls.
    The model is not compiled.
    """
    if stateful and not batch_size:
        raise MidiforgeError("build_model: a stateful model needs a fixed batch_size")
    _tf, keras = tf_keras()
    layers = keras.layers
    policy = keras.mixed_precision.Policy("mixed_float16" if mixed_precision else "float32")
    tokens = keras.Input(shape=(seq_len,), batch_size=batch_size, dtype="int32", name="tokens")
    x = layers.Embedding(cfg.vocab_size, cfg.embedding_dim, name="embedding", dtype=policy)(tokens)
    for i, units in enumerate(cfg.lstm_units, start=1):
        # Defaults kept on purpose: they are TensorFlow's conditions for the cuDNN kernel.
        x = layers.LSTM(units, return_sequences=True, stateful=stateful, name=f"lstm_{i}", dtype=policy)(x)
        x = layers.Dropout(cfg.dropout, name=f"dropout_{i}", dtype=policy)(x)
    x = layers.Dense(cfg.vocab_size, name="logits", dtype=policy)(x)
    out = layers.Activation("linear", dtype="float32", name="output")(x)
    return keras.Model(tokens, out, name="midiforge_lstm")

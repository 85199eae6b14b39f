"""Batched, stateful decoding: all pieces of a batch advance together, one token per step.

Each row of a batch carries its LSTM state from step to step, so a step costs one LSTM update
per layer, never a re-run of a window (the tutorial called ``model.predict`` on the last 100
tokens for every note).  A row first consumes its primer token by token (its logits are not
used until the last primer token), then samples one token per step; a row that emits EOS, or
reaches ``max_tokens`` generated tokens or ``max_seconds`` of music, leaves the batch while the
others go on.

Two engines run the same loop:

* :class:`NumpyLSTM` (the default): the bundle's weights in float64 NumPy.  The LSTM equations
  are the ones tf_keras uses (gates i, f, c, o; sigmoid/tanh), checked against the Keras model
  to ~1e-6 by the tests.  Each row's arithmetic is independent of the other rows (one BLAS
  ``gemm`` per layer, at least two rows so that a lone row never takes the ``gemv`` path), and
  float64 leaves ~1e-13 of noise where float32 would leave ~1e-7, so a piece's tokens do not
  depend on the batch size or on its place in the batch.  No TensorFlow at generation time.
* :class:`KerasLSTM`: the stateful build of the bundle's model (``batch_size=B, stateful=True``)
  on TensorFlow, for GPUs.  Same loop and sampling; float32 kernels may round differently for
  different batch sizes, so bit-identical tokens across batch sizes are promised only by the
  NumPy engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from midiforge.errors import MidiforgeError
from midiforge.model.sampling import SamplingSettings, choose, piece_rng
from midiforge.music.piece import DEFAULT_QPM, quarters_to_seconds
from midiforge.music.tokenizers import EOS_ID, Tokenizer


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
@dataclass
class LSTMWeights:
    """The numbers of a midiforge LSTM, taken from its Keras layers (see midiforge.model.lstm)."""

    embedding: np.ndarray                                   # [vocab, emb]
    lstm: list[tuple[np.ndarray, np.ndarray, np.ndarray]]   # per layer: kernel [in, 4u], recurrent [u, 4u], bias [4u]
    dense_kernel: np.ndarray                                # [u_last, vocab]
    dense_bias: np.ndarray                                  # [vocab]

    @property
    def vocab_size(self) -> int:
        return int(self.embedding.shape[0])

    @property
    def units(self) -> tuple[int, ...]:
        return tuple(int(r.shape[0]) for _, r, _ in self.lstm)

    def nbytes(self) -> int:
        arrays = [self.embedding, self.dense_kernel, self.dense_bias] + [a for t in self.lstm for a in t]
        return int(sum(a.nbytes for a in arrays))


def weights_from_keras(model, n_layers: int | None = None) -> LSTMWeights:
    """Read the layers of a model made by :func:`midiforge.model.lstm.build_model`.

    Refuses a model whose LSTMs are not the plain tanh/sigmoid cell the NumPy engine computes.
    """
    names = [layer.name for layer in model.layers]
    n = n_layers or sum(1 for name in names if name.startswith("lstm_"))
    lstm = []
    for i in range(1, n + 1):
        layer = model.get_layer(f"lstm_{i}")
        cfg = layer.get_config()
        plain = (cfg.get("activation") == "tanh" and cfg.get("recurrent_activation") == "sigmoid"
                 and cfg.get("use_bias", True) and not cfg.get("go_backwards") and not cfg.get("time_major"))
        if not plain:
            raise MidiforgeError(f"layer lstm_{i}: not the tanh/sigmoid LSTM the NumPy engine computes "
                                 f"({ {k: cfg.get(k) for k in ('activation', 'recurrent_activation', 'use_bias')} })")
        k, r, b = (np.asarray(w, dtype=np.float64) for w in layer.get_weights())
        lstm.append((k, r, b))
    emb = np.asarray(model.get_layer("embedding").get_weights()[0], dtype=np.float64)
    dk, db = (np.asarray(w, dtype=np.float64) for w in model.get_layer("logits").get_weights())
    return LSTMWeights(emb, lstm, dk, db)


def _sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """1 / (1 + exp(-x)), through exp (several times faster than np.tanh in float64)."""
    out = np.negative(x, out=out)
    np.exp(out, out=out)
    out += 1.0
    np.reciprocal(out, out=out)
    return out


def _tanh(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """tanh(x) = 2 * sigmoid(2x) - 1."""
    out = np.multiply(x, -2.0, out=out)
    np.exp(out, out=out)
    out += 1.0
    np.divide(2.0, out, out=out)
    out -= 1.0
    return out


# ---------------------------------------------------------------------------------------------
# engines: begin(n) / step(tokens) -> logits [live, vocab] / keep(mask)
# ---------------------------------------------------------------------------------------------
class NumpyLSTM:
    """The stateful LSTM in NumPy (float64 by default); rows are pieces."""

    name = "numpy"

    def __init__(self, weights: LSTMWeights, dtype=np.float64) -> None:
        self.dtype = np.dtype(dtype)
        self.name = "numpy" if self.dtype == np.float64 else f"numpy-{self.dtype.name}"
        self.vocab_size = weights.vocab_size
        self.units = weights.units

        def gates(a: np.ndarray, u: int) -> np.ndarray:
            # Keras orders the gate columns i, f, c, o; i, f, o, c puts the three sigmoids side by side
            return np.concatenate([a[..., :2 * u], a[..., 3 * u:], a[..., 2 * u:3 * u]], axis=-1)

        k1, r1, b1 = weights.lstm[0]
        u1 = self.units[0]
        # the first layer's input is an embedding row, so its input projection is a table lookup
        self.table = gates(weights.embedding @ k1 + b1, u1).astype(self.dtype)       # [vocab, 4u1]
        self.recurrent = [gates(r1, u1).astype(self.dtype)]
        self.fused: list[np.ndarray | None] = [None]                                 # [in + u, 4u]
        self.bias: list[np.ndarray | None] = [None]
        for (k, r, b), u in zip(weights.lstm[1:], self.units[1:]):
            self.fused.append(gates(np.concatenate([k, r], axis=0), u).astype(self.dtype))
            self.bias.append(gates(b, u).astype(self.dtype))
            self.recurrent.append(None)
        self.dense_kernel = weights.dense_kernel.astype(self.dtype)
        self.dense_bias = weights.dense_bias.astype(self.dtype)
        self.h: list[np.ndarray] = []
        self.c: list[np.ndarray] = []

    def begin(self, n: int) -> None:
        self.h = [np.zeros((n, u), self.dtype) for u in self.units]
        self.c = [np.zeros((n, u), self.dtype) for u in self.units]

    @property
    def live(self) -> int:
        return self.h[0].shape[0] if self.h else 0

    def keep(self, mask: np.ndarray) -> None:
        self.h = [h[mask] for h in self.h]
        self.c = [c[mask] for c in self.c]

    @staticmethod
    def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        # OpenBLAS sends a one-row product to gemv, which sums in another order than gemm:
        # pad a lone row so that every row of every batch size takes the same kernel.
        if a.shape[0] == 1:
            return (np.concatenate([a, a]) @ b)[:1]
        return a @ b

    def _cell(self, z: np.ndarray, layer: int) -> np.ndarray:
        """The LSTM update from the gate pre-activations ``z`` (columns i, f, o, c), in place."""
        u = self.units[layer]
        sig = _sigmoid(z[:, :3 * u], out=z[:, :3 * u])
        g = _tanh(z[:, 3 * u:], out=z[:, 3 * u:])
        c = self.c[layer]
        c *= sig[:, u:2 * u]
        g *= sig[:, :u]
        c += g
        h = _tanh(c)
        h *= sig[:, 2 * u:3 * u]
        self.h[layer] = h
        return h

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per live row; the logits ``[live, vocab]`` (float64) of the next token."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.shape != (self.live,):
            raise ValueError(f"step: {tokens.shape} tokens for {self.live} rows")
        with np.errstate(over="ignore"):  # exp(-x) -> inf gives the exact limits 0 and -1
            return self._step(tokens)

    def _step(self, tokens: np.ndarray) -> np.ndarray:
        z = self.table[tokens]
        z += self._mm(self.h[0], self.recurrent[0])
        x = self._cell(z, 0)
        for layer in range(1, len(self.units)):
            z = self._mm(np.concatenate([x, self.h[layer]], axis=1), self.fused[layer])
            z += self.bias[layer]
            x = self._cell(z, layer)
        logits = self._mm(x, self.dense_kernel)
        logits += self.dense_bias
        return logits.astype(np.float64, copy=False)

    def state_bytes(self, n: int) -> int:
        return int(2 * n * sum(self.units) * self.dtype.itemsize)


class KerasLSTM:
    """The bundle's stateful Keras model (``batch_size=B, stateful=True, seq_len=1``), e.g. on a GPU.

    Rows that leave a batch keep their slot (fed PAD, output ignored) until the batch ends.
    """

    name = "keras"

    def __init__(self, bundle, batch_size: int, mixed_precision: bool = False) -> None:
        from midiforge.model.lstm import tf_keras

        tf, _keras = tf_keras()
        self.batch_size = int(batch_size)
        self.model = bundle.build(batch_size=self.batch_size, stateful=True, seq_len=1,
                                  mixed_precision=mixed_precision)
        self.vocab_size = bundle.config.vocab_size
        self._tf = tf
        model = self.model
        self._fn = tf.function(lambda x: model(x, training=False),
                               input_signature=[tf.TensorSpec([self.batch_size, 1], tf.int32)])
        self.slots = np.zeros(0, dtype=np.int64)

    def begin(self, n: int) -> None:
        if n > self.batch_size:
            raise ValueError(f"KerasLSTM: {n} rows > batch size {self.batch_size}")
        self.model.reset_states()
        self.slots = np.arange(n)

    @property
    def live(self) -> int:
        return len(self.slots)

    def keep(self, mask: np.ndarray) -> None:
        self.slots = self.slots[mask]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        x = np.zeros((self.batch_size, 1), dtype=np.int32)
        x[self.slots, 0] = tokens
        out = self._fn(self._tf.constant(x)).numpy()
        return out[self.slots, 0, :].astype(np.float64)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
@dataclass
class PieceJob:
    """One piece to generate: its index (seeds its generator), primer ids (>= 1), tempo and time
    signature (where the tokenizer's BAR tokens put the bar lines, for ``max_seconds``)."""

    index: int
    primer: np.ndarray
    qpm: float = DEFAULT_QPM
    time_signature: tuple[int, int] = (4, 4)


STOP_REASONS = ("", "eos", "max_tokens", "max_seconds")


@dataclass
class PieceResult:
    index: int
    tokens: np.ndarray        # primer + generated ids (int32)
    primer_length: int
    stop: str                 # "eos" | "max_tokens" | "max_seconds" (STOP_REASONS)
    meta: dict = field(default_factory=dict)

    @property
    def generated(self) -> np.ndarray:
        return self.tokens[self.primer_length:]


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 1024                 # generated tokens per piece (the primer is not counted)
    max_seconds: float | None = None       # stop once the music lasts this long

    def validate(self) -> "Limits":
        if int(self.max_tokens) != self.max_tokens or self.max_tokens < 1:
            raise MidiforgeError(f"--max-tokens {self.max_tokens}: must be an integer >= 1")
        if self.max_seconds is not None and not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise MidiforgeError(f"--max-seconds {self.max_seconds}: must be a number > 0")
        return self


def _history(seq: np.ndarray, rows: np.ndarray, length: np.ndarray, window: int) -> np.ndarray:
    """The last ``window`` tokens of each row (-1 before the first), for the repetition penalty."""
    history = np.full((len(rows), window), -1, dtype=np.int64)
    for h, r in enumerate(rows):
        past = seq[r, max(0, length[r] - window):length[r]]
        history[h, window - len(past):] = past
    return history


def _music_seconds(clocks: list | None, rows: np.ndarray, new: np.ndarray, qpm: np.ndarray) -> np.ndarray:
    """Feed each row's new token to its clock; how long each row's music lasts now, in seconds."""
    quarters = np.zeros(len(rows))
    for k, (r, t) in enumerate(zip(rows.tolist(), new.tolist())):
        clocks[r].feed(t)
        quarters[k] = clocks[r].quarters()
    return quarters_to_seconds(quarters, qpm[rows])


def decode_batch(engine, jobs: list[PieceJob], settings: SamplingSettings, seed: int, limits: Limits,
                 tokenizer: Tokenizer | None = None, on_step=None) -> list[PieceResult]:
    """Generate the pieces of ``jobs`` together (one row each); results in ``jobs`` order.

    With ``limits.max_seconds``, each row reads its tokens (primer, then each sampled token) into
    a clock of ``tokenizer`` (:meth:`~midiforge.music.tokenizers.Tokenizer.clock`, in the job's
    time signature): a row stops at the token whose note makes the music last that long.
    """
    n = len(jobs)
    if n == 0:
        return []
    clocks = None
    if limits.max_seconds is not None:
        if tokenizer is None:
            raise MidiforgeError("--max-seconds needs the tokenizer (its clock says how long the music lasts)")
        clocks = [tokenizer.clock(j.time_signature).feed_all(j.primer) for j in jobs]
    primer_len = np.array([len(j.primer) for j in jobs], dtype=np.int64)
    if primer_len.min() < 1:
        raise ValueError("every primer needs at least one token (BOS)")
    seq = np.zeros((n, int(primer_len.max()) + int(limits.max_tokens)), dtype=np.int32)
    for r, j in enumerate(jobs):
        seq[r, :len(j.primer)] = j.primer
    length = primer_len.copy()                       # tokens known per row
    fed = np.zeros(n, dtype=np.int64)                # tokens consumed by the state per row
    qpm = np.array([j.qpm for j in jobs], dtype=np.float64)
    rngs = [piece_rng(seed, j.index) for j in jobs]
    stop = np.zeros(n, dtype=np.int8)                # index into STOP_REASONS; 0: still going
    live = np.arange(n)                              # job rows still decoding, in engine row order
    engine.begin(n)
    window = int(settings.repetition_window) if settings.repetition_penalty != 1.0 else 0
    while len(live):
        logits = engine.step(seq[live, fed[live]])
        fed[live] += 1
        ready = np.flatnonzero(fed[live] == length[live])   # live positions whose next token is chosen now
        if len(ready):
            rows = live[ready]
            new = choose(logits[ready], settings, history=_history(seq, rows, length, window) if window else None,
                         rngs=None if settings.greedy else [rngs[r] for r in rows])
            seq[rows, length[rows]] = new
            length[rows] += 1
            code = np.zeros(len(rows), dtype=np.int8)
            if clocks is not None:  # the sampled token counts too: where the music ends once it is played
                code[_music_seconds(clocks, rows, new, qpm) >= limits.max_seconds] = 3
            code[length[rows] - primer_len[rows] >= limits.max_tokens] = 2
            code[new == EOS_ID] = 1
            stop[rows] = code
            if code.any():
                keep = np.ones(len(live), dtype=bool)
                keep[ready[code > 0]] = False
                live = live[keep]
                engine.keep(keep)
        if on_step is not None:
            on_step(len(ready))
    return [PieceResult(j.index, seq[r, :length[r]].copy(), int(primer_len[r]), STOP_REASONS[stop[r]])
            for r, j in enumerate(jobs)]


def decode(engine, jobs: list[PieceJob], settings: SamplingSettings, seed: int, limits: Limits,
           batch_size: int, tokenizer: Tokenizer | None = None, on_step=None) -> list[PieceResult]:
    """``jobs`` in consecutive batches of ``batch_size`` rows (``tokenizer``: for ``max_seconds``)."""
    out: list[PieceResult] = []
    for i in range(0, len(jobs), batch_size):
        out.extend(decode_batch(engine, jobs[i:i + batch_size], settings, seed, limits, tokenizer, on_step))
    return out

"""Choosing the next token from logits: temperature, top-k, top-p, repetition penalty, greedy.

Pure NumPy.  Every function works on a batch of rows ``[n, vocab]`` but treats each row on its
own (per-row sorts, cumulative sums and reductions), so a piece's choice never depends on which
other pieces share its batch.  Randomness comes from one :class:`numpy.random.Generator` per piece,
made by :func:`piece_rng` from ``(seed, index)``; a sampled token consumes exactly one uniform
draw from its piece's generator (greedy consumes none), so piece ``i`` of seed ``S`` gets the same
tokens whatever the batch size, the number of workers, or a resume.

Order of operations for one row (all in float64)::

    logits -> ban PAD/BOS/UNK -> repetition penalty (last W tokens) -> greedy: argmax
           -> / temperature -> top-k -> softmax -> top-p -> inverse-CDF draw with u ~ U[0, 1)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from midiforge.errors import MidiforgeError
from midiforge.music.tokenizers import BOS_ID, PAD_ID, UNK_ID

#: Tokens a model may score but generation never emits.
BANNED = (PAD_ID, BOS_ID, UNK_ID)
#: Stream tags mixed into the seed so that the primer choice and the token draws of a piece
#: are independent streams (``default_rng([seed, index, tag])``).
SAMPLE_STREAM = 0
PRIMER_STREAM = 1


@dataclass(frozen=True)
class SamplingSettings:
    """How a token is chosen.  Defaults: plain sampling from the model's distribution."""

    temperature: float = 1.0        # > 0; below 1 sharper, above 1 flatter
    top_k: int = 0                  # keep the k most likely tokens; 0: off
    top_p: float = 1.0              # keep the smallest set whose probability reaches p; 1: off
    repetition_penalty: float = 1.0  # >= 1; CTRL-style penalty on tokens of the last window; 1: off
    repetition_window: int = 64     # how many previous tokens the penalty looks at
    greedy: bool = False            # argmax (the tutorial's choice); ignores temperature/top-k/top-p

    def validate(self) -> "SamplingSettings":
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise MidiforgeError(f"--temperature {self.temperature}: must be a number > 0")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise MidiforgeError(f"--top-k {self.top_k}: must be an integer >= 0 (0 turns it off)")
        if not (np.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise MidiforgeError(f"--top-p {self.top_p}: must be in (0, 1] (1 turns it off)")
        if not (np.isfinite(self.repetition_penalty) and self.repetition_penalty >= 1.0):
            raise MidiforgeError(f"--repetition-penalty {self.repetition_penalty}: must be >= 1 (1 turns it off)")
        if int(self.repetition_window) != self.repetition_window or self.repetition_window < 1:
            raise MidiforgeError(f"--repetition-window {self.repetition_window}: must be an integer >= 1")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def check_seed(seed: int) -> int:
    if int(seed) != seed or seed < 0 or seed >= 2**63:
        raise MidiforgeError(f"--seed {seed}: must be an integer in 0..2**63-1")
    return int(seed)


def piece_rng(seed: int, index: int, stream: int = SAMPLE_STREAM) -> np.random.Generator:
    """The generator of piece ``index`` of run ``seed`` (``stream`` separates independent uses)."""
    return np.random.default_rng([int(seed), int(index), int(stream)])


# ---------------------------------------------------------------------------------------------
# logits processing (vectorised over rows, independent per row)
# ---------------------------------------------------------------------------------------------
def ban(logits: np.ndarray, banned=BANNED) -> np.ndarray:
    """``logits`` with the banned ids at -inf (in place; returns it)."""
    logits[:, [b for b in banned if b < logits.shape[1]]] = -np.inf
    return logits


def repetition_penalty(logits: np.ndarray, history: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty (Keskar et al. 2019) on every token present in ``history`` (in place).

    ``history`` is ``[n, W]`` token ids with -1 for "no token yet".  A penalised logit ``l``
    becomes ``l / penalty`` when positive and ``l * penalty`` otherwise.
    """
    if penalty == 1.0 or history.size == 0:
        return logits
    n, v = logits.shape
    seen = np.zeros((n, v + 1), dtype=bool)
    rows = np.repeat(np.arange(n), history.shape[1])
    cols = np.where(history < 0, v, history).reshape(-1)
    seen[rows, cols] = True
    seen = seen[:, :v]
    logits[seen] = np.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
    return logits


def top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` highest logits of each row (ties: the lowest ids, as argmax); others -inf."""
    n, v = logits.shape
    if k <= 0 or k >= v:
        return logits
    order = np.argsort(-logits, axis=1, kind="stable")
    drop = order[:, k:]
    np.put_along_axis(logits, drop, -np.inf, axis=1)
    return logits


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64; -inf logits get probability 0."""
    m = np.max(logits, axis=1, keepdims=True)
    p = np.exp(logits - m)
    p /= p.sum(axis=1, keepdims=True)
    return p


def top_p_mask(probs: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filtering (Holtzman et al. 2020): per row, keep the most likely tokens until their
    total reaches ``p`` (at least one), zero the rest.  Ties are ordered by id.  In place."""
    if p >= 1.0:
        return probs
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=1)
    before = np.cumsum(sorted_p, axis=1) - sorted_p   # mass of the tokens ranked above
    drop_sorted = before >= p
    drop_sorted[:, 0] = False
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=1)
    probs[drop] = 0.0
    return probs


def draw(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling: for each row, the first id whose cumulative weight exceeds ``u * total``.

    Zero-probability ids are never chosen (``u`` is in [0, 1)).
    """
    cdf = np.cumsum(probs, axis=1)
    target = uniforms[:, None] * cdf[:, -1:]
    idx = np.count_nonzero(cdf <= target, axis=1)
    return np.minimum(idx, probs.shape[1] - 1)


def choose(logits: np.ndarray, settings: SamplingSettings, *, history: np.ndarray | None = None,
           rngs: list[np.random.Generator] | None = None) -> np.ndarray:
    """The next token of each row (int64 ``[n]``).

    ``logits`` ``[n, vocab]`` (any float dtype; copied to float64); ``history`` ``[n, W]`` the
    previous tokens (-1 padded) for the repetition penalty; ``rngs`` one generator per row
    (not needed when greedy).
    """
    x = np.array(logits, dtype=np.float64, copy=True)
    ban(x)
    if history is not None and settings.repetition_penalty != 1.0:
        repetition_penalty(x, history[:, -settings.repetition_window:], settings.repetition_penalty)
    if settings.greedy:
        return np.argmax(x, axis=1)
    if settings.temperature != 1.0:
        x /= settings.temperature
    top_k_mask(x, int(settings.top_k))
    probs = softmax(x)
    top_p_mask(probs, settings.top_p)
    if rngs is None or len(rngs) != len(x):
        raise ValueError("choose: one generator per row is needed to sample")
    u = np.fromiter((g.random() for g in rngs), dtype=np.float64, count=len(rngs))
    return draw(probs, u)

"""Training input: the token ids of a split -> windows of token ids, streamed with bounded memory.

The pipeline reads the shards (:mod:`midiforge.pipeline.tokens`) and hands this module a token
source (:data:`TokenSource`); nothing here opens a file or a store.  The token lists of a split's
pieces (each ``BOS ... EOS``) come row batch by row batch and are laid end to end; the stream is
cut into windows of ``seq_len + 1`` tokens that overlap by one, so that input ``w[:-1]`` has a
target ``w[1:]`` at every position.  Nothing holds more than one Parquet row batch plus one window
tail; the shuffle happens on piece order inside each row batch, on file order, on the window
phase, and in tf.data's shuffle buffer.

Workers split the work by file when there are at least as many files holding the split as
workers, else by window (every worker reads the same stream and keeps every W-th window).

NumPy only, except :func:`make_dataset` which imports TensorFlow when called.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Iterator

import numpy as np

from midiforge.errors import MidiforgeError

#: What this module reads: ``source(rng)`` yields flat int32 token ids (rows laid end to end, a Parquet
#: row batch at a time; rng None: file and row order as stored, else shuffled by rng), and
#: ``source.what`` names the stream in errors.  The pipeline makes it (:class:`midiforge.pipeline.tokens.SplitReader`).
TokenSource = Callable[[np.random.Generator | None], Iterator[np.ndarray]]


def default_cache_dir() -> str:
    base = os.environ.get("MIDIFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "midiforge")
    return base


def assign(files: list, split: str, worker: int, workers: int) -> tuple[list[str], tuple[int, int] | None]:
    """The local paths worker ``worker`` of ``workers`` reads for ``split``, and its window shard.

    ``files``: what the shards hold (``.local`` path, ``.tokens`` per split: :class:`midiforge.pipeline.tokens.ShardFile`).

    By file (second value None) when there are at least ``workers`` files holding the split;
    else every worker reads all files and keeps windows ``worker::workers``.
    """
    holding = [f.local for f in files if f.tokens.get(split, 0) > 0]
    if not holding:
        raise MidiforgeError(f"the shards have no {split!r} rows")
    if len(holding) >= workers:
        return holding[worker::workers], None
    return holding, (worker, workers)


def window_chunks(source: TokenSource, seq_len: int, *, seed: int | list | None = None,
                  shard: tuple[int, int] | None = None, repeat: bool = False) -> Iterator[np.ndarray]:
    """Arrays of windows ``(k, seq_len + 1)`` int32 from the token stream of ``source``.

    ``seed`` None: one deterministic pass (validation).  Else every pass draws a new piece and
    file order and a random window phase from ``seed``.  ``shard=(i, n)`` keeps windows i::n.
    ``repeat`` loops over passes forever (a pass that yields nothing is an error).
    """
    width = seq_len + 1
    passes = 0
    counter = 0  # window index in the stream, for window sharding
    while True:
        rng = None if seed is None else np.random.default_rng([*np.atleast_1d(seed).tolist(), passes])
        buf = np.zeros(0, dtype=np.int32)
        skip = 0 if rng is None else int(rng.integers(seq_len))
        produced = 0
        for flat in source(rng):
            if skip:
                cut = min(skip, len(flat))
                flat, skip = flat[cut:], skip - cut
            buf = np.concatenate([buf, flat]) if len(buf) else flat
            n = (len(buf) - 1) // seq_len
            if n <= 0:
                continue
            win = np.lib.stride_tricks.sliding_window_view(buf[: n * seq_len + 1], width)[::seq_len]
            if shard is not None:
                idx = counter + np.arange(n)
                win = win[idx % shard[1] == shard[0]]
            counter += n
            buf = buf[n * seq_len:]
            if len(win):
                produced += len(win)
                yield np.ascontiguousarray(win, dtype=np.int32)
        passes += 1
        if not repeat:
            return
        if produced == 0:
            raise MidiforgeError(f"{getattr(source, 'what', 'the token stream')}: not one window of {seq_len + 1} "
                                 f"tokens for this worker; use a smaller --seq-len")


def count_windows(tokens: int, seq_len: int) -> int:
    return max(0, (tokens - 1) // seq_len)


def token_counts(source: TokenSource, vocab_size: int) -> np.ndarray:
    """How often each id occurs in the stream of ``source`` (streamed)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for flat in source(None):
        counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
    return counts


def class_weights(counts: np.ndarray, mode: str, max_weight: float = 10.0) -> np.ndarray:
    """Per-target-token loss weights against corpus imbalance.

    ``sqrt``: w ~ count^-1/2, ``inverse``: w ~ 1/count; scaled so the average weight per
    training target is 1 (the loss keeps its scale), then clipped to ``max_weight``.
    Tokens never seen get ``max_weight`` (they are never targets in training anyway).
    """
    if mode == "none":
        return np.ones(len(counts), dtype=np.float32)
    power = {"sqrt": 0.5, "inverse": 1.0}.get(mode)
    if power is None:
        raise MidiforgeError(f"--class-weighting {mode!r}: use none, sqrt or inverse")
    c = counts.astype(np.float64)
    seen = c > 0
    w = np.full(len(c), float(max_weight))
    w[seen] = c[seen] ** -power
    w[seen] /= (c[seen] * w[seen]).sum() / c[seen].sum()
    return np.minimum(w, max_weight).astype(np.float32)


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def make_dataset(source: TokenSource, *, seq_len: int, batch_size: int, shard=None,
                 seed=None, shuffle_buffer: int = 0, weights: np.ndarray | None = None,
                 take: int | None = None):
    """A tf.data pipeline of ``(x, y)`` or ``(x, y, sample_weight)`` batches of shape ``[batch, seq_len]``.

    Training (``seed`` given): endless, shuffled.  Validation (``take`` given): the first
    ``take`` batches of the deterministic stream (wrapping around if it is shorter), the same
    every time the dataset is iterated.
    """
    from midiforge.model.lstm import tf_keras

    tf, _ = tf_keras()
    train = seed is not None
    width = seq_len + 1

    def gen():
        yield from window_chunks(source, seq_len, seed=seed, shard=shard, repeat=train)

    ds = tf.data.Dataset.from_generator(gen, output_signature=tf.TensorSpec((None, width), tf.int32)).unbatch()
    if train and shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=int(np.random.default_rng(np.atleast_1d(seed).tolist()).integers(2**31)))
    if not train:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=True)
    if weights is not None:
        w = tf.constant(weights, dtype=tf.float32)
        ds = ds.map(lambda b: (b[:, :-1], b[:, 1:], tf.gather(w, b[:, 1:])), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda b: (b[:, :-1], b[:, 1:]), num_parallel_calls=tf.data.AUTOTUNE)
    if take is not None:
        ds = ds.take(take)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

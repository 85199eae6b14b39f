"""Training input: preprocess shards -> windows of token ids, streamed with bounded memory.

The token lists of a split's pieces (each ``BOS ... EOS``) are read row batch by row batch and
laid end to end; the stream is cut into windows of ``seq_len + 1`` tokens that overlap by one,
so that input ``w[:-1]`` has a target ``w[1:]`` at every position.  Nothing holds more than one
Parquet row batch plus one window tail; the shuffle happens on piece order inside each row
batch, on file order, on the window phase, and in tf.data's shuffle buffer.

Workers split the work by file when there are at least as many files holding the split as
workers, else by window (every worker reads the same stream and keeps every W-th window).

NumPy/pyarrow only, except :func:`make_dataset` which imports TensorFlow when called.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from midiforge.errors import MidiforgeError
from midiforge.music.tokenizers import Tokenizer, load_tokenizer
from midiforge.storage.manifest import sha256_hex
from midiforge.storage.store import LocalStore, StorageOptions, open_store

SPLITS = ("train", "validation")
ROWS_PER_BATCH = 256


@dataclass(frozen=True)
class ShardFile:
    rel: str                  # path inside the shards directory (shards/part-00000.parquet)
    local: str                # readable local path (the file itself, or its verified cached copy)
    rows: dict = field(default_factory=dict)    # split -> rows
    tokens: dict = field(default_factory=dict)  # split -> tokens


@dataclass
class ShardSet:
    """A finished preprocess output, checked and readable locally."""

    uri: str
    manifest: dict
    manifest_sha256: str
    tokenizer: Tokenizer
    tokenizer_json: bytes
    files: list[ShardFile]

    @property
    def qpm_median(self) -> float:
        return float(self.manifest.get("qpm_median") or 120.0)

    def tokens(self, split: str) -> int:
        return sum(f.tokens.get(split, 0) for f in self.files)

    def rows(self, split: str) -> int:
        return sum(f.rows.get(split, 0) for f in self.files)

    def with_split(self, split: str) -> list[ShardFile]:
        return [f for f in self.files if f.tokens.get(split, 0) > 0]


def default_cache_dir() -> str:
    base = os.environ.get("MIDIFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "midiforge")
    return base


def open_shards(uri: str, options: StorageOptions | None = None, cache_dir: str | None = None) -> ShardSet:
    """Read and check a preprocess output (``DEST`` of ``midiforge preprocess``).

    Object-store shards are downloaded once into ``cache_dir`` (content-addressed by sha256,
    verified); local shards are read in place.
    """
    store = open_store(uri, options)
    if not store.exists("manifest.json"):
        hint = " (pass preprocess's DEST, not its shards/ folder)" if uri.rstrip("/").endswith("shards") else ""
        raise MidiforgeError(f"{store.url('manifest.json')}: no manifest: preprocess did not finish here, "
                             f"or this is not a preprocess output{hint}")
    manifest_bytes = store.read_bytes("manifest.json")
    try:
        manifest = json.loads(manifest_bytes)
    except json.JSONDecodeError as exc:
        raise MidiforgeError(f"{store.url('manifest.json')}: not valid JSON ({exc})") from None
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise MidiforgeError(f"{store.url('manifest.json')}: lists no shards (was preprocess run on an empty input?)")
    tok_entry = next((e for e in manifest.get("files", []) if e.get("path") == "tokenizer.json"), None)
    tok_bytes = store.read_verified("tokenizer.json", tok_entry) if tok_entry else store.read_bytes("tokenizer.json")
    try:
        tokenizer = load_tokenizer(tok_bytes)
    except (KeyError, TypeError, ValueError) as exc:
        raise MidiforgeError(f"{store.url('tokenizer.json')}: not a tokenizer ({exc})") from None
    except MidiforgeError as exc:
        raise MidiforgeError(f"{store.url('tokenizer.json')}: {exc}") from None
    if manifest.get("tokenizer") not in (None, tokenizer.id):
        raise MidiforgeError(f"{store.url('manifest.json')}: says tokenizer {manifest['tokenizer']} but "
                             f"tokenizer.json is {tokenizer.id}")
    files = []
    cache = Path(cache_dir or default_cache_dir()) / "shards"
    for entry in shards:
        rel = entry["path"]
        if isinstance(store, LocalStore):
            local = store.path(rel)
            if not local.is_file():
                raise MidiforgeError(f"{store.url(rel)}: missing (listed in the shards manifest)")
            if local.stat().st_size != entry["bytes"]:
                raise MidiforgeError(f"{store.url(rel)}: {local.stat().st_size} bytes, the manifest says "
                                     f"{entry['bytes']} (truncated or replaced)")
        else:
            local = cache / f"{entry['sha256']}.parquet"
            if not (local.is_file() and local.stat().st_size == entry["bytes"]):
                store.get_file_verified(rel, local, entry)
        files.append(_scan(store.url(rel), rel, str(local), tokenizer.id))
    return ShardSet(store.uri, manifest, sha256_hex(manifest_bytes), tokenizer, tok_bytes, files)


def _scan(url: str, rel: str, local: str, tokenizer_id: str) -> ShardFile:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(local, columns=["split", "n_tokens", "tokenizer"])
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise MidiforgeError(f"{url}: not a readable token shard ({exc})") from None
    ids = [x for x in pc.unique(t["tokenizer"]).to_pylist()]
    bad = [x for x in ids if x != tokenizer_id]
    if bad:
        raise MidiforgeError(f"{url}: rows made with tokenizer {bad[0]}, but the shards' tokenizer.json is "
                             f"{tokenizer_id}; mixed outputs of different preprocess runs cannot be trained together")
    split = np.asarray(t["split"].to_numpy(zero_copy_only=False)).astype(str)
    n_tok = np.asarray(t["n_tokens"].to_numpy(zero_copy_only=False), dtype=np.int64)
    rows = {s: int((split == s).sum()) for s in SPLITS}
    tokens = {s: int(n_tok[split == s].sum()) for s in SPLITS}
    return ShardFile(rel, local, rows, tokens)


def assign(files: list[ShardFile], split: str, worker: int, workers: int) -> tuple[list[str], tuple[int, int] | None]:
    """The local paths worker ``worker`` of ``workers`` reads for ``split``, and its window shard.

    By file (second value None) when there are at least ``workers`` files holding the split;
    else every worker reads all files and keeps windows ``worker::workers``.
    """
    holding = [f.local for f in files if f.tokens.get(split, 0) > 0]
    if not holding:
        raise MidiforgeError(f"the shards have no {split!r} rows")
    if len(holding) >= workers:
        return holding[worker::workers], None
    return holding, (worker, workers)


def token_batches(paths: list[str], split: str, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    """Flat token ids of ``split`` rows, one Parquet row batch at a time (piece order shuffled if rng)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    order = list(paths) if rng is None else [paths[i] for i in rng.permutation(len(paths))]
    for path in order:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=ROWS_PER_BATCH, columns=["split", "tokens"]):
            keep = pc.equal(batch.column(0), split)
            lists = pc.filter(batch.column(1), keep)
            if len(lists) == 0:
                continue
            if rng is not None and len(lists) > 1:
                lists = lists.take(rng.permutation(len(lists)))
            yield np.asarray(lists.flatten().to_numpy(zero_copy_only=False), dtype=np.int32)


def window_chunks(paths: list[str], split: str, seq_len: int, *, seed: int | list | None = None,
                  shard: tuple[int, int] | None = None, repeat: bool = False) -> Iterator[np.ndarray]:
    """Arrays of windows ``(k, seq_len + 1)`` int32 from the ``split`` token stream of ``paths``.

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
        for flat in token_batches(paths, split, rng):
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
            raise MidiforgeError(f"{split}: not one window of {seq_len + 1} tokens in {len(paths)} shard file(s) "
                                 f"for this worker; use a smaller --seq-len")


def count_windows(tokens: int, seq_len: int) -> int:
    return max(0, (tokens - 1) // seq_len)


def token_counts(paths: list[str], split: str, vocab_size: int) -> np.ndarray:
    """How often each id occurs in ``split`` (streamed)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for flat in token_batches(paths, split, None):
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


def make_dataset(paths: list[str], split: str, *, seq_len: int, batch_size: int, shard=None,
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
        yield from window_chunks(paths, split, seq_len, seed=seed, shard=shard, repeat=train)

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

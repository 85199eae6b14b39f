"""How the preprocess driver cuts its inputs into batches (Ray tasks), and what a batch may cost: its bytes,
its memory and its time.  Pure arithmetic, no Ray."""
from __future__ import annotations

import itertools
import math
import zlib

import numpy as np

from midiforge.music.readers import ReadOptions
from midiforge.pipeline.preprocess_batch import is_fast
from midiforge.pipeline.preprocess_inputs import InputRef

#: files per batch: a batch costs ~5 ms of its own (a Ray task, two Parquet files and their fsyncs), which
#: is ~20% of a batch of 32 MIDI files here but ~3% of one of 128; 1024 keeps a batch under a second or so
MIN_BATCH, MAX_BATCH = 128, 1024
#: batches per worker when the corpus is small enough for that to leave them under MAX_BATCH files: two,
#: so that a worker that finishes early takes the next batch, and the per-batch cost is paid few times
BATCHES_PER_WORKER = 2
#: what a file costs beyond its bytes (opening, hashing, a row), in bytes of parsing: ~30 us against
#: ~30 us per kB of MIDI here
FILE_COST_BYTES = 1024


def batch_count(files: int, workers: int) -> int:
    """BATCHES_PER_WORKER batches per worker, of MIN_BATCH..MAX_BATCH files on average, their count a
    multiple of ``workers`` (so that no worker is left idle with a tail batch running on another)."""
    size = max(MIN_BATCH, min(MAX_BATCH, math.ceil(files / (workers * BATCHES_PER_WORKER))))
    return max(1, math.ceil(math.ceil(files / size) / workers) * workers) if files else 0


def plan_batches(refs: list[InputRef], workers: int, batch_files: int | None = None) -> list[list[InputRef]]:
    """``refs`` cut into batches: consecutive runs of :func:`same_sizes_together`, each of about the
    same work (bytes, plus FILE_COST_BYTES a file; a file of unknown size counts as the mean), and
    none over MAX_BATCH files.  ``batch_files`` asks for runs of that many files instead."""
    order = same_sizes_together(refs)
    if not order:
        return []
    if batch_files:
        return [order[i:i + batch_files] for i in range(0, len(order), batch_files)]
    known = [r.size for r in order if r.size >= 0]
    mean = sum(known) / len(known) if known else 0
    cost = np.cumsum([(r.size if r.size >= 0 else mean) + FILE_COST_BYTES for r in order])
    count = batch_count(len(order), workers)
    # the k-th cut after the first file whose cumulative cost reaches k/count of the total
    cuts = np.searchsorted(cost, cost[-1] * np.arange(1, count) / count, side="left") + 1
    bounds = [0, *sorted({int(c) for c in cuts if 0 < c < len(order)}), len(order)]
    batches = []
    for a, b in itertools.pairwise(bounds):
        n = math.ceil((b - a) / MAX_BATCH)  # many small files in one stretch: split it evenly
        step = math.ceil((b - a) / n)
        batches.extend(order[i:min(i + step, b)] for i in range(a, b, step))
    return batches


def same_sizes_together(refs: list[InputRef]) -> list[InputRef]:
    """``refs`` with the files of one size next to each other (by source within a size), the sizes
    in a fixed pseudo-random order: identical files, which always share a size, then mostly fall in
    one batch, where the second copy is recognised by its sha256 and never parsed (and finalize has
    no shard to rewrite), while every batch still gets a mix of small and large files."""
    groups: dict = {}
    for r in refs:
        groups.setdefault(r.size if r.size >= 0 else ("?", r.source), []).append(r)
    order = sorted(groups, key=lambda k: (zlib.crc32(repr(k).encode()), repr(k)))
    return [r for k in order for r in sorted(groups[k], key=lambda r: r.source)]


#: --file-timeout: the seconds one file may take beyond what its size predicts.  A batch is given
#: file_timeout + TIME_SLACK x its predicted seconds (PER_FILE_SECONDS a file, plus its bytes at FAST_BYTES_PER_SECOND
#: for MIDI on symusic, SLOW_BYTES_PER_SECOND for what music21 reads), counted from when it may start; then its
#: worker is killed and the batch cut (a file alone that runs out of time fails as ``timeout``).
FILE_TIMEOUT = 120.0
TIME_SLACK = 10
PER_FILE_SECONDS = 0.005
FAST_BYTES_PER_SECOND, SLOW_BYTES_PER_SECOND = 2e6, 2e3
#: the bytes of one batch, at most (a file over it is a batch of its own; a file over --max-bytes counts 0:
#: it is refused by its listed size, never read)
MAX_BATCH_BYTES = 64 << 20
#: a batch reserves Ray's ``memory`` resource, MEMORY_BASE + MEMORY_FACTOR x its bytes (at most 90% of the
#: largest node's), so that the batches running at once on a node fit in its memory.  Measured (peak RSS
#: of process_batch over a warm worker's, one file): 9.9x a 20 MB lyric-only MIDI, 10.1x a 20 MB MIDI of
#: 2.5 M notes, 12.1x one of 3.3 M notes in running status (the worst found); 16 leaves a margin.  Ray's
#: memory monitor kills a task that goes beyond its node's memory anyway: its batch is then cut like a crash.
MEMORY_FACTOR = 16
MEMORY_BASE = 64 << 20


def batch_bytes(batch: list[InputRef], max_bytes: int) -> int:
    """The bytes a batch reads: files of unknown size count 0, files over ``max_bytes`` too (never read)."""
    return sum(r.size for r in batch if 0 <= r.size <= max_bytes)


def cap_bytes(batches: list[list[InputRef]], max_bytes: int, cap: int = MAX_BATCH_BYTES) -> list[list[InputRef]]:
    """``batches`` with every one over ``cap`` bytes cut into consecutive runs of at most ``cap``."""
    out = []
    for batch in batches:
        if batch_bytes(batch, max_bytes) <= cap:
            out.append(batch)
            continue
        run, size = [], 0
        for r in batch:
            n = r.size if 0 <= r.size <= max_bytes else 0
            if run and size + n > cap:
                out.append(run)
                run, size = [], 0
            run.append(r)
            size += n
        out.append(run)
    return out


def time_limit(batch: list[InputRef], options: ReadOptions, file_timeout: float) -> float:
    """Seconds a batch may take (see FILE_TIMEOUT); a file of unknown size counts as 64 kB."""
    predicted = 0.0
    for r in batch:
        size = 65536 if r.size < 0 else r.size if r.size <= options.max_bytes else 0
        predicted += PER_FILE_SECONDS + size / (FAST_BYTES_PER_SECOND if is_fast(r.source, options)
                                                else SLOW_BYTES_PER_SECOND)
    return file_timeout + TIME_SLACK * predicted

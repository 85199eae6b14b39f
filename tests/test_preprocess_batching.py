"""How the preprocess driver cuts a corpus into Ray tasks (pure arithmetic, no Ray)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from midiforge.pipeline.preprocess_inputs import InputRef
from midiforge.pipeline.preprocess_plan import (
    BATCHES_PER_WORKER,
    FILE_COST_BYTES,
    MAX_BATCH,
    MIN_BATCH,
    plan_batches,
    same_sizes_together,
)


def _refs(sizes):
    return [InputRef(f"f{i:06d}.mid", "/r", f"f{i:06d}.mid", int(s)) for i, s in enumerate(sizes)]


@pytest.mark.parametrize("files", [1, 5, 33, 92, 1034, 5000, 100_000])
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_batches_cover_every_file_once_with_about_the_same_work(files, workers):
    sizes = np.random.default_rng(files * 10 + workers).lognormal(8, 1, files).astype(int)  # MIDI-like sizes
    refs = _refs(sizes)
    batches = plan_batches(refs, workers)
    assert [r for b in batches for r in b] == same_sizes_together(refs)  # runs of that order, each file once
    assert all(1 <= len(b) <= MAX_BATCH for b in batches)
    per_file = max(MIN_BATCH, min(MAX_BATCH, math.ceil(files / (workers * BATCHES_PER_WORKER))))
    count = math.ceil(math.ceil(files / per_file) / workers) * workers
    cost = [sum(r.size + FILE_COST_BYTES for r in b) for b in batches]
    largest = max(sizes) + FILE_COST_BYTES
    assert len(batches) >= min(count, files)
    assert max(cost) <= sum(cost) / count + largest  # no batch holds more than its share and one file
    if len(batches) == count:  # no stretch of small files had to be split: every batch holds its share
        assert min(cost) >= sum(cost) / count - largest
        if files >= workers * MIN_BATCH:  # room for every worker: a multiple of workers, two or more each
            assert count % workers == 0 and count >= workers * BATCHES_PER_WORKER


def test_the_two_shared_corpus_sizes():
    rng = np.random.default_rng(0)
    for files, workers, count in [(92, 1, 1), (92, 2, 2), (1034, 1, 2), (1034, 2, 4)]:
        assert len(plan_batches(_refs(rng.integers(500, 9000, files)), workers)) == count
    big = plan_batches(_refs(rng.integers(500, 9000, 100_000)), 8)
    assert len(big) % 8 == 0 and max(map(len, big)) <= MAX_BATCH  # 104 batches = 13 per worker


def test_many_small_files_in_one_stretch_are_split_and_unknown_sizes_count_as_the_mean():
    refs = _refs([10] * 3000 + [5_000_000])  # one huge file: the other batch holds 3000 tiny ones
    batches = plan_batches(refs, 1)
    assert [r for b in batches for r in b] == same_sizes_together(refs)
    assert max(map(len, batches)) <= MAX_BATCH and len(batches) >= 4
    unknown = [InputRef(f"u{i}.mid", "/r", f"u{i}.mid") for i in range(300)]
    assert [len(b) for b in plan_batches(unknown, 2)] == [75] * 4


def test_batch_files_asks_for_runs_of_that_many_files():
    refs = _refs(range(100, 110))
    assert [len(b) for b in plan_batches(refs, 2, batch_files=3)] == [3, 3, 3, 1]
    assert plan_batches([], 2) == []


def test_files_of_one_size_go_together_in_a_fixed_order():
    refs = [InputRef(f"f{i:03d}.mid", "/r", f"f{i:03d}.mid", size) for i, size in
            enumerate([10, 20, 10, 30, 20, 10, 40, -1, -1, 30])]
    out = same_sizes_together(refs)
    assert sorted(out, key=lambda r: r.source) == refs  # every file once
    assert out == same_sizes_together(list(reversed(refs)))  # whatever the listing order
    sizes = [r.size for r in out if r.size >= 0]
    runs = [s for i, s in enumerate(sizes) if i == 0 or sizes[i - 1] != s]
    assert len(runs) == len(set(sizes))  # each size in one run
    for s in set(sizes):  # by source within a size: the copy kept is the first one in its batch
        group = [r.source for r in out if r.size == s]
        assert group == sorted(group)

"""How the preprocess driver cuts a corpus into Ray tasks (pure arithmetic, no Ray)."""
from __future__ import annotations

import math

import pytest

from midiforge.pipeline.preprocess import MAX_BATCH, MIN_BATCH, _batch_size


@pytest.mark.parametrize("files", [1, 5, 33, 92, 1034, 5000, 100_000])
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_batches_are_even_and_never_tiny(files, workers):
    size = _batch_size(files, workers)
    sizes = [min(size, files - i) for i in range(0, files, size)]
    assert sum(sizes) == files and 1 <= size <= MAX_BATCH
    count = math.ceil(files / max(MIN_BATCH, min(MAX_BATCH, math.ceil(files / (workers * 4)))))
    assert len(sizes) <= math.ceil(count / workers) * workers  # a multiple of workers, or fewer when sizes round up
    if len(sizes) > 1:
        assert size >= min(MIN_BATCH, files // workers) // 2  # a batch costs a few ms of its own: never tiny
        assert size - sizes[-1] < len(sizes)  # spread evenly: no 256, 256, ..., 10 tail


def test_the_two_shared_corpus_sizes():
    assert _batch_size(92, 1) == 92 and _batch_size(92, 2) == 46        # 1 batch; 2 = 1 per worker
    assert _batch_size(1034, 1) == 259 and _batch_size(1034, 2) == 130  # 4 batches; 8 = 4 per worker
    assert _batch_size(100_000, 8) == 962                               # 104 batches = 13 per worker, <= MAX_BATCH


def test_files_of_one_size_go_together_in_a_fixed_order():
    from midiforge.pipeline.preprocess import InputRef, _same_sizes_together

    refs = [InputRef(f"f{i:03d}.mid", "/r", f"f{i:03d}.mid", size) for i, size in
            enumerate([10, 20, 10, 30, 20, 10, 40, -1, -1, 30])]
    out = _same_sizes_together(refs)
    assert sorted(out, key=lambda r: r.source) == refs  # every file once
    assert out == _same_sizes_together(list(reversed(refs)))  # whatever the listing order
    sizes = [r.size for r in out if r.size >= 0]
    runs = [s for i, s in enumerate(sizes) if i == 0 or sizes[i - 1] != s]
    assert len(runs) == len(set(sizes))  # each size in one run
    for s in set(sizes):  # by source within a size: the copy kept is the first one in its batch
        group = [r.source for r in out if r.size == s]
        assert group == sorted(group)

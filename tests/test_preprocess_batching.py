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

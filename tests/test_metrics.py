"""music.metrics: repeats of any period, set summaries and distances, n-gram overlap, the
Kneser-Ney baseline, against known values and brute-force references."""
from __future__ import annotations

import math

import numpy as np
import pytest

from midiforge.music import metrics as M


def _brute_stretch(t) -> tuple[int, int]:
    """Longest t[i:j] equal to a pattern of period p repeated (j - i >= 2p), by checking every stretch."""
    t = list(t)
    if not t:
        return 0, 0
    best = (1, 0)
    for p in range(1, len(t) // 2 + 1):
        for i in range(len(t)):
            j = i
            while j + p < len(t) and t[j] == t[j + p]:
                j += 1
            span = j - i + p
            if j - i >= p and span > best[0]:
                best = (span, p)
    return best


def test_longest_repeat_counts_loops_of_any_period():
    assert M.repeat_stretch([1, 2] * 8) == (16, 2)           # a two-token loop: its whole length (was 1)
    assert M.longest_repeat([1, 2] * 8) == 16
    assert M.repeat_stretch([7] * 5) == (5, 1)
    assert M.repeat_stretch([5, 5, 6, 6, 6, 7]) == (3, 1)
    assert M.repeat_stretch([9, 1, 2, 3, 1, 2, 3, 1, 2, 8]) == (8, 3)  # 1 2 3 1 2 3 1 2
    assert M.repeat_stretch([1, 2, 3, 4]) == (1, 0)
    assert M.repeat_stretch([4]) == (1, 0) and M.repeat_stretch([]) == (0, 0)
    assert M.repeat_stretch([1, 2, 3, 1, 2]) == (1, 0)      # 1.67 copies of "1 2 3" is not a repeat
    assert M.repeat_stretch([1, 2] * 8, max_period=1) == (1, 0)
    rng = np.random.default_rng(3)
    for _ in range(400):
        t = rng.integers(0, int(rng.integers(1, 4)), int(rng.integers(0, 40)))
        assert M.repeat_stretch(t) == _brute_stretch(t), t.tolist()
    long = np.concatenate([rng.integers(0, 50, 3000), np.tile(rng.integers(0, 50, 37), 20), rng.integers(0, 50, 500)])
    length, period = M.repeat_stretch(long)
    assert period == 37 and length >= 740


def test_summary_and_duplicates():
    s = M.summary([1.0, 3.0, math.nan])
    assert s == {"n": 2, "missing": 1, "mean": 2.0, "std": 1.0, "median": 2.0, "min": 1.0, "max": 3.0}
    assert math.isnan(M.summary([math.nan])["mean"])
    keys = [M.sequence_key([1, 2]), M.sequence_key(np.array([1, 2], np.int32)), M.sequence_key([2, 1])]
    assert M.duplicate_count(keys) == 1 and M.duplicate_count([]) == 0


def test_distribution_distance_known_cases():
    assert M.distribution_distance([1, 2, 3, 4], [1, 2, 3, 4]) == {"overlap": 1.0, "kl": 0.0}
    assert M.distribution_distance([3, 3], [3, 3, 3]) == {"overlap": 1.0, "kl": 0.0}
    far = M.distribution_distance([1, 1, 1], [5, 5, 5])
    assert far["overlap"] < 1e-6 and far["kl"] > 20
    none = M.distribution_distance([], [1.0])
    assert math.isnan(none["overlap"]) and math.isnan(none["kl"])
    assert M.distribution_distance([1, math.nan, 2], [1, 2]) == M.distribution_distance([1, 2], [1, 2])
    # two unit normals one sd apart: overlapping area 2 * Phi(-1/2) = 0.617, KL = 1/2 nat
    rng = np.random.default_rng(0)
    d = M.distribution_distance(rng.normal(0, 1, 4000), rng.normal(1, 1, 4000))
    assert d["overlap"] == pytest.approx(2 * 0.5 * math.erfc(0.5 / math.sqrt(2)), abs=0.03)
    assert d["kl"] == pytest.approx(0.5, abs=0.08)


def test_ngram_hashes_and_nearest_training_piece():
    a, b = [1, 2, 3, 4, 5, 6], [9, 9, 9, 9]
    h = M.ngram_hashes(a, 3)
    assert len(h) == 4 and len(set(h.tolist())) == 4
    assert M.ngram_hashes([7, 1, 2, 3], 3)[1] == h[0]          # equal n-grams, equal hashes
    assert len(M.ngram_hashes([1, 2], 3)) == 0
    index = M.NgramIndex([a, b, [1, 2, 3, 8, 8, 8]], n=3)
    assert index.nearest(a) == (1.0, 0)
    assert index.nearest([1, 2, 3, 4, 0, 0]) == (0.5, 0)        # 2 of its 4 distinct 3-grams are in piece 0
    assert index.nearest([0, 0, 0]) == (0.0, -1)
    frac, j = index.nearest([1, 2])
    assert math.isnan(frac) and j == -1


def test_kneser_ney_is_a_distribution_and_matches_hand_counts():
    rng = np.random.default_rng(1)
    vocab = 12
    train = [np.concatenate([[1], rng.integers(4, vocab, int(rng.integers(5, 40))), [2]]) for _ in range(40)]
    lm = M.KneserNey(train, vocab, order=5)
    for ctx in ([1, 5, 6, 7], [1], [1, 4, 4, 4, 4, 4, 4], [1, 11, 11, 5]):
        total = sum(math.exp(lm.log_probs([list(ctx) + [w]])[-1]) for w in range(vocab))
        assert total == pytest.approx(1.0, abs=1e-9)
    # order 1: P(w) = max(c(w) - D, 0) / N + D * types / N / V, D = n1 / (n1 + 2 n2); BOS is never a target
    uni = M.KneserNey([[1, 5, 5, 6, 7, 7, 7]], 10, order=1)
    counts = {5: 2, 6: 1, 7: 3}
    n, types, d = 6, 3, 1 / (1 + 2 * 1)
    expected = {w: max(counts.get(w, 0) - d, 0) / n + d * types / n / 10 for w in range(10)}
    got = np.exp(uni.log_probs([[1] + list(range(10))]))
    assert got == pytest.approx([expected[w] for w in range(10)], rel=1e-12)
    # a deterministic loop is learned: almost no surprise left
    loop = [[1] + [5, 6] * 50 + [2] for _ in range(5)]
    assert M.KneserNey(loop, vocab).cross_entropy(loop) < 0.1
    assert math.isnan(lm.cross_entropy([[1]]))

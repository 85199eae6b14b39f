"""Music metrics of a :class:`~midiforge.music.piece.Piece` and repetition metrics of token ids.

Pure NumPy, usable on generated pieces and on real corpora alike.  The note metrics follow
MusPy's definitions (``muspy.metrics``, Dong et al., ISMIR 2020 LBD), computed on a tick grid of
``resolution`` ticks per quarter note (MusPy's default 24): ``start`` and ``end`` of each note are
rounded to ticks, a "beat" is a quarter note.  As in MusPy, drum notes are ignored by every
note metric except ``empty_beat_rate``; a metric that has no notes to look at is NaN (``pitch_range``
is 0).

===================== ==============================================================================
pitch_class_entropy   Shannon entropy (bits) of the histogram of pitch classes (pitch % 12) of the
                      notes; 0 for one pitch class, log2(12) = 3.585 for all twelve equally often.
scale_consistency     the largest fraction of notes whose pitch class lies in one scale, over the 24
                      major and natural-minor scales.
pitch_range           highest minus lowest pitch, in semitones.
polyphony             mean number of pitches sounding at the time steps where at least one sounds
                      (a binary piano roll: a pitch doubled by two tracks counts once).
empty_beat_rate       fraction of the beats 0 .. end // resolution where no note sounds; a note
                      touches beats start // res .. end // res inclusive (MusPy's convention, so a
                      note ending on a beat line also touches the next beat).
longest_repeat        tokens in the longest stretch made of one pattern repeated back to back, of any
                      period: ``5 5 5`` (period 1) and ``1 2 1 2 1 2`` (period 2) both count their
                      whole length (3 and 6); 1 when nothing repeats, 0 for no tokens.
distinct_4gram_ratio  distinct 4-grams of token ids / all 4-grams (NaN under 4 tokens); 1 means no
                      4-gram repeats, small values mean loops.
===================== ==============================================================================

Comparing sets of pieces (the ``evaluate`` command): :func:`summary` (mean, spread),
:func:`distribution_distance` (overlapping area and KL divergence of the Gaussian kernel density
estimates of two sets of per-piece values, as in Yang & Lerch's mgeval), :func:`duplicate_count`
(identical pieces), :class:`NgramIndex` (the training piece sharing most n-grams with a piece:
memorisation) and :class:`KneserNey` (an interpolated Kneser-Ney n-gram language model, the
baseline a neural model's held-out loss should beat).
"""
from __future__ import annotations

import math

import numpy as np

from midiforge.music.piece import Piece

DEFAULT_RESOLUTION = 24  # ticks per quarter note, as MusPy's default
_MAJOR = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1], dtype=bool)
_MINOR = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0], dtype=bool)
#: [24, 12] membership of each pitch class in the 12 major then the 12 minor scales.
SCALES = np.stack([np.roll(_MAJOR, r) for r in range(12)] + [np.roll(_MINOR, r) for r in range(12)])

NOTE_METRICS = ("pitch_class_entropy", "scale_consistency", "pitch_range", "polyphony", "empty_beat_rate")
TOKEN_METRICS = ("longest_repeat", "distinct_4gram_ratio")
METRICS = NOTE_METRICS + TOKEN_METRICS


def _pitched(piece: Piece) -> np.ndarray:
    return piece.pitch[~piece.is_drum].astype(np.int64)


def _ticks(piece: Piece, resolution: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    start = piece.start if mask is None else piece.start[mask]
    dur = piece.duration if mask is None else piece.duration[mask]
    s = np.floor(start * resolution + 0.5).astype(np.int64)
    e = np.floor((start + dur) * resolution + 0.5).astype(np.int64)
    return s, np.maximum(e, s)


def pitch_class_entropy(piece: Piece) -> float:
    pc = _pitched(piece) % 12
    if len(pc) == 0:
        return math.nan
    counts = np.bincount(pc, minlength=12).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0


def scale_consistency(piece: Piece) -> float:
    pc = _pitched(piece) % 12
    if len(pc) == 0:
        return math.nan
    counts = np.bincount(pc, minlength=12)
    return float((SCALES @ counts).max() / len(pc))


def pitch_range(piece: Piece) -> int:
    p = _pitched(piece)
    return int(p.max() - p.min()) if len(p) else 0


def polyphony(piece: Piece, resolution: int = DEFAULT_RESOLUTION) -> float:
    pitched = ~piece.is_drum
    s, e = _ticks(piece, resolution, pitched)
    pitch = piece.pitch[pitched].astype(np.int64)
    keep = e > s
    s, e, pitch = s[keep], e[keep], pitch[keep]
    if len(s) == 0:
        return math.nan
    # merge overlapping notes of the same pitch (a piano roll is binary), then sweep.  Each pitch's
    # times are shifted into a band of its own so that one running maximum serves every pitch.
    band = int(e.max()) + 1
    order = np.lexsort((s, pitch))
    off = pitch[order] * band
    ps, pe = s[order] + off, e[order] + off
    reach = np.maximum.accumulate(pe)
    new = np.ones(len(ps), dtype=bool)
    new[1:] = ps[1:] > reach[:-1]          # starts after every earlier note of its pitch ended
    first = np.flatnonzero(new)
    ms = ps[first] - off[first]
    me = np.maximum.reduceat(pe, first) - off[first]
    on_pitch_steps = int((me - ms).sum())
    length = int(me.max())
    diff = np.zeros(length + 1, dtype=np.int64)
    np.add.at(diff, ms, 1)
    np.add.at(diff, me, -1)
    sounding = np.count_nonzero(np.cumsum(diff)[:length] > 0)
    return float(on_pitch_steps / sounding) if sounding else math.nan


def empty_beat_rate(piece: Piece, resolution: int = DEFAULT_RESOLUTION) -> float:
    if len(piece) == 0:
        return math.nan
    s, e = _ticks(piece, resolution)
    length = int(e.max())
    if length < 1:
        return math.nan
    n_beats = length // resolution + 1
    diff = np.zeros(n_beats + 1, dtype=np.int64)
    np.add.at(diff, s // resolution, 1)
    np.add.at(diff, e // resolution + 1, -1)
    touched = np.count_nonzero(np.cumsum(diff)[:n_beats] > 0)
    return float(1.0 - touched / n_beats)


def repeat_stretch(tokens, max_period: int | None = None) -> tuple[int, int]:
    """(length, period) of the longest stretch of ``tokens`` made of one pattern repeated back to back
    at least twice, over every period 1 .. len // 2 (or ``max_period``); the smallest period on ties.

    ``(1, 0)`` when nothing repeats, ``(0, 0)`` for no tokens.  A stretch of period ``p`` is a run of
    positions ``k`` where ``t[k] == t[k + p]``: a run of ``m >= p`` such positions covers ``m + p``
    tokens.  Exact; O(len x periods) element operations, done a block of periods at a time.
    """
    t = np.asarray(tokens, dtype=np.int64).ravel()
    n = len(t)
    if n == 0:
        return 0, 0
    best_len, best_p = 1, 0
    top = n // 2 if max_period is None else min(int(max_period), n // 2)
    if top < 1:
        return best_len, best_p
    # past the end: values no token has, all different, so that no match runs over the end
    padded = np.concatenate([t, t.min() - 1 - np.arange(top + 1)])
    idx = np.arange(n, dtype=np.int32)
    block = max(1, (1 << 21) // n)  # periods per block: ~2 M elements per array
    for p0 in range(1, top + 1, block):
        p1 = min(top, p0 + block - 1)
        later = np.lib.stride_tricks.sliding_window_view(padded[p0:p1 + n], n)  # row r: t[k + p0 + r]
        eq = later == t[None, :]
        # the run of matches ending at k is k minus the last mismatch at or before k
        last = np.where(eq, np.int32(-1), idx)
        np.maximum.accumulate(last, axis=1, out=last)
        m = (idx - last).max(axis=1)
        ps = np.arange(p0, p1 + 1)
        span = np.where(m >= ps, m + ps, 0)
        r = int(np.argmax(span))
        if span[r] > best_len:
            best_len, best_p = int(span[r]), int(ps[r])
    return best_len, best_p


def longest_repeat(tokens, max_period: int | None = None) -> int:
    """Tokens in the longest stretch of one pattern repeated back to back, any period (see :func:`repeat_stretch`)."""
    return repeat_stretch(tokens, max_period)[0]


def distinct_ngram_ratio(tokens, n: int = 4) -> float:
    t = np.asarray(tokens, dtype=np.int64)
    if len(t) < n:
        return math.nan
    grams = np.lib.stride_tricks.sliding_window_view(t, n)
    base = int(t.max()) + 1 if t.min() >= 0 else 0
    if base and base ** n < 2**62:  # pack each n-gram into one integer: a 1-D unique is much faster
        packed = (grams * (base ** np.arange(n - 1, -1, -1, dtype=np.int64))).sum(axis=1)
        return float(len(np.unique(packed)) / len(grams))
    return float(len(np.unique(grams, axis=0)) / len(grams))


def distinct_4gram_ratio(tokens) -> float:
    return distinct_ngram_ratio(tokens, 4)


def piece_metrics(piece: Piece, resolution: int = DEFAULT_RESOLUTION) -> dict[str, float]:
    """The note metrics of ``piece`` (see the module docstring)."""
    return {
        "pitch_class_entropy": pitch_class_entropy(piece),
        "scale_consistency": scale_consistency(piece),
        "pitch_range": float(pitch_range(piece)),
        "polyphony": polyphony(piece, resolution),
        "empty_beat_rate": empty_beat_rate(piece, resolution),
    }


def token_metrics(tokens) -> dict[str, float]:
    """The repetition metrics of a token id sequence."""
    return {"longest_repeat": float(longest_repeat(tokens)), "distinct_4gram_ratio": distinct_4gram_ratio(tokens)}


def all_metrics(piece: Piece, tokens, resolution: int = DEFAULT_RESOLUTION) -> dict[str, float]:
    return {**piece_metrics(piece, resolution), **token_metrics(tokens)}


# ---------------------------------------------------------------------------------------------
# comparing sets of pieces
# ---------------------------------------------------------------------------------------------
def summary(values) -> dict[str, float]:
    """n (finite values), missing (NaN), mean, std (population), median, min, max of ``values``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    ok = v[np.isfinite(v)]
    out = {"n": int(len(ok)), "missing": int(len(v) - len(ok))}
    if len(ok) == 0:
        return {**out, "mean": math.nan, "std": math.nan, "median": math.nan, "min": math.nan, "max": math.nan}
    return {**out, "mean": float(ok.mean()), "std": float(ok.std()), "median": float(np.median(ok)),
            "min": float(ok.min()), "max": float(ok.max())}


def _kde(x: np.ndarray, samples: np.ndarray, h: float, dx: float) -> np.ndarray:
    """Gaussian kernel density of ``samples`` (bandwidth ``h``) at the grid ``x``, normalised on the grid."""
    dens = np.zeros(len(x))
    for a in range(0, len(samples), 256):
        z = (x[:, None] - samples[None, a:a + 256]) / h
        dens += np.exp(-0.5 * z * z).sum(axis=1)
    total = dens.sum() * dx
    return dens / total if total > 0 else dens


def distribution_distance(p_values, q_values, grid: int = 1024) -> dict[str, float]:
    """How far apart two sets of per-piece values are (mgeval's measures, Yang & Lerch 2020).

    Each set becomes a Gaussian kernel density estimate (Silverman's bandwidth ``1.06 sd n^-1/5``,
    at least two grid steps, the grid being ``grid`` steps over the pooled range); returns
    ``overlap``, the overlapping area of the two densities (1: the same distribution, 0: disjoint),
    and ``kl``, the Kullback-Leibler divergence KL(P || Q) in nats (0: the same; large when P has
    mass where Q has none).  NaN values are left out; NaN results when a set has no value.  Two sets
    holding one and the same constant give overlap 1 and kl 0.
    """
    p = np.asarray(p_values, dtype=np.float64).ravel()
    q = np.asarray(q_values, dtype=np.float64).ravel()
    p, q = p[np.isfinite(p)], q[np.isfinite(q)]
    if len(p) == 0 or len(q) == 0:
        return {"overlap": math.nan, "kl": math.nan}
    lo, hi = float(min(p.min(), q.min())), float(max(p.max(), q.max()))
    if hi == lo:  # every value of both sets is the same number
        return {"overlap": 1.0, "kl": 0.0}
    dx = (hi - lo) / grid

    def bandwidth(v: np.ndarray) -> float:
        return max(1.06 * float(v.std()) * len(v) ** -0.2, 2 * dx)

    hp, hq = bandwidth(p), bandwidth(q)
    pad = 4 * max(hp, hq)
    x = np.arange(lo - pad, hi + pad + dx / 2, dx)
    dp, dq = _kde(x, p, hp, dx), _kde(x, q, hq, dx)
    overlap = float(np.minimum(dp, dq).sum() * dx)
    floor = 1e-12
    mass = dp > floor
    kl = float((dp[mass] * np.log(dp[mass] / np.maximum(dq[mass], floor))).sum() * dx)
    return {"overlap": min(max(overlap, 0.0), 1.0), "kl": max(kl, 0.0)}


_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplication by it is a bijection mod 2**64


def ngram_hashes(tokens, n: int) -> np.ndarray:
    """One 64-bit hash per n-gram of ``tokens`` (len - n + 1 of them, none under n tokens): a
    polynomial hash mod 2**64, equal for equal n-grams; a collision of different ones has a chance
    of about 2**-64 per pair."""
    t = np.asarray(tokens, dtype=np.int64).ravel()
    if len(t) < n:
        return np.zeros(0, dtype=np.uint64)
    m = len(t) - n + 1
    x = (t + 2).astype(np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _HASH_MUL + x[k:k + m]
    return h


def sequence_key(tokens) -> bytes:
    """A key equal for equal token sequences (for counting identical pieces)."""
    return np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).ravel()).tobytes()


def duplicate_count(keys) -> int:
    """Items equal to an earlier item of ``keys`` (0: all different; n - 1: all the same)."""
    keys = list(keys)
    return len(keys) - len(set(keys))


class NgramIndex:
    """The n-grams of a set of pieces (e.g. the training split), to find the piece nearest to another.

    :meth:`nearest` gives, for a token sequence, the largest fraction of its distinct n-grams found
    in one indexed piece, and that piece: 1.0 means every n-gram of it occurs in a single training
    piece (a copy, or a stitch of long quotes of one piece), small values mean new material.
    """

    def __init__(self, sequences, n: int = 16) -> None:
        self.n = int(n)
        keys, owners = [], []
        for i, seq in enumerate(sequences):
            u = np.unique(ngram_hashes(seq, self.n))
            keys.append(u)
            owners.append(np.full(len(u), i, dtype=np.int64))
        self.pieces = len(keys)
        k = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        o = np.concatenate(owners) if owners else np.zeros(0, np.int64)
        order = np.argsort(k, kind="stable")
        self.keys, self.owners = k[order], o[order]

    def nearest(self, tokens) -> tuple[float, int]:
        """(largest fraction of the distinct n-grams of ``tokens`` found in one indexed piece, that
        piece's index); (NaN, -1) when ``tokens`` has no n-gram, (0.0, -1) when none is found."""
        q = np.unique(ngram_hashes(tokens, self.n))
        if len(q) == 0:
            return math.nan, -1
        left = np.searchsorted(self.keys, q, side="left")
        right = np.searchsorted(self.keys, q, side="right")
        counts = right - left
        if counts.sum() == 0:
            return 0.0, -1
        starts = np.repeat(left, counts)
        offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        per_piece = np.bincount(self.owners[starts + offsets], minlength=self.pieces)
        best = int(np.argmax(per_piece))
        return float(per_piece[best] / len(q)), best


class KneserNey:
    """An interpolated Kneser-Ney n-gram language model of token ids (Chen & Goodman 1998), the
    baseline a neural model should beat: the highest order uses counts, the lower orders
    continuation counts (how many different tokens precede an n-gram), each order discounted by
    ``D = n1 / (n1 + 2 n2)`` and interpolated with the next lower one, the unigram with the uniform
    distribution over ``vocab_size`` tokens.

    Each sequence is one piece; its first token (BOS) is context only, never a target (as for the
    LSTM, whose first input it is); contexts before it are padding.  N-grams are held as 64-bit
    hashes (see :func:`ngram_hashes`), every lookup vectorised.
    """

    def __init__(self, sequences, vocab_size: int, order: int = 5) -> None:
        if order < 1:
            raise ValueError("order must be >= 1")
        self.order, self.vocab_size = int(order), int(vocab_size)
        grams, ctxs, _ = self._hashes(sequences)
        self.tables = []  # per order k = 1..N: (gram keys, gram counts, ctx keys, ctx totals, ctx types, D)
        for k in range(1, self.order + 1):
            g, c = grams[k - 1], ctxs[k - 1]
            if k == self.order:
                keys, first, counts = np.unique(g, return_index=True, return_counts=True)
            else:  # continuation counts: distinct (k+1)-grams per k-gram
                _u, first_up = np.unique(grams[k], return_index=True)
                keys, first, counts = np.unique(g[first_up], return_index=True, return_counts=True)
                first = first_up[first]
            ctx_of = c[first]
            ckeys, inverse = np.unique(ctx_of, return_inverse=True)
            totals = np.bincount(inverse, weights=counts, minlength=len(ckeys))
            types = np.bincount(inverse, minlength=len(ckeys)).astype(np.float64)
            n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
            d = n1 / (n1 + 2 * n2) if n1 > 0 else 0.5
            self.tables.append((keys, counts.astype(np.float64), ckeys, totals, types, min(max(d, 0.05), 0.95)))

    def _hashes(self, sequences):
        """Per order k: hashes of the k-gram ending at each target and of its (k-1)-token context."""
        pad = self.order - 1
        parts, targets = [], []
        at = 0
        for seq in sequences:
            s = np.asarray(seq, dtype=np.int64).ravel()
            if len(s) < 2:
                continue
            parts.append(np.full(pad, -1, np.int64))
            parts.append(s)
            targets.append(np.arange(at + pad + 1, at + pad + len(s)))
            at += pad + len(s)
        x = (np.concatenate(parts) if parts else np.zeros(0, np.int64)) + 2
        x = x.astype(np.uint64)
        tgt = np.concatenate(targets) if targets else np.zeros(0, np.int64)
        grams, ctxs = [], []
        g = np.zeros(len(tgt), np.uint64)  # the (k-1)-gram ending just before the target: the context
        power = np.uint64(1)
        with np.errstate(over="ignore"):
            for k in range(1, self.order + 1):
                ctxs.append(g.copy())
                # k-gram = target + context; the context's hash is shifted by one power of the multiplier
                if k == 1:
                    gram = x[tgt].copy()
                else:
                    gram = grams[-1] + x[tgt - (k - 1)] * power
                grams.append(gram)
                g = g + x[tgt - k] * power if k < self.order else g
                power = power * _HASH_MUL
        return grams, ctxs, tgt

    @staticmethod
    def _lookup(keys: np.ndarray, values: np.ndarray, q: np.ndarray) -> np.ndarray:
        if len(keys) == 0:
            return np.zeros(len(q))
        i = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        return np.where(keys[i] == q, values[i], 0.0)

    def log_probs(self, sequences) -> np.ndarray:
        """Natural log-probability of every target token (all but the first of each sequence)."""
        grams, ctxs, _tgt = self._hashes(sequences)
        prob = np.full(len(grams[0]), 1.0 / self.vocab_size)
        for k in range(1, self.order + 1):
            keys, counts, ckeys, totals, types, d = self.tables[k - 1]
            c = self._lookup(keys, counts, grams[k - 1])
            tot = self._lookup(ckeys, totals, ctxs[k - 1])
            typ = self._lookup(ckeys, types, ctxs[k - 1])
            seen = tot > 0
            safe = np.where(seen, tot, 1.0)
            prob = np.where(seen, np.maximum(c - d, 0.0) / safe + d * typ / safe * prob, prob)
        return np.log(prob)

    def cross_entropy(self, sequences) -> float:
        """Mean negative log-likelihood per target token, in nats."""
        lp = self.log_probs(sequences)
        return float(-lp.mean()) if len(lp) else math.nan

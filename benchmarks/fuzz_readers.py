"""Fuzzing of the MIDI readers (issues 12 and 14): ``python benchmarks/fuzz_readers.py``.

Prints one JSON object.  Two kinds of cases, both reproducible from ``--seed``:

* ``--cases`` mutated files: real MIDI files of the shared corpora (ff, nottingham) with one to three
  mutations each (truncation, bit flips, inserted or deleted bytes, a chunk length field, the track
  count or format, a delta time or a meta/sysex length (varlen), a meta event's type or contents, a
  tick overflow, two files spliced).  They go in batches through :func:`read_midi_batch` twice: with
  the compiled part (``midiforge.music._midi``) and with the Python path; checked: no crash, every
  input accounted for (a piece, or a failure whose reason is one of FAILURE_REASONS, with a detail),
  and both paths give the same failures and the same pieces, note for note.  With
  ``--preprocess-every K``, every K-th batch also goes through the preprocess worker itself
  (:func:`process_batch`, written to a temporary folder): inputs == pieces + duplicates + failures.
* ``--api-cases`` calls of the C entry points themselves (``_midi.scan/fill/ticks``,
  ``_events.encode``) with random, inconsistent or hostile arguments: wrong types, item formats,
  sizes, read-only or strided buffers, meta rows changed between scan and fill, outputs aliasing
  inputs, mutated symusic state buffers, NaN/inf/huge times, rules out of range.  Each call must
  either succeed or raise ValueError/TypeError/OverflowError; outputs are windows of larger arrays
  whose guard cells must come back untouched; a call that succeeds is compared with its twin
  (the Python tick walk, symusic's ``.numpy()``, the NumPy encoder).

Cases run in chunks, each chunk in a subprocess (``--chunk`` cases, ``--timeout`` seconds), so that a
crash of native code is caught: the case it was on (a progress file says which) is saved to
``--save`` (its bytes, and a JSON line saying how it was made) and the chunk goes on after it.
Exit status 1 if anything failed a check.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "corpora"
MUTATIONS = ("truncate", "bitflip", "insert", "delete", "chunk_length", "track_count", "varlen", "meta",
             "tick_overflow", "splice")
BATCH = 50  # mutated files per read_midi_batch call
BIG_DELTA = b"\xff\xff\xff\x7f"  # 0x0FFFFFFF, the largest 4-byte delta time


# ------------------------------------------------------------------------------------------
# mutated files
# ------------------------------------------------------------------------------------------
def seed_files(corpora: list[str]) -> list[tuple[str, bytes]]:
    out = []
    for name in corpora:
        folder = Path(name) if os.sep in name else SHARED / name
        out += [(f"{folder.name}/{p.name}", p.read_bytes()) for p in sorted(folder.glob("*.mid"))]
    if not out:
        raise SystemExit(f"no .mid files in {corpora} (the shared corpora are at {SHARED})")
    return out


def _events(data: bytes) -> dict:
    """Byte positions in a Standard MIDI File: chunk heads, delta times, meta events and their
    lengths, sysex lengths (the same lenient walk as readers._smf_ticks)."""
    from midiforge.music.readers import _varlen

    found = {"chunks": [], "deltas": [], "metas": [], "lengths": []}
    if len(data) < 8 or data[:4] != b"MThd":
        return found
    pos = 8 + int.from_bytes(data[4:8], "big")
    while pos + 8 <= len(data):
        found["chunks"].append(pos)
        length = int.from_bytes(data[pos + 4: pos + 8], "big")
        at, end = pos + 8, min(pos + 8 + length, len(data))
        if data[pos: pos + 4] == b"MTrk":
            running = 0
            while at < end:
                got = _varlen(data, at, end)
                if got is None:
                    break
                found["deltas"].append((at, got[1] - at))
                at = got[1]
                if at >= end:
                    break
                status = data[at]
                if status & 0x80:
                    at += 1
                elif running:
                    status = running
                else:
                    break
                if status == 0xFF:
                    if at >= end:
                        break
                    got = _varlen(data, at + 1, end)
                    if got is None:
                        break
                    found["metas"].append((at - 1, got[1], got[0]))  # (status at, data at, length)
                    found["lengths"].append((at + 1, got[1] - at - 1))
                    at = min(got[1] + got[0], end)
                elif status in (0xF0, 0xF7):
                    got = _varlen(data, at, end)
                    if got is None:
                        break
                    found["lengths"].append((at, got[1] - at))
                    at = min(got[1] + got[0], end)
                elif status >= 0xF0:
                    at += 2 if status == 0xF2 else 1 if status in (0xF1, 0xF3) else 0
                else:
                    running = status
                    at += 1 if status & 0xF0 in (0xC0, 0xD0) else 2
        pos += 8 + length
    return found


def _pick(rng, items):
    return items[int(rng.integers(len(items)))] if items else None


def mutate_once(rng, data: bytes, kind: str, other: bytes) -> bytes:
    b = bytearray(data)
    n = len(b)
    if kind == "truncate":
        return bytes(b[: int(rng.integers(0, max(n, 1)))])
    if kind == "bitflip":
        for _ in range(int(rng.integers(1, 9))):
            if n:
                i = int(rng.integers(n))
                b[i] ^= 1 << int(rng.integers(8))
        return bytes(b)
    if kind == "insert":
        i = int(rng.integers(n + 1))
        return bytes(b[:i]) + rng.bytes(int(rng.integers(1, 17))) + bytes(b[i:])
    if kind == "delete":
        i = int(rng.integers(n + 1))
        return bytes(b[:i]) + bytes(b[i + int(rng.integers(1, 65)):])
    ev = _events(bytes(b))
    if kind == "chunk_length":
        at = _pick(rng, [0] + ev["chunks"])
        if at is None or at + 8 > n:
            return bytes(b)
        old = int.from_bytes(b[at + 4: at + 8], "big")
        new = int(_pick(rng, [0, 1, 5, 6, 0x7FFFFFFF, 0xFFFFFFFF, max(old - int(rng.integers(1, 64)), 0),
                              old + int(rng.integers(1, 64)), int(rng.integers(0, 2**32))]))
        b[at + 4: at + 8] = (new & 0xFFFFFFFF).to_bytes(4, "big")
        return bytes(b)
    if kind == "track_count":
        if n >= 14:
            field = int(_pick(rng, [8, 10]))  # format, track count
            b[field: field + 2] = int(_pick(rng, [0, 1, 2, 3, 0xFFFF, int(rng.integers(0, 65536))])).to_bytes(2, "big")
        return bytes(b)
    if kind == "varlen":
        spots = ev["deltas"] + ev["lengths"]
        spot = _pick(rng, spots)
        if spot is None:
            return bytes(b)
        at, size = spot
        how = int(rng.integers(4))
        if how == 0:  # never ends: continuation bits on 5 bytes
            new = b"\x8f\xff\xff\xff\xff"
        elif how == 1:  # the largest value
            new = BIG_DELTA
        elif how == 2:  # a random value of 1..4 bytes
            new = bytes(rng.integers(0x80, 0x100, int(rng.integers(0, 4))).astype(np.uint8).tobytes()) \
                + bytes([int(rng.integers(0, 0x80))])
        else:  # the last byte loses its end mark
            new = bytes(b[at: at + size - 1]) + bytes([b[at + size - 1] | 0x80])
        return bytes(b[:at]) + new + bytes(b[at + size:])
    if kind == "meta":
        meta = _pick(rng, ev["metas"])
        if meta is None:
            return bytes(b)
        status_at, data_at, length = meta
        how = int(rng.integers(4))
        if how == 0 and status_at + 1 < n:  # another type: tempo, time/key signature, end of track, ...
            b[status_at + 1] = int(_pick(rng, [0x51, 0x58, 0x59, 0x2F, 0x01, 0x03, 0x7F, int(rng.integers(256))]))
        elif how == 1:  # its contents: zeros, 0xFF, random (a tempo of 0, a denominator of 2**255 ...)
            fill = _pick(rng, [b"\0", b"\xff", None])
            for i in range(data_at, min(data_at + length, n)):
                b[i] = fill[0] if fill else int(rng.integers(256))
        elif how == 2:  # a tempo or time signature of odd size put in its place
            new = _pick(rng, [b"\xff\x51\x03\x00\x00\x00", b"\xff\x51\x01\x00", b"\xff\x58\x04\x04\xff\x18\x08",
                              b"\xff\x58\x00", b"\xff\x59\x02\x80\x05", b"\xff\x2f\x00"])
            end = min(data_at + length, n)
            return bytes(b[:status_at]) + new + bytes(b[end:])
        else:  # a huge length
            return bytes(b[:status_at + 2]) + b"\x8f\xff\xff\x7f" + bytes(b[data_at:])
        return bytes(b)
    if kind == "tick_overflow":  # delta times that add past int32 (issue 14), before a random event
        spot = _pick(rng, ev["deltas"])
        if spot is None:
            return bytes(b)
        at, size = spot
        k = int(rng.integers(7, 18))
        filler = b"\xff\x01\x01a" + BIG_DELTA  # text events BIG_DELTA apart
        new = BIG_DELTA + filler * (k - 1) + b"\xff\x01\x01a" + bytes(b[at: at + size])
        out = bytes(b[:at]) + new + bytes(b[at + size:])
        chunk = max((c for c in ev["chunks"] if c < at), default=None)  # keep the chunk length right
        if chunk is not None and rng.random() < 0.8:
            old = int.from_bytes(out[chunk + 4: chunk + 8], "big")
            out = out[: chunk + 4] + ((old + len(new) - size) & 0xFFFFFFFF).to_bytes(4, "big") + out[chunk + 8:]
        return out
    if kind == "splice":
        i, j = int(rng.integers(n + 1)), int(rng.integers(len(other) + 1))
        return bytes(b[:i]) + other[j:]
    raise ValueError(kind)


def make_case(seed: int, case: int, seeds: list[tuple[str, bytes]]) -> tuple[bytes, dict]:
    """The mutated file of case ``case``, and how it was made."""
    rng = np.random.default_rng([seed, case])
    source = int(rng.integers(len(seeds)))
    other = int(rng.integers(len(seeds)))
    data = seeds[source][1]
    kinds = [str(_pick(rng, MUTATIONS)) for _ in range(int(_pick(rng, [1, 1, 1, 2, 3])))]
    for kind in kinds:
        data = mutate_once(rng, data, kind, seeds[other][1])
    return data, {"case": case, "seed": seed, "source": seeds[source][0], "other": seeds[other][0], "mutations": kinds}


# ------------------------------------------------------------------------------------------
# checks of the batch reader (and the preprocess worker)
# ------------------------------------------------------------------------------------------
def _outcomes(batch, errors) -> list:
    """Per input: ('failure', reason, detail) or ('piece', its columns and facts as lists)."""
    from midiforge.music.piece import PieceBatch

    out, k = [], 0
    for e in errors:
        if e is None:
            p = batch.piece(k)
            out.append(("piece", *(getattr(p, c).tolist() for c in PieceBatch.NOTE_COLUMNS),
                        p.qpm, p.seconds, tuple(p.time_signature)))
            k += 1
        else:
            out.append(("failure", e.reason, e.detail))
    return out


def check_batch(datas: list[bytes], first_case: int, result: dict) -> None:
    from midiforge.errors import FAILURE_REASONS, PieceError
    from midiforge.music import readers

    native = readers._native_midi
    runs = []
    for mode in ("compiled", "python") if native is not None else ("python",):
        readers._native_midi = native if mode == "compiled" else None
        try:
            batch, errors = readers.read_midi_batch(datas)
        finally:
            readers._native_midi = native
        ok = len(errors) == len(datas) and len(batch) == sum(e is None for e in errors)
        for i, e in enumerate(errors):
            if e is not None and not (isinstance(e, PieceError) and e.reason in FAILURE_REASONS and e.detail):
                ok = False
        if not ok:
            result["unaccounted"].append({"mode": mode, "cases": [first_case, first_case + len(datas) - 1]})
            return
        runs.append(_outcomes(batch, errors))
    for i, outcome in enumerate(runs[0]):
        key = "pieces" if outcome[0] == "piece" else outcome[1]
        result["outcomes"][key] = result["outcomes"].get(key, 0) + 1
        if len(runs) > 1 and runs[1][i] != outcome:
            result["disagreements"].append({"case": first_case + i, "compiled": str(outcome)[:300],
                                            "python": str(runs[1][i])[:300]})


def check_preprocess(datas: list[bytes], first_case: int, result: dict) -> None:
    from midiforge.pipeline.preprocess import PreprocessSettings, list_inputs, process_batch
    from midiforge.storage import StorageOptions

    with tempfile.TemporaryDirectory(prefix="fuzz-pre-") as tmp:
        src, dest = Path(tmp) / "src", Path(tmp) / "dest"
        src.mkdir()
        for i, data in enumerate(datas):
            (src / f"case-{first_case + i:07d}.mid").write_bytes(data)
        (src / "copy-of-first.mid").write_bytes(datas[0])  # a duplicate in the same batch
        refs = list_inputs(str(src))
        res = process_batch(0, refs, str(dest), StorageOptions(), PreprocessSettings())
        statuses = res["journal"]["status"]
        ok = (res["units"] == len(refs) == len(datas) + 1 and len(statuses) == res["units"]
              and res["units"] == res["pieces"] + res["duplicates"] + res["failures"]
              and all(s in ("piece", "duplicate", "failure") for s in statuses))
        result["preprocess"]["batches"] += 1
        result["preprocess"]["inputs"] += res["units"]
        if not ok:
            result["preprocess"]["unaccounted"].append([first_case, first_case + len(datas) - 1])


# ------------------------------------------------------------------------------------------
# the C entry points themselves
# ------------------------------------------------------------------------------------------
ALLOWED = (ValueError, TypeError, OverflowError)
GUARD = 7


def _window(rng, n: int, dtype, kind: str):
    """An output of n items inside a guarded array (or a hostile stand-in); (array, guard check)."""
    dtype = np.dtype(dtype)
    if kind == "ok":
        base = np.zeros((n + 2 * GUARD) * dtype.itemsize, np.uint8)
        base[:] = 0xA5
        arr = base[GUARD * dtype.itemsize: (GUARD + n) * dtype.itemsize].view(dtype)

        def intact():
            return bool((base[: GUARD * dtype.itemsize] == 0xA5).all() and (base[(GUARD + n) * dtype.itemsize:] == 0xA5).all())
        return arr, intact
    if kind == "short":
        return _window(rng, max(n - int(rng.integers(1, 4)), 0), dtype, "ok")
    if kind == "long":
        return _window(rng, n + int(rng.integers(1, 4)), dtype, "ok")
    if kind == "dtype":
        other = _pick(rng, ["f4", "i4", "i8", "f8", "i2", "u8", ">i8", ">f8"])
        if np.dtype(other) == dtype:
            other = "u1"
        size = (n * dtype.itemsize) // np.dtype(other).itemsize  # same bytes when it divides
        return _window(rng, size, other, "ok")
    if kind == "readonly":
        arr, intact = _window(rng, n, dtype, "ok")
        arr.flags.writeable = False
        return arr, intact
    if kind == "strided":
        base = np.zeros(2 * n + 2, dtype)
        return base[::2][:n] if n > 1 else base[::2][: n + 2], (lambda: True)
    return _pick(rng, [None, 3, "x", b"\0" * (n * dtype.itemsize), [0] * n, bytearray(n * dtype.itemsize)]), (lambda: True)


def _states(rng, seeds, k: int) -> tuple[list, list]:
    """k state buffers of symusic Scores of seed files, and the Scores."""
    import symusic

    states, scores = [], []
    for _ in range(k):
        name, data = seeds[int(rng.integers(len(seeds)))]
        try:
            score = symusic.Score.from_midi(data)
            states.append(score.__getstate__())
        except Exception:
            score = None
            states.append(b"")
        scores.append(score)
    return states, scores


def _mutate_state(rng, buf: bytes) -> bytes:
    b = bytearray(buf)
    how = int(rng.integers(5))
    if how == 0 and b:
        for _ in range(int(rng.integers(1, 5))):
            b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
    elif how == 1 and len(b) >= 8:  # a count field: tracks, or a random u32 made huge
        at = int(_pick(rng, [0, 4, int(rng.integers(0, len(b) - 4))]))
        b[at: at + 4] = int(_pick(rng, [0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 65536, 65537, int(rng.integers(2**32))])).to_bytes(4, "little")
    elif how == 2:
        b = b[: int(rng.integers(len(b) + 1))]
    elif how == 3:
        b += rng.bytes(int(rng.integers(1, 16)))
    return bytes(b)


def api_case(rng, seeds, result: dict) -> None:
    from midiforge.music import readers

    midi = readers._native_midi
    which = _pick(rng, ["scan_fill", "scan_fill", "scan_fill", "ticks", "encode", "encode"])
    if midi is None and which != "encode":
        which = "encode"
    api = result["api"]
    api["calls"][which] = api["calls"].get(which, 0) + 1
    try:
        if which == "scan_fill":
            _api_scan_fill(rng, seeds, midi, api)
        elif which == "ticks":
            _api_ticks(rng, seeds, midi, api)
        else:
            _api_encode(rng, api)
    except ALLOWED as exc:
        api["rejected"][type(exc).__name__] = api["rejected"].get(type(exc).__name__, 0) + 1
    except Exception as exc:  # anything else from a C entry point is a bug
        api["unexpected"].append(f"{which}: {type(exc).__name__}: {exc}"[:300])


def _api_scan_fill(rng, seeds, midi, api) -> None:
    from midiforge.music import readers

    k = int(rng.integers(0, 6))
    states, scores = _states(rng, seeds, k)
    hostile = rng.random() < 0.5
    if hostile and states:
        for j in range(len(states)):
            if rng.random() < 0.5:
                states[j] = _mutate_state(rng, states[j])
    arg_states = states
    if rng.random() < 0.1:  # not a list of bytes
        arg_states = _pick(rng, [tuple(states), [bytearray(s) for s in states] or [bytearray(1)],
                                 [memoryview(s) for s in states] or [1], None, [1, 2], "abc"])
    meta_kind = "ok" if rng.random() < 0.8 else _pick(rng, ["short", "long", "dtype", "readonly", "strided", "junk"])
    meta, meta_ok = _window(rng, len(states) * readers._META, np.int64, meta_kind)
    first_only = int(rng.integers(0, 2))
    max_notes = int(_pick(rng, [10**9, 500, 0, -1, 2**63 - 1]))
    total = midi.scan(arg_states, first_only, max_notes,
                      meta.reshape(len(states), readers._META) if isinstance(meta, np.ndarray) and meta.size == len(states) * readers._META else meta)
    if not meta_ok():
        api["guard_violations"] += 1
        return
    meta = meta.reshape(len(states), readers._META)
    ok = meta[:, readers._M_STATUS] == readers._OK
    if ok.any() and int(meta[ok, readers._M_KEPT].sum()) != total:
        api["disagreements"].append("scan: total != kept notes of the OK files")
    # tamper with meta between the passes (a caller's mistake): statuses, counts, ticks per quarter
    tampered = False
    if rng.random() < 0.4 and len(states):
        tampered = True
        j = int(rng.integers(len(states)))
        col = int(_pick(rng, [readers._M_STATUS, readers._M_KEPT, readers._M_TPQ]))
        meta[j, col] = int(_pick(rng, [0, 1, -1, 2**62, int(meta[j, col]) + 1, int(meta[j, col]) - 1]))
    ok = meta[:, readers._M_STATUS] == readers._OK
    kept = meta[ok, readers._M_KEPT]
    total = int(kept.sum()) if ok.any() and (kept >= 0).all() and (kept < 2**40).all() else 0
    kinds = ["ok"] * 7
    if rng.random() < 0.3:
        kinds[int(rng.integers(7))] = _pick(rng, ["short", "long", "dtype", "readonly", "strided", "junk"])
    outs = [_window(rng, total if c < 6 else int(ok.sum()) * 3, dt, kind)
            for c, (dt, kind) in enumerate(zip(["f8", "f8", "i2", "i2", "i2", "i2", "f8"], kinds))]
    facts = outs[6][0]
    if isinstance(facts, np.ndarray) and facts.ndim == 1 and facts.size % 3 == 0 and facts.dtype == np.float64:
        facts = facts.reshape(-1, 3)
    meta_arg = meta
    if rng.random() < 0.1 and outs[0][0] is not None and isinstance(outs[0][0], np.ndarray) and outs[0][0].size:
        meta_arg = meta  # meta is read before any write: alias the start column over it
        outs[0] = (meta.reshape(-1).view(np.float64)[: outs[0][0].size] if meta.size >= outs[0][0].size
                   else outs[0][0], outs[0][1])
    midi.fill(states if isinstance(arg_states, list) else arg_states, first_only, meta_arg,
              *[o[0] for o in outs[:6]], facts)
    if not all(o[1]() for o in outs):
        api["guard_violations"] += 1
        return
    if not hostile and not tampered and all(k == "ok" for k in kinds) and meta_kind == "ok" and arg_states is states:
        _compare_fill(scores, first_only, meta, outs, api)


def _compare_fill(scores, first_only, meta, outs, api) -> None:
    """A clean scan + fill against symusic's own .numpy() of the same Scores."""
    from midiforge.music import readers

    ok_rows = np.flatnonzero(meta[:, readers._M_STATUS] == readers._OK)
    start = 0
    for j in ok_rows.tolist():
        score = scores[j]
        n = int(meta[j, readers._M_KEPT])
        options = readers.ReadOptions(tracks="first" if first_only else "all", max_notes=10**9)
        f = readers._file_of(score, int(score.ticks_per_quarter), options)
        pitch = np.concatenate([c[2] for c in f.chunks]).astype(np.int16)
        time_ = np.concatenate([c[0] for c in f.chunks]).astype(np.int64)
        if (outs[2][0][start: start + n].tolist() != pitch.tolist()
                or outs[0][0][start: start + n].tolist() != (time_ * (1.0 / f.tpq)).tolist()):
            api["disagreements"].append(f"fill: notes of state {j} differ from .numpy()")
        start += n
        api["compared"] += 1


def _api_ticks(rng, seeds, midi, api) -> None:
    from midiforge.music import readers

    datas = []
    for _ in range(int(rng.integers(0, 8))):
        data = seeds[int(rng.integers(len(seeds)))][1]
        for _ in range(int(rng.integers(0, 3))):
            data = mutate_once(rng, data, str(_pick(rng, MUTATIONS)), seeds[0][1])
        datas.append(data)
    out_kind = "ok" if rng.random() < 0.85 else _pick(rng, ["short", "long", "dtype", "readonly", "strided", "junk"])
    out, intact = _window(rng, len(datas), np.int64, out_kind)
    arg = datas if rng.random() < 0.9 else _pick(rng, [tuple(datas), [bytearray(d) for d in datas] or [0], None])
    midi.ticks(arg, out)
    if not intact():
        api["guard_violations"] += 1
    elif out.tolist() != [readers._smf_ticks(d) for d in datas]:
        api["disagreements"].append("ticks: C and Python tick walks differ")
    else:
        api["compared"] += len(datas)


def _api_encode(rng, api) -> None:
    from midiforge.music import tokenizers
    from midiforge.music.piece import PieceBatch
    from midiforge.music.tokenizers import EventsConfig, EventsTokenizer

    n_pieces = int(rng.integers(0, 5))
    lengths = rng.integers(0, 30, n_pieces)
    n = int(lengths.sum())
    twin = rng.random() < 0.5
    # onsets in quarters: small; 2000 (up to 24,000 steps: many time-shift tokens); 1e15 (past the
    # packed key, 2**46 steps at most: C declines; only in hostile calls, NumPy would write ~1e15
    # tokens); 1e300 (past int64)
    scale = float(_pick(rng, [1.0, 50.0, 2000.0, 1e300] if twin else [1.0, 50.0, 2000.0, 1e15, 1e300]))
    start = rng.random(n) * scale
    dur = rng.random(n) * float(_pick(rng, [2.0, 100.0, 1e300]))
    bad_float = rng.random() < 0.2 and n
    if bad_float:
        col = start if rng.random() < 0.5 else dur
        col[int(rng.integers(n))] = _pick(rng, [np.nan, np.inf, -np.inf])
    pitch = rng.integers(-5 if rng.random() < 0.1 else 0, 140 if rng.random() < 0.1 else 128, n).astype(np.int16)
    vel = rng.integers(-3, 200, n).astype(np.int16)
    prog = np.where(rng.random(n) < 0.1, 128, rng.integers(0, 128, n)).astype(np.int16)
    offsets = np.zeros(n_pieces + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    batch = PieceBatch(pitch, start, dur, vel, prog, np.zeros(n, np.int16), offsets, rng.uniform(20, 300, n_pieces),
                       np.zeros(n_pieces), np.tile(np.array([[4, 4]], np.int64), (n_pieces, 1)))
    config = EventsConfig(bars=bool(rng.integers(2)), programs=bool(rng.integers(2)), drums=bool(rng.integers(2)),
                          velocity_bins=int(_pick(rng, [0, 8, 32])), steps_per_quarter=int(_pick(rng, [1, 4, 12])),
                          max_shift_steps=int(_pick(rng, [1, 16, 64])))
    tok = EventsTokenizer(config)
    if twin:  # the twin: both modes give the same ids (huge finite values: both modes' rules)
        if bad_float:
            try:
                tok._encode_native(batch)
            except ValueError:
                api["rejected"]["ValueError"] = api["rejected"].get("ValueError", 0) + 1
                return
            api["disagreements"].append("encode: a NaN/inf start or duration was not rejected")
            return
        with np.errstate(all="ignore"):
            got = []
            for mode in (True, False):
                tok.native = mode
                got.append(tok.encode_batch(batch))
        if not (np.array_equal(got[0][0], got[1][0]) and np.array_equal(got[0][1], got[1][1])):
            api["disagreements"].append(f"encode: C and NumPy ids differ ({n} notes, scale {scale})")
        api["compared"] += 1
        return
    # hostile calls: one argument wrong
    c = tok.config
    cols = [offsets, start, dur, pitch, vel, prog, tok._tempo_ids(batch),
            tok._bar_steps(batch.time_signature) if c.bars else np.zeros(0, np.int64)]
    grid = [c.steps_per_quarter, c.max_duration_steps, c.velocity_bins, int(c.programs), int(c.drums)]
    rule = [c.max_shift_steps, tok.shift_base, tok.bar_id, c.velocity_bins, tok.velocity_base, tok.pitch_base,
            tok.duration_base, int(bool((tok.instrument_ids >= 0).any())), int(c.bars), 1 + (c.tempo_bins > 0),
            tok.instrument_ids]
    per_kind = _pick(rng, ["ok", "ok", "short", "long", "dtype", "readonly", "strided", "junk"])
    per, intact = _window(rng, n_pieces, np.int64, per_kind)
    what = int(rng.integers(5))
    if what == 0:  # a column of another type, size, layout
        k = int(rng.integers(8))
        cols[k] = _window(rng, len(cols[k]), cols[k].dtype, _pick(rng, ["short", "long", "dtype", "strided", "junk"]))[0]
    elif what == 1 and n_pieces:  # offsets that do not fit
        cols[0] = cols[0].copy()
        cols[0][int(rng.integers(1, n_pieces + 1))] = int(_pick(rng, [-1, n + 1, 2**62, -(2**62)]))
    elif what == 2:  # grid or rule values out of range
        if rng.random() < 0.5:
            grid[int(rng.integers(3))] = int(_pick(rng, [0, -1, 2**40, 2**62, 2**63 - 1]))
        else:
            rule[int(rng.integers(7))] = int(_pick(rng, [0, -1, 2**31, -(2**31), 2**62, 2**63 - 1]))
    elif what == 3:  # per_piece aliasing the offsets
        per = cols[0][1:] if n_pieces else per
    elif what == 4:  # instrument ids of the wrong size
        rule[10] = rule[10][: int(rng.integers(0, 129))]
    with np.errstate(all="ignore"):
        tokenizers._native.encode(*cols, tuple(grid), tuple(rule), per)
    if not intact():
        api["guard_violations"] += 1


# ------------------------------------------------------------------------------------------
# the worker (one chunk, in a subprocess) and the driver
# ------------------------------------------------------------------------------------------
def new_result() -> dict:
    return {"cases": 0, "outcomes": {}, "mutations": {}, "unaccounted": [], "disagreements": [],
            "preprocess": {"batches": 0, "inputs": 0, "unaccounted": []},
            "api": {"cases": 0, "calls": {}, "rejected": {}, "unexpected": [], "guard_violations": 0,
                    "disagreements": [], "compared": 0}}


def worker(args) -> None:
    """Cases [start, stop) of one kind; the case in progress goes to args.progress first."""
    import resource

    if args.worker_memory > 0 and not args.asan_dir:  # (ASan reserves terabytes of address space)  # an absurd allocation: a MemoryError here, not the OOM killer on a shared machine
        limit = int(args.worker_memory * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if args.asan_dir:  # the AddressSanitizer builds of the extensions, in place of the installed ones
        import importlib.util

        for name in ("_midi", "_events"):
            path = next(Path(args.asan_dir).glob(f"**/{name}.*.so"))
            spec = importlib.util.spec_from_file_location(f"midiforge.music.{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[f"midiforge.music.{name}"] = module
        from midiforge.music import readers, tokenizers

        assert readers._native_midi.__file__.startswith(args.asan_dir) and tokenizers._native.__file__.startswith(args.asan_dir)
    seeds = seed_files(args.corpora)
    result = new_result()
    crash_at = int(os.environ.get("MIDIFORGE_FUZZ_CRASH_AT", "-1"))  # the harness's own test: a native crash

    def progress(case: int) -> None:
        with open(args.progress, "w") as f:
            f.write(str(case))

    if args.kind == "files":
        for a in range(args.start, args.stop, args.batch):
            b = min(a + args.batch, args.stop)
            progress(a)
            datas = []
            for case in range(a, b):
                data, how = make_case(args.seed, case, seeds)
                for kind in how["mutations"]:
                    result["mutations"][kind] = result["mutations"].get(kind, 0) + 1
                datas.append(data)
            if a <= crash_at < b:
                os.kill(os.getpid(), signal.SIGSEGV)
            check_batch(datas, a, result)
            if args.preprocess_every and (a // args.batch) % args.preprocess_every == 0:
                check_preprocess(datas, a, result)
            result["cases"] += b - a
    else:
        for case in range(args.start, args.stop):
            progress(case)
            rng = np.random.default_rng([args.seed, 1_000_000_007, case])
            before = len(result["api"]["unexpected"]), len(result["api"]["disagreements"])
            api_case(rng, seeds, result)
            for key, n in zip(("unexpected", "disagreements"), before):  # say which case
                result["api"][key][n:] = [f"case {case}: {m}" for m in result["api"][key][n:]]
            result["api"]["cases"] += 1
    print(json.dumps(result))


def _merge(total: dict, part: dict) -> None:
    total["cases"] += part["cases"]
    for key in ("outcomes", "mutations"):
        for k, v in part[key].items():
            total[key][k] = total[key].get(k, 0) + v
    total["unaccounted"] += part["unaccounted"]
    total["disagreements"] += part["disagreements"]
    for k in ("batches", "inputs"):
        total["preprocess"][k] += part["preprocess"][k]
    total["preprocess"]["unaccounted"] += part["preprocess"]["unaccounted"]
    api, other = total["api"], part["api"]
    api["cases"] += other["cases"]
    api["guard_violations"] += other["guard_violations"]
    api["compared"] += other["compared"]
    for key in ("calls", "rejected"):
        for k, v in other[key].items():
            api[key][k] = api[key].get(k, 0) + v
    api["unexpected"] += other["unexpected"]
    api["disagreements"] += other["disagreements"]


def _run_chunk(args, kind: str, start: int, stop: int, batch: int, progress: Path):
    """(result or None, how it ended, the case in progress when it did not end well)."""
    cmd = [sys.executable, __file__, "--worker", "--kind", kind, "--seed", str(args.seed), "--start", str(start),
           "--stop", str(stop), "--batch", str(batch), "--progress", str(progress),
           "--preprocess-every", str(args.preprocess_every), "--worker-memory", str(args.worker_memory),
           "--corpora", *args.corpora]
    env = None
    if args.asan_dir:
        cmd += ["--asan-dir", args.asan_dir]
        env = {**os.environ, "LD_PRELOAD": args.asan_lib, "ASAN_OPTIONS": "detect_leaks=0:allocator_may_return_null=1"}
    progress.write_text(str(start))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None, "timeout", int(progress.read_text() or start)
    finally:  # the driver stopped (SIGTERM, Ctrl-C): its worker too
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}: {err.strip()[-500:]}"
        if proc.returncode == -signal.SIGKILL:
            how += " (killed from outside: the OOM killer?)"
        return None, how, int(progress.read_text() or start)
    return json.loads(out.splitlines()[-1]), "ok", None


def _save(args, kind: str, case: int, how: str, seeds) -> str:
    save = Path(args.save)
    save.mkdir(parents=True, exist_ok=True)
    if kind == "files":
        data, made = make_case(args.seed, case, seeds)
        path = save / f"crash-{args.seed}-{case}.mid"
        path.write_bytes(data)
    else:
        made = {"case": case, "seed": args.seed, "api": True}
        path = save / f"crash-api-{args.seed}-{case}.json"
        path.write_text(json.dumps(made))
    with open(save / "crashes.jsonl", "a") as f:
        f.write(json.dumps({**made, "kind": kind, "how": how, "file": str(path)}) + "\n")
    return str(path)


def build_asan(into: str) -> str:
    """Both extensions built with AddressSanitizer into ``into``; returns the libraries to preload."""
    script = (
        "from setuptools import Extension, setup\n"
        f"src = {str(ROOT / 'src' / 'midiforge' / 'music')!r}\n"
        "setup(name='asan', script_args=['build_ext', '--build-lib', 'lib', '--build-temp', 'tmp'],\n"
        "      ext_modules=[Extension(f'midiforge.music.{n}', [f'{src}/{n}.c'], extra_compile_args=['-O1', '-g',\n"
        "      '-std=c99', '-fsanitize=address', '-fno-omit-frame-pointer'], extra_link_args=['-fsanitize=address'])\n"
        "      for n in ('_midi', '_events')])\n")
    subprocess.run([sys.executable, "-c", script], cwd=into, check=True, capture_output=True, timeout=300)
    libs = [subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True, timeout=60).stdout.strip()
            for name in ("libasan.so", "libstdc++.so.6")]  # libstdc++ too: symusic throws C++ exceptions
    if not all(os.path.isabs(lib) for lib in libs):
        raise SystemExit(f"--asan: gcc has no {libs}")
    return ":".join(libs)


def drive(args) -> int:
    started = time.perf_counter()
    asan_tmp = None
    if args.asan:
        asan_tmp = tempfile.TemporaryDirectory(prefix="fuzz-asan-")
        args.asan_lib = build_asan(asan_tmp.name)
        args.asan_dir = str(Path(asan_tmp.name) / "lib")
    seeds = seed_files(args.corpora)
    total = new_result()
    crashes = []

    def run(kind: str, lo: int, hi: int, batch: int, progress: Path) -> None:
        """Cases [lo, hi) in subprocesses of --chunk cases; a crash: the case found, saved, the rest run."""
        for a in range(lo, hi, args.chunk):
            b = min(a + args.chunk, hi)
            part, how, at = _run_chunk(args, kind, a, b, batch, progress)
            if part is not None:
                _merge(total, part)
                continue
            if batch > 1:  # `at` is the first case of the batch it was on: that batch one case at a time
                end = min(at + batch, b)
                run(kind, a, at, batch, progress)
                before = len(crashes)
                run(kind, at, end, 1, progress)
                if len(crashes) == before:  # no case crashes alone
                    crashes.append({"kind": kind, "case": at, "how": f"{how} (the batch of cases {at}..{end - 1}; "
                                    "no case alone)", "saved": _save(args, kind, at, how, seeds)})
                run(kind, end, b, batch, progress)
            else:
                crashes.append({"kind": kind, "case": at, "how": how, "saved": _save(args, kind, at, how, seeds)})
                if kind == "files":
                    total["cases"] += 1  # accounted for, as a crash
                else:
                    total["api"]["cases"] += 1
                run(kind, a, at, 1, progress)
                run(kind, at + 1, b, 1, progress)

    with tempfile.TemporaryDirectory(prefix="fuzz-progress-") as tmp:
        progress = Path(tmp) / "progress"
        run("files", 0, args.cases, BATCH, progress)
        run("api", 0, args.api_cases, 1, progress)
    from midiforge.music import readers, tokenizers

    result = {
        "benchmark": "fuzz_readers",
        "seed": args.seed,
        "compiled": {"_midi": readers._native_midi is not None, "_events": tokenizers._native is not None},
        "asan": bool(args.asan),
        "corpora": args.corpora, "seed_files": len(seeds),
        "cases": total["cases"],
        "mutations": dict(sorted(total["mutations"].items())),
        "pieces": total["outcomes"].pop("pieces", 0),
        "failures_by_reason": dict(sorted(total["outcomes"].items())),
        "crashes": crashes,
        "unaccounted": total["unaccounted"],
        "disagreements": len(total["disagreements"]),
        "disagreement_examples": total["disagreements"][:5],
        "preprocess": total["preprocess"],
        "api": {**total["api"], "unexpected": total["api"]["unexpected"][:10],
                "disagreements": total["api"]["disagreements"][:10],
                "disagreement_count": len(total["api"]["disagreements"]),
                "unexpected_count": len(total["api"]["unexpected"])},
        "seconds": round(time.perf_counter() - started, 2),
    }
    result["clean"] = not (crashes or total["unaccounted"] or total["disagreements"]
                           or total["preprocess"]["unaccounted"] or total["api"]["unexpected"]
                           or total["api"]["guard_violations"] or total["api"]["disagreements"]
                           or result["cases"] != args.cases or total["api"]["cases"] != args.api_cases)
    print(json.dumps(result, indent=1))
    if asan_tmp is not None:
        asan_tmp.cleanup()
    return 0 if result["clean"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10_000, help="mutated files (default 10000)")
    ap.add_argument("--api-cases", type=int, default=2_000, help="calls of the C entry points (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=1000, help="cases per subprocess")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a chunk may take")
    ap.add_argument("--preprocess-every", type=int, default=0,
                    help="every K-th batch of mutated files also through process_batch (0: never)")
    ap.add_argument("--worker-memory", type=float, default=4.0,
                    help="GiB of address space a worker may use (0: no limit); beyond it, MemoryError")
    ap.add_argument("--corpora", nargs="+", default=["ff", "nottingham"],
                    help=f"folders of .mid files, or names under {SHARED}")
    ap.add_argument("--save", default=str(Path(tempfile.gettempdir()) / "midiforge-fuzz"),
                    help="where the case of a crash is saved")
    ap.add_argument("--asan", action="store_true",
                    help="run the cases against AddressSanitizer builds of the extensions (gcc, libasan)")
    ap.add_argument("--asan-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="files", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    ap.add_argument("--progress", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through _run_chunk's finally
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the preprocess stage (issue 2): ``python benchmarks/preprocess.py CORPUS``.

Prints one JSON object.  On the same MIDI files of CORPUS, in the same run:

* ``raw_symusic``: the ceiling, parsing every file with symusic in one process, two ways:
  ``symusic.Score(path)`` and ``open(path).read()`` + ``Score.from_midi(bytes)``; the ceiling
  is the faster of the two.
* ``engine``: the preprocess worker itself, :func:`process_batch` on all files as one batch,
  in this process, no Ray (read, sha256, parse, tokenize, write one Parquet shard).
* ``end_to_end``: the real stage, :func:`run_preprocess` into a fresh DEST, with one worker
  and with every core, on a local Ray started (and warmed up) before timing; the Ray start-up
  is reported apart.  files/s = input files / wall seconds of ``run_preprocess``.
* ``miditok_tsd``: MidiTok's TSD tokenizer on every file (symusic Score from the bytes, then
  ``tokenizer.encode``), with velocities and tempos like the events tokenizer.
* ``music21_tutorial``: the Keras tutorial's loop on a seeded sample of files
  (``converter.parse`` + ``partitionByInstrument`` + the Note/Chord loop).

Every measurement runs ``--repeats`` times (the tutorial loop ``--tutorial-repeats`` times)
and the best (fastest) run is reported: the machine is shared, the fastest run is the one
least disturbed by others.  Load averages are recorded before and after.  Nothing is
asserted: ``targets_met`` says which of the issue's targets this run met.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata

import numpy as np

TARGETS = {"single_worker_vs_raw_symusic": 0.25, "single_worker_vs_miditok": 10.0, "two_workers_vs_one": 1.7}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _rate(count: float, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 else None


def _best(runs: list[dict]) -> dict:
    """The fastest of several runs, with every run's seconds kept for the record."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["runs_seconds"] = [round(r["seconds"], 4) for r in runs]
    best["seconds"] = round(best["seconds"], 4)
    return best


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# -------------------------------------------------------------------------------------------
# the measurements
# -------------------------------------------------------------------------------------------
def raw_symusic(paths: list[str], repeats: int) -> dict:
    import symusic

    def from_path():
        t = time.perf_counter()
        notes = sum(symusic.Score(p).note_num() for p in paths)
        return {"seconds": time.perf_counter() - t, "notes": notes}

    def from_bytes():
        t = time.perf_counter()
        notes = 0
        for p in paths:
            with open(p, "rb") as fh:
                notes += symusic.Score.from_midi(fh.read()).note_num()
        return {"seconds": time.perf_counter() - t, "notes": notes}

    out = {}
    for name, fn in (("score_path", from_path), ("read_from_midi", from_bytes)):
        best = _best([fn() for _ in range(repeats)])
        best["files_per_second"] = _rate(len(paths), best["seconds"])
        out[name] = best
    ceiling = max(out, key=lambda k: out[k]["files_per_second"])
    out["ceiling"] = ceiling
    out["files_per_second"] = out[ceiling]["files_per_second"]
    return out


def engine(refs, settings, repeats: int) -> dict:
    """process_batch on every file as one batch, in this process (no Ray)."""
    from midiforge.pipeline.preprocess import process_batch
    from midiforge.storage import StorageOptions

    runs = []
    for attempt in range(repeats + 1):  # the first run, on a few files, only imports and warms up
        dest = tempfile.mkdtemp(prefix="mf-bench-engine-")
        try:
            t = time.perf_counter()
            res = process_batch(0, refs if attempt else refs[:8], dest, StorageOptions(), settings)
            seconds = time.perf_counter() - t
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        if attempt:
            runs.append({"seconds": seconds, "tokens": res["tokens"], "pieces": res["pieces"],
                         "failures": res["failures"], "duplicates": res["duplicates"]})
    best = _best(runs)
    best["files_per_second"] = _rate(len(refs), best["seconds"])
    best["tokens_per_second"] = _rate(best["tokens"], best["seconds"])
    return best


def end_to_end(src: str, settings, worker_counts: list[int], repeats: int) -> dict:
    """run_preprocess with each worker count, interleaved, ``repeats`` times; finalize timed apart."""
    from midiforge.pipeline import preprocess

    finalize = preprocess.finalize
    timing = {}

    def timed_finalize(*a, **kw):  # instrumentation only: the stage calls the module's finalize
        t = time.perf_counter()
        try:
            return finalize(*a, **kw)
        finally:
            timing["finalize"] = time.perf_counter() - t

    runs: dict[int, list[dict]] = {w: [] for w in worker_counts}
    preprocess.finalize = timed_finalize
    try:
        for _ in range(repeats):
            for w in worker_counts:
                dest = tempfile.mkdtemp(prefix="mf-bench-e2e-")
                try:
                    t = time.perf_counter()
                    m = preprocess.run_preprocess(src, os.path.join(dest, "out"), settings, workers=w, progress=False)
                    seconds = time.perf_counter() - t
                finally:
                    shutil.rmtree(dest, ignore_errors=True)
                runs[w].append({"seconds": seconds, "finalize_seconds": round(timing["finalize"], 4),
                                "input_files": m["input_files"], "pieces": m["pieces"],
                                "duplicates": m["duplicates"], "failures": m["failures"], "tokens": m["tokens"],
                                "shards": len(m["shards"]), "load": _load()})
    finally:
        preprocess.finalize = finalize
    out = {}
    for w, rs in runs.items():
        best = _best(rs)
        best["files_per_second"] = _rate(best["input_files"], best["seconds"])
        best["tokens_per_second"] = _rate(best["tokens"], best["seconds"])
        out[f"workers_{w}"] = best
    return out


def miditok_tsd(paths: list[str], repeats: int) -> dict:
    import miditok
    import symusic

    config = miditok.TokenizerConfig(
        # as close to the events tokenizer's defaults as TSD goes: a 1/4-beat grid for time shifts
        # and durations up to 16 beats, 8 velocity bins, 32 log-spaced tempos in 30..300 qpm
        beat_res={(0, 16): 4}, num_velocities=8, use_velocities=True,
        use_tempos=True, num_tempos=32, tempo_range=(30, 300), log_tempos=True,
        use_programs=False, use_time_signatures=False, use_chords=False, use_rests=False,
        use_sustain_pedals=False, use_pitch_bends=False,
    )
    tok = miditok.TSD(config)
    described = {"tokenizer": "TSD", "vocab_size": len(tok), "beat_res": "{(0, 16): 4}", "num_velocities": 8,
                 "use_tempos": True, "num_tempos": 32, "use_programs": False,
                 "note": "one token sequence per track (TSD without programs); tokens = their sum"}

    def once():
        tokens = failures = 0
        encode_seconds = 0.0
        t = time.perf_counter()
        for p in paths:
            with open(p, "rb") as fh:
                data = fh.read()
            try:
                score = symusic.Score.from_midi(data)
                e = time.perf_counter()
                seqs = tok.encode(score)
                encode_seconds += time.perf_counter() - e
            except Exception:  # a file MidiTok cannot read: counted, the benchmark goes on
                failures += 1
                continue
            seqs = seqs if isinstance(seqs, list) else [seqs]
            tokens += sum(len(s.ids) for s in seqs)
        return {"seconds": time.perf_counter() - t, "encode_seconds": round(encode_seconds, 4),
                "tokens": tokens, "failures": failures}

    best = _best([once() for _ in range(repeats)])
    best["files_per_second"] = _rate(len(paths), best["seconds"])
    best["tokens_per_second"] = _rate(best["tokens"], best["seconds"])
    best["config"] = described
    return best


def music21_tutorial(paths: list[str], repeats: int) -> dict:
    """The tutorial's loop (Skúli, "How to Generate Music using a LSTM Neural Network in Keras").

    Two deviations, both forced: ``midi.flat.notes`` is ``midi.flatten().notes`` (``.flat`` is
    gone in music21 10), and ``forceSource=True`` so every repeat parses the MIDI file itself
    (by default music21 writes a pickle of each parsed file to its scratch folder and loads that
    the next time; the benchmark neither writes nor loads pickles).
    """
    import warnings

    from music21 import chord, converter, instrument, note

    def once():
        notes = []
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for file in paths:
                midi = converter.parse(file, forceSource=True)
                notes_to_parse = None
                parts = instrument.partitionByInstrument(midi)
                if parts:  # file has instrument parts
                    notes_to_parse = parts.parts[0].recurse()
                else:  # file has notes in a flat structure
                    notes_to_parse = midi.flatten().notes
                for element in notes_to_parse:
                    if isinstance(element, note.Note):
                        notes.append(str(element.pitch))
                    elif isinstance(element, chord.Chord):
                        notes.append(".".join(str(n) for n in element.normalOrder))
        return {"seconds": time.perf_counter() - t, "tokens": len(notes)}

    best = _best([once() for _ in range(repeats)])
    best["files"] = len(paths)
    best["files_per_second"] = _rate(len(paths), best["seconds"])
    best["tokens_per_second"] = _rate(best["tokens"], best["seconds"])
    return best


# -------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", metavar="CORPUS", help="a folder of MIDI files")
    p.add_argument("--repeats", type=int, default=2, help="runs of each measurement; the best is reported")
    p.add_argument("--tutorial-sample", type=int, default=8, help="files for the music21 tutorial loop")
    p.add_argument("--tutorial-repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="for the tutorial's sample")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="'all cores' (default: os.cpu_count())")
    p.add_argument("--skip", action="append", default=[],
                   choices=("raw", "engine", "end_to_end", "miditok", "music21"), help="leave a measurement out")
    args = p.parse_args(argv)

    from midiforge.music.readers import MIDI_SUFFIXES
    from midiforge.pipeline.preprocess import PreprocessSettings, list_inputs, run_preprocess, start_ray

    load_start = _load()
    corpus = os.path.abspath(args.corpus)
    all_refs = list_inputs(corpus)
    refs = [r for r in all_refs if r.source.lower().endswith(MIDI_SUFFIXES)]
    if not refs:
        print(f"{corpus}: no MIDI files", file=sys.stderr)
        return 2
    paths = [os.path.join(corpus, r.key) for r in refs]
    settings = PreprocessSettings()
    scratch = tempfile.mkdtemp(prefix="mf-bench-")
    try:
        src = corpus
        if len(refs) != len(all_refs):  # the stage must see exactly the files the baselines see
            src = os.path.join(scratch, "files.txt")
            with open(src, "w", encoding="utf-8") as fh:
                fh.write("\n".join(paths) + "\n")
        result: dict = {
            "benchmark": "preprocess", "corpus": corpus, "files": len(refs),
            "bytes": int(sum(os.path.getsize(x) for x in paths)),
            "settings": {"tokenizer": settings.tokenizer, "parser": settings.read.parser,
                         "tracks": settings.read.tracks, "transpose": list(settings.transpose)},
            "repeats": args.repeats, "statistic": "best of repeats (fastest run)",
            "machine": {"cores": os.cpu_count(), "load_average_start": load_start,
                        "python": platform.python_version(),
                        "versions": {d: _version(d) for d in ("symusic", "miditok", "music21", "ray", "pyarrow")}},
        }
        if "raw" not in args.skip:
            result["raw_symusic"] = raw_symusic(paths, max(args.repeats, 3))
        if "engine" not in args.skip:
            result["engine"] = engine(refs, settings, args.repeats)
        if "end_to_end" not in args.skip:
            import ray

            t = time.perf_counter()
            start_ray(None, args.workers)
            ray_start = time.perf_counter() - t
            cpus = int(ray.cluster_resources().get("CPU", 1))
            counts = sorted({1, min(args.workers, cpus)})
            warm = tempfile.mkdtemp(prefix="mf-bench-warm-")
            t = time.perf_counter()
            try:  # workers started, modules imported: not part of the figures
                run_preprocess(src, os.path.join(warm, "out"), settings, workers=max(counts), progress=False)
            finally:
                shutil.rmtree(warm, ignore_errors=True)
            warm_seconds = time.perf_counter() - t
            e2e = end_to_end(src, settings, counts, args.repeats)
            e2e["ray_start_seconds"] = round(ray_start, 3)
            e2e["warm_up_seconds"] = round(warm_seconds, 3)
            e2e["ray_cpus"] = cpus
            result["end_to_end"] = e2e
            ray.shutdown()
        if "miditok" not in args.skip:
            result["miditok_tsd"] = miditok_tsd(paths, args.repeats)
        if "music21" not in args.skip:
            n = min(args.tutorial_sample, len(paths))
            pick = sorted(np.random.default_rng(args.seed).choice(len(paths), size=n, replace=False).tolist())
            sample = [paths[i] for i in pick]
            result["music21_tutorial"] = music21_tutorial(sample, args.tutorial_repeats)
            result["music21_tutorial"]["sample"] = [os.path.basename(x) for x in sample]
            result["music21_tutorial"]["seed"] = args.seed

        ratios, met = {}, {}
        e2e = result.get("end_to_end", {})
        one = e2e.get("workers_1", {}).get("files_per_second")
        all_key = max((k for k in e2e if k.startswith("workers_")), key=lambda k: int(k.split("_")[1]), default=None)
        many = e2e.get(all_key, {}).get("files_per_second") if all_key else None
        raw = result.get("raw_symusic", {}).get("files_per_second")
        mt = result.get("miditok_tsd", {}).get("files_per_second")
        if one and raw:
            ratios["single_worker_vs_raw_symusic"] = round(one / raw, 3)
            ratios["single_worker_vs_raw_symusic_score_path"] = round(
                one / result["raw_symusic"]["score_path"]["files_per_second"], 3)
        if one and mt:
            ratios["single_worker_vs_miditok"] = round(one / mt, 2)
            ratios["single_worker_tokens_per_second_vs_miditok"] = round(
                e2e["workers_1"]["tokens_per_second"] / result["miditok_tsd"]["tokens_per_second"], 2)
        if one and many and all_key != "workers_1":
            ratios["two_workers_vs_one" if all_key == "workers_2" else f"{all_key}_vs_one"] = round(many / one, 3)
        if "engine" in result and raw:
            ratios["engine_vs_raw_symusic"] = round(result["engine"]["files_per_second"] / raw, 3)
        if one and "music21_tutorial" in result:
            ratios["single_worker_vs_music21_tutorial"] = round(one / result["music21_tutorial"]["files_per_second"], 1)
        for name, target in TARGETS.items():
            if name in ratios:
                met[name] = ratios[name] >= target
        result["ratios"] = ratios
        result["targets"] = TARGETS
        result["targets_met"] = met
        result["machine"]["load_average_end"] = _load()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

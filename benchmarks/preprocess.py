"""Benchmark of the preprocess stage (issue 2): ``python benchmarks/preprocess.py CORPUS``.

Prints one JSON object.  On the same MIDI files of CORPUS, in the same run:

* ``raw_symusic``: the ceiling, parsing every file with symusic in one process, two ways:
  ``symusic.Score(path)`` and ``open(path).read()`` + ``Score.from_midi(bytes)``.  The
  ceiling is the faster of the two (the stricter target); both ratios are printed.
* ``engine``: the preprocess worker itself, :func:`process_batch` on all files as one batch,
  in this process, no Ray (read, sha256, parse, tokenize, write one Parquet shard).
* ``engine_processes``: the same in one and in ``--workers`` plain processes at once (files split
  evenly, no Ray): what the shared machine gives to parallel work during this run, i.e. the
  ceiling of ``two_workers_vs_one``.
* ``raw_symusic_processes``: the raw ceiling (bytes + ``from_midi``) in one and in ``--workers``
  plain processes the same way: how far parsing alone, with nothing else to do, scales here.
* ``end_to_end``: the real stage, :func:`run_preprocess` into a fresh DEST, with one worker
  and with every core, on a local Ray started (and warmed up) before timing, its worker processes
  up before every timed run (:func:`warm_workers`); the Ray start-up is reported apart.
  files/s = input files / wall seconds of ``run_preprocess``; tokens, and where the time went
  (the manifest's ``timing``), from its manifest.  ``two_workers_vs_one_ceiling`` (Amdahl) is what
  two workers could give in this run if the batches phase of the one-worker run went as much faster
  as two plain processes did and the driver's serial part (listing, setup, finalize) stayed.
* ``miditok_tsd``: MidiTok's TSD tokenizer on every file (symusic Score from the bytes, then
  ``tokenizer.encode``), with velocities and tempos like the events tokenizer.
* ``music21_tutorial``: the Keras tutorial's loop on a seeded sample of files
  (``converter.parse`` + ``partitionByInstrument`` + the Note/Chord loop).

``--copies K`` measures the same on a corpus K times larger made of the same music (each file and
its transpositions by +1, -1, +2, ... semitones, distinct files): how the stage scales once its
fixed costs are spread.  The issue's targets are on the corpora themselves (K = 1).

The machine is shared, so the measurements are interleaved: each of ``--repeats`` rounds runs
every measurement once (MidiTok in the first ``--miditok-repeats`` rounds and the tutorial loop in
the first ``--tutorial-repeats``: they take seconds where the others take tenths), and
each figure is the best (fastest) of its rounds, the one least disturbed by others.  Load
averages are recorded at the start, after each round and at the end.  No speed is asserted:
``targets_met`` says which of the issue's targets this run met.  What is checked is that the
figures compare like with like (``accounting``): every measurement of the stage accounts for every
file (pieces + duplicates + failures), the raw parsers saw the same notes, and the whole-corpus runs
made the same tokens; if not, the JSON is still printed, the problems go to stderr, and the exit
status is 1.
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


def _best(runs: list[dict], files: int) -> dict:
    """The fastest of several runs, with every run's seconds kept for the record."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["runs_seconds"] = [round(r["seconds"], 4) for r in runs]
    best["seconds"] = round(best["seconds"], 4)
    best["files_per_second"] = _rate(files, best["seconds"])
    if "tokens" in best:
        best["tokens_per_second"] = _rate(best["tokens"], best["seconds"])
    return best


def _compiled_encoder() -> bool:
    """Whether the events tokenizer's C emission step is built (else its NumPy code runs)."""
    from midiforge.music import tokenizers

    return tokenizers._native is not None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# -------------------------------------------------------------------------------------------
# the measurements: each function runs one measurement once and returns its seconds and counts
# -------------------------------------------------------------------------------------------
def raw_score_path(paths: list[str]) -> dict:
    import symusic

    t = time.perf_counter()
    notes = sum(symusic.Score(p).note_num() for p in paths)
    return {"seconds": time.perf_counter() - t, "notes": notes}


def raw_read_from_midi(paths: list[str]) -> dict:
    import symusic

    t = time.perf_counter()
    notes = 0
    for p in paths:
        with open(p, "rb") as fh:
            notes += symusic.Score.from_midi(fh.read()).note_num()
    return {"seconds": time.perf_counter() - t, "notes": notes}


def engine(refs, settings) -> dict:
    """process_batch on every file as one batch, in this process (no Ray)."""
    from midiforge.pipeline.preprocess import process_batch
    from midiforge.storage import StorageOptions

    dest = tempfile.mkdtemp(prefix="mf-bench-engine-")
    try:
        t = time.perf_counter()
        res = process_batch(0, refs, dest, StorageOptions(), settings)
        seconds = time.perf_counter() - t
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    return {"seconds": seconds, "tokens": res["tokens"], "pieces": res["pieces"],
            "failures": res["failures"], "duplicates": res["duplicates"]}


def in_processes(pool, measure, items: list, processes: int, *args) -> dict:
    """``measure(part, *args)`` in ``processes`` plain processes at once, ``items`` split evenly, no Ray:
    the wall seconds, the processes' own seconds summed (``busy_seconds``), and their counts summed
    (notes, pieces, ...: every item is accounted for, as in the one-process run)."""
    parts = [items[i::processes] for i in range(processes)]
    t = time.perf_counter()
    outs = [f.result() for f in [pool.submit(measure, part, *args) for part in parts]]
    seconds = time.perf_counter() - t
    counts = {k: sum(o[k] for o in outs) for k in outs[0] if k != "seconds"}
    return {"seconds": seconds, "busy_seconds": round(sum(o["seconds"] for o in outs), 4), **counts}


def warm_workers(files: list[str], settings, workers: int) -> None:
    """One task per worker, untimed: Ray ends worker processes that stay idle (here, while the other
    measurements run), and a new one spends ~1.3 s importing before its first batch.  The figures are
    of the stage with its workers up, as the Ray start-up is reported apart."""
    from midiforge.pipeline.preprocess import run_preprocess

    dest = tempfile.mkdtemp(prefix="mf-bench-warm-")
    try:
        listing = os.path.join(dest, "files.txt")
        with open(listing, "w", encoding="utf-8") as fh:
            fh.write("\n".join(files[:workers]) + "\n")
        run_preprocess(listing, os.path.join(dest, "out"), settings, workers=workers, batch_files=1, progress=False,
                       allow_absolute_paths=True)  # the list names the corpus's files by absolute path
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def end_to_end(src: str, settings, workers: int) -> dict:
    """run_preprocess into a fresh DEST; where its time went from the manifest's ``timing``."""
    from midiforge.pipeline.preprocess import run_preprocess

    dest = tempfile.mkdtemp(prefix="mf-bench-e2e-")
    try:
        t = time.perf_counter()
        m = run_preprocess(src, os.path.join(dest, "out"), settings, workers=workers, progress=False,
                           allow_absolute_paths=True)
        seconds = time.perf_counter() - t
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    return {"seconds": seconds, "timing": m["timing"], "input_files": m["input_files"],
            "pieces": m["pieces"], "duplicates": m["duplicates"], "failures": m["failures"],
            "tokens": m["tokens"], "shards": len(m["shards"])}


MIDITOK_CONFIG = {
    # as close to the events tokenizer's defaults as TSD goes: a 1/4-beat grid for time shifts and
    # durations up to 16 beats, 8 velocity bins, 32 log-spaced tempos in 30..300 qpm, no programs
    "beat_res": {(0, 16): 4}, "num_velocities": 8, "use_velocities": True,
    "use_tempos": True, "num_tempos": 32, "tempo_range": (30, 300), "log_tempos": True,
    "use_programs": False, "use_time_signatures": False, "use_chords": False, "use_rests": False,
    "use_sustain_pedals": False, "use_pitch_bends": False,
}


def make_miditok():
    import miditok

    return miditok.TSD(miditok.TokenizerConfig(**MIDITOK_CONFIG))


def miditok_tsd(tok, paths: list[str]) -> dict:
    import symusic

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
        except Exception:  # a file MidiTok cannot read: counted in "failures", the benchmark goes on
            failures += 1
            continue
        seqs = seqs if isinstance(seqs, list) else [seqs]  # one sequence per track without programs
        tokens += sum(len(s.ids) for s in seqs)
    return {"seconds": time.perf_counter() - t, "encode_seconds": round(encode_seconds, 4),
            "tokens": tokens, "failures": failures}


def music21_tutorial(paths: list[str]) -> dict:
    """The tutorial's loop (Skuli, "How to Generate Music using a LSTM Neural Network in Keras").

    Two deviations, both forced: ``midi.flat.notes`` is ``midi.flatten().notes`` (``.flat`` is
    gone in music21 10), and ``forceSource=True`` so every round parses the MIDI files themselves
    (by default music21 writes a pickle of each parsed file to its scratch folder and loads that
    the next time; the benchmark neither writes nor loads pickles).
    """
    import warnings

    from music21 import chord, converter, instrument, note

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


def transposed_copies(corpus: str, out: str, copies: int) -> str:
    """``copies`` versions of every MIDI file of ``corpus`` in ``out``: the file itself, then the file
    transposed by +1, -1, +2, -2, ... semitones (symusic), each a distinct file (its own sha256).  A
    transposition that would take a note out of 0..127 is left out."""
    import symusic

    from midiforge.music.readers import MIDI_SUFFIXES

    os.makedirs(out, exist_ok=True)
    shifts = [0] + [k * sign for k in range(1, copies) for sign in (1, -1)][:copies - 1]
    for name in sorted(os.listdir(corpus)):
        if not name.lower().endswith(MIDI_SUFFIXES):
            continue
        with open(os.path.join(corpus, name), "rb") as fh:
            data = fh.read()
        score = symusic.Score.from_midi(data)
        pitches = [t.notes.numpy()["pitch"] for t in score.tracks if t.note_num()]
        low = min((int(p.min()) for p in pitches), default=60)
        high = max((int(p.max()) for p in pitches), default=60)
        stem = os.path.splitext(name)[0]
        for k in shifts:
            if low + k < 0 or high + k > 127:
                continue
            with open(os.path.join(out, f"{stem}~{k:+d}.mid"), "wb") as fh:
                fh.write(data if k == 0 else score.shift_pitch(k).dumps_midi())
    return out


# -------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------
def _ratios(result: dict) -> tuple[dict, dict]:
    ratios: dict = {}
    e2e = result.get("end_to_end", {})
    one = e2e.get("workers_1", {}).get("files_per_second")
    most = max((k for k in e2e if k.startswith("workers_")), key=lambda k: int(k.split("_")[1]), default=None)
    many = e2e[most]["files_per_second"] if most else None
    raw = result.get("raw_symusic", {})
    mt = result.get("miditok_tsd", {}).get("files_per_second")
    if one and raw:
        ratios["single_worker_vs_raw_symusic"] = round(one / raw["files_per_second"], 3)
        ratios["single_worker_vs_raw_symusic_score_path"] = round(one / raw["score_path"]["files_per_second"], 3)
    if one and mt:
        ratios["single_worker_vs_miditok"] = round(one / mt, 2)
        ratios["single_worker_tokens_per_second_vs_miditok"] = round(
            e2e["workers_1"]["tokens_per_second"] / result["miditok_tsd"]["tokens_per_second"], 2)
    if one and many and most != "workers_1":
        ratios["two_workers_vs_one" if most == "workers_2" else f"{most}_vs_one"] = round(many / one, 3)
    if "engine" in result and raw:
        ratios["engine_vs_raw_symusic"] = round(result["engine"]["files_per_second"] / raw["files_per_second"], 3)
        if one:
            ratios["single_worker_vs_engine"] = round(one / result["engine"]["files_per_second"], 3)
    ep = result.get("engine_processes", {})
    if len(ep) > 1:  # the machine's own parallel speed-up in this run, no Ray: the ceiling of the one above
        most_p = max(ep, key=lambda k: int(k.split("_")[1]))
        ratios[f"machine_{most_p}_vs_one_no_ray"] = round(
            ep[most_p]["files_per_second"] / ep["processes_1"]["files_per_second"], 3)
    rp = result.get("raw_symusic_processes", {})
    if len(rp) > 1:  # the ceiling itself, split over plain processes: parsing alone scales this far here
        most_p = max(rp, key=lambda k: int(k.split("_")[1]))
        ratios[f"raw_symusic_{most_p}_vs_one"] = round(
            rp[most_p]["files_per_second"] / rp["processes_1"]["files_per_second"], 3)
    if one and "machine_processes_2_vs_one_no_ray" in ratios:
        # Amdahl: what two workers could give in this run if the batches phase of the best one-worker run
        # (planning, the Ray tasks, the waits for their results) went as much faster as two plain
        # processes did, and the rest (listing, setup, finalize, the manifest) stayed as it was
        run = e2e["workers_1"]
        parallel = run["timing"]["batches"]
        ratios["two_workers_vs_one_ceiling"] = round(
            run["seconds"] / (run["seconds"] - parallel + parallel / ratios["machine_processes_2_vs_one_no_ray"]), 3)
        ratios["single_worker_serial_fraction"] = round(1 - parallel / run["seconds"], 3)
    if one and "music21_tutorial" in result:
        ratios["single_worker_vs_music21_tutorial"] = round(one / result["music21_tutorial"]["files_per_second"], 1)
    met = {name: ratios[name] >= target for name, target in TARGETS.items() if name in ratios}
    return ratios, met


def _accounting(result: dict, files: int) -> list[str]:
    """What would make the figures incomparable: a measurement that did not account for every file
    (pieces + duplicates + failures), raw parsers that saw different notes, whole-corpus runs that
    made different tokens.  Empty when all is well."""
    problems = []
    notes = {f"raw_symusic.{k}": v["notes"] for k, v in result.get("raw_symusic", {}).items() if isinstance(v, dict)}
    notes.update({f"raw_symusic_processes.{k}": v["notes"] for k, v in result.get("raw_symusic_processes", {}).items()})
    if len(set(notes.values())) > 1:
        problems.append(f"the raw parsers saw different notes: {notes}")
    runs = {"engine": result.get("engine")}
    runs.update({f"engine_processes.{k}": v for k, v in result.get("engine_processes", {}).items()})
    runs.update({f"end_to_end.{k}": v for k, v in result.get("end_to_end", {}).items() if k.startswith("workers_")})
    runs = {k: v for k, v in runs.items() if v}
    for name, r in runs.items():
        if r["pieces"] + r["duplicates"] + r["failures"] != files:
            problems.append(f"{name}: {r['pieces']} pieces + {r['duplicates']} duplicates + {r['failures']} failures "
                            f"for {files} files")
    whole = {k: v["tokens"] for k, v in runs.items() if not k.startswith("engine_processes.")}  # one batch or Ray's
    if len(set(whole.values())) > 1:
        problems.append(f"whole-corpus runs made different tokens: {whole}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", metavar="CORPUS", help="a folder of MIDI files")
    p.add_argument("--repeats", type=int, default=9, help="rounds; each figure is the best of its rounds")
    p.add_argument("--tutorial-sample", type=int, default=8, help="files for the music21 tutorial loop")
    p.add_argument("--tutorial-repeats", type=int, default=2, help="rounds that run the tutorial loop")
    p.add_argument("--miditok-repeats", type=int, default=3, help="rounds that run MidiTok")
    p.add_argument("--seed", type=int, default=0, help="for the tutorial's sample")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="'all cores' (default: os.cpu_count())")
    p.add_argument("--copies", type=int, default=1,
                   help="K > 1: measure on K distinct versions of every file instead (the file, then transposed by "
                        "+1, -1, +2, -2, ... semitones), written to a scratch folder: the same music as a corpus K "
                        "times larger, to see how the stage scales once its fixed costs are spread")
    p.add_argument("--skip", action="append", default=[],
                   choices=("raw", "engine", "end_to_end", "miditok", "music21"), help="leave a measurement out")
    args = p.parse_args(argv)

    from midiforge.music.readers import MIDI_SUFFIXES
    from midiforge.pipeline.preprocess import PreprocessSettings, list_inputs, run_preprocess
    from midiforge.pipeline.ray_runtime import start_ray

    load_start = _load()
    original = corpus = os.path.abspath(args.corpus)
    scratch = tempfile.mkdtemp(prefix="mf-bench-")
    if args.copies > 1:
        corpus = transposed_copies(original, os.path.join(scratch, "corpus"), args.copies)
    all_refs = list_inputs(corpus)
    refs = [r for r in all_refs if r.source.lower().endswith(MIDI_SUFFIXES)]
    if not refs:
        print(f"{corpus}: no MIDI files", file=sys.stderr)
        return 2
    paths = [os.path.join(corpus, r.key) for r in refs]
    settings = PreprocessSettings()
    n = min(args.tutorial_sample, len(paths))
    sample = [paths[i] for i in sorted(np.random.default_rng(args.seed).choice(len(paths), size=n, replace=False))]
    pool = None  # plain processes for engine_processes
    result: dict = {
        "benchmark": "preprocess", "corpus": original, "copies": args.copies, "files": len(refs),
        "bytes": int(sum(os.path.getsize(x) for x in paths)),
        "settings": {"tokenizer": settings.tokenizer, "parser": settings.read.parser,
                     "tracks": settings.read.tracks, "transpose": list(settings.transpose),
                     "compiled_encoder": _compiled_encoder()},
        "repeats": args.repeats, "statistic": "best (fastest) of interleaved rounds",
        "machine": {"cores": os.cpu_count(), "load_average_start": load_start, "load_average_rounds": [],
                    "python": platform.python_version(),
                    "versions": {d: _version(d) for d in ("symusic", "miditok", "music21", "ray", "pyarrow")}},
    }
    try:
        src = corpus
        if len(refs) != len(all_refs):  # the stage must see exactly the files the baselines see
            src = os.path.join(scratch, "files.txt")
            with open(src, "w", encoding="utf-8") as fh:
                fh.write("\n".join(paths) + "\n")

        measure: dict[str, callable] = {}  # name -> one run; all run once per round, in this order
        if "raw" not in args.skip:
            measure["raw_score_path"] = lambda: raw_score_path(paths)
            measure["raw_read_from_midi"] = lambda: raw_read_from_midi(paths)
        if "engine" not in args.skip:
            engine(refs[:8], settings)  # imports and first calls, not timed
            measure["engine"] = lambda: engine(refs, settings)
            if args.workers > 1:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
                for f in [pool.submit(engine, refs[:8], settings) for _ in range(args.workers)]:
                    f.result()  # started, imported, warmed up
                for k in sorted({1, args.workers}):
                    # what the machine gives to that many CPU-bound processes right now: the ceiling of
                    # two_workers_vs_one; and how far raw parsing alone (the ceiling) scales here
                    measure[f"engine_processes_{k}"] = lambda k=k: in_processes(pool, engine, refs, k, settings)
                    if "raw" not in args.skip:
                        measure[f"raw_processes_{k}"] = lambda k=k: in_processes(pool, raw_read_from_midi, paths, k)
        counts: list[int] = []
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
                run_preprocess(src, os.path.join(warm, "out"), settings, workers=max(counts), progress=False,
                               allow_absolute_paths=True)
            finally:
                shutil.rmtree(warm, ignore_errors=True)
            result["end_to_end"] = {"ray_start_seconds": round(ray_start, 3),
                                    "warm_up_seconds": round(time.perf_counter() - t, 3), "ray_cpus": cpus}
            for w in counts:
                measure[f"workers_{w}"] = lambda w=w: (warm_workers(paths, settings, max(counts)),
                                                       end_to_end(src, settings, w))[1]
        if "miditok" not in args.skip:
            tok = make_miditok()
            miditok_tsd(tok, paths[:8])  # first calls, not timed
            measure["miditok_tsd"] = lambda: miditok_tsd(tok, paths)
        if "music21" not in args.skip:
            measure["music21_tutorial"] = lambda: music21_tutorial(sample)

        runs: dict[str, list[dict]] = {k: [] for k in measure}
        for round_ in range(args.repeats):
            names = list(measure)
            if round_ % 2:  # the worker and process counts in the other order every other round
                for prefix in ("workers_", "engine_processes_", "raw_processes_"):
                    order = [k for k in names if k.startswith(prefix)]
                    names = [k if not k.startswith(prefix) else order.pop() for k in names]
            for name in names:
                if (name == "music21_tutorial" and round_ >= args.tutorial_repeats) or \
                        (name == "miditok_tsd" and round_ >= args.miditok_repeats):
                    continue
                r = measure[name]()
                r["load"] = _load()
                runs[name].append(r)
            result["machine"]["load_average_rounds"].append(_load())

        if "raw" not in args.skip:
            raw = {"score_path": _best(runs["raw_score_path"], len(paths)),
                   "read_from_midi": _best(runs["raw_read_from_midi"], len(paths))}
            raw["ceiling"] = max(raw, key=lambda k: raw[k]["files_per_second"])
            raw["files_per_second"] = raw[raw["ceiling"]]["files_per_second"]
            result["raw_symusic"] = raw
        if "engine" in runs:
            result["engine"] = _best(runs["engine"], len(refs))
            procs = sorted(int(k.rsplit("_", 1)[1]) for k in runs if k.startswith("engine_processes_"))
            if procs:
                result["engine_processes"] = {f"processes_{k}": _best(runs[f"engine_processes_{k}"], len(refs))
                                              for k in procs}
        procs = sorted(int(k.rsplit("_", 1)[1]) for k in runs if k.startswith("raw_processes_"))
        if procs:
            result["raw_symusic_processes"] = {f"processes_{k}": _best(runs[f"raw_processes_{k}"], len(paths))
                                               for k in procs}
        for w in counts:
            result["end_to_end"][f"workers_{w}"] = _best(runs[f"workers_{w}"], len(refs))
        if "miditok_tsd" in runs:
            result["miditok_tsd"] = _best(runs["miditok_tsd"], len(paths))
            cfg = {k: (str(v) if k == "beat_res" else v) for k, v in MIDITOK_CONFIG.items()}
            result["miditok_tsd"]["config"] = {"tokenizer": "TSD", "vocab_size": len(tok), **cfg,
                                               "tokens": "one sequence per track (no programs); their sum"}
        if "music21_tutorial" in runs:
            m21 = _best(runs["music21_tutorial"], len(sample))
            m21.update({"files": len(sample), "sample": [os.path.basename(x) for x in sample], "seed": args.seed})
            result["music21_tutorial"] = m21
        if "end_to_end" in result:
            import ray

            ray.shutdown()
        problems = _accounting(result, len(refs))
        result["accounting"] = problems or "every measurement accounted for every file"
        result["ratios"], result["targets_met"] = _ratios(result)
        result["targets"] = TARGETS
        result["machine"]["load_average_end"] = _load()
    finally:
        if pool is not None:
            pool.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if problems:
        print("\n".join(["the measurements are not comparable:", *problems]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

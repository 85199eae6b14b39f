"""Generate MIDI pieces from a trained model bundle, in parallel on Ray actors.

``midiforge generate MODEL_DIR DEST --num-pieces N`` loads the bundle (verified against its
manifest), spreads the pieces over Ray actors that each hold the model once, decodes them in
batches with the LSTM state carried from token to token, and writes each finished batch as one
Parquet shard ``pieces/<checkpoint>/part-<first index>.parquet`` (tokens, settings, metrics and
the MIDI file's bytes: see :mod:`midiforge.pipeline.pieces`), one MIDI file per piece unless
``--no-midi-files``, and ``manifest.json`` (last).  Piece ``i`` of seed ``S`` has the same tokens
whatever the batch size, the number of workers, or a resume.
"""
# The stage's modules (the docstring above is the CLI's description): this one (the settings, the
# driver run_generate, the manifest, the CLI), generate_models (the bundles --checkpoint names),
# generate_primers (how each piece starts) and generate_worker (the worker that writes a shard per
# batch, locally or on Ray actors).
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import secrets
import sys
import time
from dataclasses import dataclass

import numpy as np

from midiforge.errors import MidiforgeError
from midiforge.model.decode import Limits
from midiforge.model.sampling import SamplingSettings, check_seed
from midiforge.pipeline.generate_models import (  # noqa: F401  (resolve_labels..numpy_weights: importable here too)
    ModelSpec, check_model_dir, load_models, numpy_weights, resolve_labels,
)
from midiforge.pipeline.generate_primers import PrimerPlan, plan_primers, read_uri_bytes  # noqa: F401
from midiforge.pipeline.generate_worker import GenerateWorker, _progress, _ray_workers, _run_local, _run_ray
from midiforge.storage import StorageOptions, open_store, write_manifest

WORK = "_work"
SETTINGS = f"{WORK}/settings.json"
PRIMER_KINDS = ("none", "midi", "shards")
ENGINES = ("auto", "numpy", "keras")
PRECISIONS = ("float64", "float32")


# -------------------------------------------------------------------------------------------
# settings
# -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateSettings:
    """What decides the pieces' content (all of it must match on --resume)."""

    sampling: SamplingSettings = SamplingSettings()
    limits: Limits = Limits()
    qpm: float | None = None           # None: the primer's tempo, else the corpus median
    primer: str = "none"               # none | midi | shards
    primer_path: str | None = None     # the MIDI file, or the preprocess output (shards)
    primer_length: int = 100           # shards: window length (the tutorial's sequence length)
    primer_split: str = "train"        # shards: which split the windows come from
    piano_roll: bool = False
    midi_files: bool = True            # one MIDI (and PNG) object per piece besides the shards
    engine: str = "auto"
    precision: str = "float64"         # numpy engine: float64 (batch-independent on any BLAS) or float32

    def validate(self) -> "GenerateSettings":
        self.sampling.validate()
        self.limits.validate()
        if self.qpm is not None and not (math.isfinite(self.qpm) and 1.0 <= self.qpm <= 1000.0):
            raise MidiforgeError(f"--qpm {self.qpm}: must be in 1..1000 quarter notes per minute")
        if self.primer not in PRIMER_KINDS:
            raise MidiforgeError(f"primer {self.primer!r}: use one of {', '.join(PRIMER_KINDS)}")
        if self.primer != "none" and not self.primer_path:
            raise MidiforgeError(f"primer {self.primer}: a path is needed")
        if int(self.primer_length) != self.primer_length or self.primer_length < 1:
            raise MidiforgeError(f"--primer-length {self.primer_length}: must be an integer >= 1")
        if self.primer_split not in ("train", "validation", "test"):
            raise MidiforgeError(f"--primer-split {self.primer_split}: use train, validation or test")
        if self.engine not in ENGINES:
            raise MidiforgeError(f"--engine {self.engine}: use one of {', '.join(ENGINES)}")
        if self.precision not in PRECISIONS:
            raise MidiforgeError(f"--precision {self.precision}: use one of {', '.join(PRECISIONS)}")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d


# -------------------------------------------------------------------------------------------
# the driver
# -------------------------------------------------------------------------------------------
def _chunks(indices: list[int], size: int) -> list[list[int]]:
    """Batches of at most ``size`` consecutive indices (a gap ends a batch: a shard holds a range)."""
    out: list[list[int]] = []
    for i in indices:
        if out and len(out[-1]) < size and out[-1][-1] == i - 1:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _identity(models: list[ModelSpec], settings: GenerateSettings, seed: int, engine: str,
              primer_sha256: str | None) -> dict:
    """What a resumed run must share with the run it continues (not N, batch size or workers)."""
    return {"bundles": {m.label: m.sha256 for m in models}, "seed": seed, "engine": engine,
            "settings": settings.to_dict(), "primer_sha256": primer_sha256}


def _check_arguments(num_pieces: int, batch_size: int, workers: int | None, num_gpus_per_worker: float,
                     cpus_per_worker: float) -> None:
    if int(num_pieces) != num_pieces or num_pieces <= 0:
        raise MidiforgeError(f"--num-pieces {num_pieces}: must be a positive integer")
    if int(batch_size) != batch_size or batch_size < 1:
        raise MidiforgeError(f"--batch-size {batch_size}: must be a positive integer")
    if workers is not None and workers < 0:
        raise MidiforgeError(f"--workers {workers}: must be >= 0 (0: no Ray, in this process)")
    if num_gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise MidiforgeError("--num-gpus-per-worker must be >= 0 and --cpus-per-worker > 0")


def _earlier_run(dest, resume: bool) -> tuple[bool, dict | None]:
    """Whether DEST holds a generate run (refused without --resume), and that run's saved settings."""
    existing = dest.exists(SETTINGS) or dest.exists("manifest.json")
    if existing and not resume:
        raise MidiforgeError(f"{dest.uri}: already holds a generate run; pass --resume to add the missing "
                             f"pieces, or use a new DEST")
    saved = json.loads(dest.read_bytes(SETTINGS)) if existing and dest.exists(SETTINGS) else None
    if saved is not None:  # written before --midi-files existed: those runs wrote MIDI files
        saved.get("identity", {}).get("settings", {}).setdefault("midi_files", True)
    return existing, saved


def _primer_sha256(settings: GenerateSettings, storage: StorageOptions) -> str | None:
    if settings.primer != "midi":
        return None
    from midiforge.storage.manifest import sha256_hex

    return sha256_hex(read_uri_bytes(settings.primer_path, storage, "primer"))


def _check_same_run(dest, saved: dict | None, identity: dict) -> None:
    """--resume continues only a run with the same identity (else its pieces would not match)."""
    if saved is not None and saved["identity"] != identity:
        diff = sorted(k for k in identity if identity[k] != saved["identity"].get(k))
        raise MidiforgeError(f"{dest.uri}: --resume with different {', '.join(diff)} than the run it continues "
                             f"(pieces would not match); use a new DEST")


def _pending(dest, existing: bool, models: list[ModelSpec], num_pieces: int) -> tuple[dict, dict[str, list[int]]]:
    """The shards earlier runs finished (path -> info), and per checkpoint the piece indices still to make."""
    from midiforge.pipeline import pieces

    shards = pieces.scan_shards(dest) if existing else {}  # the batches finished by earlier runs
    labels = [m.label for m in models]
    done = pieces.held(shards.values(), labels, num_pieces)
    return shards, {lab: np.flatnonzero(~done[lab]).tolist() for lab in labels}


def _tasks(models: list[ModelSpec], pending: dict[str, list[int]], batch_size: int, n_workers: int,
           n_pending: int) -> list[tuple[str, list[int]]]:
    """(checkpoint, consecutive piece indices) batches of --batch-size pieces, smaller when that leaves a
    worker idle (tokens do not depend on it)."""
    chunk_size = max(1, min(batch_size, math.ceil(n_pending / n_workers))) if n_pending else batch_size
    return [(m.label, chunk) for m in models for chunk in _chunks(pending[m.label], chunk_size)]


def _primer_maker(plan: PrimerPlan, models: list[ModelSpec], qpm: float | None):
    """task -> (label, indices, primers): a batch's primers, made when it is sent (a driver never holds
    N of them)."""
    toks = {m.label: (m.tokenizer, m.qpm_median) for m in models}

    def with_primers(task):
        label, chunk = task
        tok, qpm_median = toks[label]
        return label, chunk, [plan.for_piece(tok, i, qpm, qpm_median) for i in chunk]

    return with_primers


def _run_tasks(dest, tasks: list, with_primers, worker_args: tuple, *, workers: int | None, n_workers: int,
               gpus: float, cpus: float, total: int, n_pending: int, progress: bool) -> dict:
    """Every task on the workers (GenerateWorker, as this module names it); the run's statistics."""
    stats = {"tokens": 0, "decode_seconds": 0.0, "peak_rss": 0, "workers": 0, "batches": {}}
    if not tasks:
        return stats
    dest.delete("manifest.json")  # incomplete again until this run finishes
    bar = _progress(total, total - n_pending, progress)
    try:
        if workers == 0:
            _run_local(GenerateWorker, worker_args, tasks, with_primers, bar, stats)
        else:
            _run_ray(GenerateWorker, worker_args, tasks, with_primers, bar, stats, n=n_workers, gpus=gpus, cpus=cpus)
    finally:
        bar.close()
    return stats


def run_generate(model_dir: str, dest_uri: str, num_pieces: int, settings: GenerateSettings, *,
                 seed: int | None = None, checkpoint: str = "final", batch_size: int = 256,
                 workers: int | None = None, address: str | None = None, num_gpus_per_worker: float = 0.0,
                 cpus_per_worker: float = 1.0, resume: bool = False, storage: StorageOptions | None = None,
                 progress: bool = True) -> dict:
    """The whole stage; returns the manifest it wrote.  Every check runs before anything is written."""
    started = time.time()
    storage = storage or StorageOptions()
    _check_arguments(num_pieces, batch_size, workers, num_gpus_per_worker, cpus_per_worker)
    settings.validate()
    engine = settings.engine if settings.engine != "auto" else ("keras" if num_gpus_per_worker > 0 else "numpy")
    if seed is not None:
        check_seed(seed)
    dest = open_store(dest_uri, storage)
    existing, saved = _earlier_run(dest, resume)
    if saved is not None and seed is None:
        seed = int(saved["identity"]["seed"])
    if seed is None:
        seed = secrets.randbelow(2**31)
    models = load_models(model_dir, checkpoint, engine, storage)
    primer_sha = _primer_sha256(settings, storage)
    plan = plan_primers(settings, models, seed, storage)
    identity = _identity(models, settings, seed, engine, primer_sha)
    _check_same_run(dest, saved, identity)
    shards, pending = _pending(dest, existing, models, num_pieces)
    n_pending = sum(len(v) for v in pending.values())
    n_workers = 1
    if n_pending and workers != 0:  # the cluster must fit the actors before anything is written
        n_workers = _ray_workers(workers, address, num_gpus_per_worker, cpus_per_worker, n_pending)
    tasks = _tasks(models, pending, batch_size, n_workers, n_pending)
    with_primers = _primer_maker(plan, models, settings.qpm)
    if tasks:
        with_primers(tasks[0])  # the primers can be made, before anything is written

    # ---- from here on, things are written ----
    if saved is None:
        dest.write_bytes(SETTINGS, (json.dumps({"identity": identity}, indent=1) + "\n").encode())
    gen_started = time.time()
    stats = _run_tasks(dest, tasks, with_primers, (models, settings, seed, dest.uri, storage, batch_size, engine),
                       workers=workers, n_workers=n_workers, gpus=num_gpus_per_worker, cpus=cpus_per_worker,
                       total=num_pieces * len(models), n_pending=n_pending, progress=progress)
    gen_seconds = time.time() - gen_started
    return finalize(dest, models, settings, seed, num_pieces, model_dir=model_dir, engine=engine,
                    started=started, run_stats={**stats, "pieces": n_pending, "generate_seconds": gen_seconds,
                                                "batch_size": batch_size},
                    primer_mapped=plan.mapped, known=shards)

def identical_pieces(small) -> dict[str, int]:
    """Per checkpoint: how many pieces have the same MIDI file (same sha256) as an earlier piece."""
    out: dict[str, int] = {}
    if small is None:
        return out
    seen: set[tuple[str, str]] = set()
    for label, sha in zip(small["checkpoint"].to_pylist(), small["midi_sha256"].to_pylist()):
        out.setdefault(label, 0)
        if (label, sha) in seen:
            out[label] += 1
        seen.add((label, sha))
    return out


def same_pieces_warning(settings: GenerateSettings, num_pieces: int) -> str | None:
    """Why every piece would be the same, when the settings make it so (said before generating)."""
    s = settings.sampling
    deterministic = "--greedy" if s.greedy else "--top-k 1" if s.top_k == 1 else None
    if deterministic is None or num_pieces < 2 or settings.primer == "shards":
        return None
    start = "the same primer (--primer-midi)" if settings.primer == "midi" else "BOS and the tempo token (no primer)"
    return (f"{deterministic} always takes the most likely token and every piece starts from {start}: all "
            f"{num_pieces} pieces will be the same; sample instead (without {deterministic}, e.g. --temperature 0.9 "
            f"--top-p 0.95) or give each piece its own primer with --primer-shards DIR")


def finalize(dest, models: list[ModelSpec], settings: GenerateSettings, seed: int, num_pieces: int, *,
             model_dir: str, engine: str, started: float, run_stats: dict, primer_mapped: int = 0,
             known: dict | None = None) -> dict:
    """Check that the shards hold every piece exactly once, then write manifest.json (last).

    Only the shards' small columns are decoded (each shard is read once for its sha256; those
    ``known`` from the start of the run, with the same size, are not read again).
    """
    import pyarrow as pa

    from midiforge.pipeline import pieces

    labels = [m.label for m in models]
    infos = pieces.settle(dest, pieces.scan_shards(dest, known), labels, num_pieces)
    small = pa.concat_tables([i.small for i in infos]) if infos else None
    n_pieces = small.num_rows if small is not None else 0
    stops: dict[str, int] = {}
    for reason in (small["stop_reason"].to_pylist() if small is not None else []):
        stops[reason] = stops.get(reason, 0) + 1
    identical = identical_pieces(small)
    elapsed = time.time() - started
    gen_tokens = int(run_stats["tokens"])
    gen_seconds = float(run_stats["generate_seconds"])
    manifest = {
        "stage": "generate",
        "model": model_dir,
        "bundles": [{"checkpoint": m.label, "uri": m.uri, "sha256": m.sha256, "epoch": m.epoch} for m in models],
        "seed": seed,
        "num_pieces": num_pieces,
        "pieces": n_pieces,
        "tokens": int(np.sum(small["generated_tokens"].to_numpy())) if small is not None else 0,
        "stop_reasons": stops,
        "identical_pieces": identical,
        "settings": settings.to_dict(),
        "engine": engine,
        "primer_tokens_mapped": primer_mapped,
        "run": {"pieces": run_stats["pieces"], "tokens": gen_tokens, "workers": run_stats["workers"],
                "batch_size": run_stats["batch_size"], "generate_seconds": round(gen_seconds, 3),
                "decode_seconds": round(float(run_stats["decode_seconds"]), 3),  # summed over the workers
                "batches_per_worker": sorted(run_stats["batches"].values(), reverse=True),
                "worker_peak_rss_bytes": run_stats["peak_rss"]},
        "shards": pieces.shard_entries(infos),
        "files": pieces.file_entries(infos),
        "seconds": round(elapsed, 3),
        "tokens_per_second": round(gen_tokens / gen_seconds, 1) if gen_tokens and gen_seconds > 0 else None,
    }
    write_manifest(dest, manifest)
    return manifest



# -------------------------------------------------------------------------------------------
# CLI
# -------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="training output (or one bundle's directory): local, file:// or s3://")
    p.add_argument("dest", metavar="DEST", help="output folder or s3:// prefix")
    p.add_argument("--num-pieces", "-n", type=int, required=True, metavar="N", help="pieces to write (required)")
    m = _model_arguments(p)
    _sampling_arguments(p)
    _primer_arguments(p)
    _output_arguments(p, m)
    _execution_arguments(p)
    from midiforge.storage.cli_options import add_storage_arguments

    add_storage_arguments(p)


def _model_arguments(p: argparse.ArgumentParser):
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", default="final", metavar="WHICH",
                   help="final (default: the final bundle), best, latest, an epoch number, or all "
                        "(every checkpoint, then final: hear how the model changed while training)")
    m.add_argument("--engine", choices=ENGINES, default="auto",
                   help="numpy: float64 NumPy LSTM, tokens independent of batching (default on CPU); "
                        "keras: the stateful tf_keras model (default with --num-gpus-per-worker)")
    return m


def _sampling_arguments(p: argparse.ArgumentParser) -> None:
    d = SamplingSettings()
    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=d.temperature, help="> 0 (default 1)")
    s.add_argument("--top-k", type=int, default=d.top_k, help="keep the k most likely tokens (0: off; default %(default)s)")
    s.add_argument("--top-p", type=float, default=d.top_p, help="nucleus: keep tokens up to this mass (1: off; default %(default)s)")
    s.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help="CTRL penalty >= 1 on tokens of the last --repetition-window tokens (1: off; default %(default)s)")
    s.add_argument("--repetition-window", type=int, default=d.repetition_window, metavar="W",
                   help="tokens the repetition penalty looks back at (default %(default)s)")
    s.add_argument("--greedy", action="store_true", help="always the most likely token (the tutorial's argmax; without --primer-shards every piece is the same; "
                        "default: sampling)")
    s.add_argument("--max-tokens", type=int, default=Limits.max_tokens,
                   help="generated tokens per piece, primer not counted (default %(default)s)")
    s.add_argument("--max-seconds", type=float, default=None, help="stop a piece once its music lasts this many seconds (default: no limit)")


def _primer_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("seeds, primers, tempo")
    g.add_argument("--seed", type=int, default=None,
                   help="run seed; piece i draws from its own generator seeded by (seed, i) (default: random, "
                        "recorded in the manifest)")
    pr = g.add_mutually_exclusive_group()
    pr.add_argument("--primer-midi", metavar="FILE", help="start every piece from this MIDI file's tokens (default: no primer)")
    pr.add_argument("--primer-shards", metavar="DIR",
                    help="start each piece from a random window of a piece in this preprocess output "
                         "(the tutorial's way); default: no primer, pieces start at BOS")
    g.add_argument("--primer-length", type=int, default=100, help="--primer-shards window (default 100)")
    g.add_argument("--primer-split", default="train", choices=("train", "validation", "test"),
                   help="the split of --primer-shards the windows come from (default: %(default)s)")
    g.add_argument("--qpm", type=float, default=None,
                   help="tempo (default: the primer's, else the corpus median recorded by preprocess)")
    g.add_argument("--piano-roll", action="store_true", help="also make a piano-roll PNG per piece")


def _output_arguments(p: argparse.ArgumentParser, m) -> None:
    """The output group, then --precision in the model group ``m`` (added here, after --midi-files, as
    it always was: the usage line lists the options in the order they were added)."""
    o = p.add_argument_group("output")
    o.add_argument("--midi-files", action=argparse.BooleanOptionalAction, default=True,
                   help="one object per piece, midi/<checkpoint>/s<seed>-<index>.mid (and png/ with --piano-roll), "
                        "besides the pieces/ shards that always hold every piece's MIDI bytes (default: on; at "
                        "dataset scale pass --no-midi-files and extract files later with pieces.export_midi)")
    m.add_argument("--precision", choices=PRECISIONS, default="float64",
                   help="numpy engine arithmetic: float64 (default; a piece's tokens do not depend on the batch "
                        "on any BLAS) or float32 (about 2x faster; batch-independent where the BLAS computes "
                        "each row alike whatever the number of rows, as OpenBLAS does)")


def _execution_arguments(p: argparse.ArgumentParser) -> None:
    x = p.add_argument_group("execution")
    x.add_argument("--batch-size", type=int, default=256,
                   help="pieces decoded together by a worker (default 256; smaller when N would leave workers idle)")
    x.add_argument("--workers", type=int, default=None,
                   help="Ray actors (default: as many as the cluster's CPUs or GPUs allow; 0: no Ray)")
    x.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs Ray reserves per actor (default %(default)s)")
    x.add_argument("--num-gpus-per-worker", type=float, default=0.0,
                   help="GPUs per actor on a GPU cluster (selects the keras engine; default %(default)s)")
    x.add_argument("--address", help="Ray cluster address HEAD:PORT (default: RAY_ADDRESS, else a private local Ray "
                                      "on 127.0.0.1)")
    x.add_argument("--cluster", choices=("none", "slurm"), default="none",
                   help="slurm: start a Ray cluster across this Slurm job's nodes for the run and stop it after "
                        "(run inside sbatch: slurm/generate.sbatch); default none")
    x.add_argument("--resume", action="store_true", help="make only the pieces DEST does not have yet")
    x.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on stderr)")

def settings_from_args(args) -> GenerateSettings:
    primer, path = "none", None
    if args.primer_midi:
        primer, path = "midi", args.primer_midi
    elif args.primer_shards:
        primer, path = "shards", args.primer_shards
    sampling = SamplingSettings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty,
                                repetition_window=args.repetition_window, greedy=args.greedy)
    return GenerateSettings(sampling=sampling, limits=Limits(args.max_tokens, args.max_seconds), qpm=args.qpm,
                            primer=primer, primer_path=path, primer_length=args.primer_length,
                            primer_split=args.primer_split, piano_roll=args.piano_roll,
                            midi_files=args.midi_files, engine=args.engine,
                            precision=args.precision)


def main(args) -> int:
    from midiforge.storage.cli_options import options_from_args

    from midiforge.pipeline.slurm_ray import run_with_cluster

    settings = settings_from_args(args)
    warning = same_pieces_warning(settings, args.num_pieces)
    if warning:
        print(f"midiforge generate: warning: {warning}", file=sys.stderr)
    manifest = run_with_cluster(args.cluster, args.address, lambda address: run_generate(
        args.model_dir, args.dest, args.num_pieces, settings, seed=args.seed, checkpoint=args.checkpoint,
        batch_size=args.batch_size, workers=args.workers, address=address,
        num_gpus_per_worker=args.num_gpus_per_worker, cpus_per_worker=args.cpus_per_worker, resume=args.resume,
        storage=options_from_args(args), progress=not args.no_progress))
    print(json.dumps({k: manifest[k] for k in ("pieces", "tokens", "seed", "stop_reasons", "seconds",
                                               "tokens_per_second")}))
    for label, n in (manifest.get("identical_pieces") or {}).items():
        if n:
            print(f"midiforge generate: warning: {n} of the {label} pieces are identical to an earlier piece (the "
                  f"same MIDI file){': ' + warning if warning else ''}", file=sys.stderr)
    print(f"pieces: {open_store(args.dest, options_from_args(args)).url('midi/' if settings.midi_files else 'pieces/')}")
    return 0

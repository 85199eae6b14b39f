"""Generate MIDI pieces from a trained model bundle, in parallel on Ray actors.

``midiforge generate MODEL_DIR DEST --num-pieces N`` loads the bundle (verified against its
manifest), spreads the pieces over Ray actors that each hold the model once, decodes them in
batches with the LSTM state carried from token to token, and writes each finished batch as one
Parquet shard ``pieces/<checkpoint>/part-<first index>.parquet`` (tokens, settings, metrics and
the MIDI file's bytes: see :mod:`midiforge.pipeline.pieces`), one MIDI file per piece unless
``--no-midi-files``, and ``manifest.json`` (last).  Piece ``i`` of seed ``S`` has the same tokens
whatever the batch size, the number of workers, or a resume.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from midiforge.errors import MidiforgeError, PieceError
from midiforge.model.decode import Limits, PieceJob, decode
from midiforge.model.sampling import PRIMER_STREAM, SamplingSettings, check_seed, piece_rng
from midiforge.storage import StorageOptions, open_store, split_uri, write_manifest

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
# models
# -------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """One checkpoint as the workers need it (plain data: travels through Ray's object store)."""

    label: str                      # "final", "epoch-0003"
    uri: str
    sha256: str
    epoch: int | None
    tokenizer: object               # Tokenizer (parsed once, from the bundle's tokenizer.json)
    qpm_median: float | None
    weights: object = None          # LSTMWeights (numpy engine), read from the HDF5 bytes with h5py
    bundle: object = None           # Bundle (keras engine builds its stateful model from it)


def resolve_labels(store, checkpoint: str) -> list[str | int]:
    """What to load for ``--checkpoint``: "final", "best", "latest", an epoch, or every one ("all")."""
    from midiforge.model.bundle import FINAL_DIR, MANIFEST
    from midiforge.pipeline.bundles import is_single_bundle, list_checkpoints

    if checkpoint != "all":
        return [checkpoint]
    if is_single_bundle(store):
        return ["final"]
    out: list[str | int] = [int(c["epoch"]) for c in list_checkpoints(store)]
    if store.exists(f"{FINAL_DIR}/{MANIFEST}"):
        out.append("final")
    if not out:
        raise MidiforgeError(f"{store.uri}: no checkpoints and no final bundle to generate from")
    return out


def check_model_dir(model_dir: str, storage: StorageOptions | None) -> None:
    """A MODEL_DIR that does not exist is named as such (not as a training that has not finished)."""
    from midiforge.storage import LocalStore

    store = open_store(model_dir, storage)
    if isinstance(store, LocalStore):
        if not store.root.exists():
            raise MidiforgeError(f"{store.uri}: MODEL_DIR does not exist (no such folder)")
        if not store.root.is_dir():
            raise MidiforgeError(f"{store.uri}: MODEL_DIR is not a folder (give train's output folder or a "
                                 f"bundle's folder)")
        if not any(store.root.iterdir()):
            raise MidiforgeError(f"{store.uri}: MODEL_DIR is an empty folder (no training output there)")
    elif not store.list():
        raise MidiforgeError(f"{store.uri}: MODEL_DIR does not exist (no objects under this prefix)")


def load_models(model_dir: str, checkpoint: str, engine: str, storage: StorageOptions | None) -> list[ModelSpec]:
    """Load and verify every bundle ``--checkpoint`` names, reading each bundle's files once.

    The numpy engine gets its weights from the HDF5 bytes (h5py): no TensorFlow in the driver or
    the actors.  The keras engine gets the bundle (its actors build the tf_keras model).
    """
    from midiforge.pipeline.bundles import load_bundle

    check_model_dir(model_dir, storage)
    store = open_store(model_dir, storage)
    specs: list[ModelSpec] = []
    for what in resolve_labels(store, checkpoint):
        b = load_bundle(store, checkpoint=what)
        if any(s.label == b.checkpoint for s in specs):
            continue
        spec = ModelSpec(label=b.checkpoint, uri=b.uri, sha256=b.sha256, epoch=b.epoch, tokenizer=b.tokenizer,
                         qpm_median=_float_or_none(b.training.get("qpm_median")))
        if engine == "keras":
            spec.bundle = b
        else:
            spec.weights = numpy_weights(b)
        specs.append(spec)
    return specs


def numpy_weights(bundle):
    """The bundle's weights as float64 NumPy arrays, read from its HDF5 bytes with h5py (no TensorFlow)."""
    return bundle.numpy_weights()


def _float_or_none(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


# -------------------------------------------------------------------------------------------
# primers
# -------------------------------------------------------------------------------------------
@dataclass
class PrimerPlan:
    """How piece ``i`` starts: shared (none, midi) or one shard window per piece."""

    kind: str
    source: str = ""
    piece: object = None                                   # midi: the primer Piece
    time_signature: tuple[int, int] = (4, 4)
    qpm: float | None = None                               # midi: the file's tempo
    windows: object = None                                 # shards: index -> (ids, qpm, source, time signature)
    mapped: int = 0                                        # midi: tokens mapped to the nearest known
    _encoded: dict = field(default_factory=dict, repr=False)  # midi: (tokenizer id, qpm) -> ids

    def for_piece(self, tokenizer, index: int, qpm_setting: float | None, qpm_median: float | None):
        """(primer ids, qpm, time signature, primer source) of piece ``index``."""
        from midiforge.music.primer import encode_primer, start_primer

        if self.kind == "shards":
            ids, row_qpm, source, ts = self.windows(index)
            return np.asarray(ids, dtype=np.int32), float(qpm_setting or row_qpm or qpm_median or 120.0), ts, source
        if self.kind == "midi":
            qpm = float(qpm_setting or self.qpm or qpm_median or 120.0)
            key = (tokenizer.id, qpm)
            if key not in self._encoded:
                self._encoded[key] = encode_primer(tokenizer, self.piece, qpm)[0]
            return self._encoded[key].copy(), qpm, self.time_signature, self.source
        qpm = float(qpm_setting or qpm_median or 120.0)
        return start_primer(tokenizer, qpm), qpm, (4, 4), ""


def read_uri_bytes(uri: str, storage: StorageOptions | None, what: str) -> bytes:
    scheme, where = split_uri(uri)
    try:
        if scheme == "file":
            with open(where, "rb") as fh:
                return fh.read()
        parent, _, key = uri.rstrip("/").rpartition("/")
        return open_store(parent, storage).read_bytes(key)
    except OSError as exc:
        raise MidiforgeError(f"{uri}: cannot read the {what} ({exc.strerror or exc})") from None


def plan_primers(settings: GenerateSettings, models: list[ModelSpec], seed: int,
                 storage: StorageOptions | None) -> PrimerPlan:
    from midiforge.music.readers import read_piece
    from midiforge.music.primer import encode_primer

    if settings.primer == "none":
        return PrimerPlan("none")
    if settings.primer == "midi":
        path = settings.primer_path
        data = read_uri_bytes(path, storage, "primer")
        try:
            piece = read_piece(path.rsplit("/", 1)[-1], data)
        except PieceError as exc:
            raise MidiforgeError(f"{path}: cannot read the primer ({exc})") from None
        mapped = 0
        for m in models:
            ids, n = encode_primer(m.tokenizer, piece)
            mapped = max(mapped, n)
            if len(ids) < 2:
                raise MidiforgeError(f"{path}: the primer has no notes the model's tokenizer keeps")
        return PrimerPlan("midi", source=path, piece=piece, time_signature=piece.time_signature, qpm=piece.qpm,
                          mapped=mapped)
    return _shard_windows(settings, models, seed, storage)


def _shard_windows(settings: GenerateSettings, models: list[ModelSpec], seed: int,
                   storage: StorageOptions | None) -> PrimerPlan:
    """One random window per piece from the pieces of a preprocess output (the tutorial's primer),
    each with the time signature of the piece it comes from."""
    from midiforge.music.primer import window_primer
    from midiforge.pipeline import tokens

    uri = settings.primer_path
    store = open_store(uri, storage)
    manifest = tokens.read_output_manifest(store)
    for m in models:
        model_tok = m.tokenizer.id
        if manifest.get("tokenizer") != model_tok:
            raise MidiforgeError(
                f"{store.url(tokens.MANIFEST)}: tokenizer {manifest.get('tokenizer')} differs from the model's "
                f"tokenizer {model_tok} ({m.uri}); its token ids would not match the model's vocabulary")
    rows = tokens.primer_rows(store, manifest, settings.primer_split, min_tokens=3)
    if not len(rows):
        raise MidiforgeError(f"{store.uri}: no piece of split {settings.primer_split!r} to take primers from")

    def window(i: int):  # piece i's window, when its batch is sent (not N of them held at once)
        rng = piece_rng(seed, i, PRIMER_STREAM)
        ids, qpm, source, ts = rows.get(int(rng.integers(0, len(rows))))
        return window_primer(ids, rng, settings.primer_length), _float_or_none(qpm), source, ts

    return PrimerPlan("shards", source=store.uri, windows=window)


# -------------------------------------------------------------------------------------------
# the worker (a Ray actor, or a plain object with --workers 0)
# -------------------------------------------------------------------------------------------
class GenerateWorker:
    """Holds every model once; turns a list of consecutive piece indices into one pieces shard
    (and MIDI files with ``midi_files``)."""

    def __init__(self, models: list[ModelSpec], settings: GenerateSettings, seed: int, dest_uri: str,
                 storage: StorageOptions, batch_size: int, engine: str) -> None:
        from midiforge.model.decode import KerasLSTM, NumpyLSTM

        self.settings, self.seed, self.batch_size = settings, seed, batch_size
        self.dest = open_store(dest_uri, storage)
        self.engine_name = engine
        self.models = {}
        for m in models:
            tok = m.tokenizer
            if engine == "keras":
                eng = KerasLSTM(m.bundle, batch_size)
            else:
                eng = NumpyLSTM(m.weights, dtype=np.dtype(settings.precision))
            self.models[m.label] = (m, tok, eng)

    def peak_rss(self) -> int:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def run(self, label: str, indices: list[int], primers: list) -> dict:
        """Generate pieces ``indices`` of checkpoint ``label``; ``primers[k]`` = (ids, qpm, ts, source)."""
        from midiforge.music.metrics import all_metrics
        from midiforge.music.midi_io import piano_roll_png, piece_to_midi
        from midiforge.pipeline import pieces
        from midiforge.storage import file_entry, map_parallel

        started = time.perf_counter()
        spec, tok, eng = self.models[label]
        s = self.settings
        jobs = [PieceJob(i, p[0], p[1], tuple(p[2])) for i, p in zip(indices, primers)]
        results = decode(eng, jobs, s.sampling, self.seed, s.limits, self.batch_size, tok)
        decoded_at = time.perf_counter()
        rows: dict[str, list] = {k: [] for k in pieces.COLUMNS}
        writes: list[tuple[str, bytes]] = []
        for res, (_ids, qpm, ts, source) in zip(results, primers):
            piece = tok.decode(res.tokens, time_signature=tuple(ts))
            piece = dataclasses.replace(piece, qpm=qpm)
            piece = dataclasses.replace(piece, seconds=piece.end_seconds())
            midi = piece_to_midi(piece, qpm)
            m_rel = pieces.midi_rel(label, self.seed, res.index) if s.midi_files else None
            m_entry = file_entry(m_rel or "", midi)
            if m_rel:
                writes.append((m_rel, midi))
            png, p_rel, p_entry = None, None, None
            if s.piano_roll:
                png = piano_roll_png(piece)
                p_rel = pieces.png_rel(label, self.seed, res.index) if s.midi_files else None
                p_entry = file_entry(p_rel or "", png)
                if p_rel:
                    writes.append((p_rel, png))
            gen = res.generated
            gen = gen[:-1] if len(gen) and res.stop == "eos" else gen
            metrics = all_metrics(piece, gen)
            row = {
                "piece_id": f"{label}-{pieces.piece_name(self.seed, res.index)}", "checkpoint": label,
                "seed": self.seed, "index": res.index, "bundle_sha256": spec.sha256, "engine": eng.name,
                "temperature": s.sampling.temperature, "top_k": s.sampling.top_k, "top_p": s.sampling.top_p,
                "repetition_penalty": s.sampling.repetition_penalty,
                "repetition_window": s.sampling.repetition_window, "greedy": s.sampling.greedy,
                "max_tokens": s.limits.max_tokens, "max_seconds": s.limits.max_seconds, "qpm": qpm,
                "primer": s.primer, "primer_source": source, "primer_length": res.primer_length,
                "tokens": res.tokens, "n_tokens": len(res.tokens), "generated_tokens": len(res.generated),
                "stop_reason": res.stop, "n_notes": len(piece), "seconds": float(piece.seconds),
                "midi_path": m_rel, "midi_bytes": m_entry["bytes"], "midi_sha256": m_entry["sha256"],
                "png_path": p_rel, "png_bytes": p_entry["bytes"] if p_entry else None,
                "png_sha256": p_entry["sha256"] if p_entry else None,
                **metrics, "midi": midi, "png": png,
            }
            for k in pieces.COLUMNS:
                rows[k].append(row[k])
        map_parallel(lambda w: self.dest.write_bytes(*w), writes, 8)
        # last: the shard's presence marks the batch done (its name depends only on the batch's pieces)
        entry = pieces.write_shard(self.dest, pieces.shard_rel(indices[0], label), pieces.rows_table(rows))
        return {"label": label, "pieces": len(results), "tokens": int(sum(len(r.generated) for r in results)),
                "shard_bytes": entry["bytes"],
                "worker": f"{socket.gethostname()}:{os.getpid()}",
                "decode_seconds": decoded_at - started, "seconds": time.perf_counter() - started,
                "peak_rss": self.peak_rss()}


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


def run_generate(model_dir: str, dest_uri: str, num_pieces: int, settings: GenerateSettings, *,
                 seed: int | None = None, checkpoint: str = "final", batch_size: int = 256,
                 workers: int | None = None, address: str | None = None, num_gpus_per_worker: float = 0.0,
                 cpus_per_worker: float = 1.0, resume: bool = False, storage: StorageOptions | None = None,
                 progress: bool = True) -> dict:
    """The whole stage; returns the manifest it wrote.  Every check runs before anything is written."""
    started = time.time()
    storage = storage or StorageOptions()
    if int(num_pieces) != num_pieces or num_pieces <= 0:
        raise MidiforgeError(f"--num-pieces {num_pieces}: must be a positive integer")
    if int(batch_size) != batch_size or batch_size < 1:
        raise MidiforgeError(f"--batch-size {batch_size}: must be a positive integer")
    if workers is not None and workers < 0:
        raise MidiforgeError(f"--workers {workers}: must be >= 0 (0: no Ray, in this process)")
    if num_gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise MidiforgeError("--num-gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
    settings.validate()
    engine = settings.engine if settings.engine != "auto" else ("keras" if num_gpus_per_worker > 0 else "numpy")
    if seed is not None:
        check_seed(seed)

    dest = open_store(dest_uri, storage)
    existing = dest.exists(SETTINGS) or dest.exists("manifest.json")
    if existing and not resume:
        raise MidiforgeError(f"{dest.uri}: already holds a generate run; pass --resume to add the missing "
                             f"pieces, or use a new DEST")
    saved = json.loads(dest.read_bytes(SETTINGS)) if existing and dest.exists(SETTINGS) else None
    if saved is not None:  # written before --midi-files existed: those runs wrote MIDI files
        saved.get("identity", {}).get("settings", {}).setdefault("midi_files", True)
    if saved is not None and seed is None:
        seed = int(saved["identity"]["seed"])
    if seed is None:
        seed = secrets.randbelow(2**31)

    models = load_models(model_dir, checkpoint, engine, storage)
    primer_sha = None
    if settings.primer == "midi":
        from midiforge.storage.manifest import sha256_hex

        primer_sha = sha256_hex(read_uri_bytes(settings.primer_path, storage, "primer"))
    plan = plan_primers(settings, models, seed, storage)
    identity = _identity(models, settings, seed, engine, primer_sha)
    if saved is not None and saved["identity"] != identity:
        diff = sorted(k for k in identity if identity[k] != saved["identity"].get(k))
        raise MidiforgeError(f"{dest.uri}: --resume with different {', '.join(diff)} than the run it continues "
                             f"(pieces would not match); use a new DEST")
    from midiforge.pipeline import pieces

    shards = pieces.scan_shards(dest) if existing else {}  # the batches finished by earlier runs
    labels = [m.label for m in models]
    done = pieces.held(shards.values(), labels, num_pieces)
    pending = {lab: np.flatnonzero(~done[lab]).tolist() for lab in labels}
    n_pending = sum(len(v) for v in pending.values())
    n_workers = 1
    if n_pending and workers != 0:  # the cluster must fit the actors before anything is written
        n_workers = _ray_workers(workers, address, num_gpus_per_worker, cpus_per_worker, n_pending)
    # batches of --batch-size pieces, smaller when that leaves a worker idle (tokens do not depend on it)
    chunk_size = max(1, min(batch_size, math.ceil(n_pending / n_workers))) if n_pending else batch_size
    tasks = [(m.label, chunk) for m in models for chunk in _chunks(pending[m.label], chunk_size)]
    toks = {m.label: (m.tokenizer, m.qpm_median) for m in models}

    def with_primers(task):  # a batch's primers, made when it is sent (a driver never holds N of them)
        label, chunk = task
        tok, qpm_median = toks[label]
        return label, chunk, [plan.for_piece(tok, i, settings.qpm, qpm_median) for i in chunk]

    if tasks:
        with_primers(tasks[0])  # the primers can be made, before anything is written

    # ---- from here on, things are written ----
    if saved is None:
        dest.write_bytes(SETTINGS, (json.dumps({"identity": identity}, indent=1) + "\n").encode())
    stats = {"tokens": 0, "decode_seconds": 0.0, "peak_rss": 0, "workers": 0, "batches": {}}
    gen_started = time.time()
    if tasks:
        dest.delete("manifest.json")  # incomplete again until this run finishes
        bar = _progress(num_pieces * len(labels), num_pieces * len(labels) - n_pending, progress)
        args = (models, settings, seed, dest.uri, storage, batch_size, engine)
        try:
            if workers == 0:
                _run_local(args, tasks, with_primers, bar, stats)
            else:
                _run_ray(args, tasks, with_primers, bar, stats, n=n_workers, gpus=num_gpus_per_worker,
                         cpus=cpus_per_worker)
        finally:
            bar.close()
    gen_seconds = time.time() - gen_started
    return finalize(dest, models, settings, seed, num_pieces, model_dir=model_dir, engine=engine,
                    started=started, run_stats={**stats, "pieces": n_pending, "generate_seconds": gen_seconds,
                                                "batch_size": batch_size},
                    primer_mapped=plan.mapped, known=shards)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="piece", desc="generate", disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)


def _account(stats: dict, res: dict, bar, t0: float) -> None:
    stats["tokens"] += res["tokens"]
    stats["decode_seconds"] += res["decode_seconds"]
    stats["peak_rss"] = max(stats["peak_rss"], res["peak_rss"])
    stats["batches"][res["worker"]] = stats["batches"].get(res["worker"], 0) + 1
    bar.update(res["pieces"])
    elapsed = max(time.time() - t0, 1e-9)
    bar.set_postfix(tok_s=f"{stats['tokens'] / elapsed:,.0f}", refresh=False)


def _run_local(args, tasks, with_primers, bar, stats) -> None:
    worker = GenerateWorker(*args)
    stats["workers"] = 1
    t0 = time.time()
    for task in tasks:
        _account(stats, worker.run(*with_primers(task)), bar, t0)


def _ray_workers(workers: int | None, address: str | None, gpus: float, cpus: float, n_pieces: int) -> int:
    """Start (or join) Ray; how many actors to run (refuses a cluster that cannot hold one)."""
    import ray

    from midiforge.pipeline.ray_runtime import start_ray

    start_ray(address, workers)
    res = ray.cluster_resources()
    if gpus > 0:
        cap = int(res.get("GPU", 0) // gpus)
        if cap < 1:
            raise MidiforgeError(f"--num-gpus-per-worker {gpus}: the Ray cluster has {res.get('GPU', 0):g} GPUs")
    else:
        cap = int(res.get("CPU", 0) // cpus)
        if cap < 1:
            raise MidiforgeError(f"--cpus-per-worker {cpus}: the Ray cluster has {res.get('CPU', 0):g} CPUs")
    return max(1, min(workers or cap, cap, n_pieces))


MAX_REPLACEMENTS = 3  # dead actors replaced per run before giving up (their batches are redone)


def _run_ray(args, tasks, with_primers, bar, stats, *, n: int, gpus: float, cpus: float) -> None:
    import ray

    stats["workers"] = n
    models_ref = ray.put(args[0])
    actor_cls = ray.remote(GenerateWorker).options(num_cpus=cpus, num_gpus=gpus)
    actors = [actor_cls.remote(models_ref, *args[1:]) for _ in range(n)]
    queue = list(tasks)
    running: dict = {}   # ref -> (actor, task)
    replaced = 0
    t0 = time.time()
    try:
        free = [a for _ in range(2) for a in actors]  # two batches in flight per actor, spread over actors first
        while queue or running:
            while queue and free:
                actor, task = free.pop(0), queue.pop(0)
                running[actor.run.remote(*with_primers(task))] = (actor, task)
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, task = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, MidiforgeError):
                    raise exc.cause from None
                raise
            except ray.exceptions.RayActorError as exc:
                # the process died (killed, out of memory, node lost): its batches start again elsewhere
                replaced += 1
                if replaced > MAX_REPLACEMENTS:
                    raise MidiforgeError(f"generate workers died {replaced} times (last: {type(exc).__name__}); "
                                         f"the finished batches are kept: rerun with --resume") from None
                queue.insert(0, task)
                if actor in actors:
                    for ref in [r for r, (a, _t) in running.items() if a is actor]:
                        queue.insert(0, running.pop(ref)[1])
                    actors.remove(actor)
                    free = [a for a in free if a is not actor]
                    new = actor_cls.remote(models_ref, *args[1:])
                    actors.append(new)
                    free += [new, new]
                continue
            free.append(actor)
            _account(stats, result, bar, t0)
    finally:
        # killing the actors ends their batches (ray.cancel(force=True) refuses actor tasks with a ValueError,
        # which hid the error that stopped the run)
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already dead
                pass


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
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", default="final", metavar="WHICH",
                   help="final (default: the final bundle), best, latest, an epoch number, or all "
                        "(every checkpoint, then final: hear how the model changed while training)")
    m.add_argument("--engine", choices=ENGINES, default="auto",
                   help="numpy: float64 NumPy LSTM, tokens independent of batching (default on CPU); "
                        "keras: the stateful tf_keras model (default with --num-gpus-per-worker)")
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
    o = p.add_argument_group("output")
    o.add_argument("--midi-files", action=argparse.BooleanOptionalAction, default=True,
                   help="one object per piece, midi/<checkpoint>/s<seed>-<index>.mid (and png/ with --piano-roll), "
                        "besides the pieces/ shards that always hold every piece's MIDI bytes (default: on; at "
                        "dataset scale pass --no-midi-files and extract files later with pieces.export_midi)")
    m.add_argument("--precision", choices=PRECISIONS, default="float64",
                   help="numpy engine arithmetic: float64 (default; a piece's tokens do not depend on the batch "
                        "on any BLAS) or float32 (about 2x faster; batch-independent where the BLAS computes "
                        "each row alike whatever the number of rows, as OpenBLAS does)")
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
    from midiforge.storage.cli_options import add_storage_arguments

    add_storage_arguments(p)


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

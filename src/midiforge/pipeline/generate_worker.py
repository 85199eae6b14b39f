"""generate's worker side: :class:`GenerateWorker` (every model held once; a batch of piece indices in,
one pieces shard out) and the loops that feed it batches, in this process (``--workers 0``) or on
Ray actors (replacing an actor that dies and redoing its batches)."""
from __future__ import annotations

import dataclasses
import os
import resource
import socket
import time
from typing import TYPE_CHECKING

import numpy as np

from midiforge.errors import MidiforgeError
from midiforge.model.decode import PieceJob, decode
from midiforge.pipeline.generate_models import ModelSpec
from midiforge.storage import StorageOptions, open_store

if TYPE_CHECKING:
    from midiforge.pipeline.generate import GenerateSettings


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
        from midiforge.pipeline import pieces
        from midiforge.storage import map_parallel

        started = time.perf_counter()
        spec, tok, eng = self.models[label]
        s = self.settings
        jobs = [PieceJob(i, p[0], p[1], tuple(p[2])) for i, p in zip(indices, primers)]
        results = decode(eng, jobs, s.sampling, self.seed, s.limits, self.batch_size, tok)
        decoded_at = time.perf_counter()
        rows: dict[str, list] = {k: [] for k in pieces.COLUMNS}
        writes: list[tuple[str, bytes]] = []
        for res, primer in zip(results, primers):
            row = self._row(label, spec, tok, eng.name, res, primer, writes)
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

    def _row(self, label: str, spec: ModelSpec, tok, engine_name: str, res, primer, writes: list) -> dict:
        """The shard row of one decoded piece (``res``, started from ``primer`` = (ids, qpm, ts, source));
        its MIDI (and PNG) objects are appended to ``writes``."""
        from midiforge.music.metrics import all_metrics
        from midiforge.music.midi_io import piano_roll_png, piece_to_midi
        from midiforge.pipeline import pieces
        from midiforge.storage import file_entry

        s = self.settings
        _ids, qpm, ts, source = primer
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
        return {
            "piece_id": f"{label}-{pieces.piece_name(self.seed, res.index)}", "checkpoint": label,
            "seed": self.seed, "index": res.index, "bundle_sha256": spec.sha256, "engine": engine_name,
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


def _run_local(worker_cls, args, tasks, with_primers, bar, stats) -> None:
    """Every task on one ``worker_cls`` (:class:`GenerateWorker`) in this process (``--workers 0``)."""
    worker = worker_cls(*args)
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


def _run_ray(worker_cls, args, tasks, with_primers, bar, stats, *, n: int, gpus: float, cpus: float) -> None:
    """Every task on ``n`` Ray actors of ``worker_cls`` (:class:`GenerateWorker`, as
    midiforge.pipeline.generate names it), two batches in flight per actor."""
    import ray

    stats["workers"] = n
    models_ref = ray.put(args[0])
    actor_cls = ray.remote(worker_cls).options(num_cpus=cpus, num_gpus=gpus)
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

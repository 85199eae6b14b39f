"""Generation speed: the Keras tutorial's loop against midiforge, on this machine, in one run.

* tutorial: one piece; for every note ``model.predict`` on the whole 100-token window, argmax,
  slide the window (the tutorial's loop), with the same model as midiforge's.
* midiforge, in process: the NumPy engine's batched stateful decoding (sampling at temperature 1),
  one BLAS thread (= one Ray actor's core), batch sizes 1 .. 1024, float64 (default) and float32.
* keras stateful: the same loop on the stateful tf_keras build (the GPU engine), for reference.
* the real stage: ``run_generate`` on a local Ray with N actors (pieces/ shards, MIDI files,
  manifest): wall-clock tokens per second (actor start-up, MIDI files, metrics, shards and
  manifest included), decoding tokens per second per actor, and the peak memory of an actor;
  the largest batch size once more with ``--no-midi-files`` (shards only: the dataset-scale way),
  with the objects each run wrote.

The model has random weights (speed does not depend on them).  Prints one JSON object.

    .venv/bin/python benchmarks/generate.py [--quick]
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy: the in-process engine gets one core, like an actor
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def tutorial_loop(model, vocab: int, window: int, notes: int) -> dict:
    rng = np.random.default_rng(0)
    pattern = [int(x) for x in rng.integers(4, vocab, window)]
    model.predict(np.array([pattern], np.int32), verbose=0)  # warm-up (tracing)
    t = time.perf_counter()
    for _ in range(notes):
        prediction = model.predict(np.array([pattern], np.int32), verbose=0)
        index = int(np.argmax(prediction[0, -1]))
        pattern = pattern[1:] + [index]
    dt = time.perf_counter() - t
    return {"tokens": notes, "seconds": round(dt, 3), "tokens_per_second": round(notes / dt, 2),
            "ms_per_token": round(dt / notes * 1e3, 1), "window": window}


def midiforge_in_process(engine, batch_sizes, min_tokens: int, tutorial_tps: float, max_tokens_cap: int) -> list:
    """The decoding loop alone (no files), ``min_tokens`` or more per batch size."""
    from midiforge.model.decode import Limits, PieceJob, decode
    from midiforge.model.sampling import SamplingSettings

    out = []
    for b in batch_sizes:
        steps = max(32, min(max_tokens_cap, -(-min_tokens // b)))
        jobs = [PieceJob(i, np.array([1], np.int32), 120.0) for i in range(b)]
        decode(engine, jobs[:min(b, 4)], SamplingSettings(), 0, Limits(4), b)  # warm-up
        t = time.perf_counter()
        res = decode(engine, jobs, SamplingSettings(), 1, Limits(steps), b)
        dt = time.perf_counter() - t
        n = sum(len(r.generated) for r in res)
        out.append({"batch_size": b, "precision": engine.dtype.name, "tokens": n, "seconds": round(dt, 3),
                    "tokens_per_second": round(n / dt, 1), "speedup_vs_tutorial": round(n / dt / tutorial_tps, 1)})
    return out


def keras_stateful(bundle, batch_sizes, steps: int) -> list:
    from midiforge.model.decode import KerasLSTM, Limits, PieceJob, decode
    from midiforge.model.sampling import SamplingSettings

    out = []
    for b in batch_sizes:
        eng = KerasLSTM(bundle, b)
        jobs = [PieceJob(i, np.array([1], np.int32), 120.0) for i in range(b)]
        decode(eng, jobs, SamplingSettings(), 0, Limits(2), b)  # warm-up (tracing)
        t = time.perf_counter()
        res = decode(eng, jobs, SamplingSettings(), 1, Limits(steps), b)
        dt = time.perf_counter() - t
        n = sum(len(r.generated) for r in res)
        out.append({"batch_size": b, "tokens": n, "seconds": round(dt, 3), "tokens_per_second": round(n / dt, 1)})
    return out


def ray_stage(model_dir: str, batch_sizes, workers: int, max_tokens: int, tutorial_tps: float,
              precision: str = "float64", midi_files: bool = True) -> list:
    from midiforge.model.decode import Limits
    from midiforge.model.sampling import SamplingSettings
    from midiforge.pipeline.generate import GenerateSettings, run_generate

    from midiforge.pipeline.ray_runtime import start_ray

    start_ray(None, workers)  # a private local Ray with `workers` CPUs (never a `ray start` cluster)
    out = []
    settings = GenerateSettings(sampling=SamplingSettings(), limits=Limits(max_tokens), precision=precision,
                                midi_files=midi_files)
    for b in batch_sizes:
        pieces = max(workers * b, 16)  # one batch per actor
        with tempfile.TemporaryDirectory(prefix="midiforge-bench-") as dest:
            m = run_generate(model_dir, os.path.join(dest, "out"), pieces, settings, seed=1, batch_size=b,
                             workers=workers, progress=False)
            objects = sum(len(files) for _root, _dirs, files in os.walk(os.path.join(dest, "out")))
        run = m["run"]
        out.append({"batch_size": b, "precision": precision, "midi_files": midi_files, "workers": run["workers"],
                    "pieces": pieces, "objects": objects, "shards": len(m["shards"]),
                    "tokens": run["tokens"],
                    "wall_seconds": run["generate_seconds"], "tokens_per_second": m["tokens_per_second"],
                    "speedup_vs_tutorial": round(m["tokens_per_second"] / tutorial_tps, 1),
                    "decode_tokens_per_second_per_actor": round(run["tokens"] / run["decode_seconds"], 1),
                    "actor_peak_rss_mb": round(run["worker_peak_rss_bytes"] / 2**20, 1)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embedding-dim", type=int, default=128)
    p.add_argument("--lstm-units", default="256,256")
    p.add_argument("--window", type=int, default=100, help="the tutorial's sequence length")
    p.add_argument("--tutorial-notes", type=int, default=15)
    p.add_argument("--batch-sizes", default="1,4,16,64,256,1024")
    p.add_argument("--min-tokens", type=int, default=6000, help="tokens per in-process measurement (at least)")
    p.add_argument("--keras-batch-sizes", default="1,64,256")
    p.add_argument("--ray-batch-sizes", default="16,256,1024")
    p.add_argument("--ray-max-tokens", type=int, default=512, help="tokens per piece in the stage runs")
    p.add_argument("--float32-batch-sizes", default="256,1024", help="also measure --precision float32 here")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--quick", action="store_true", help="small sweep (a smoke test of the benchmark)")
    args = p.parse_args()
    if args.quick:
        args.tutorial_notes, args.batch_sizes, args.min_tokens = 3, "1,64", 500
        args.keras_batch_sizes, args.ray_batch_sizes, args.ray_max_tokens = "1", "16", 32
        args.float32_batch_sizes = "64"

    from midiforge.pipeline.bundles import load_bundle, write_bundle
    from midiforge.model.decode import NumpyLSTM
    from midiforge.model.lstm import ModelConfig, build_model, parse_units, tf_keras
    from midiforge.music.tokenizers import make_tokenizer
    from midiforge.pipeline.generate import numpy_weights
    from midiforge.storage import open_store

    load_before = load()
    tf, keras = tf_keras()
    keras.utils.set_random_seed(0)
    tok = make_tokenizer("events")
    cfg = ModelConfig(vocab_size=tok.vocab_size, embedding_dim=args.embedding_dim,
                      lstm_units=parse_units(args.lstm_units), tokenizer_id=tok.id)
    model = build_model(cfg)
    with tempfile.TemporaryDirectory(prefix="midiforge-bench-model-") as tmp:
        path = os.path.join(tmp, "w.weights.h5")
        model.save_weights(path)
        with open(path, "rb") as fh:
            weights = fh.read()
        model_dir = os.path.join(tmp, "model")
        write_bundle(open_store(model_dir), "bundle", config=cfg, tokenizer_json=tok.to_json(),
                     training={"qpm_median": 120.0, "epochs_done": 0}, weights=weights)
        bundle = load_bundle(model_dir)

        # the machine may be shared: the tutorial runs before and after, speedups use the faster run
        tutorial = tutorial_loop(model, tok.vocab_size, args.window, args.tutorial_notes)
        tps = tutorial["tokens_per_second"]
        engine = NumpyLSTM(numpy_weights(bundle))
        batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
        in_process = midiforge_in_process(engine, batch_sizes, args.min_tokens, tps, 512)
        f32_sizes = [int(x) for x in args.float32_batch_sizes.split(",") if x]
        in_process += midiforge_in_process(NumpyLSTM(numpy_weights(bundle), dtype=np.float32), f32_sizes,
                                           args.min_tokens, tps, 512)
        keras_rows = keras_stateful(bundle, [int(x) for x in args.keras_batch_sizes.split(",") if x], 48)
        ray_sizes = [int(x) for x in args.ray_batch_sizes.split(",") if x]
        ray_rows = ray_stage(model_dir, ray_sizes, args.workers, args.ray_max_tokens, tps)
        ray_rows += ray_stage(model_dir, [max(ray_sizes)], args.workers, args.ray_max_tokens, tps, "float32")
        ray_rows += ray_stage(model_dir, [max(ray_sizes)], args.workers, args.ray_max_tokens, tps, midi_files=False)
        tutorial_after = tutorial_loop(model, tok.vocab_size, args.window, args.tutorial_notes)
        fastest = max(tps, tutorial_after["tokens_per_second"])
        for row in in_process + ray_rows:
            row["speedup_vs_tutorial"] = round(row["tokens_per_second"] / fastest, 1)
    default = [r for r in in_process + ray_rows if r["precision"] == "float64" and r.get("midi_files", True)]
    best = max(r["tokens_per_second"] or 0 for r in default)
    best_stage = max(r["tokens_per_second"] or 0 for r in ray_rows if r["precision"] == "float64" and r["midi_files"])
    report = {
        "benchmark": "generate",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_before": load_before,
                    "load_after": load(), "openblas_threads_in_process": os.environ.get("OPENBLAS_NUM_THREADS")},
        "model": {"vocab_size": cfg.vocab_size, "embedding_dim": cfg.embedding_dim, "lstm_units": list(cfg.lstm_units),
                  "parameters": cfg.parameters},
        "tutorial_loop": {"before": tutorial, "after": tutorial_after, "tokens_per_second_used": fastest},
        "midiforge_numpy_in_process": in_process,
        "keras_stateful_in_process": keras_rows,
        "midiforge_ray_stage": ray_rows,
        "best_tokens_per_second_float64": best,
        "best_speedup_vs_tutorial_float64": round(best / fastest, 1),
        "stage_speedup_vs_tutorial_float64": round(best_stage / fastest, 1),
        "best_speedup_vs_tutorial_any": round(max(r["tokens_per_second"] or 0 for r in in_process + ray_rows) / fastest, 1),
        "target_1000x_met": best / fastest >= 1000,
        "benchmark_process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

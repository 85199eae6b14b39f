"""``midiforge train --launcher ray``: one Ray Train worker per TensorFlow worker.

Ray Train's TensorflowTrainer starts ``--num-workers`` workers and sets ``TF_CONFIG`` for each;
every worker then calls the same training function as any other launcher
(:func:`midiforge.pipeline.train_worker.run_training`), with every ``midiforge train`` setting.

    midiforge train SHARDS MODEL_DIR --launcher ray --num-workers 4 --cpus-per-worker 8 [train flags]
    midiforge train ... --launcher ray --address HEAD:6379     # on an existing Ray cluster
    midiforge train ... --launcher ray --max-failures 3        # Ray restarts the group; training resumes

With ``--max-failures K``, a worker lost mid-training makes Ray restart the whole worker group
(up to K times), and the restarted workers continue from the last backup like any re-run of
the same command.  MODEL_DIR must be reachable from every node (s3:// or a shared file system).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from midiforge.errors import MidiforgeError

DEFAULT_WORKERS = 2
DEFAULT_CPUS_PER_WORKER = 1.0
DEFAULT_MAX_FAILURES = 0


def _worker_loop(config: dict) -> None:
    """Runs in each Ray Train worker (TF_CONFIG already set by TensorflowTrainer)."""
    import logging

    import ray.train

    from midiforge.pipeline.train_settings import TrainSettings
    from midiforge.pipeline.train_worker import run_training

    logging.getLogger("tensorflow").setLevel(logging.WARNING)   # Ray's workers log INFO otherwise
    try:
        result = run_training(TrainSettings.from_dict(config["settings"]), membership="tf_config")
    except MidiforgeError as exc:   # the driver reports it like the CLI does (exit 2)
        raise RuntimeError(f"{_MARK}{exc}{_MARK}") from None
    ray.train.report({k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))})


#: Brackets a MidiforgeError's message inside the error Ray hands to the driver.
_MARK = "\x1emidiforge-error\x1e"


def run_on_ray(settings, *, num_workers: int = DEFAULT_WORKERS, cpus_per_worker: float = DEFAULT_CPUS_PER_WORKER,
               use_gpu: bool = False, max_failures: int = DEFAULT_MAX_FAILURES, address: str | None = None) -> dict:
    """Train with ``num_workers`` Ray Train workers; returns the run's summary (read from MODEL_DIR:
    Ray Train 2.5x keeps no metrics of reports without a checkpoint)."""
    if num_workers < 1:
        raise MidiforgeError(f"--num-workers must be at least 1, got {num_workers}")
    if cpus_per_worker <= 0:
        raise MidiforgeError(f"--cpus-per-worker must be > 0, got {cpus_per_worker}")
    if max_failures < 0:
        raise MidiforgeError(f"--max-failures must be >= 0, got {max_failures}")
    if settings.membership not in ("auto", "tf_config"):
        raise MidiforgeError(f"--membership {settings.membership}: with --launcher ray the workers' membership "
                             "comes from Ray Train (TF_CONFIG)")
    # TensorFlow in the workers: tf_keras (set before TensorFlow is imported there)
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from midiforge.pipeline.ray_runtime import start_ray

    start_ray(address, None)
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    storage = tempfile.mkdtemp(prefix="midiforge-ray-train-")   # Ray Train's run directory (no checkpoints in it)
    try:
        trainer = TensorflowTrainer(
            _worker_loop,
            train_loop_config={"settings": settings.to_dict()},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(name="midiforge-train", storage_path=storage,
                                 failure_config=FailureConfig(max_failures=max_failures)),
        )
        try:
            result = trainer.fit()
        except Exception as exc:   # Ray wraps worker errors; the reason is in the message
            text = str(exc)
            if _MARK in text:
                raise MidiforgeError(text.split(_MARK)[1]) from None
            raise RayTrainingFailed(text) from None
        from midiforge.pipeline.train_state import run_summary

        return {**(result.metrics or {}), **run_summary(settings)}
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        ray.shutdown()   # a private local Ray stops; a cluster is only disconnected from


class RayTrainingFailed(Exception):
    """Training on Ray failed (a worker error or too many lost workers)."""


def main_ray(settings, args: argparse.Namespace) -> int:
    """``midiforge train --launcher ray``."""
    from midiforge.pipeline.train import SUMMARY_KEYS

    try:
        metrics = run_on_ray(settings, num_workers=args.num_workers or DEFAULT_WORKERS,
                             cpus_per_worker=args.cpus_per_worker or DEFAULT_CPUS_PER_WORKER, use_gpu=bool(args.use_gpu),
                             max_failures=args.max_failures or DEFAULT_MAX_FAILURES, address=args.address)
    except RayTrainingFailed as exc:
        print(f"midiforge train: training on Ray failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: metrics[k] for k in SUMMARY_KEYS if k in metrics}))
    return 0

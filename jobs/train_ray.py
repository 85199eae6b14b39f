"""Run ``midiforge train`` on Ray: one Ray Train worker per TensorFlow worker.

Ray Train's TensorflowTrainer starts the workers and sets ``TF_CONFIG`` for each; every
worker then calls the same training function as the CLI
(:func:`midiforge.pipeline.train.run_training`).  All ``midiforge train`` flags apply.

    python jobs/train_ray.py SHARDS MODEL_DIR --num-workers 4 --cpus-per-worker 8 [train flags]
    python jobs/train_ray.py ... --address auto          # on an existing Ray cluster
    python jobs/train_ray.py ... --max-failures 3        # Ray restarts the group; training resumes

With ``--max-failures``, a worker lost mid-training makes Ray restart the whole worker group,
and the restarted run continues from the last backup like any re-run of the same command.
MODEL_DIR must be reachable from every node (s3:// or a shared file system).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def _loop(config: dict) -> None:
    import ray.train

    from midiforge.pipeline.train import TrainSettings, run_training

    result = run_training(TrainSettings.from_dict(config["settings"]), membership="tf_config")
    ray.train.report({k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))})


def main(argv: list[str] | None = None) -> int:
    from midiforge.errors import MidiforgeError
    from midiforge.pipeline import train

    parser = argparse.ArgumentParser(prog="train_ray.py", description=__doc__.splitlines()[0])
    train.add_arguments(parser)
    g = parser.add_argument_group("ray")
    g.add_argument("--num-workers", type=int, default=2, help="TensorFlow workers (default 2)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default 1)")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    g.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a private local Ray on 127.0.0.1)")
    g.add_argument("--max-failures", type=int, default=0, help="worker-group restarts Ray may do (default 0)")
    g.add_argument("--ray-storage", default=None, help="Ray Train's run directory (default: a temporary directory)")
    args = parser.parse_args(argv)
    try:
        settings = train.settings_from_args(args)
    except MidiforgeError as exc:
        print(f"train_ray: error: {exc}", file=sys.stderr)
        return 2

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    # the workers import TensorFlow through midiforge (TF_USE_LEGACY_KERAS=1 first)
    env = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    if not address:  # a private local Ray on loopback, never a cluster a stale /tmp/ray file points to
        from midiforge.pipeline.ray_runtime import LOOPBACK_ENV

        os.environ.setdefault(LOOPBACK_ENV, "0")
    ray.init(address=address or "local", runtime_env={"env_vars": env}, include_dashboard=False,
             logging_level="WARNING")
    storage = args.ray_storage or tempfile.mkdtemp(prefix="midiforge-ray-train-")
    trainer = TensorflowTrainer(
        _loop,
        train_loop_config={"settings": settings.to_dict()},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        run_config=RunConfig(name="midiforge-train", storage_path=storage,
                             failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; the reason is in its message
        print(f"train_ray: training failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.metrics or {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

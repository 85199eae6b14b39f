"""Train the LSTM on preprocess's token shards with tf.distribute.MultiWorkerMirroredStrategy.

``midiforge train SHARDS MODEL_DIR`` reads the output of ``midiforge preprocess`` (local or
s3://) and writes the model bundle, checkpoints, metrics.jsonl and TensorBoard files to
MODEL_DIR (local or s3://; layout in :mod:`midiforge.model.bundle`).  Settings come from the
flags, a TOML file (``--config``; flags win), the run being continued, then the defaults.

Workers: one local worker without configuration; TF_CONFIG; Slurm (srun); Ray (``--launcher
ray``: Ray Train sets TF_CONFIG per worker, :mod:`midiforge.pipeline.train_ray`).  Only the
chief writes to MODEL_DIR.

Stopping: SIGTERM or SIGUSR1 to any worker makes every worker stop after the same step, back
up that step and exit with STOP_EXIT_CODE (75, EX_TEMPFAIL: "run the same command again").

Resuming: running the same command again after a stop, crash or kill continues from the last
backup (BackupAndRestore: the exact epoch and step) or the latest checkpoint; on a finished
run it does nothing (exit 0); ``--resume`` continues a finished run to ``--epochs`` (also from
object storage).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

from midiforge.errors import MidiforgeError
from midiforge.pipeline.train_ray import (
    DEFAULT_CPUS_PER_WORKER,
    DEFAULT_MAX_FAILURES,
    DEFAULT_WORKERS,
)
from midiforge.pipeline.train_settings import (
    CLASS_WEIGHTINGS,
    DEFAULTS,
    MAX_VALIDATION_STEPS,
    MEMBERSHIPS,
    PROGRESS,
    TrainSettings,
    default_text,
)
from midiforge.pipeline.train_state import run_summary
from midiforge.pipeline.train_stop import STOP_EXIT_CODE, TrainingStopped
from midiforge.pipeline.train_worker import run_training
from midiforge.storage.cli_options import add_storage_arguments

#: The stage's entry points, and the names other code imports from here (their homes: the modules
#: train_settings, train_stop, train_state, train_worker).
__all__ = ["DEFAULTS", "STOP_EXIT_CODE", "SUMMARY_KEYS", "TrainSettings", "TrainingStopped", "add_arguments", "main",
           "run_summary", "run_training", "settings_from_args"]

RAY_ONLY = ("num_workers", "cpus_per_worker", "use_gpu", "max_failures", "address")
SUMMARY_KEYS = ("model_dir", "epochs", "bundle_sha256", "val_loss", "val_accuracy", "tokens_per_second", "seconds",
                "nothing_to_do")


# ---------------------------------------------------------------------------------------------
# CLI: every flag defaults to None (so that a run knows what was given); the help shows the
# default of TrainSettings
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", metavar="SHARDS", help="preprocess output (DEST of midiforge preprocess): path or s3://")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="where the bundle, checkpoints and metrics go: path or s3://")
    parser.add_argument("--config", metavar="TOML", help="TOML file with any of the settings below "
                        "(keys as the flag names, - or _); flags override it")
    _add_training_arguments(parser.add_argument_group("training"))
    _add_model_arguments(parser.add_argument_group("model"))
    _add_checkpoint_arguments(parser.add_argument_group("checkpoints and resuming"))
    _add_worker_arguments(parser.add_argument_group("workers"))
    _add_launcher_arguments(parser.add_argument_group("launcher"))
    add_storage_arguments(parser)


def _add_training_arguments(g) -> None:
    d = default_text
    g.add_argument("--epochs", type=int, help=f"total epochs to train to (default {d('epochs')})")
    g.add_argument("--batch-size", type=int, help=f"global batch, split across workers (default {d('batch_size')})")
    g.add_argument("--seq-len", type=int, help=f"tokens per window; a target at every position (default {d('seq_len')})")
    g.add_argument("--learning-rate", type=float, help=f"Adam learning rate (default {d('learning_rate')})")
    g.add_argument("--clipnorm", type=float, help=f"gradient norm clip, 0 for none (default {d('clipnorm')})")
    g.add_argument("--steps-per-epoch", type=int,
                   help=f"steps per epoch (default {d('steps_per_epoch')}: one pass over the training windows)")
    g.add_argument("--validation-steps", type=int, help=f"validation batches per epoch (default "
                   f"{d('validation_steps')}: all, at most {MAX_VALIDATION_STEPS})")
    g.add_argument("--class-weighting", choices=CLASS_WEIGHTINGS, help="re-weight rare target tokens: loss weight "
                   f"~ count^-1/2 (sqrt) or 1/count (default {d('class_weighting')})")
    g.add_argument("--class-weight-max", type=float,
                   help=f"upper bound of a token's weight (default {d('class_weight_max')})")
    g.add_argument("--shuffle-buffer", type=int, help=f"windows in the shuffle buffer (default {d('shuffle_buffer')})")
    g.add_argument("--seed", type=int, help=f"data order seed (default {d('seed')})")
    g.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                   help=f"float16 compute with float32 weights (for GPUs; default {d('mixed_precision')})")


def _add_model_arguments(g) -> None:
    d = default_text
    g.add_argument("--embedding-dim", type=int, help=f"token embedding size (default {d('embedding_dim')})")
    g.add_argument("--lstm-units", help=f"comma-separated LSTM layer sizes (default {d('lstm_units')})")
    g.add_argument("--dropout", type=float, help=f"dropout after each LSTM (default {d('dropout')})")


def _add_checkpoint_arguments(g) -> None:
    d = default_text
    g.add_argument("--checkpoint-every", type=int,
                   help=f"write a checkpoint every N epochs (default {d('checkpoint_every')}; the last epoch always)")
    g.add_argument("--keep", type=int,
                   help=f"keep the last K checkpoints, plus the best by val_loss (default {d('keep')})")
    g.add_argument("--backup-every", help="BackupAndRestore frequency: 'epoch', a number of steps, or 'off' "
                   f"(default {d('backup_every')})")
    g.add_argument("--backup-dir", help="backup directory shared by all workers (default: MODEL_DIR/backup for a local "
                   "MODEL_DIR; for s3:// a local directory per worker, mirrored to MODEL_DIR/backup)")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in MODEL_DIR (finished or not) up to --epochs")
    g.add_argument("--cache-dir", help="local cache for downloaded shards and backups (default ~/.cache/midiforge)")


def _add_worker_arguments(g) -> None:
    d = default_text
    g.add_argument("--membership", choices=MEMBERSHIPS, help=f"where the worker list comes from (default "
                   f"{d('membership')}: TF_CONFIG, else Slurm under srun, else local)")
    g.add_argument("--port-base", type=int, help="Slurm: worker port = port base + SLURM_LOCALID (default: "
                   "MIDIFORGE_PORT_BASE, else 20000 + (SLURM_JOB_ID * 8) %% 12000)")
    g.add_argument("--progress", choices=PROGRESS, help=f"progress display (default {d('progress')})")


def _add_launcher_arguments(g) -> None:
    g.add_argument("--launcher", choices=("local", "ray"), default="local",
                   help="local (default): this process is one worker (membership above); ray: start --num-workers "
                        "workers with Ray Train (TensorflowTrainer sets TF_CONFIG for each)")
    g.add_argument("--num-workers", type=int, help=f"ray: TensorFlow workers (default {DEFAULT_WORKERS})")
    g.add_argument("--cpus-per-worker", type=float,
                   help=f"ray: CPUs reserved per worker (default {DEFAULT_CPUS_PER_WORKER:g})")
    g.add_argument("--use-gpu", action="store_true", default=None, help="ray: one GPU per worker")
    g.add_argument("--max-failures", type=int, help="ray: times Ray may restart the worker group after a lost "
                   f"worker; each restart continues from the last backup (default {DEFAULT_MAX_FAILURES})")
    g.add_argument("--address", help="ray: cluster address HEAD:PORT to join (default: RAY_ADDRESS, else a "
                   "private local Ray on 127.0.0.1)")


def _read_toml(path: str) -> dict:
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise MidiforgeError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise MidiforgeError(f"{path}: not valid TOML ({exc})") from None
    if isinstance(data.get("train"), dict):
        data = {**{k: v for k, v in data.items() if k != "train"}, **data["train"]}
    known = {f.name for f in fields(TrainSettings)} - {"shards", "model_dir", "explicit"}
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise MidiforgeError(f"{path}: unknown setting {key!r} (known: {', '.join(sorted(known))})")
        out[name] = value
    return out


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """Flags over the TOML config over the defaults; remembers which were given."""
    values = _read_toml(args.config) if getattr(args, "config", None) else {}
    for f in fields(TrainSettings):
        if f.name in ("shards", "model_dir", "explicit"):
            continue
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    try:
        return TrainSettings(shards=args.shards, model_dir=args.model_dir, **values, explicit=tuple(values))
    except TypeError as exc:
        raise MidiforgeError(f"bad training settings ({exc})") from None


def main(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    launcher = getattr(args, "launcher", "local") or "local"
    if launcher == "ray":
        from midiforge.pipeline.train_ray import main_ray

        return main_ray(settings, args)
    given = [f"--{k.replace('_', '-')}" for k in RAY_ONLY if getattr(args, k, None) is not None]
    if given:
        raise MidiforgeError(f"{', '.join(given)}: only with --launcher ray")
    try:
        result = run_training(settings, restore_signals=False)
    except TrainingStopped as stop:
        print(f"midiforge train: {stop}; run the same command again to continue "
              f"(exit {STOP_EXIT_CODE})", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Everything is written and every worker has passed the stop barrier: leave now.  TensorFlow's
        # teardown (servers, coordination service) takes seconds, and under Slurm srun kills the tasks
        # KillWait seconds after a SIGTERM.
        os._exit(STOP_EXIT_CODE)
    if result.get("is_chief", True):
        print(json.dumps({k: result[k] for k in SUMMARY_KEYS if k in result}))
    return 0


"""One worker of ``midiforge train``: the distributed training loop every launcher runs.

:func:`run_training` is called by every worker of the job with the same settings (the CLI's
local worker, srun's tasks, Ray Train's workers).  It reads MODEL_DIR and plans the run
(:mod:`midiforge.pipeline.train_state`), joins the MultiWorkerMirroredStrategy cluster,
assigns this worker its share of the shards, restores a backup or checkpoint, trains with the
checkpoint, backup and stop callbacks, and (the chief) writes the bundle
(:mod:`midiforge.pipeline.train_writer`).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from midiforge.errors import MidiforgeError
from midiforge.pipeline.train_settings import MAX_VALIDATION_STEPS, TrainSettings
from midiforge.pipeline.train_state import (
    BACKUP_PREFIX,
    Plan,
    RunState,
    inspect_model_dir,
    plan_run,
    utc_now,
)
from midiforge.pipeline.train_stop import StopSignals, TrainingStopped
from midiforge.pipeline.train_writer import RunWriter
from midiforge.storage.manifest import read_json
from midiforge.storage.store import LocalStore, Store, open_store


# ---------------------------------------------------------------------------------------------
# backups (BackupAndRestore) and their mirror in object storage
# ---------------------------------------------------------------------------------------------
def backup_location(settings: TrainSettings, store: Store, rank: int) -> tuple[str, bool]:
    """(local backup dir, mirrored to MODEL_DIR/backup?).

    By default every worker keeps its BackupAndRestore directory in its own cache and the
    chief mirrors its backup to MODEL_DIR/backup (local or object storage) after each save;
    at start every worker replaces its directory with that mirror.  So non-chief workers write
    nothing shared, and a job can resume on other machines.  ``--backup-dir`` instead names
    one directory all workers share (BackupAndRestore's own scheme), not mirrored.
    """
    if settings.backup_dir:
        return settings.backup_dir, False
    from midiforge.model.data import default_cache_dir, fingerprint

    cache = settings.cache_dir or default_cache_dir()
    return os.path.join(cache, "backup", fingerprint(store.uri), f"worker-{rank}"), True


def download_backup(store: Store, local: str) -> None:
    manifest = read_json(store, f"{BACKUP_PREFIX}/manifest.json", "the backup manifest")
    for e in manifest["files"]:
        store.get_file_verified(f"{BACKUP_PREFIX}/{e['path']}", os.path.join(local, e["path"]), e)


def upload_backup(store: Store, local: str, uploaded: dict) -> None:
    """Mirror the chief's backup (``local/chief``) to MODEL_DIR/backup; manifest after the files."""
    from midiforge.storage.manifest import local_file_entry, write_manifest

    root = Path(local)
    files = []
    for p in sorted((root / "chief").rglob("*")):
        if not p.is_file() or p.name.endswith(".tmp") or p.name.startswith("."):
            continue
        rel = p.relative_to(root).as_posix()
        entry = local_file_entry(rel, p)
        if uploaded.get(rel) != entry["sha256"]:
            store.put_file(p, f"{BACKUP_PREFIX}/{rel}")
            uploaded[rel] = entry["sha256"]
        files.append(entry)
    write_manifest(store, {"format": "midiforge-backup", "time": utc_now(), "files": files},
                   f"{BACKUP_PREFIX}/manifest.json")
    current = {e["path"] for e in files}
    for o in store.list(f"{BACKUP_PREFIX}/"):
        rel = o.path[len(BACKUP_PREFIX) + 1:]
        if rel != "manifest.json" and rel not in current:
            store.delete(o.path)
            uploaded.pop(rel, None)


# ---------------------------------------------------------------------------------------------
# the training function (one for every launcher)
# ---------------------------------------------------------------------------------------------
def run_training(settings: TrainSettings | dict, *, membership: str | None = None, keep_model: bool = False,
                 restore_signals: bool = True) -> dict:
    """Train on this worker; every worker of the job calls this with the same settings.

    Returns a summary (the chief's has the bundle's sha256); with ``keep_model`` also the
    trained tf_keras model under ``"model"`` (for in-process callers).  In the main thread,
    SIGTERM and SIGUSR1 stop training (every worker after the same step, with a backup) and
    raise :class:`TrainingStopped`; ``restore_signals=False`` leaves the handlers in place
    afterwards (the CLI: a late duplicate signal must not kill a process on its way out).
    """
    signals = StopSignals()
    signals.install()   # before TensorFlow: a signal during setup stops training at its first step
    try:
        return _run_training(settings, membership, keep_model, signals)
    finally:
        if restore_signals:
            signals.uninstall()


@dataclass
class _Worker:
    """This worker's view of the job: who it is, the shards it reads, MODEL_DIR and the plan."""

    member: object                  # membership.Membership
    log: Callable[[str], None]      # prints on the chief only
    shards: object                  # tokens.Shards
    store: Store                    # MODEL_DIR
    state: RunState                 # MODEL_DIR at the start
    plan: Plan
    shards_uri: str                 # as given (messages)

    @property
    def s(self) -> TrainSettings:
        """The settings of this run (the run's own for a continued run, merged with the flags)."""
        return self.plan.settings

    @property
    def is_chief(self) -> bool:
        return self.member.is_chief

    @property
    def rank(self) -> int:
        return self.member.worker_rank

    @property
    def workers(self) -> int:
        return self.member.num_workers

    def nothing_to_do(self) -> bool:
        return self.plan.done or (not self.plan.fresh and self.state.finished
                                  and self.s.epochs <= self.state.epochs_done)


@dataclass
class _Data:
    """This worker's share of the shards and the steps per epoch."""

    train_files: list
    train_shard: tuple | None
    val_files: list
    val_shard: tuple | None
    steps: int
    val_steps: int
    weights: object                 # class weights per token, or None


@dataclass
class _Backup:
    """This worker's BackupAndRestore directory (None: backups off)."""

    dir: str | None
    mirrored: bool                  # the chief mirrors it to MODEL_DIR/backup
    restored: bool                  # training continues from it


def _run_training(settings: TrainSettings | dict, membership: str | None, keep_model: bool,
                  signals: StopSignals) -> dict:
    from midiforge.model.lstm import tf_keras

    if isinstance(settings, dict):
        settings = TrainSettings.from_dict(settings)
    started = time.time()
    tf, _keras = tf_keras()
    from midiforge.model import training as T

    w = _open_worker(settings, membership)
    if w.nothing_to_do():
        w.log(f"{settings.model_dir}: already holds this finished model ({w.state.epochs_done} epochs, --epochs "
              f"{w.s.epochs}); nothing to do")
        return {"model_dir": w.store.uri, "epochs": w.state.epochs_done, "is_chief": w.is_chief, "nothing_to_do": True}

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    signals.install()   # again: the strategy's server installed TensorFlow's own SIGTERM handler
    replicas = strategy.num_replicas_in_sync
    if w.s.batch_size % replicas:
        raise MidiforgeError(f"--batch-size {w.s.batch_size} is not divisible by the {replicas} replicas")
    data = _plan_data(w)
    backup = _prepare_backup(w)   # every worker prepares its view before anyone writes
    model = _build_model(w, strategy, backup.restored)
    T.barrier(strategy)  # nobody writes before every worker has read MODEL_DIR
    writer = _start_writer(w, data.steps)
    train_ds, val_ds = _datasets(w, strategy, data)
    callbacks = _callbacks(w, strategy, model, writer, data, backup, signals)
    _fit(w, model, train_ds, val_ds, data, callbacks)
    return _finish(w, strategy, model, writer, started, keep_model)


def _open_worker(settings: TrainSettings, membership: str | None) -> _Worker:
    """Join the job's membership (TF_CONFIG), open the shards and MODEL_DIR, plan the run."""
    from midiforge.pipeline import membership as M
    from midiforge.pipeline import tokens

    member = M.resolve(membership or settings.membership, port_base=settings.port_base or None)
    M.apply(member)
    log = _logger(member.is_chief)
    log(f"midiforge train: {member.describe()}")
    options = settings.storage_options()
    shards = tokens.open_shards(settings.shards, options, settings.cache_dir or None)
    store = open_store(settings.model_dir, options)
    state = inspect_model_dir(store)
    plan = plan_run(settings, shards.tokenizer, state, settings.model_dir, shards.manifest_sha256)
    return _Worker(member, log, shards, store, state, plan, settings.shards)


def _plan_data(w: _Worker) -> _Data:
    """Steps per epoch and this worker's files and window shard; refuses splits too small for a worker."""
    from midiforge.model import data as D

    s, shards = w.s, w.shards
    train_files, train_shard = D.assign(shards.files, "train", w.rank, w.workers)
    val_files, val_shard = D.assign(shards.files, "validation", w.rank, w.workers)
    train_windows = D.count_windows(shards.tokens("train"), s.seq_len)
    val_windows = D.count_windows(shards.tokens("validation"), s.seq_len)
    if train_windows < 1:
        raise MidiforgeError(f"{w.shards_uri}: {shards.tokens('train')} training tokens do not fill one window "
                             f"of {s.seq_len + 1}; use a smaller --seq-len")
    _check_worker_windows(shards, val_files, val_shard, "validation", s.seq_len, w.rank, w.shards_uri)
    _check_worker_windows(shards, train_files, train_shard, "train", s.seq_len, w.rank, w.shards_uri)
    steps = s.steps_per_epoch or max(1, train_windows // s.batch_size)
    val_steps = s.validation_steps or min(MAX_VALIDATION_STEPS, max(1, -(-val_windows // s.batch_size)))
    weights = None
    if s.class_weighting != "none":
        counts = D.token_counts(shards.reader("train"), shards.tokenizer.vocab_size)
        weights = D.class_weights(counts, s.class_weighting, s.class_weight_max)
    return _Data(train_files, train_shard, val_files, val_shard, steps, val_steps, weights)


def _check_worker_windows(shards, paths, shard, split, seq_len, rank, uri) -> None:
    from midiforge.model.data import count_windows

    tokens = sum(f.tokens[split] for f in shards.files if f.local in set(paths))
    n = count_windows(tokens, seq_len)
    if shard is not None:
        n = len(range(shard[0], n, shard[1]))
    if n < 1:
        raise MidiforgeError(f"{uri}: the {split} split is too small for worker {rank} ({tokens} tokens, not one "
                             f"window of {seq_len + 1}); use a smaller --seq-len or fewer workers")


def _prepare_backup(w: _Worker) -> _Backup:
    """This worker's backup directory, replaced by the mirror in MODEL_DIR/backup when there is one."""
    if w.s.backup_every == "off":
        return _Backup(None, False, False)
    backup_dir, mirrored = backup_location(w.s, w.store, w.rank)
    if mirrored:
        shutil.rmtree(backup_dir, ignore_errors=True)   # the object store holds the truth
        if not w.plan.fresh and w.state.remote_backup:
            download_backup(w.store, backup_dir)
    elif w.plan.fresh and w.is_chief:
        shutil.rmtree(os.path.join(backup_dir, "chief"), ignore_errors=True)  # stale state of a removed run
    restored = not w.plan.fresh and os.path.exists(os.path.join(backup_dir, "chief", "checkpoint"))
    if restored:
        w.log(f"continuing from the backup in {w.store.url(BACKUP_PREFIX) if mirrored else backup_dir} "
              f"(the epoch and step where the last run stopped)")
    return _Backup(backup_dir, mirrored, restored)


def _build_model(w: _Worker, strategy, has_backup: bool):
    """The compiled model, with the weights and optimizer state of the checkpoint the plan continues from."""
    from midiforge.model import training as T

    s, plan, store = w.s, w.plan, w.store
    with strategy.scope():
        model = T.compile_model(plan.config, learning_rate=s.learning_rate, clipnorm=s.clipnorm,
                                mixed_precision=s.mixed_precision)
    if plan.restore_checkpoint:
        from midiforge.model.bundle import OPTIMIZER, WEIGHTS

        ck = plan.restore_checkpoint
        cmanifest = read_json(store, f"{ck}/manifest.json", "the checkpoint manifest")
        entries = {e["path"]: e for e in cmanifest["files"]}
        weights = store.read_verified(f"{ck}/{WEIGHTS}", entries[WEIGHTS])
        optimizer = store.read_verified(f"{ck}/{OPTIMIZER}", entries[OPTIMIZER]) if OPTIMIZER in entries else None
        T.restore_state(model, weights, optimizer, store.url(ck))
        if not has_backup:
            w.log(f"continuing from {store.url(ck)} (epoch {plan.initial_epoch})")
    return model


def _start_writer(w: _Worker, steps: int) -> RunWriter:
    """The chief's writer (run.json says "running" from here); TensorBoard files go to a local directory."""
    from midiforge.model import data as D

    s, store = w.s, w.store
    tb_local = (str(store.path("tensorboard")) if isinstance(store, LocalStore) else
                os.path.join(s.cache_dir or D.default_cache_dir(), "tensorboard", D.fingerprint(store.uri),
                             f"start-{w.plan.starts + 1}"))
    writer = RunWriter(store, w.plan, w.state, w.shards, tb_local, num_workers=w.workers, steps_per_epoch=steps)
    if w.is_chief:
        writer.start(w.member, w.workers)
    return writer


def _datasets(w: _Worker, strategy, data: _Data) -> tuple:
    """The distributed training and validation datasets (this worker's files, per-replica batches)."""
    from midiforge.model import data as D

    s, shards, rank = w.s, w.shards, w.rank
    seed = [s.seed, w.plan.starts]

    def train_fn(ctx):
        return D.make_dataset(shards.reader("train", data.train_files), seq_len=s.seq_len,
                              batch_size=ctx.get_per_replica_batch_size(s.batch_size), shard=data.train_shard,
                              seed=seed + ([rank] if data.train_shard is None else []),
                              shuffle_buffer=s.shuffle_buffer, weights=data.weights)

    def val_fn(ctx):
        return D.make_dataset(shards.reader("validation", data.val_files), seq_len=s.seq_len,
                              batch_size=ctx.get_per_replica_batch_size(s.batch_size), shard=data.val_shard,
                              take=data.val_steps)

    return strategy.distribute_datasets_from_function(train_fn), strategy.distribute_datasets_from_function(val_fn)


def _callbacks(w: _Worker, strategy, model, writer: RunWriter, data: _Data, backup: _Backup,
               signals: StopSignals) -> list:
    """Metrics and checkpoints per epoch (the chief writes them), backups, and the stop on a signal."""
    from midiforge.model import training as T

    s = w.s
    final_epoch = s.epochs

    def on_epoch_done(epoch: int, logs: dict, info: dict) -> None:
        ckpt = epoch % s.checkpoint_every == 0 or epoch == final_epoch
        weights = T.weights_bytes(model) if ckpt else None
        optimizer = T.optimizer_bytes(model.optimizer) if ckpt else None
        if w.is_chief:
            writer.epoch_done(epoch, logs, info, weights, optimizer)

    callbacks = [T.Monitor(s.batch_size * s.seq_len, on_epoch_done)]
    backup_callback = None
    if backup.dir:
        uploaded: dict = {}
        after = (lambda: upload_backup(w.store, backup.dir, uploaded)) if (backup.mirrored and w.is_chief) else None
        freq = "epoch" if s.backup_every == "epoch" else int(s.backup_every)
        backup_callback = T.make_backup(backup.dir, freq, data.steps, after)
        callbacks.append(backup_callback)

    def on_stop(info: dict) -> None:
        if w.is_chief:
            writer.stopped(info)
        if w.workers > 1:
            T.barrier(strategy)   # everyone's backup (and the chief's mirror of it) is complete
        raise TrainingStopped(info)

    if signals.active:
        callbacks.append(T.GracefulStop(signals.requested, rank=w.rank, workers=w.workers, steps_per_epoch=data.steps,
                                        backup=backup_callback, on_stop=on_stop))
    return callbacks


def _fit(w: _Worker, model, train_ds, val_ds, data: _Data, callbacks: list) -> None:
    s, plan = w.s, w.plan
    verbose = 0
    if w.is_chief and s.progress != "none":
        verbose = 1 if s.progress == "bar" or (s.progress == "auto" and sys.stdout.isatty()) else 2
    w.log(f"training {plan.config.parameters:,} parameters, {data.steps} steps/epoch x {s.batch_size} windows x "
          f"{s.seq_len} tokens, {data.val_steps} validation steps, epochs {plan.initial_epoch + 1}..{s.epochs}")
    model.fit(train_ds, epochs=s.epochs, initial_epoch=plan.initial_epoch, steps_per_epoch=data.steps,
              validation_data=val_ds, validation_steps=data.val_steps, callbacks=callbacks, verbose=verbose)


def _finish(w: _Worker, strategy, model, writer: RunWriter, started: float, keep_model: bool) -> dict:
    """The chief writes the bundle and the manifest; every worker waits for it."""
    from midiforge.model import training as T

    final_weights = T.weights_bytes(model)
    result = {"model_dir": w.store.uri, "is_chief": w.is_chief, "epochs": w.s.epochs}
    if w.is_chief:
        result.update(writer.finish(final_weights, time.time() - started))
    result["seconds"] = round(time.time() - started, 3)
    T.barrier(strategy)  # non-chief workers leave only after the bundle exists
    if keep_model:
        result["model"] = model
    return result


def _logger(is_chief: bool):
    def log(msg: str) -> None:
        if is_chief:
            print(msg, file=sys.stderr, flush=True)
    return log

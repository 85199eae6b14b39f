"""TensorFlow-side training helpers: compile, weights/optimizer state as bytes, callbacks.

Imported only inside the training function (it imports TensorFlow with
``TF_USE_LEGACY_KERAS=1`` at import time).

Under MultiWorkerMirroredStrategy, reading variables for a save can run collective ops, so
every worker calls the ``*_bytes`` helpers at the same points; only the chief keeps the result.
"""
from __future__ import annotations

import io
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np

from midiforge.errors import MidiforgeError
from midiforge.model.lstm import ModelConfig, build_model, tf_keras

tf, keras = tf_keras()


def compile_model(cfg: ModelConfig, *, learning_rate: float, clipnorm: float | None, mixed_precision: bool):
    """Build and compile the training model (call inside ``strategy.scope()``)."""
    model = build_model(cfg, mixed_precision=mixed_precision)
    opt = keras.optimizers.Adam(learning_rate=learning_rate, clipnorm=clipnorm or None)
    if mixed_precision:
        opt = keras.mixed_precision.LossScaleOptimizer(opt)
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    opt.build(model.trainable_variables)
    return model


def weights_bytes(model) -> bytes:
    """``model.save_weights`` (HDF5) as bytes; every worker must call it."""
    with tempfile.TemporaryDirectory(prefix="midiforge-save-") as tmp:
        path = os.path.join(tmp, "model.weights.h5")
        model.save_weights(path)
        with open(path, "rb") as fh:
            return fh.read()


def optimizer_bytes(optimizer) -> bytes:
    """The optimizer's variables (step, moments, loss scale) in HDF5; every worker must call it."""
    import h5py

    values = [(v.name, np.asarray(v.numpy())) for v in optimizer.variables]
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.attrs["format"] = "midiforge-optimizer"
        f.attrs["optimizer"] = type(optimizer).__name__
        f.attrs["count"] = len(values)
        for i, (name, value) in enumerate(values):
            ds = f.create_dataset(f"v{i:05d}", data=value)
            ds.attrs["name"] = name
    return buf.getvalue()


def restore_state(model, weights: bytes, optimizer_state: bytes | None, where: str) -> None:
    """Load weights and (if given) optimizer variables into a compiled model; every worker calls it."""
    import h5py

    with tempfile.TemporaryDirectory(prefix="midiforge-load-") as tmp:
        path = os.path.join(tmp, "model.weights.h5")
        with open(path, "wb") as fh:
            fh.write(weights)
        try:
            model.load_weights(path)
        except (ValueError, OSError) as exc:
            raise MidiforgeError(f"{where}: weights do not fit the model ({exc})") from None
    if optimizer_state is None:
        return
    variables = model.optimizer.variables
    with h5py.File(io.BytesIO(optimizer_state), "r") as f:
        if f.attrs.get("format") != "midiforge-optimizer" or int(f.attrs["count"]) != len(variables):
            raise MidiforgeError(f"{where}: optimizer state holds {f.attrs.get('count')} variables, "
                                 f"the optimizer has {len(variables)} (different optimizer settings?)")
        for i, var in enumerate(variables):
            value = f[f"v{i:05d}"][()]
            if tuple(value.shape) != tuple(var.shape):
                raise MidiforgeError(f"{where}: optimizer variable {var.name} has shape {value.shape}, "
                                     f"expected {tuple(var.shape)}")
            var.assign(value)


def barrier(strategy) -> None:
    """All workers meet here (one all-reduce)."""
    value = strategy.run(lambda: tf.constant(1.0))
    strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)


class Monitor(keras.callbacks.Callback):
    """Times each epoch's training phase, adds ``tokens_per_second`` to the logs (progress bar,
    TensorBoard, metrics.jsonl) and hands every finished epoch to ``on_epoch_done``.

    ``on_epoch_done(epoch_number_from_1, logs, info)`` runs on every worker (it may save).
    """

    def __init__(self, tokens_per_step: int, on_epoch_done: Callable[[int, dict, dict], None]) -> None:
        super().__init__()
        self.tokens_per_step = tokens_per_step
        self.on_epoch_done = on_epoch_done
        self._t0 = self._t_train = 0.0
        self._batches = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()
        self._t_train = 0.0
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if logs is not None:
            elapsed = time.perf_counter() - self._t0
            if elapsed > 0:
                logs["tokens_per_second"] = self._batches * self.tokens_per_step / elapsed

    def on_test_begin(self, logs=None):
        if not self._t_train:
            self._t_train = time.perf_counter() - self._t0

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        train_seconds = self._t_train or (now - self._t0)
        logs = logs if logs is not None else {}
        tps = self._batches * self.tokens_per_step / train_seconds if train_seconds > 0 else 0.0
        logs["tokens_per_second"] = tps
        info = {"steps": self._batches, "train_seconds": train_seconds, "seconds": now - self._t0}
        self.on_epoch_done(epoch + 1, {k: float(v) for k, v in logs.items()}, info)


def make_backup(backup_dir: str, save_freq, steps_per_epoch: int, after_backup: Callable[[], None] | None):
    """BackupAndRestore that also backs up at every epoch end (after the callbacks before it).

    With a step frequency, the mid-epoch backup on an epoch's last step is skipped: the
    epoch-end backup follows once metrics and checkpoints of that epoch are written, so a
    kill between them re-runs that epoch's end instead of skipping it.

    Restoring always uses BackupAndRestore's step semantics (an integer ``save_freq`` is
    passed even for ``"epoch"``): a backup records the epoch and the step it was taken after,
    and training continues at the next step.  So the backup :class:`GracefulStop` takes in
    the middle of an epoch resumes there (with ``"epoch"`` semantics it would skip the rest of
    that epoch); an epoch-end backup records the epoch's last step and resumes at the next epoch.
    ``backup_now(epoch, step)`` backs up at once (all workers together).
    """
    every = None if save_freq == "epoch" else int(save_freq)

    class Backup(keras.callbacks.BackupAndRestore):
        last: tuple | None = None   # (epoch, step) of the last mid-epoch backup

        def on_train_batch_end(self, batch, logs=None):
            self._training_state.backup_if_preempted()
            if every:
                self._batches_count += 1
                if self._batches_count >= every and batch != steps_per_epoch - 1:
                    self._batches_count = 0
                    self._backup(epoch=self._current_epoch, batch=batch)
                    self.last = (self._current_epoch, batch)

        def on_epoch_end(self, epoch, logs=None):
            self._backup(epoch=epoch)
            self.last = None

        def backup_now(self, epoch: int, batch: int) -> None:
            if self.last != (epoch, batch):
                self._backup(epoch=epoch, batch=batch)
                self.last = (epoch, batch)

        def _backup(self, epoch, batch=0):
            super()._backup(epoch, batch)
            if after_backup is not None:
                after_backup()

    return Backup(backup_dir, save_freq=every or max(1, steps_per_epoch))


#: Coordination-service keys of GracefulStop (the service lives as long as the job's workers).
STOP_KEY = "midiforge_stop_after_step"
STOP_ACK_KEY = "midiforge_stop_ack_"
_WATCH_DONE = "done"


class GracefulStop(keras.callbacks.Callback):
    """Stops every worker of the job after the same step when one of them is asked to stop.

    ``requested()`` tells whether this process was asked to stop (a signal; it returns the
    signal number or None).  It is checked at every step end and epoch start (in the main
    thread, between TensorFlow calls).  The stop itself calls ``on_stop(info)``, which must
    raise; before that, ``backup.backup_now`` saves the exact step (all workers together).

    One worker: it stops at the check that sees the request.  Several workers
    (MultiWorkerMirroredStrategy): stopping alone would leave the others blocked in the next
    all-reduce until TensorFlow's heartbeat declares this worker lost, with no backup.  So the
    first worker that sees a request publishes "stop after step N+1" (N: steps it has finished
    in this run) in the coordination service's key-value store (TensorFlow's own per-job
    store, the mechanism of its PreemptionCheckpointHandler) and waits until every worker has
    acknowledged it.  Each worker runs a thread that blocks on that key, records the step and
    acknowledges.  Training is synchronous: no worker can finish step N+1 before the
    publisher starts it, and the publisher starts it only after every acknowledgement, so all
    workers know the step before they reach it and stop after the same step.  A step that
    ends an epoch is not a stop point (its validation, metrics, checkpoint and epoch-end backup
    come first): the workers then stop when the next epoch begins, where the epoch-end backup
    is current.  If the last epoch ends first, training simply finishes.
    """

    def __init__(self, requested: Callable[[], int | None], *, rank: int, workers: int, steps_per_epoch: int,
                 backup=None, on_stop: Callable[[dict], None]) -> None:
        super().__init__()
        self.requested = requested
        self.rank = rank
        self.workers = workers
        self.steps_per_epoch = steps_per_epoch
        self.backup = backup
        self.on_stop = on_stop
        self.stop_at: int | None = None      # stop once this many steps are done (this run)
        self.signum: int | None = None
        self._done = 0
        self._epoch = 0
        self._published = False
        self._watcher = None

    # -- the coordination service (several workers) --
    def _context(self):
        from tensorflow.python.eager import context

        return context.context()

    def _watch(self) -> None:
        ctx = self._context()
        try:
            value = ctx.get_config_key_value(STOP_KEY)   # blocks until set (or the service goes away)
        except Exception:  # noqa: BLE001 - the job is ending anyway (a lost peer, shutdown)
            return
        if value == _WATCH_DONE:
            return
        step, _, signum = value.partition(":")
        if self.signum is None and signum.isdigit():
            self.signum = int(signum)
        self.stop_at = int(step)
        try:
            ctx.set_config_key_value(f"{STOP_ACK_KEY}{self.rank}", "1")
        except Exception:  # noqa: BLE001
            pass

    def _publish(self) -> None:
        self._published = True
        target = self._done + 1
        if self.workers == 1:
            self.stop_at = self._done
            return
        ctx = self._context()
        try:
            ctx.set_config_key_value(STOP_KEY, f"{target}:{self.signum or 0}")
        except tf.errors.AlreadyExistsError:
            return   # another worker asked first; the watcher brings its step
        self.stop_at = target
        for i in range(self.workers):   # every worker knows the step before this one trains it
            ctx.get_config_key_value(f"{STOP_ACK_KEY}{i}")

    def _check(self) -> bool:
        if self.stop_at is None and not self._published:
            signum = self.requested()
            if signum is not None:
                self.signum = signum
                self._publish()
        return self.stop_at is not None and self._done >= self.stop_at

    def _stop(self, epoch: int, step: int | None, backed_up: bool) -> None:
        self.on_stop({"signal": self.signum, "epoch": epoch + 1, "step": step, "steps_done": self._done,
                      "backup": backed_up})

    # -- keras hooks --
    def on_train_begin(self, logs=None):
        self._done = 0
        if self.workers > 1:
            import threading

            self._watcher = threading.Thread(target=self._watch, name="midiforge-stop-watcher", daemon=True)
            self._watcher.start()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self._check():
            # the previous epoch's end (metrics, checkpoint, backup) is complete: stop before this one
            self._stop(epoch, 0, self.backup is not None and self._done > 0)

    def on_train_batch_end(self, batch, logs=None):
        self._done += 1
        if self._check() and batch != self.steps_per_epoch - 1:
            if self.backup is not None:
                self.backup.backup_now(self._epoch, batch)
            self._stop(self._epoch, batch + 1, self.backup is not None)

    def on_train_end(self, logs=None):
        if self._watcher is not None and self._watcher.is_alive():
            try:
                self._context().set_config_key_value(STOP_KEY, _WATCH_DONE)   # release the watchers
            except tf.errors.AlreadyExistsError:
                pass
            self._watcher.join(timeout=10)


class Summaries:
    """TensorBoard event files (chief only): ``train/`` and ``validation/`` scalars per epoch.

    Written with TensorFlow's core ``tf.summary.write`` and the scalars plugin's metadata, so
    the ``tensorboard`` package is needed only to view them (``tensorboard --logdir ...``).
    """

    def __init__(self, log_dir: str) -> None:
        from tensorflow.core.framework import summary_pb2

        self.log_dir = log_dir
        self.train = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
        self.validation = tf.summary.create_file_writer(os.path.join(log_dir, "validation"))
        md = summary_pb2.SummaryMetadata()
        md.plugin_data.plugin_name = "scalars"   # what tensorboard.summary.scalar writes
        self._metadata = md.SerializeToString()

    def _scalar(self, name: str, value: float, step: int) -> None:
        tf.summary.write(name, tf.constant(float(value), dtype=tf.float32), step=step, metadata=self._metadata)

    def write(self, epoch: int, logs: dict) -> None:
        with self.train.as_default():
            for key in ("loss", "accuracy", "tokens_per_second"):
                if key in logs:
                    self._scalar(f"epoch_{key}", logs[key], epoch)
        with self.validation.as_default():
            for key in ("loss", "accuracy"):
                if f"val_{key}" in logs:
                    self._scalar(f"epoch_{key}", logs[f"val_{key}"], epoch)
        self.train.flush()
        self.validation.flush()

    def close(self) -> None:
        self.train.close()
        self.validation.close()

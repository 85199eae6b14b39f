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
import datetime as _dt
import json
import os
import select
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from midiforge.errors import MidiforgeError
from midiforge.storage.cli_options import add_storage_arguments, options_from_args
from midiforge.storage.manifest import read_json
from midiforge.storage.store import LocalStore, StorageOptions, Store, open_store

#: Defaults "chosen for the data": vocabularies of a few hundred tokens, corpora from a few
#: hundred to a million pieces; two 256-unit LSTMs train at tens of thousands of tokens/s on
#: a laptop CPU and far faster on a GPU with cuDNN.
DEFAULTS = {
    "epochs": 20,
    "batch_size": 64,
    "seq_len": 128,
    "embedding_dim": 128,
    "lstm_units": (256, 256),
    "dropout": 0.2,
    "learning_rate": 0.002,
    "clipnorm": 1.0,
    "steps_per_epoch": 0,          # 0: one pass over the training windows
    "validation_steps": 0,         # 0: all validation windows, at most MAX_VALIDATION_STEPS batches
    "checkpoint_every": 1,         # epochs
    "keep": 3,                     # last K checkpoints (+ the best by val_loss)
    "backup_every": "epoch",       # "epoch", a number of steps, or "off"
    "backup_dir": "",
    "mixed_precision": False,
    "class_weighting": "none",     # none | sqrt | inverse
    "class_weight_max": 10.0,
    "shuffle_buffer": 2048,        # windows
    "seed": 0,
    "membership": "auto",
    "port_base": 0,
    "cache_dir": "",
    "progress": "auto",            # auto | bar | epoch | none
}
MODEL_KEYS = ("embedding_dim", "lstm_units", "dropout")
MAX_VALIDATION_STEPS = 200
RUN = "run.json"
METRICS = "metrics.jsonl"
BACKUP_PREFIX = "backup"

#: Exit status of a worker that stopped on SIGTERM/SIGUSR1 (after a backup when backups are
#: on): EX_TEMPFAIL of sysexits.h, "temporary failure, try again": run the same command again
#: (slurm/train.sbatch requeues the job on it).  Not 0 (the run is not finished), not 1/2
#: (errors), not 128+N (killed by signal N).
STOP_EXIT_CODE = 75
#: Seconds a worker may take from the first SIGTERM/SIGUSR1 to its exit (backup included)
#: before a watchdog ends it with STOP_EXIT_CODE anyway (a peer that hangs, a stuck write).
STOP_GRACE_SECONDS = 90.0
STOP_GRACE_ENV = "MIDIFORGE_STOP_GRACE"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(Exception):
    """Training stopped on a signal; ``info``: signal, epoch (from 1), step, backup."""

    def __init__(self, info: dict) -> None:
        self.info = info
        name = signal.Signals(info["signal"]).name if info.get("signal") else "a stop request"
        where = f"epoch {info['epoch']}" + (f" after step {info['step']}" if info.get("step") else " start")
        super().__init__(f"stopped by {name} at {where}"
                         + (" with a backup" if info.get("backup") else " without a new backup"))


class StopSignals:
    """SIGTERM and SIGUSR1 ask this training process to stop (main thread only).

    The handler only records the request; :class:`midiforge.model.training.GracefulStop`
    acts on it at the next step end or epoch start.  TensorFlow installs a SIGTERM handler of
    its own when MultiWorkerMirroredStrategy starts its server (its preemption notifier, which
    nothing in Keras reads: SIGTERM was ignored), so :meth:`install` is called again after the
    strategy exists.  A watchdog thread, woken by Python's signal wakeup fd even while the main
    thread is blocked inside TensorFlow, ends the process with STOP_EXIT_CODE if it is still
    alive ``grace`` seconds after the first signal.  Further signals are only logged: under
    Slurm the same SIGTERM may arrive twice (from slurmstepd and forwarded by srun).
    """

    def __init__(self, grace: float | None = None) -> None:
        if grace is None:
            try:
                grace = float(os.environ.get(STOP_GRACE_ENV) or STOP_GRACE_SECONDS)
            except ValueError:
                raise MidiforgeError(f"{STOP_GRACE_ENV}={os.environ[STOP_GRACE_ENV]!r} is not a number of seconds") from None
        self.grace = grace
        self.signum: int | None = None
        self._previous: dict = {}
        self._fds: tuple[int, int] | None = None
        self._old_wakeup = -1
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._fds is not None

    def requested(self) -> int | None:
        return self.signum

    def install(self) -> bool:
        """(Re)install the handlers; False when not in the main thread (e.g. under Ray Train)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for s in STOP_SIGNALS:
            previous = signal.signal(s, self._handler)
            self._previous.setdefault(s, previous)
        if self._fds is None:
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self._fds = (r, w)
            self._thread = threading.Thread(target=self._watchdog, name="midiforge-stop-watchdog", daemon=True)
            self._thread.start()
        return True

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            print(f"midiforge train: {name}: stopping after the current step with a backup "
                  f"(exit {STOP_EXIT_CODE}; at the latest in {self.grace:g} s)", file=sys.stderr, flush=True)
        else:
            print(f"midiforge train: {name} again: already stopping", file=sys.stderr, flush=True)

    def _watchdog(self) -> None:
        r = self._fds[0]
        deadline = None
        while not self._closed.is_set():
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            try:
                ready, _, _ = select.select([r], [], [], wait)
                data = os.read(r, 64) if ready else b""
            except OSError:
                return
            if deadline is None and any(b in STOP_SIGNALS for b in data):
                deadline = time.monotonic() + self.grace
            if deadline is not None and time.monotonic() >= deadline and not self._closed.is_set():
                print(f"midiforge train: not stopped {self.grace:g} s after the signal (a peer worker lost or "
                      f"hanging?); exiting with {STOP_EXIT_CODE} now; the next run continues from the last "
                      f"backup", file=sys.stderr, flush=True)
                os._exit(STOP_EXIT_CODE)

    def uninstall(self) -> None:
        """Restore the previous handlers and stop the watchdog."""
        if threading.current_thread() is not threading.main_thread() or self._fds is None:
            return
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(self._old_wakeup)
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for fd in self._fds:
            os.close(fd)
        self._fds = None


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run needs; plain values (travels to Ray workers as a dict)."""

    shards: str
    model_dir: str
    epochs: int = DEFAULTS["epochs"]
    batch_size: int = DEFAULTS["batch_size"]
    seq_len: int = DEFAULTS["seq_len"]
    embedding_dim: int = DEFAULTS["embedding_dim"]
    lstm_units: tuple = DEFAULTS["lstm_units"]
    dropout: float = DEFAULTS["dropout"]
    learning_rate: float = DEFAULTS["learning_rate"]
    clipnorm: float = DEFAULTS["clipnorm"]
    steps_per_epoch: int = DEFAULTS["steps_per_epoch"]
    validation_steps: int = DEFAULTS["validation_steps"]
    checkpoint_every: int = DEFAULTS["checkpoint_every"]
    keep: int = DEFAULTS["keep"]
    backup_every: str = DEFAULTS["backup_every"]
    backup_dir: str = DEFAULTS["backup_dir"]
    mixed_precision: bool = DEFAULTS["mixed_precision"]
    class_weighting: str = DEFAULTS["class_weighting"]
    class_weight_max: float = DEFAULTS["class_weight_max"]
    shuffle_buffer: int = DEFAULTS["shuffle_buffer"]
    seed: int = DEFAULTS["seed"]
    membership: str = DEFAULTS["membership"]
    port_base: int = DEFAULTS["port_base"]
    cache_dir: str = DEFAULTS["cache_dir"]
    progress: str = DEFAULTS["progress"]
    resume: bool = False
    endpoint_url: str | None = None
    s3_max_attempts: int | None = None
    s3_checksum: str | None = None
    explicit: tuple = ()           # names set by flags or the config file (not defaults)

    def __post_init__(self) -> None:
        from midiforge.model.lstm import parse_units

        object.__setattr__(self, "lstm_units", parse_units(self.lstm_units))
        for name in ("shards", "model_dir", "backup_dir", "cache_dir"):  # absolute: workers may run elsewhere
            value = getattr(self, name)
            if value and "://" not in value:
                object.__setattr__(self, name, os.path.abspath(os.path.expanduser(value)))
        object.__setattr__(self, "backup_every", str(self.backup_every))
        object.__setattr__(self, "explicit", tuple(sorted(set(self.explicit))))
        for name in ("epochs", "batch_size", "seq_len", "embedding_dim", "checkpoint_every", "keep"):
            if int(getattr(self, name)) < 1:
                raise MidiforgeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("steps_per_epoch", "validation_steps", "shuffle_buffer", "port_base"):
            if int(getattr(self, name)) < 0:
                raise MidiforgeError(f"--{name.replace('_', '-')} must be >= 0")
        if not 0 <= float(self.dropout) < 1:
            raise MidiforgeError(f"--dropout must be in [0, 1), got {self.dropout}")
        if float(self.learning_rate) <= 0:
            raise MidiforgeError("--learning-rate must be > 0")
        if self.backup_every not in ("epoch", "off") and not (self.backup_every.isdigit() and int(self.backup_every) > 0):
            raise MidiforgeError(f"--backup-every {self.backup_every!r}: use 'epoch', a number of steps, or 'off'")
        if self.class_weighting not in ("none", "sqrt", "inverse"):
            raise MidiforgeError(f"--class-weighting {self.class_weighting!r}: use none, sqrt or inverse")
        if self.progress not in ("auto", "bar", "epoch", "none"):
            raise MidiforgeError(f"--progress {self.progress!r}: use auto, bar, epoch or none")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lstm_units"] = list(self.lstm_units)
        d["explicit"] = list(self.explicit)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        return cls(**d)

    def storage_options(self) -> StorageOptions:
        return options_from_args(argparse.Namespace(endpoint_url=self.endpoint_url,
                                                    s3_max_attempts=self.s3_max_attempts,
                                                    s3_checksum=self.s3_checksum))

    def run_settings(self) -> dict:
        """What run.json records (and a continued run starts from)."""
        keep = set(DEFAULTS) - {"membership", "port_base", "cache_dir", "progress", "backup_dir"}
        d = {k: v for k, v in self.to_dict().items() if k in keep}
        return d


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", metavar="SHARDS", help="preprocess output (DEST of midiforge preprocess): path or s3://")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="where the bundle, checkpoints and metrics go: path or s3://")
    parser.add_argument("--config", metavar="TOML", help="TOML file with any of the settings below "
                        "(keys as the flag names, - or _); flags override it")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, help=f"total epochs to train to (default {DEFAULTS['epochs']})")
    g.add_argument("--batch-size", type=int, help=f"global batch, split across workers (default {DEFAULTS['batch_size']})")
    g.add_argument("--seq-len", type=int, help=f"tokens per window; a target at every position (default {DEFAULTS['seq_len']})")
    g.add_argument("--learning-rate", type=float, help=f"Adam learning rate (default {DEFAULTS['learning_rate']})")
    g.add_argument("--clipnorm", type=float, help=f"gradient norm clip, 0 for none (default {DEFAULTS['clipnorm']})")
    g.add_argument("--steps-per-epoch", type=int, help="steps per epoch (default 0: one pass over the training windows)")
    g.add_argument("--validation-steps", type=int, help=f"validation batches per epoch (default 0: all, at most {MAX_VALIDATION_STEPS})")
    g.add_argument("--class-weighting", choices=("none", "sqrt", "inverse"),
                   help="re-weight rare target tokens: loss weight ~ count^-1/2 (sqrt) or 1/count (default none)")
    g.add_argument("--class-weight-max", type=float, help=f"upper bound of a token's weight (default {DEFAULTS['class_weight_max']})")
    g.add_argument("--shuffle-buffer", type=int, help=f"windows in the shuffle buffer (default {DEFAULTS['shuffle_buffer']})")
    g.add_argument("--seed", type=int, help="data order seed (default 0)")
    g.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                   help="float16 compute with float32 weights (for GPUs; default off)")
    g = parser.add_argument_group("model")
    g.add_argument("--embedding-dim", type=int, help=f"token embedding size (default {DEFAULTS['embedding_dim']})")
    g.add_argument("--lstm-units", help="comma-separated LSTM layer sizes (default "
                   + ",".join(map(str, DEFAULTS["lstm_units"])) + ")")
    g.add_argument("--dropout", type=float, help=f"dropout after each LSTM (default {DEFAULTS['dropout']})")
    g = parser.add_argument_group("checkpoints and resuming")
    g.add_argument("--checkpoint-every", type=int, help="write a checkpoint every N epochs (default 1; the last epoch always)")
    g.add_argument("--keep", type=int, help=f"keep the last K checkpoints, plus the best by val_loss (default {DEFAULTS['keep']})")
    g.add_argument("--backup-every", help="BackupAndRestore frequency: 'epoch', a number of steps, or 'off' (default epoch)")
    g.add_argument("--backup-dir", help="backup directory shared by all workers (default: MODEL_DIR/backup for a local "
                   "MODEL_DIR; for s3:// a local directory per worker, mirrored to MODEL_DIR/backup)")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in MODEL_DIR (finished or not) up to --epochs")
    g.add_argument("--cache-dir", help="local cache for downloaded shards and backups (default ~/.cache/midiforge)")
    g = parser.add_argument_group("workers")
    g.add_argument("--membership", choices=("auto", "local", "tf_config", "slurm"),
                   help="where the worker list comes from (default auto: TF_CONFIG, else Slurm under srun, else local)")
    g.add_argument("--port-base", type=int, help="Slurm: worker port = port base + SLURM_LOCALID (default: "
                   "MIDIFORGE_PORT_BASE, else 20000 + (SLURM_JOB_ID * 8) %% 12000)")
    g.add_argument("--progress", choices=("auto", "bar", "epoch", "none"), help="progress display (default auto)")
    g = parser.add_argument_group("launcher")
    g.add_argument("--launcher", choices=("local", "ray"), default="local",
                   help="local (default): this process is one worker (membership above); ray: start --num-workers "
                        "workers with Ray Train (TensorflowTrainer sets TF_CONFIG for each)")
    g.add_argument("--num-workers", type=int, help="ray: TensorFlow workers (default 2)")
    g.add_argument("--cpus-per-worker", type=float, help="ray: CPUs reserved per worker (default 1)")
    g.add_argument("--use-gpu", action="store_true", default=None, help="ray: one GPU per worker")
    g.add_argument("--max-failures", type=int, help="ray: times Ray may restart the worker group after a lost "
                   "worker; each restart continues from the last backup (default 0)")
    g.add_argument("--address", help="ray: cluster address HEAD:PORT to join (default: RAY_ADDRESS, else a "
                   "private local Ray on 127.0.0.1)")
    add_storage_arguments(parser)


RAY_ONLY = ("num_workers", "cpus_per_worker", "use_gpu", "max_failures", "address")


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


SUMMARY_KEYS = ("model_dir", "epochs", "bundle_sha256", "val_loss", "val_accuracy", "tokens_per_second", "seconds",
                "nothing_to_do")


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


def run_summary(settings: TrainSettings) -> dict:
    """The summary ``midiforge train`` prints, read back from a finished MODEL_DIR."""
    store = open_store(settings.model_dir, settings.storage_options())
    state = inspect_model_dir(store)
    if not state.finished:
        raise MidiforgeError(f"{settings.model_dir}: the run did not finish (no manifest.json)")
    manifest = read_json(store, "manifest.json", "the train manifest")
    last = next((m for m in reversed(state.metrics) if int(m["epoch"]) == int(manifest["epochs"])), {})
    out = {"model_dir": store.uri, "epochs": manifest["epochs"], "bundle_sha256": manifest["bundle_sha256"],
           "seconds": manifest.get("seconds")}
    out.update({k: last[k] for k in ("val_loss", "val_accuracy", "tokens_per_second") if last.get(k) is not None})
    return out


# ---------------------------------------------------------------------------------------------
# MODEL_DIR state
# ---------------------------------------------------------------------------------------------
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunState:
    """What MODEL_DIR holds when a worker starts (read by all workers before anyone writes)."""

    run: dict | None
    finished: bool
    index: dict
    metrics: list[dict]
    remote_backup: bool
    foreign: list[str] = field(default_factory=list)   # objects that are not ours

    @property
    def epochs_done(self) -> int:
        eps = [int(c["epoch"]) for c in self.index["checkpoints"]]
        return max(eps) if eps else 0


def inspect_model_dir(store: Store) -> RunState:
    from midiforge.pipeline.bundles import read_index

    objects = [o.path for o in store.list()]
    run = read_json(store, RUN, "the run settings") if RUN in objects else None
    finished = False
    if "manifest.json" in objects:
        finished = read_json(store, "manifest.json", "the train manifest").get("format") == "midiforge-train"
    metrics = _parse_metrics(store.read_bytes(METRICS), store.url(METRICS)) if METRICS in objects else []
    ours = ("bundle/", "checkpoints/", "tensorboard/", f"{BACKUP_PREFIX}/")
    foreign = [p for p in objects if p not in (RUN, METRICS, "manifest.json") and not p.startswith(ours)]
    return RunState(run, finished, read_index(store), metrics, f"{BACKUP_PREFIX}/manifest.json" in objects, foreign)


def _parse_metrics(data: bytes, where: str) -> list[dict]:
    out = []
    for i, line in enumerate(data.decode().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise MidiforgeError(f"{where}: line {i} is not JSON") from None
    return out


@dataclass
class Plan:
    settings: TrainSettings
    config: object                   # ModelConfig
    initial_epoch: int
    restore_checkpoint: str | None   # checkpoints/epoch-NNNN to load when there is no backup
    fresh: bool
    starts: int
    done: bool = False               # a finished run asked again with the same settings: nothing to do


def finished_run_differences(settings: TrainSettings, run: dict, shards_sha256: str | None) -> list[str]:
    """What a command asks differently from the finished run in ``run`` (run.json).

    Settings not given now are taken from the run (as when an interrupted run continues), so
    only the explicit ones can differ; and the shards (their manifest's sha256)."""
    recorded = run.get("settings", {})
    now = settings.run_settings()
    out = [f"--{k.replace('_', '-')} {recorded[k]} (now {now[k]})" for k in settings.explicit
           if k in now and k in recorded and now[k] != recorded[k]]
    before = run.get("shards_manifest_sha256")
    if shards_sha256 and before and shards_sha256 != before:
        out.append(f"other shards (manifest sha256 {shards_sha256[:12]}, the run's {before[:12]})")
    return out


def plan_run(settings: TrainSettings, tokenizer, state: RunState, model_dir: str,
             shards_sha256: str | None = None) -> Plan:
    """Fresh run, continuation of an interrupted run, --resume, or nothing to do; with clear refusals."""
    from midiforge.model.lstm import ModelConfig

    if state.run is None:
        if state.foreign:
            raise MidiforgeError(f"{model_dir}: not empty and not a midiforge training output "
                                 f"(e.g. {state.foreign[0]}); choose an empty or new MODEL_DIR")
        if settings.resume:
            raise MidiforgeError(f"{model_dir}: nothing to resume (no run.json); drop --resume to start a new run")
        cfg = ModelConfig(vocab_size=tokenizer.vocab_size, embedding_dim=settings.embedding_dim,
                          lstm_units=settings.lstm_units, dropout=settings.dropout, tokenizer_id=tokenizer.id)
        return Plan(settings, cfg, 0, None, True, 0)

    run = state.run
    where = f"{model_dir.rstrip('/')}/{RUN}"
    cfg = ModelConfig.from_dict(run["model"], where)
    if cfg.tokenizer_id != tokenizer.id:
        raise MidiforgeError(
            f"{settings.shards}: tokenizer {tokenizer.id} differs from the tokenizer {cfg.tokenizer_id} of the model in "
            f"{model_dir}; its vocabulary and weights would not match these shards. Train a new model in another "
            f"MODEL_DIR, or preprocess with the model's tokenizer.json")
    if cfg.vocab_size != tokenizer.vocab_size:
        raise MidiforgeError(f"{model_dir}: model vocab_size {cfg.vocab_size} != the shards' {tokenizer.vocab_size}")
    # the data a run continues on is the data it was trained on: the shards' manifest.json, by its sha256 (the same
    # shards at another URI, e.g. copied to S3, are the same data; other data would make the run's metrics and
    # checkpoints a mix of two corpora)
    before = run.get("shards_manifest_sha256")
    if shards_sha256 and before and shards_sha256 != before:
        raise MidiforgeError(
            f"{model_dir}: the run was trained on the shards {run.get('shards')} (manifest sha256 {before[:12]}), "
            f"not {settings.shards} (manifest sha256 {shards_sha256[:12]}); a run continues only on its own shards "
            f"(the same shards at another URI are accepted). Train on these in another MODEL_DIR")
    for key in MODEL_KEYS:
        if key in settings.explicit and getattr(cfg, key) != getattr(settings, key):
            raise MidiforgeError(f"{model_dir}: holds a model with {key}={getattr(cfg, key)}, you asked for "
                                 f"{getattr(settings, key)}; a model's shape cannot change (use a new MODEL_DIR)")
    done = False
    if state.finished and not settings.resume:
        differ = finished_run_differences(settings, run, shards_sha256)
        if differ:
            raise MidiforgeError(f"{model_dir}: already holds a finished model ({state.epochs_done} epochs) trained "
                                 f"with other settings: {'; '.join(differ)}. Pass --resume to train it further (to "
                                 f"--epochs), or choose another MODEL_DIR")
        done = True   # the same command again (e.g. a requeued job): nothing to do
    # continue with the run's settings except what was given explicitly now
    previous = dict(run.get("settings", {}))
    merged = {k: previous[k] for k in previous if k in DEFAULTS and k not in settings.explicit}
    merged.update({k: cfg.to_dict()[k] for k in MODEL_KEYS})
    new = replace(settings, **merged)
    latest = max((c for c in state.index["checkpoints"]), key=lambda c: c["epoch"], default=None)
    return Plan(new, cfg, int(latest["epoch"]) if latest else 0, latest["path"] if latest else None, False,
                int(run.get("starts", 0)), done)


class RunWriter:
    """The chief's writes to MODEL_DIR: run.json, metrics.jsonl, checkpoints, index, TensorBoard, manifest."""

    def __init__(self, store: Store, plan: Plan, state: RunState, shards, tb_local: str, *,
                 num_workers: int, steps_per_epoch: int) -> None:
        self.store = store
        self.plan = plan
        self.settings = plan.settings
        self.shards = shards
        self.metrics = list(state.metrics)
        self.index = state.index
        self.tb_local = tb_local
        self.num_workers = num_workers
        self.steps_per_epoch = steps_per_epoch
        self.summaries = None
        self.tb_uploaded: dict[str, int] = {}

    # -- run.json --
    def start(self, membership, num_workers: int) -> None:
        run = {"format": "midiforge-run", "model": self.plan.config.to_dict(), "tokenizer": self.shards.tokenizer.id,
               "settings": self.settings.run_settings(), "shards": self.settings.shards,
               "shards_manifest_sha256": self.shards.manifest_sha256, "workers": num_workers,
               "membership": membership.source,
               "cluster": membership.tf_config["cluster"] if membership.tf_config else None,
               "starts": self.plan.starts + 1, "updated": _now(), "status": "running"}
        self.store.write_bytes(RUN, (json.dumps(run, indent=1) + "\n").encode())
        if not self.plan.fresh and self.store.exists("manifest.json"):
            self.store.delete("manifest.json")  # the output is incomplete again until this run finishes
        self.run = run

    def training_info(self, epoch: int, logs: dict | None) -> dict:
        import tensorflow as tf

        import midiforge

        s = self.settings
        info = {
            "epochs_done": epoch, "epochs_requested": s.epochs, "seq_len": s.seq_len, "batch_size": s.batch_size,
            "learning_rate": s.learning_rate, "clipnorm": s.clipnorm, "class_weighting": s.class_weighting,
            "mixed_precision": s.mixed_precision, "seed": s.seed, "steps_per_epoch": self.steps_per_epoch,
            "workers": self.num_workers, "tokenizer": self.shards.tokenizer.id,
            "tokenizer_kind": self.shards.tokenizer.kind, "qpm_median": self.shards.qpm_median,
            "shards": s.shards, "shards_manifest_sha256": self.shards.manifest_sha256,
            "train_tokens": self.shards.tokens("train"), "validation_tokens": self.shards.tokens("validation"),
            "midiforge_version": getattr(midiforge, "__version__", "0.1.0"), "tensorflow_version": tf.__version__,
            "time": _now(),
        }
        for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
            if logs and k in logs:
                info[k] = logs[k]
        return info

    # -- per epoch (chief) --
    def epoch_done(self, epoch: int, logs: dict, info: dict, weights: bytes | None, optimizer: bytes | None) -> None:
        s = self.settings
        record = {"epoch": epoch, "loss": logs.get("loss"), "accuracy": logs.get("accuracy"),
                  "val_loss": logs.get("val_loss"), "val_accuracy": logs.get("val_accuracy"),
                  "tokens_per_second": round(logs.get("tokens_per_second", 0.0), 1), "steps": info["steps"],
                  "train_seconds": round(info["train_seconds"], 3), "seconds": round(info["seconds"], 3),
                  "global_batch": s.batch_size, "seq_len": s.seq_len, "workers": self.num_workers, "time": _now()}
        if weights is not None:
            self.write_checkpoint(epoch, logs, weights, optimizer)
        self.metrics = [m for m in self.metrics if int(m["epoch"]) != epoch] + [record]
        self.metrics.sort(key=lambda m: int(m["epoch"]))
        self.store.write_bytes(METRICS, "".join(json.dumps(m) + "\n" for m in self.metrics).encode())
        self.write_summaries(epoch, logs)

    def write_summaries(self, epoch: int, logs: dict) -> None:
        from midiforge.model.training import Summaries

        if self.summaries is None:
            self.summaries = Summaries(self.tb_local)
        self.summaries.write(epoch, logs)
        if not isinstance(self.store, LocalStore):
            root = Path(self.tb_local)
            for p in sorted(root.rglob("*")):
                if p.is_file() and self.tb_uploaded.get(str(p)) != p.stat().st_size:
                    self.store.put_file(p, f"tensorboard/{p.relative_to(root).as_posix()}")
                    self.tb_uploaded[str(p)] = p.stat().st_size

    def write_checkpoint(self, epoch: int, logs: dict, weights: bytes, optimizer: bytes | None) -> None:
        from midiforge.model.bundle import INDEX, OPTIMIZER, checkpoint_dir
        from midiforge.pipeline.bundles import write_bundle
        from midiforge.storage.manifest import sha256_hex

        path = checkpoint_dir(epoch)
        manifest = write_bundle(self.store, path, config=self.plan.config, tokenizer_json=self.shards.tokenizer_json,
                                training=self.training_info(epoch, logs), weights=weights,
                                extra={OPTIMIZER: optimizer} if optimizer is not None else None)
        entries = [c for c in self.index["checkpoints"] if int(c["epoch"]) != epoch]
        entries.append({"epoch": epoch, "val_loss": logs.get("val_loss"), "val_accuracy": logs.get("val_accuracy"),
                        "path": path, "sha256": sha256_hex(manifest)})
        entries.sort(key=lambda c: c["epoch"])
        scored = [c for c in entries if c.get("val_loss") is not None]
        best = min(scored, key=lambda c: (c["val_loss"], -c["epoch"]))["epoch"] if scored else None
        keep = {c["epoch"] for c in entries[-self.settings.keep:]} | ({best} if best is not None else set())
        dropped = [c for c in entries if c["epoch"] not in keep]
        entries = [c for c in entries if c["epoch"] in keep]
        self.index = {"checkpoints": entries, "best": best, "latest": entries[-1]["epoch"]}
        self.store.write_bytes(INDEX, (json.dumps(self.index, indent=1) + "\n").encode())
        for c in dropped:
            for o in self.store.list(c["path"] + "/"):
                if o.path.endswith("/manifest.json"):
                    continue
                self.store.delete(o.path)
            self.store.delete(c["path"] + "/manifest.json")

    def stopped(self, info: dict) -> None:
        """run.json says where a stopped run stopped (the next start sets it running again)."""
        sig = signal.Signals(info["signal"]).name if info.get("signal") else None
        self.run.update(status="stopped", updated=_now(),
                        stopped={"signal": sig, "epoch": info["epoch"], "step": info.get("step"),
                                 "backup": bool(info.get("backup"))})
        self.store.write_bytes(RUN, (json.dumps(self.run, indent=1) + "\n").encode())

    # -- the end --
    def finish(self, weights: bytes, seconds: float) -> dict:
        from midiforge.model.bundle import FINAL_DIR
        from midiforge.pipeline.bundles import write_bundle
        from midiforge.storage.manifest import sha256_hex

        epochs = self.settings.epochs
        last = next((m for m in self.metrics if int(m["epoch"]) == epochs), {})
        logs = {k: last.get(k) for k in ("loss", "accuracy", "val_loss", "val_accuracy") if last.get(k) is not None}
        manifest = write_bundle(self.store, FINAL_DIR, config=self.plan.config,
                                tokenizer_json=self.shards.tokenizer_json,
                                training=self.training_info(epochs, logs), weights=weights)
        if self.summaries is not None:
            self.summaries.close()
        for o in self.store.list(f"{BACKUP_PREFIX}/"):
            self.store.delete(o.path)
        if isinstance(self.store, LocalStore):
            shutil.rmtree(self.store.path(BACKUP_PREFIX), ignore_errors=True)
        self.run.update(status="finished", updated=_now(), epochs_done=epochs)
        self.run.pop("stopped", None)
        self.store.write_bytes(RUN, (json.dumps(self.run, indent=1) + "\n").encode())
        top = self.write_manifest(epochs, sha256_hex(manifest), seconds)
        return {"model_dir": self.store.uri, "epochs": epochs, "bundle_sha256": sha256_hex(manifest),
                "manifest_files": len(top["files"]), **logs,
                "tokens_per_second": last.get("tokens_per_second")}

    def write_manifest(self, epochs: int, bundle_sha: str, seconds: float) -> dict:
        from midiforge.storage.manifest import file_entry, write_manifest

        objects = [o for o in self.store.list() if o.path != "manifest.json" and not o.path.startswith(f"{BACKUP_PREFIX}/")]
        known: dict[str, dict] = {}
        for o in objects:
            if o.path.endswith("/manifest.json") and (o.path.startswith("bundle/") or o.path.startswith("checkpoints/")):
                prefix = o.path[: -len("manifest.json")]
                sub = read_json(self.store, o.path, "a bundle manifest")
                for e in sub.get("files", []):
                    known[prefix + e["path"]] = {"path": prefix + e["path"], "bytes": e["bytes"], "sha256": e["sha256"]}
        files = []
        for o in objects:
            files.append(known.get(o.path) or file_entry(o.path, self.store.read_bytes(o.path)))
        manifest = {"format": "midiforge-train", "stage": "train", "epochs": epochs, "bundle": "bundle",
                    "bundle_sha256": bundle_sha, "tokenizer": self.shards.tokenizer.id,
                    "best_epoch": self.index.get("best"), "seconds": round(seconds, 3), "files": files}
        write_manifest(self.store, manifest)
        return manifest


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
    write_manifest(store, {"format": "midiforge-backup", "time": _now(), "files": files},
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


def _run_training(settings: TrainSettings | dict, membership: str | None, keep_model: bool,
                  signals: StopSignals) -> dict:
    from midiforge.model.lstm import tf_keras

    if isinstance(settings, dict):
        settings = TrainSettings.from_dict(settings)
    started = time.time()
    tf, keras = tf_keras()
    from midiforge.model import data as D
    from midiforge.model import training as T
    from midiforge.pipeline import membership as M

    member = M.resolve(membership or settings.membership, port_base=settings.port_base or None)
    M.apply(member)
    is_chief, rank, workers = member.is_chief, member.worker_rank, member.num_workers
    log = _logger(is_chief)
    log(f"midiforge train: {member.describe()}")

    options = settings.storage_options()
    from midiforge.pipeline import tokens

    shards = tokens.open_shards(settings.shards, options, settings.cache_dir or None)
    store = open_store(settings.model_dir, options)
    state = inspect_model_dir(store)
    plan = plan_run(settings, shards.tokenizer, state, settings.model_dir, shards.manifest_sha256)
    s = plan.settings
    if plan.done or (not plan.fresh and state.finished and s.epochs <= state.epochs_done):
        log(f"{settings.model_dir}: already holds this finished model ({state.epochs_done} epochs, --epochs "
            f"{s.epochs}); nothing to do")
        return {"model_dir": store.uri, "epochs": state.epochs_done, "is_chief": is_chief, "nothing_to_do": True}

    # ---- the cluster ----
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    signals.install()   # again: the strategy's server installed TensorFlow's own SIGTERM handler
    replicas = strategy.num_replicas_in_sync
    if s.batch_size % replicas:
        raise MidiforgeError(f"--batch-size {s.batch_size} is not divisible by the {replicas} replicas")

    # ---- data: steps and per-worker assignment ----
    train_files, train_shard = D.assign(shards.files, "train", rank, workers)
    val_files, val_shard = D.assign(shards.files, "validation", rank, workers)
    train_windows = D.count_windows(shards.tokens("train"), s.seq_len)
    val_windows = D.count_windows(shards.tokens("validation"), s.seq_len)
    if train_windows < 1:
        raise MidiforgeError(f"{settings.shards}: {shards.tokens('train')} training tokens do not fill one window "
                             f"of {s.seq_len + 1}; use a smaller --seq-len")
    _check_worker_windows(shards, val_files, val_shard, "validation", s.seq_len, rank, settings.shards)
    _check_worker_windows(shards, train_files, train_shard, "train", s.seq_len, rank, settings.shards)
    steps = s.steps_per_epoch or max(1, train_windows // s.batch_size)
    val_steps = s.validation_steps or min(MAX_VALIDATION_STEPS, max(1, -(-val_windows // s.batch_size)))
    weights_vec = None
    if s.class_weighting != "none":
        counts = D.token_counts(shards.reader("train"), shards.tokenizer.vocab_size)
        weights_vec = D.class_weights(counts, s.class_weighting, s.class_weight_max)

    # ---- backups: every worker prepares its view before anyone writes ----
    backup_dir, mirrored, has_backup = (None, False, False)
    if s.backup_every != "off":
        backup_dir, mirrored = backup_location(s, store, rank)
        if mirrored:
            shutil.rmtree(backup_dir, ignore_errors=True)   # the object store holds the truth
            if not plan.fresh and state.remote_backup:
                download_backup(store, backup_dir)
        elif plan.fresh and is_chief:
            shutil.rmtree(os.path.join(backup_dir, "chief"), ignore_errors=True)  # stale state of a removed run
        has_backup = not plan.fresh and os.path.exists(os.path.join(backup_dir, "chief", "checkpoint"))
        if has_backup:
            log(f"continuing from the backup in {store.url(BACKUP_PREFIX) if mirrored else backup_dir} "
                f"(the epoch and step where the last run stopped)")

    # ---- model ----
    with strategy.scope():
        model = T.compile_model(plan.config, learning_rate=s.learning_rate, clipnorm=s.clipnorm,
                                mixed_precision=s.mixed_precision)
    if plan.restore_checkpoint:
        from midiforge.model.bundle import OPTIMIZER, WEIGHTS

        ck = plan.restore_checkpoint
        cmanifest = read_json(store, f"{ck}/manifest.json", "the checkpoint manifest")
        entries = {e["path"]: e for e in cmanifest["files"]}
        w = store.read_verified(f"{ck}/{WEIGHTS}", entries[WEIGHTS])
        o = store.read_verified(f"{ck}/{OPTIMIZER}", entries[OPTIMIZER]) if OPTIMIZER in entries else None
        T.restore_state(model, w, o, store.url(ck))
        if not has_backup:
            log(f"continuing from {store.url(ck)} (epoch {plan.initial_epoch})")
    T.barrier(strategy)  # nobody writes before every worker has read MODEL_DIR

    tb_local = (str(store.path("tensorboard")) if isinstance(store, LocalStore) else
                os.path.join(s.cache_dir or D.default_cache_dir(), "tensorboard", D.fingerprint(store.uri),
                             f"start-{plan.starts + 1}"))
    writer = RunWriter(store, plan, state, shards, tb_local, num_workers=workers, steps_per_epoch=steps)
    if is_chief:
        writer.start(member, workers)

    # ---- input pipelines ----
    seed = [s.seed, plan.starts]

    def train_fn(ctx):
        return D.make_dataset(shards.reader("train", train_files), seq_len=s.seq_len,
                              batch_size=ctx.get_per_replica_batch_size(s.batch_size), shard=train_shard, seed=seed + ([rank] if train_shard is None else []),
                              shuffle_buffer=s.shuffle_buffer, weights=weights_vec)

    def val_fn(ctx):
        return D.make_dataset(shards.reader("validation", val_files), seq_len=s.seq_len,
                              batch_size=ctx.get_per_replica_batch_size(s.batch_size), shard=val_shard, take=val_steps)

    train_ds = strategy.distribute_datasets_from_function(train_fn)
    val_ds = strategy.distribute_datasets_from_function(val_fn)

    # ---- callbacks ----
    final_epoch = s.epochs

    def on_epoch_done(epoch: int, logs: dict, info: dict) -> None:
        ckpt = epoch % s.checkpoint_every == 0 or epoch == final_epoch
        w = T.weights_bytes(model) if ckpt else None
        o = T.optimizer_bytes(model.optimizer) if ckpt else None
        if is_chief:
            writer.epoch_done(epoch, logs, info, w, o)

    callbacks = [T.Monitor(s.batch_size * s.seq_len, on_epoch_done)]
    backup = None
    if backup_dir:
        uploaded: dict = {}
        after = (lambda: upload_backup(store, backup_dir, uploaded)) if (mirrored and is_chief) else None
        freq = "epoch" if s.backup_every == "epoch" else int(s.backup_every)
        backup = T.make_backup(backup_dir, freq, steps, after)
        callbacks.append(backup)

    def on_stop(info: dict) -> None:
        if is_chief:
            writer.stopped(info)
        if workers > 1:
            T.barrier(strategy)   # everyone's backup (and the chief's mirror of it) is complete
        raise TrainingStopped(info)

    if signals.active:
        callbacks.append(T.GracefulStop(signals.requested, rank=rank, workers=workers, steps_per_epoch=steps,
                                        backup=backup, on_stop=on_stop))
    verbose = 0
    if is_chief and s.progress != "none":
        verbose = 1 if s.progress == "bar" or (s.progress == "auto" and sys.stdout.isatty()) else 2
    log(f"training {plan.config.parameters:,} parameters, {steps} steps/epoch x {s.batch_size} windows x "
        f"{s.seq_len} tokens, {val_steps} validation steps, epochs {plan.initial_epoch + 1}..{s.epochs}")
    model.fit(train_ds, epochs=s.epochs, initial_epoch=plan.initial_epoch, steps_per_epoch=steps,
              validation_data=val_ds, validation_steps=val_steps, callbacks=callbacks, verbose=verbose)

    # ---- the bundle ----
    final_weights = T.weights_bytes(model)
    result = {"model_dir": store.uri, "is_chief": is_chief, "epochs": s.epochs}
    if is_chief:
        result.update(writer.finish(final_weights, time.time() - started))
    result["seconds"] = round(time.time() - started, 3)
    T.barrier(strategy)  # non-chief workers leave only after the bundle exists
    if keep_model:
        result["model"] = model
    return result


def _check_worker_windows(shards, paths, shard, split, seq_len, rank, uri) -> None:
    from midiforge.model.data import count_windows

    tokens = sum(f.tokens[split] for f in shards.files if f.local in set(paths))
    n = count_windows(tokens, seq_len)
    if shard is not None:
        n = len(range(shard[0], n, shard[1]))
    if n < 1:
        raise MidiforgeError(f"{uri}: the {split} split is too small for worker {rank} ({tokens} tokens, not one "
                             f"window of {seq_len + 1}); use a smaller --seq-len or fewer workers")


def _logger(is_chief: bool):
    def log(msg: str) -> None:
        if is_chief:
            print(msg, file=sys.stderr, flush=True)
    return log

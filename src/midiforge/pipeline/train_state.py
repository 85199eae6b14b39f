"""What MODEL_DIR holds when ``midiforge train`` starts, and the plan made from it.

:func:`inspect_model_dir` reads run.json, the checkpoint index, metrics.jsonl and the backup
mirror (every worker, before anyone writes); :func:`plan_run` decides between a fresh run, the
continuation of an interrupted run, ``--resume`` and nothing to do, with clear refusals.
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field, replace

from midiforge.errors import MidiforgeError
from midiforge.pipeline.train_settings import DEFAULTS, MODEL_KEYS, TrainSettings
from midiforge.storage.manifest import read_json
from midiforge.storage.store import Store, open_store

RUN = "run.json"
METRICS = "metrics.jsonl"
BACKUP_PREFIX = "backup"


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


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


def read_metrics(store) -> list[dict]:
    """The records of MODEL_DIR's metrics.jsonl, one per epoch (none when it has no such file)."""
    return _parse_metrics(store.read_bytes(METRICS), store.url(METRICS)) if store.exists(METRICS) else []


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

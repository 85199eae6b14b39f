"""The chief's writes to MODEL_DIR during ``midiforge train``: run.json, metrics.jsonl, checkpoints
and their index, TensorBoard files, the final bundle and the top manifest (layout in
:mod:`midiforge.model.bundle`)."""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

from midiforge.pipeline.train_state import (
    BACKUP_PREFIX,
    METRICS,
    RUN,
    Plan,
    RunState,
    utc_now,
)
from midiforge.storage.manifest import read_json
from midiforge.storage.store import LocalStore, Store


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
               "starts": self.plan.starts + 1, "updated": utc_now(), "status": "running"}
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
            "time": utc_now(),
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
                  "global_batch": s.batch_size, "seq_len": s.seq_len, "workers": self.num_workers, "time": utc_now()}
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
        self.run.update(status="stopped", updated=utc_now(),
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
        self.run.update(status="finished", updated=utc_now(), epochs_done=epochs)
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

"""midiforge train: real TensorFlow worker processes on 127.0.0.1, a real S3 server, real bundles.

The end-to-end tests spawn ``python -m midiforge.cli train`` processes (tiny models, a few
steps per epoch) so that MultiWorkerMirroredStrategy, BackupAndRestore and the kill/resume
path run exactly as in production.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from midiforge.errors import MidiforgeError
from midiforge.model.data import assign, class_weights, window_chunks
from midiforge.pipeline.tokens import open_shards
from midiforge.pipeline import membership as M
from midiforge.storage import open_store, verify_store

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import SMALL, consecutive_free_ports, epochs_in, free_ports, make_shards, worker_env  # noqa: E402

METRIC_KEYS = {"epoch", "loss", "val_loss", "val_accuracy", "tokens_per_second"}
_env = worker_env
_free_ports = free_ports
_consecutive_free_ports = consecutive_free_ports
_epochs = epochs_in


def _train(args: list[str], *, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "midiforge.cli", "train", *args], env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("shards") / "events"
    make_shards(str(dest), pieces=40, files=2)
    return dest


# ---------------------------------------------------------------------------------------------
# membership (pure)
# ---------------------------------------------------------------------------------------------
def test_membership_from_nothing_tf_config_and_slurm():
    assert M.resolve("auto", {}).tf_config is None
    assert M.resolve("auto", {}).is_chief and M.resolve("auto", {}).num_workers == 1
    cfg = M.tf_config_for(["127.0.0.1:1", "127.0.0.1:2"], 1)
    m = M.resolve("auto", {"TF_CONFIG": json.dumps(cfg)})
    assert (m.source, m.num_workers, m.worker_rank, m.is_chief) == ("tf_config", 2, 1, False)
    chiefed = {"cluster": {"chief": ["h:1"], "worker": ["h:2", "h:3"]}, "task": {"type": "worker", "index": 0}}
    m = M.resolve("auto", {"TF_CONFIG": json.dumps(chiefed)})
    assert (m.num_workers, m.worker_rank, m.is_chief) == (3, 1, False)
    with pytest.raises(MidiforgeError, match="task index"):
        M.resolve("auto", {"TF_CONFIG": json.dumps({"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 3}})})

    assert M.expand_hostlist("node[01-03,07],gpu-a[1-2]") == ["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]
    assert M.expand_tasks_per_node("2(x2),1") == [2, 2, 1]
    slurm = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4",
             "SLURM_STEP_NODELIST": "cn[1-2]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_NTASKS": "4"}
    m = M.resolve("auto", slurm, port_base=5000)
    assert m.source == "slurm"
    assert m.tf_config == {"cluster": {"worker": ["cn1:5000", "cn1:5001", "cn2:5000", "cn2:5001"]},
                           "task": {"type": "worker", "index": 3}}
    cyclic = {**slurm, "SLURM_DISTRIBUTION": "cyclic", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    assert M.resolve("slurm", cyclic, port_base=5000).tf_config["cluster"]["worker"] == \
        ["cn1:5000", "cn2:5000", "cn1:5001", "cn2:5001"]
    # sbatch's batch step (no srun): one local worker, not a cluster waiting for absent peers
    assert M.resolve("auto", {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}).tf_config is None
    with pytest.raises(MidiforgeError, match="SLURM_LOCALID"):
        M.resolve("slurm", {**slurm, "SLURM_LOCALID": "0"})
    env: dict = {}
    M.apply(M.resolve("slurm", slurm), env)
    assert json.loads(env["TF_CONFIG"])["task"]["index"] == 3


# ---------------------------------------------------------------------------------------------
# data (pure)
# ---------------------------------------------------------------------------------------------
def test_windows_have_a_target_at_every_position_and_shard_exactly(shards):
    s = open_shards(str(shards))
    paths, by_window = assign(s.files, "validation", 0, 1)
    assert by_window is None
    val = s.reader("validation", paths)
    wins = np.concatenate(list(window_chunks(val, 16)))
    assert wins.shape[1] == 17
    # consecutive windows overlap by one token: the stream is cut once, every token is a target once
    assert (wins[1:, 0] == wins[:-1, -1]).all()
    assert len(wins) == (s.tokens("validation") - 1) // 16
    # two workers by window (fewer files than workers would need): disjoint, complete
    parts = [np.concatenate(list(window_chunks(val, 16, shard=(i, 2)))) for i in range(2)]
    assert len(parts[0]) + len(parts[1]) == len(wins)
    assert {w.tobytes() for w in parts[0]} | {w.tobytes() for w in parts[1]} == {w.tobytes() for w in wins}
    # training passes reshuffle but keep every window well formed
    shuffled = np.concatenate(list(window_chunks(val, 16, seed=[1, 2])))
    assert shuffled.shape[1] == 17 and not np.array_equal(shuffled[:5], wins[:5])
    by_file = [assign(s.files, "train", i, 2) for i in range(2)]
    assert by_file[0][1] is None and set(by_file[0][0]).isdisjoint(by_file[1][0])


def test_class_weights_lift_rare_tokens_and_keep_the_loss_scale():
    counts = np.array([0, 1000, 10, 1, 0, 500], dtype=np.int64)
    w = class_weights(counts, "sqrt", max_weight=50)
    seen = counts > 0
    assert abs((counts[seen] * w[seen]).sum() / counts[seen].sum() - 1) < 1e-5
    assert w[3] > w[2] > w[5] > w[1]
    assert (class_weights(counts, "none") == 1).all()
    assert class_weights(counts, "inverse", max_weight=5).max() <= 5


# ---------------------------------------------------------------------------------------------
# settings (pure)
# ---------------------------------------------------------------------------------------------
def _parse_train_flags(argv: list[str]):
    import argparse

    from midiforge.pipeline import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return train.settings_from_args(parser.parse_args(argv))


def test_s3_retry_seconds_reaches_the_training_storage_options(monkeypatch):
    from midiforge.pipeline.train_settings import TrainSettings

    monkeypatch.delenv("MIDIFORGE_S3_RETRY_SECONDS", raising=False)
    s = _parse_train_flags(["shards", "model", "--s3-retry-seconds", "7.5", "--s3-max-attempts", "2"])
    options = s.storage_options()
    assert (options.retry_seconds, options.max_attempts) == (7.5, 2)
    assert TrainSettings.from_dict(s.to_dict()).storage_options().retry_seconds == 7.5   # as Ray workers get it
    assert "s3_retry_seconds" not in s.run_settings()    # not a training setting: run.json does not record it
    monkeypatch.setenv("MIDIFORGE_S3_RETRY_SECONDS", "3")   # no flag: the environment, as for the other stages
    assert _parse_train_flags(["shards", "model"]).storage_options().retry_seconds == 3.0
    with pytest.raises(MidiforgeError, match="--s3-retry-seconds"):
        TrainSettings("shards", "model", s3_retry_seconds=-1)


def test_flag_help_shows_the_settings_defaults():
    import argparse

    from midiforge.pipeline import train
    from midiforge.pipeline.train_settings import DEFAULTS, TrainSettings

    defaults = TrainSettings("shards", "model")
    assert DEFAULTS and all(getattr(defaults, k) == v for k, v in DEFAULTS.items())
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions}
    assert f"(default {DEFAULTS['epochs']})" in helps["epochs"]
    assert "(default 256,256)" in helps["lstm_units"] and "default off" in helps["mixed_precision"]
    assert all(a.default is None for a in parser._actions if a.dest in DEFAULTS)   # unset flags: not "explicit"


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
def test_single_worker_without_configuration(shards, tmp_path):
    from midiforge.pipeline.bundles import list_checkpoints, load_bundle

    config = tmp_path / "train.toml"
    config.write_text('epochs = 3\nseq-len = 32\nbatch_size = 8\nlstm_units = "32"\nembedding_dim = 16\n'
                      'steps_per_epoch = 8\nvalidation_steps = 3\n[train]\nclass_weighting = "sqrt"\n')
    out = tmp_path / "model"
    args = [str(shards), str(out), "--config", str(config), "--epochs", "1", "--cache-dir", str(tmp_path / "cache")]
    r = _train(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "one local worker" in r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 1  # the flag beat the config file's 3

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1] and METRIC_KEYS <= set(lines[0])
    assert lines[0]["tokens_per_second"] > 0 and lines[0]["steps"] == 8
    assert list((out / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert verify_store(open_store(str(out))).ok

    b = load_bundle(str(out))
    assert b.config.lstm_units == (32,) and b.config.embedding_dim == 16   # from the config file
    manifest = json.loads((shards / "manifest.json").read_text())
    assert b.training["seq_len"] == 32 and b.training["class_weighting"] == "sqrt"
    assert b.training["qpm_median"] == manifest["qpm_median"] and b.tokenizer.id == manifest["tokenizer"]
    import hashlib
    assert b.sha256 == hashlib.sha256((out / "bundle" / "manifest.json").read_bytes()).hexdigest()
    assert [c["epoch"] for c in list_checkpoints(str(out))] == [1]
    assert load_bundle(str(out), checkpoint="best").checkpoint == "epoch-0001"

    # the same command again (a requeued job): nothing to do, exit 0, nothing rewritten
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    again = _train(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already holds this finished model (1 epochs" in again.stderr and "nothing to do" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["nothing_to_do"] is True
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before
    # the same with a setting the run did not have: refused, naming it
    other_lr = _train(args + ["--learning-rate", "0.01"])
    assert other_lr.returncode == 2
    assert "already holds a finished model" in other_lr.stderr and "--learning-rate 0.002 (now 0.01)" in other_lr.stderr
    more = _train([*args[:-2], "--epochs", "2", *args[-2:]])
    assert more.returncode == 2 and "--epochs 1 (now 2)" in more.stderr and "--resume" in more.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before
    # other data, other tokenizer: refused with the reason
    other = tmp_path / "classic"
    make_shards(str(other), pieces=20, files=1, tokenizer="classic")
    mismatch = _train([str(other), str(out), "--resume", "--epochs", "2", "--cache-dir", str(tmp_path / "cache")])
    assert mismatch.returncode == 2
    assert "differs from the tokenizer" in mismatch.stderr and b.tokenizer.id in mismatch.stderr

    # a damaged bundle file is named before anything is loaded
    weights = out / "bundle" / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(MidiforgeError, match="model.weights.h5"):
        load_bundle(str(out))


def test_two_workers_one_killed_then_resumed_with_exact_epochs(shards, tmp_path):
    """Attempt 1 (TF_CONFIG) loses worker 1 to SIGKILL mid-training; attempt 2 (the same
    command, membership from SLURM_* as under srun) finishes with every epoch exactly once."""
    from midiforge.pipeline.bundles import load_bundle

    out = tmp_path / "model"
    epochs = 4

    def start(attempt: int, launcher: str) -> list[subprocess.Popen]:
        procs = []
        if launcher == "tf_config":
            workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
            envs = [_env(TF_CONFIG=json.dumps(M.tf_config_for(workers, i))) for i in range(2)]
        else:  # what srun gives two tasks on one node; TF_CONFIG is built from it
            base = _consecutive_free_ports(2)
            envs = [_env(SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2",
                         SLURM_STEP_NODELIST="127.0.0.1", SLURM_STEP_TASKS_PER_NODE="2",
                         MIDIFORGE_PORT_BASE=str(base)) for i in range(2)]
        for i in range(2):
            log = open(tmp_path / f"attempt{attempt}-worker{i}.log", "w")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "midiforge.cli", "train", str(shards), str(out), "--epochs", str(epochs),
                 *SMALL, "--backup-every", "3", "--mixed-precision", "--cache-dir", str(tmp_path / f"cache{i}")],
                env=envs[i], stdout=log, stderr=subprocess.STDOUT))
        return procs

    def stop(procs, deadline: float) -> list[int | None]:
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=30)
                codes.append(None)
        return codes

    # attempt 1: kill worker 1 (not the chief) with SIGKILL once the first epoch is recorded
    procs = start(1, "tf_config")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not _epochs(out / "metrics.jsonl") and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    assert _epochs(out / "metrics.jsonl"), (tmp_path / "attempt1-worker0.log").read_text()[-3000:]
    time.sleep(1.0)
    procs[1].send_signal(signal.SIGKILL)
    stop(procs, time.monotonic() + 60)  # the chief notices the lost peer and stops; else it is killed
    done_before = _epochs(out / "metrics.jsonl")
    assert not (out / "manifest.json").exists(), "the job finished before the kill: make it longer"
    assert max(done_before) < epochs

    # attempt 2: the very same command on both workers, this time launched as by Slurm's srun
    procs = start(2, "slurm")
    codes = stop(procs, time.monotonic() + 240)
    chief_log = (tmp_path / "attempt2-worker0.log").read_text()
    assert codes == [0, 0], chief_log[-3000:]
    assert "worker 0 of 2 workers (from slurm), chief" in chief_log
    assert _epochs(out / "metrics.jsonl") == list(range(1, epochs + 1))   # every epoch once
    first = int(chief_log.split("Epoch ", 1)[1].split("/", 1)[0])
    assert first >= max(done_before), f"restarted at epoch {first} after {done_before} were done"
    assert "Epoch 1/" not in chief_log
    run = json.loads((out / "run.json").read_text())
    assert run["workers"] == 2 and run["starts"] == 2 and run["status"] == "finished"
    b = load_bundle(str(out))
    assert b.training["epochs_done"] == epochs and b.training["workers"] == 2
    assert verify_store(open_store(str(out))).ok
    assert not (out / "backup").exists()


def test_s3_bundle_reloads_to_identical_predictions_and_resumes_from_s3(s3_server, tmp_path):
    from midiforge.pipeline.bundles import list_checkpoints, load_bundle

    bucket = s3_server.new_bucket()
    options = s3_server.options()
    make_shards(f"{bucket}/shards", pieces=30, files=2, options=options)
    model_uri = f"{bucket}/model"
    x = np.random.default_rng(0).integers(4, 200, size=(2, 24)).astype(np.int32)
    np.save(tmp_path / "x.npy", x)
    # train in a worker process and keep the in-memory model's predictions
    script = f"""
import json, numpy as np
from midiforge.pipeline.train import TrainSettings, run_training
s = TrainSettings(shards={bucket + '/shards'!r}, model_dir={model_uri!r}, epochs=1, seq_len=32, batch_size=8,
                  lstm_units=(32,), embedding_dim=16, steps_per_epoch=8, validation_steps=3, progress="none",
                  endpoint_url={s3_server.endpoint_url!r}, cache_dir={str(tmp_path / 'cache-a')!r})
r = run_training(s, keep_model=True)
np.save({str(tmp_path / 'y.npy')!r}, r["model"](np.load({str(tmp_path / 'x.npy')!r}), training=False).numpy())
"""
    r = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    trained = np.load(tmp_path / "y.npy")

    b = load_bundle(model_uri, options=options)
    assert b.checkpoint == "final" and b.config.vocab_size == trained.shape[-1]
    assert np.array_equal(b.build()(x, training=False).numpy(), trained)
    # the stateful decoder (batch 2, one token per call) gives the same logits
    dec = b.build(batch_size=2, stateful=True, seq_len=1)
    steps = np.concatenate([dec(x[:, t:t + 1], training=False).numpy() for t in range(x.shape[1])], axis=1)
    np.testing.assert_allclose(steps, trained, rtol=1e-5, atol=1e-5)
    assert [c["epoch"] for c in list_checkpoints(model_uri, options)] == [1]
    assert load_bundle(model_uri, checkpoint=1, options=options).checkpoint == "epoch-0001"

    # --resume from object storage on "another machine" (an empty cache)
    r = _train([f"{bucket}/shards", model_uri, "--resume", "--epochs", "2", "--progress", "none",
                "--endpoint-url", s3_server.endpoint_url, "--cache-dir", str(tmp_path / "cache-b")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "continuing from" in r.stderr and "epoch 1" in r.stderr
    store = open_store(model_uri, options)
    assert [json.loads(x)["epoch"] for x in store.read_bytes("metrics.jsonl").decode().splitlines()] == [1, 2]
    b2 = load_bundle(model_uri, options=options)
    assert b2.training["epochs_done"] == 2 and b2.sha256 != b.sha256
    assert b2.config == b.config  # the model's shape came from the run, not from defaults
    assert verify_store(store).ok
    assert not store.list("backup/")

    # a replaced object is named, never used
    s3_server.client().put_object(Bucket=bucket[len("s3://"):], Key="model/bundle/model.weights.h5", Body=b"junk")
    with pytest.raises(MidiforgeError, match="model.weights.h5"):
        load_bundle(model_uri, options=options)


def test_ray_launcher_runs_the_same_training_function_on_two_ray_workers(shards, tmp_path):
    out = tmp_path / "model"
    r = _train([str(shards), str(out), "--launcher", "ray", "--num-workers", "2", "--epochs", "1", *SMALL,
                "--steps-per-epoch", "4", "--validation-steps", "2", "--cache-dir", str(tmp_path / "cache")],
               env=_env(RAY_ADDRESS=""), timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["epochs"] == 1
    run = json.loads((out / "run.json").read_text())
    assert [w.split(":")[0] for w in run["cluster"]["worker"]] == ["127.0.0.1"] * 2  # TF_CONFIG from Ray, loopback
    assert (run["workers"], run["membership"], run["status"]) == (2, "tf_config", "finished")
    assert _epochs(out / "metrics.jsonl") == [1] and json.loads((out / "metrics.jsonl").read_text())["steps"] == 4
    assert verify_store(open_store(str(out))).ok


def test_ray_only_options_need_the_ray_launcher(shards, tmp_path):
    r = _train([str(shards), str(tmp_path / "model"), "--num-workers", "2", "--max-failures", "1"], timeout=60)
    assert r.returncode == 2
    assert "--num-workers, --max-failures: only with --launcher ray" in r.stderr
    assert not (tmp_path / "model").exists()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_ray_launcher_with_max_failures_survives_a_killed_worker_with_exact_epochs(shards, tmp_path):
    """A Ray Train worker is SIGKILLed mid-training; Ray restarts the worker group (--max-failures 1),
    which continues from the backup: the run finishes with every epoch exactly once."""
    out, epochs = tmp_path / "model", 3
    cmd = [sys.executable, "-m", "midiforge.cli", "train", str(shards), str(out), "--launcher", "ray",
           "--num-workers", "2", "--max-failures", "1", "--epochs", str(epochs), *SMALL, "--backup-every", "3",
           "--cache-dir", str(tmp_path / "cache")]
    log = tmp_path / "driver.log"
    with open(log, "w") as fh:
        driver = subprocess.Popen(cmd, env=_env(RAY_ADDRESS=""), stdout=fh, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not _epochs(out / "metrics.jsonl") and driver.poll() is None:
            time.sleep(0.5)
        assert _epochs(out / "metrics.jsonl"), log.read_text()[-3000:]
        workers = sorted(p for p in _descendants(driver.pid) if "RayTrainWorker" in _cmdline(p))
        assert len(workers) == 2, [_cmdline(p) for p in _descendants(driver.pid)]
        os.kill(workers[-1], signal.SIGKILL)
        code = driver.wait(timeout=600)
    finally:
        if driver.poll() is None:   # failed: stop the driver and its local Ray (live descendants only)
            for pid in [*_descendants(driver.pid), driver.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            driver.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    assert _epochs(out / "metrics.jsonl") == list(range(1, epochs + 1))   # every epoch once
    run = json.loads((out / "run.json").read_text())
    assert (run["status"], run["starts"], run["workers"]) == ("finished", 2, 2)
    assert verify_store(open_store(str(out))).ok

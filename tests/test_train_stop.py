"""midiforge train as a batch job: stopping on SIGTERM/SIGUSR1, requeue-friendly exits, ports.

Real TensorFlow worker processes on 127.0.0.1 (MultiWorkerMirroredStrategy with TF_CONFIG),
signals sent with os.kill, the resumed run checked epoch by epoch.
"""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from midiforge.pipeline import membership as M
from midiforge.pipeline.train import STOP_EXIT_CODE
from midiforge.storage import open_store, verify_store

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import SMALL, Workers, epochs_in, make_shards, metrics_in, worker_env  # noqa: E402

STEPS = 10   # --steps-per-epoch in SMALL


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("shards") / "events"
    make_shards(str(dest), pieces=40, files=2)
    return dest


# ---------------------------------------------------------------------------------------------
# ports (pure)
# ---------------------------------------------------------------------------------------------
def _slurm_env(job_id: str | None, procid: int, **extra) -> dict:
    env = {"SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid), "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_STEP_NODELIST": "cn1", "SLURM_STEP_TASKS_PER_NODE": "2", **extra}
    if job_id is not None:
        env["SLURM_JOB_ID"] = job_id
    return env


def test_slurm_port_base_comes_from_the_job_id_and_differs_between_jobs():
    ports = lambda env, **kw: M.from_slurm(env, **kw).tf_config["cluster"]["worker"]  # noqa: E731
    assert ports(_slurm_env("1234", 0)) == ["cn1:29872", "cn1:29873"]   # 20000 + (1234 * 8) % 12000
    assert M.slurm_port_base({"SLURM_JOB_ID": "1234"}) == 29872
    # two jobs on one node at the same time: disjoint port sets (8 ports a job), a requeued job keeps its own
    bases = {job: M.slurm_port_base({"SLURM_JOB_ID": str(job)}) for job in range(700000, 701500)}
    assert len(set(bases.values())) == 1500
    assert all(abs(bases[j] - bases[j + 1]) >= 8 for j in range(700000, 701499))
    assert min(bases.values()) >= 20000 and max(bases.values()) + 7 < 32768   # below Linux's ephemeral ports
    mine = set(ports(_slurm_env("41", 0))) | set(ports(_slurm_env("41", 1)))
    theirs = set(ports(_slurm_env("42", 0))) | set(ports(_slurm_env("42", 1)))
    assert len(mine) == 2 and not mine & theirs
    # overrides: --port-base, then MIDIFORGE_PORT_BASE; no job id: the fixed default
    assert ports(_slurm_env("1234", 1), port_base=5000) == ["cn1:5000", "cn1:5001"]
    assert ports(_slurm_env("1234", 1, MIDIFORGE_PORT_BASE="6000")) == ["cn1:6000", "cn1:6001"]
    assert ports(_slurm_env(None, 0)) == [f"cn1:{M.DEFAULT_PORT_BASE}", f"cn1:{M.DEFAULT_PORT_BASE + 1}"]
    with pytest.raises(Exception, match="MIDIFORGE_PORT_BASE"):
        M.from_slurm(_slurm_env("1", 0, MIDIFORGE_PORT_BASE="x"))
    with pytest.raises(Exception, match="port range"):
        M.from_slurm(_slurm_env("1", 0), port_base=65535)


# ---------------------------------------------------------------------------------------------
# stopping on a signal and resuming
# ---------------------------------------------------------------------------------------------
def _args(shards: Path, out: Path, epochs: int, cache: Path, *extra: str) -> list[str]:
    return [str(shards), str(out), "--epochs", str(epochs), *SMALL, "--cache-dir", str(cache), *extra]


def _check_resumed_exactly(out: Path, epochs: int, stopped: dict) -> None:
    """metrics.jsonl has every epoch once; the stopped epoch was finished from the step after the stop."""
    metrics = metrics_in(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))
    if stopped["step"]:   # stopped inside an epoch: the next run trained only its remaining steps
        assert metrics[stopped["epoch"] - 1]["steps"] == STEPS - stopped["step"]
    assert all(m["steps"] == STEPS for m in metrics if m["epoch"] != stopped["epoch"])
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and "stopped" not in run
    assert verify_store(open_store(str(out))).ok
    assert not (out / "backup").exists()


def _stopped(out: Path) -> dict:
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "stopped", run
    return run["stopped"]


@pytest.mark.slow
def test_sigterm_to_one_of_two_workers_stops_both_after_a_backup_and_the_rerun_is_exact(shards, tmp_path):
    out, epochs = tmp_path / "model", 4
    argv = [_args(shards, out, epochs, tmp_path / f"cache{i}") for i in range(2)]
    with Workers(tmp_path, "attempt1") as w:
        w.start_tf_config(argv)
        # SIGTERM to worker 1 (not the chief) once epoch 1 is recorded and epoch 2 is under way
        assert w.wait_for(lambda: epochs_in(out / "metrics.jsonl"), 240), w.log(0)[-3000:]
        time.sleep(1.0)
        w.signal(1, signal.SIGTERM)
        t0 = time.monotonic()
        codes = w.wait(120)
        took = time.monotonic() - t0
        assert codes == [STOP_EXIT_CODE, STOP_EXIT_CODE], (codes, w.log(0)[-2000:], w.log(1)[-2000:])
        assert "SIGTERM: stopping after the current step" in w.log(1)
        assert "stopped by SIGTERM" in w.log(0)   # the chief learned of the signal from its peer
    stopped = _stopped(out)
    assert stopped["signal"] == "SIGTERM" and stopped["backup"]
    assert (out / "backup" / "manifest.json").exists()   # the chief's backup, mirrored into MODEL_DIR
    done = epochs_in(out / "metrics.jsonl")
    assert done and max(done) < epochs, "the job finished before the stop: make it longer"
    print(f"both workers exited {STOP_EXIT_CODE} {took:.1f} s after the SIGTERM; stopped at {stopped}")

    with Workers(tmp_path, "attempt2") as w:   # the very same command again
        codes = w.start_tf_config(argv).wait(300)
        assert codes == [0, 0], w.log(0)[-3000:]
        assert "continuing from the backup in" in w.log(0)
    _check_resumed_exactly(out, epochs, stopped)


@pytest.mark.slow
def test_sigusr1_stops_a_single_worker_with_a_backup_and_the_rerun_is_exact(shards, tmp_path):
    # one worker's epoch takes ~0.3 s: 12 of them leave the signal seconds before the run could end
    out, epochs = tmp_path / "model", 12
    args = _args(shards, out, epochs, tmp_path / "cache", "--backup-every", "4")
    with Workers(tmp_path, "attempt1") as w:
        w.start([args], [worker_env()])
        assert w.wait_for(lambda: epochs_in(out / "metrics.jsonl"), 240), w.log()[-3000:]
        time.sleep(0.1)
        w.signal(0, signal.SIGUSR1)
        codes = w.wait(120)
        assert codes == [STOP_EXIT_CODE], w.log()[-3000:]
        assert f"run the same command again to continue (exit {STOP_EXIT_CODE})" in w.log()
    stopped = _stopped(out)
    assert stopped["signal"] == "SIGUSR1" and stopped["backup"]
    assert list((out / "backup" / "chief").glob("ckpt-*.index"))
    done = epochs_in(out / "metrics.jsonl")
    assert done and max(done) < epochs, "the run finished before the stop: make it longer"

    with Workers(tmp_path, "attempt2") as w:
        codes = w.start([args], [worker_env()]).wait(300)
        assert codes == [0], w.log()[-3000:]
    _check_resumed_exactly(out, epochs, stopped)


@pytest.mark.slow
def test_a_worker_whose_peer_hangs_still_exits_in_bounded_time(shards, tmp_path):
    """Worker 1 is frozen (SIGSTOP) mid-training, so the chief hangs in an all-reduce and cannot
    even run its Python signal handler; SIGTERM to the chief ends it within the grace period."""
    out = tmp_path / "model"
    argv = [_args(shards, out, 50, tmp_path / f"cache{i}") for i in range(2)]
    with Workers(tmp_path, "run") as w:
        w.start_tf_config(argv, MIDIFORGE_STOP_GRACE="3")
        assert w.wait_for(lambda: epochs_in(out / "metrics.jsonl"), 240), w.log(0)[-3000:]
        w.signal(1, signal.SIGSTOP)
        try:
            time.sleep(1.0)
            w.signal(0, signal.SIGTERM)
            code = w.procs[0].wait(timeout=60)
        finally:
            w.signal(1, signal.SIGCONT)
        assert code == STOP_EXIT_CODE, w.log(0)[-3000:]
        assert "not stopped 3 s after the signal" in w.log(0)

"""slurm/train.sbatch submitted to a real 2-node Slurm (tests/slurmcluster.py), as users submit it.

Two TensorFlow workers (one per node, TF_CONFIG from SLURM_*, ports from the job id); SIGUSR1 to the
batch script (what ``--signal=B:USR1@120`` sends before the time limit) makes both back up and exit 75,
the script requeues the job, the requeued job finishes with every epoch exactly once, and requeueing
the finished job is a no-op.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import SMALL, epochs_in, make_shards, metrics_in  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
STEPS = 10   # --steps-per-epoch in SMALL


def _env(**extra) -> dict:
    """A user's environment: midiforge found through MIDIFORGE_VENV only (not on PATH)."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != VENV / "bin")
    return {"PATH": path, "MIDIFORGE_VENV": str(VENV), "TF_CONFIG": None, "MIDIFORGE_PORT_BASE": None,
            "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **extra}


def test_train_sbatch_usr1_backs_up_requeues_and_the_job_finishes_exactly(slurm, tmp_path):
    from slurmcluster import TERMINAL_STATES, wait_until

    c = slurm
    shards, out, epochs = tmp_path / "shards", tmp_path / "model", 4
    make_shards(str(shards), pieces=40, files=2)
    args = [str(shards), str(out), "--epochs", str(epochs), *SMALL, "--cache-dir", str(tmp_path / "cache")]
    job = c.sbatch(["--nodes=2", "--output", str(tmp_path / "job-%j.out"), str(REPO / "slurm" / "train.sbatch"),
                    *args], env=_env(), cwd=str(tmp_path))
    wait_until(lambda: epochs_in(out / "metrics.jsonl") or c.state(job) in TERMINAL_STATES, 400, "the first epoch")
    assert epochs_in(out / "metrics.jsonl"), c.output(job)[-4000:]
    c.scancel(job, signal="USR1", batch=True)   # what --signal=B:USR1@120 does before the time limit
    state = c.wait(job, timeout=900)
    log = c.output(job)
    assert state == "COMPLETED", log[-4000:]
    assert c.wait_no_leftovers(60) == []

    # the first start: both workers stopped after the same step with a backup, the script requeued the job
    assert f"job {job} (restart 0) on n[1-2], 2 workers" in log and f"job {job} (restart 1) on n[1-2]" in log, log[-4000:]
    assert "continuing from the backup" in log.split("(restart 1)", 1)[1]
    stops = re.findall(r"stopped by SIGUSR1 at epoch (\d+) (?:after step (\d+)|start) with a backup", log)
    assert len(stops) == 2 and stops[0] == stops[1], log[-4000:]   # every worker, the same step
    assert f"job {job} requeued" in log
    assert c.job_info(job).get("Restarts") == "1"
    epoch, step = int(stops[0][0]), int(stops[0][1] or 0)
    assert epoch < epochs, "the job finished before the stop: make it longer"

    # the second start continued from that step: every epoch once, the stopped one only its remaining steps
    metrics = metrics_in(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))
    assert metrics[epoch - 1]["steps"] == STEPS - step   # step 0: stopped as the epoch began
    run = json.loads((out / "run.json").read_text())
    base = 20000 + (job * 8) % 12000   # the port base from the job id
    assert (run["status"], run["starts"], run["workers"], run["membership"]) == ("finished", 2, 2, "slurm")
    assert run["cluster"]["worker"] == [f"n1:{base}", f"n2:{base}"]
    assert not (out / "backup").exists()

    # requeueing the finished job runs the same command again: nothing to do, exit 0, nothing rewritten
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    c.requeue(job)
    wait_until(lambda: c.job_info(job).get("Restarts") == "2" and c.state(job) == "COMPLETED", 300,
               "the requeued finished job")
    log = c.output(job)
    assert f"job {job} (restart 2)" in log and "nothing to do" in log, log[-3000:]
    assert f"job {job} ends with exit status 0" in log.rsplit("(restart 2)", 1)[1]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before
    assert c.wait_no_leftovers(60) == []


def test_scontrol_requeue_of_a_running_training_job_continues_from_a_backup(slurm, tmp_path):
    """`scontrol requeue` (SIGTERM to the workers and to srun, which kills them KillWait seconds later,
    5 s on the test cluster): the job starts again and finishes with every epoch exactly once."""
    from slurmcluster import TERMINAL_STATES, wait_until

    c = slurm
    shards, out, epochs = tmp_path / "shards", tmp_path / "model", 4
    make_shards(str(shards), pieces=40, files=2)
    args = [str(shards), str(out), "--epochs", str(epochs), *SMALL, "--cache-dir", str(tmp_path / "cache")]
    job = c.sbatch(["--nodes=2", "--output", str(tmp_path / "job-%j.out"), str(REPO / "slurm" / "train.sbatch"),
                    *args], env=_env(), cwd=str(tmp_path))
    wait_until(lambda: epochs_in(out / "metrics.jsonl") or c.state(job) in TERMINAL_STATES, 400, "the first epoch")
    assert epochs_in(out / "metrics.jsonl"), c.output(job)[-4000:]
    c.requeue(job)
    wait_until(lambda: c.job_info(job).get("Restarts") == "1", 120, "the requeue")
    state = c.wait(job, timeout=900)
    log = c.output(job)
    assert state == "COMPLETED", log[-4000:]
    assert c.wait_no_leftovers(60) == []
    assert "SIGTERM: stopping after the current step" in log.split("(restart 1)", 1)[0]
    assert "continuing from the backup" in log.split("(restart 1)", 1)[1], log[-3000:]
    assert epochs_in(out / "metrics.jsonl") == list(range(1, epochs + 1))
    run = json.loads((out / "run.json").read_text())
    assert (run["status"], run["starts"], run["workers"]) == ("finished", 2, 2)

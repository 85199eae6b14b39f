"""midiforge's slurm/*.sbatch scripts submitted to a real 2-node Slurm (tests/slurmcluster.py), as users submit them.

preprocess and generate start one Ray cluster across both nodes (head on n1, a worker on n2), run the stage
against it and stop it: the outputs equal a local run, both hosts did work, and no process outlives a job,
whether it succeeds, fails or is cancelled.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from corpora import corpus

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent


def _env(**extra) -> dict:
    """A user's environment: midiforge found through MIDIFORGE_VENV only (not on PATH)."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != VENV / "bin")
    return {"PATH": path, "MIDIFORGE_VENV": str(VENV), "RAY_ADDRESS": None, "RAY_AUTH_MODE": None,
            "RAY_AUTH_TOKEN": None, **extra}


def _submit(c, tmp_path, script: str, args: list[str], nodes: int = 2, extra: list[str] = ()) -> int:
    return c.sbatch([f"--nodes={nodes}", "--output", str(tmp_path / "job-%j.out"), *extra,
                     str(REPO / "slurm" / script), *args], env=_env(), cwd=str(tmp_path))


def _finish(c, job: int, timeout: float = 600) -> tuple[str, str]:
    state = c.wait(job, timeout=timeout)
    out = c.output(job)
    left = c.wait_no_leftovers(60)
    assert left == [], f"processes outlived job {job}: {left}\n{out[-3000:]}"
    return state, out


def _rows(dest: Path, columns: list[str]) -> list[tuple]:
    rows = []
    for f in sorted((dest / "shards").glob("*.parquet")):
        t = pq.read_table(f, columns=columns).to_pydict()
        rows += list(zip(*(t[c] for c in columns)))
    return sorted(rows)


def _local(args: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "midiforge.cli", *args], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]


def test_preprocess_sbatch_spans_two_nodes_and_equals_a_local_run(slurm, tmp_path):
    c = slurm
    src = corpus("ff")
    dest = tmp_path / "tokens"
    job = _submit(c, tmp_path, "preprocess.sbatch", [str(src), str(dest), "--sample", "60", "--batch-files", "5"])
    state, out = _finish(c, job)
    assert state == "COMPLETED", out[-4000:]
    # the log names the job, the nodes and the outputs
    assert f"job {job}" in out and "n1" in out and "n2" in out and str(dest) in out
    assert "2 Ray nodes joined" in out, out[-3000:]
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["inputs"] == 60 == manifest["pieces"] + manifest["duplicates"] + manifest["failures"]
    assert sorted(manifest["timing"]["batch_hosts"]) == ["n1", "n2"], manifest["timing"]  # both nodes worked
    local = tmp_path / "local"
    _local(["preprocess", str(src), str(local), "--sample", "60", "--no-progress"])
    cols = ["piece_id", "source", "split", "tokens"]
    assert _rows(dest, cols) == _rows(local, cols)
    # a requeued or resubmitted job is a no-op on a finished run
    job2 = _submit(c, tmp_path, "preprocess.sbatch", [str(src), str(dest), "--sample", "60"])
    state2, out2 = _finish(c, job2)
    assert state2 == "COMPLETED", out2[-3000:]
    assert json.loads((dest / "manifest.json").read_text())["files"] == manifest["files"]


def test_a_failing_stage_fails_the_job_and_stops_the_cluster(slurm, tmp_path):
    c = slurm
    job = _submit(c, tmp_path, "preprocess.sbatch", [str(tmp_path / "no-such-corpus"), str(tmp_path / "d")])
    state, out = _finish(c, job)
    assert state == "FAILED", out[-3000:]
    assert "no-such-corpus" in out and "Traceback" not in out
    assert "Ray cluster stopped" in out


def test_midiforge_not_found_is_a_clear_error(slurm, tmp_path):
    c = slurm
    job = c.sbatch(["--output", str(tmp_path / "job-%j.out"), str(REPO / "slurm" / "preprocess.sbatch"), "a", "b"],
                   env={**_env(), "MIDIFORGE_VENV": str(tmp_path / "no-venv")}, cwd=str(tmp_path))
    state = c.wait(job, timeout=120)
    assert state == "FAILED"
    assert "MIDIFORGE_VENV" in c.output(job)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny trained model (one short epoch on synthetic shards), made locally once."""
    from train_helpers import make_shards

    root = tmp_path_factory.mktemp("model")
    make_shards(str(root / "tokens"), pieces=24)
    _local(["train", str(root / "tokens"), str(root / "model"), "--epochs", "1", "--steps-per-epoch", "3",
            "--validation-steps", "1", "--batch-size", "8", "--seq-len", "32", "--lstm-units", "32",
            "--embedding-dim", "16"])
    return root / "model"


def _pieces(dest: Path) -> list[tuple]:
    from midiforge.pipeline.pieces import read_pieces

    t = read_pieces(str(dest), columns=["checkpoint", "index", "tokens"]).to_pydict()
    return sorted(zip(t["checkpoint"], t["index"], t["tokens"]))


def test_generate_sbatch_spans_two_nodes_and_equals_a_local_run(slurm, model_dir, tmp_path):
    c = slurm
    dest = tmp_path / "pieces"
    args = ["--num-pieces", "12", "--seed", "5", "--max-tokens", "64", "--batch-size", "2", "--no-midi-files"]
    job = _submit(c, tmp_path, "generate.sbatch", [str(model_dir), str(dest), *args])
    state, out = _finish(c, job)
    assert state == "COMPLETED", out[-4000:]
    assert "2 Ray nodes joined" in out
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["pieces"] == 12
    local = tmp_path / "local"
    _local(["generate", str(model_dir), str(local), *args, "--no-progress"])
    assert _pieces(dest) == _pieces(local)


def test_scancel_of_a_running_job_stops_every_ray_process(slurm, model_dir, tmp_path):
    c = slurm
    dest = tmp_path / "pieces"
    job = _submit(c, tmp_path, "generate.sbatch", [str(model_dir), str(dest), "--num-pieces", "100000", "--seed", "1",
                                                   "--max-tokens", "512", "--no-midi-files"])
    deadline = time.monotonic() + 300
    while "Ray nodes joined" not in c.output(job):
        assert c.state(job) in ("PENDING", "CONFIGURING", "RUNNING"), c.output(job)[-3000:]
        assert time.monotonic() < deadline, c.output(job)[-3000:]
        time.sleep(1)
    time.sleep(5)  # generating now
    c.scancel(job)
    state, out = _finish(c, job, timeout=120)
    assert state == "CANCELLED", out[-3000:]
    assert not (dest / "manifest.json").exists()


def test_a_job_that_reaches_its_time_limit_stops_its_cluster(slurm, model_dir, tmp_path):
    c = slurm
    dest = tmp_path / "pieces"
    job = _submit(c, tmp_path, "generate.sbatch", [str(model_dir), str(dest), "--num-pieces", "100000", "--seed", "2",
                                                   "--max-tokens", "512", "--no-midi-files"], extra=["--time=1"])
    state, out = _finish(c, job, timeout=400)  # Slurm's granularity: the limit passes within ~30 s after a minute
    assert state == "TIMEOUT", out[-3000:]
    assert "Ray cluster stopped" in out or "SIGTERM" in out, out[-3000:]
    assert not (dest / "manifest.json").exists()


def test_pipeline_sh_submits_the_three_stages_as_one_chain(slurm, tmp_path):
    c = slurm
    out_dir = tmp_path / "run"
    env = {**_env(), "PREPROCESS_ARGS": "--sample 16",
           "TRAIN_ARGS": "--epochs 1 --steps-per-epoch 2 --validation-steps 1 --batch-size 8 --seq-len 32 "
                         "--lstm-units 16 --embedding-dim 8",
           "GENERATE_ARGS": "--seed 1 --max-tokens 32 --no-midi-files",
           "SBATCH_ARGS": f"--output={tmp_path}/%x-%j.out", "GENERATE_NODES": "2"}
    r = c.run(["bash", str(REPO / "slurm" / "pipeline.sh"), str(corpus("ff")), str(out_dir), "--num-pieces", "4"],
              env=env, cwd=str(tmp_path), timeout=120)
    ids = [int(x) for x in r.stdout.strip().splitlines()[-1].split()]
    assert len(ids) == 3, r.stdout
    info = c.job_info(ids[1])
    assert f"afterok:{ids[0]}" in info.get("Dependency", "") or c.state(ids[1]) != "PENDING", info
    states = [c.wait(j, timeout=900) for j in ids]
    outputs = "\n".join(c.output(j)[-2000:] for j in ids)
    assert states == ["COMPLETED"] * 3, outputs
    assert json.loads((out_dir / "tokens" / "manifest.json").read_text())["inputs"] == 16
    assert (out_dir / "model" / "manifest.json").exists()
    assert json.loads((out_dir / "pieces" / "manifest.json").read_text())["pieces"] == 4
    assert c.wait_no_leftovers(60) == []


def test_a_failed_stage_cancels_the_rest_of_the_chain(slurm, tmp_path):
    c = slurm
    env = {**_env(), "SBATCH_ARGS": f"--output={tmp_path}/%x-%j.out"}
    r = c.run(["bash", str(REPO / "slurm" / "pipeline.sh"), str(tmp_path / "no-such-corpus"), str(tmp_path / "run"),
               "--num-pieces", "4"], env=env, cwd=str(tmp_path), timeout=120)
    ids = [int(x) for x in r.stdout.strip().splitlines()[-1].split()]
    assert c.wait(ids[0], timeout=300) == "FAILED"
    assert [c.wait(j, timeout=120) for j in ids[1:]] == ["CANCELLED", "CANCELLED"]

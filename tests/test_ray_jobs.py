"""jobs/*.sh (`ray job submit`) against a real two-node Ray cluster made with cluster/start-head.sh and start-worker.sh.

The cluster runs in a network + PID namespace made for the test (``unshare``): loopback is the only interface there, so
the two nodes (which Ray only allows with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER unset, i.e. binding every interface) stay
on 127.0.0.1, and ``ray stop`` sees only this cluster's processes.  The three stages are submitted one after another,
as a user would: preprocess a corpus sample, train on it with Ray Train (two workers), generate from the model.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raycluster import namespaces_missing

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "corpora"

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def _base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MIDIFORGE_", "AWS_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"  # nothing of the venv on PATH: the scripts must find it themselves
    env.update(extra)
    return env


@pytest.mark.timeout(1500)
def test_each_stage_submitted_with_ray_job_submit_to_a_two_node_cluster():
    why = namespaces_missing()
    if why:
        pytest.skip(why)
    if not (SHARED / "ff").is_dir():
        pytest.skip(f"shared corpus {SHARED / 'ff'} is absent")
    tmp = tempfile.mkdtemp(prefix="mfj-", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        proc = subprocess.Popen(["unshare", "--net", "--map-root-user", "--pid", "--fork", "--mount-proc",
                                 sys.executable, __file__, "--scenario", tmp],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env=_base_env())
        try:
            out, err = proc.communicate(timeout=1400)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"the scenario did not finish in time:\n{err[-4000:]}")
        assert proc.returncode == 0, f"scenario failed ({proc.returncode}):\n{out[-3000:]}\n{err[-6000:]}"
        r = json.loads(out.strip().splitlines()[-1])
        logs = "\n".join(f"--- {k}:\n{v}" for k, v in r["logs"].items())
        assert r["nodes"] == 2, logs
        for stage in ("preprocess", "train", "generate"):
            assert r[f"{stage}_rc"] == 0, f"{stage}:\n{logs}"
            assert f"job midiforge-{stage}-test SUCCEEDED" in r["logs"][stage], logs
        work = Path(tmp) / "work"
        tokens = json.loads((work / "tokens" / "manifest.json").read_text())
        assert tokens["inputs"] == 24 == tokens["pieces"] + tokens["duplicates"] + tokens["failures"]
        assert tokens["pieces"] >= 20
        metrics = [json.loads(x) for x in (work / "model" / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in metrics] == [1, 2]
        run = json.loads((work / "model" / "run.json").read_text())
        assert "2" in json.dumps(run.get("workers", run))  # two Ray Train workers trained it
        pieces = json.loads((work / "pieces" / "manifest.json").read_text())
        assert pieces["pieces"] == 6
        # a failing job reports FAILED and a non-zero exit status
        assert r["bad_rc"] != 0 and "FAILED" in r["logs"]["bad"], logs
        assert r["left_in_namespace"] == [], r["left_in_namespace"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _leftovers(marker: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                found.append(f"{proc.name}: {cmd[:160]}")
    return found


def _scenario(tmp: str) -> int:  # pragma: no cover - runs in the namespace, reports through JSON
    tmpd = Path(tmp)
    work = tmpd / "work"
    r: dict = {"logs": {}}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
    token = tmpd / "token"
    base = _base_env(RAY_AUTH_TOKEN_PATH=str(token), HOME=str(tmpd / "home"))
    ray = str(ROOT / ".venv" / "bin" / "ray")
    client = {**base, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": "http://127.0.0.1:8265",
              "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    def run(key, cmd, env, timeout=600):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        r["logs"][key] = (p.stdout[-4000:] + "\n" + p.stderr[-4000:]).strip()
        return p

    try:
        run("head", ["bash", str(ROOT / "cluster" / "start-head.sh"), "--node-ip-address=127.0.0.1", "--port=6379",
                     "--num-cpus=2", f"--temp-dir={tmpd / 'h'}", "--disable-usage-stats"],
            {**base, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, timeout=300)
        run("worker", ["bash", str(ROOT / "cluster" / "start-worker.sh"), "127.0.0.1:6379",
                       "--node-ip-address=127.0.0.1", "--num-cpus=2", f"--temp-dir={tmpd / 'w'}",
                       "--dashboard-agent-listen-port=52366", "--disable-usage-stats"], base, timeout=300)
        deadline, r["nodes"] = time.monotonic() + 180, 0
        while time.monotonic() < deadline and r["nodes"] < 2:
            st = run("status", [ray, "status", "--address", "127.0.0.1:6379"], client, timeout=120)
            r["nodes"] = st.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0].count(" node_")
            time.sleep(1)
        jobs = ROOT / "jobs"
        steps = [
            ("preprocess", [str(jobs / "preprocess.sh"), str(SHARED / "ff"), str(work / "tokens"), "--sample", "24"]),
            ("train", [str(jobs / "train.sh"), str(work / "tokens"), str(work / "model"), "--launcher", "ray",
                       "--num-workers", "2", "--epochs", "2", "--steps-per-epoch", "3", "--validation-steps", "1",
                       "--batch-size", "8", "--seq-len", "32", "--lstm-units", "32", "--embedding-dim", "16"]),
            ("generate", [str(jobs / "generate.sh"), str(work / "model"), str(work / "pieces"), "--num-pieces", "6",
                          "--seed", "1", "--max-tokens", "48"]),
        ]
        for stage, cmd in steps:
            p = run(stage, ["bash", *cmd], {**client, "RAY_JOB_ID": f"midiforge-{stage}-test"}, timeout=900)
            r[f"{stage}_rc"] = p.returncode
            if p.returncode:
                break
        bad = run("bad", ["bash", str(jobs / "preprocess.sh"), str(tmpd / "no-such-corpus"), str(work / "bad")],
                  {**client, "RAY_JOB_ID": "midiforge-bad-test"}, timeout=600)
        r["bad_rc"] = bad.returncode
    finally:
        stop = run("ray_stop", [ray, "stop"], client, timeout=180)
        r["ray_stop_rc"] = stop.returncode
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r["left_in_namespace"] = [x for m in ("site-packages/ray", "ray::", "bin/ray ", "midiforge")
                                      for x in _leftovers(m) if "--scenario" not in x]
            if not r["left_in_namespace"]:
                break
            time.sleep(0.5)
        print(json.dumps(r))
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--scenario"]:
    sys.exit(_scenario(sys.argv[2]))

"""A whole Ray worker node lost in the middle of a preprocess run (issue 14: "a worker node killed
mid-preprocess", kept as a test).

Two Ray nodes (`ray start --head` and `ray start --address`, one CPU each) run inside a network + PID
namespace made for the test (``unshare``): loopback is the only interface there, so the nodes, which Ray
only allows to form a cluster when it binds every interface, stay on 127.0.0.1, and every process of the
cluster ends with the namespace.  A clean run makes the reference; then a second run's worker node is
SIGKILLed (``ray start --block``, its raylet and every worker on it) while batches run on it.  The run must
go on on the head's node and end with exactly the clean run's output: no input lost or counted twice, none
blamed on the node (a batch cut by a lost node is not a parser crash).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from corpora import corpus
from raycluster import namespaces_missing

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(1200)]

SCRIPT = textwrap.dedent(r"""
    import json, os, secrets, signal, subprocess, sys, time
    from pathlib import Path

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    tmp, src = Path(sys.argv[1]), sys.argv[2]
    ray = str(Path(sys.executable).with_name("ray"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
               MIDIFORGE_TEST_SLOW_SECONDS="1.0")   # every batch a second longer: several run on the node

    def start(what, args):
        log = tmp / f"{what}.log"
        p = subprocess.Popen([ray, "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=1",
                              "--disable-usage-stats", "--block"], stdout=open(log, "w"),
                             stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        return p

    def preprocess(dest):
        return [sys.executable, "-m", "midiforge.cli", "preprocess", src, str(tmp / dest), "--batch-files", "8",
                "--no-progress", "--address", "127.0.0.1:6379"]

    head = start("head", ["--head", "--port=6379", "--include-dashboard=false"])
    node = start("node", ["--address=127.0.0.1:6379"])
    result = {}
    clean = subprocess.run(preprocess("clean"), env=env, capture_output=True, text=True, timeout=600)
    result["clean"] = [clean.returncode, clean.stderr[-3000:]]
    proc = subprocess.Popen(preprocess("dest"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list((tmp / "dest" / "_work").glob("part-*.json"))) >= 4:
            break
        time.sleep(0.05)

    def node_processes():
        # (pid, title) of the node: its process group (`ray start`, the raylet, its agents) and the workers
        # its raylet started (each in a session of its own)
        procs = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(bytes(1))[0].decode(errors="replace")
                procs[int(pid)] = (int(stat[1]), int(stat[2]), title)   # ppid, pgid, title
            except (OSError, IndexError, ValueError):
                pass
        group = {pid for pid, (_pp, pg, _t) in procs.items() if pg == node.pid}
        return [(pid, t) for pid, (pp, _pg, t) in procs.items() if pid in group or pp in group]

    busy = []
    while proc.poll() is None and time.monotonic() < deadline and not busy:
        busy = [t for _pid, t in node_processes() if t.startswith("ray::_process")]   # a preprocess batch
        time.sleep(0.02)
    result["busy_on_node"] = busy
    result["killed_while_running"] = proc.poll() is None
    for pid, _t in node_processes():   # the machine is gone: every process of the node at once
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.wait(timeout=60)
    out, err = proc.communicate(timeout=600)
    result["run"] = [proc.returncode, err[-3000:]]
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(timeout=120)
    print(json.dumps(result))
""")


def _outcome(dest: Path) -> tuple[dict, list]:
    m = json.loads((dest / "manifest.json").read_text())
    assert m["inputs"] == m["pieces"] + m["duplicates"] + m["failures"]
    sources = pq.read_table(dest / "inputs.parquet")["source"].to_pylist()
    assert len(sources) == len(set(sources)) == m["inputs"]
    rows = []
    for s in m["shards"]:
        t = pq.read_table(dest / s["path"], columns=["piece_id", "source", "transpose", "tokens"])
        rows.extend(zip(t["piece_id"].to_pylist(), t["source"].to_pylist(), t["transpose"].to_pylist(),
                        map(tuple, t["tokens"].to_pylist())))
    keys = ("inputs", "pieces", "duplicates", "failures", "failure_reasons", "rows", "tokens", "splits")
    return {k: m[k] for k in keys}, sorted(rows)


def test_a_worker_node_killed_mid_run_leaves_the_output_exact(tmp_path):
    missing = namespaces_missing()
    if missing:
        pytest.skip(missing)
    src = tmp_path / "src"
    src.mkdir()
    for name in sorted(p for p in os.listdir(corpus("nottingham")) if p.endswith(".mid"))[:160]:
        shutil.copy(corpus("nottingham") / name, src / name)
    script = tmp_path / "node_loss.py"
    script.write_text(SCRIPT)
    # the namespace's init is the script: when it ends, every process of the cluster ends with it
    res = subprocess.run(["unshare", "--net", "--map-root-user", "--pid", "--fork", "--mount-proc", sys.executable,
                          str(script), str(tmp_path), str(src)], capture_output=True, text=True, timeout=1100)
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["clean"][0] == 0, result["clean"][1]
    assert result["killed_while_running"], "the run ended before the node could be killed"
    assert result["run"][0] == 0, result["run"][1]
    assert result["busy_on_node"], "no batch was running on the node when it was killed"
    clean, clean_rows = _outcome(tmp_path / "clean")
    killed, killed_rows = _outcome(tmp_path / "dest")
    assert clean["inputs"] == 160 and clean["failures"] == 0
    assert killed == clean
    assert killed_rows == clean_rows
    v = subprocess.run([sys.executable, "-m", "midiforge.cli", "verify", str(tmp_path / "dest")],
                       capture_output=True, text=True, timeout=300)
    assert v.returncode == 0, v.stdout + v.stderr

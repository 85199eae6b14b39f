"""The Slurm test cluster itself (tests/slurmcluster.py): real slurmctld + two slurmd in network namespaces."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from slurmcluster import SlurmCluster, cleanup_stale, missing_requirements, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

PY = sys.executable
IP = shutil.which("ip", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or "ip"


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _root_ns_ipv4() -> str:
    return subprocess.run([IP, "-4", "-o", "addr"], capture_output=True, text=True, timeout=30, check=True).stdout


def test_two_nodes_have_distinct_names_and_addresses(slurm, tmp_path):
    where = tmp_path / "where.py"
    where.write_text(textwrap.dedent(f"""\
        import json, os, socket, subprocess, sys
        out = subprocess.run([{IP!r}, "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
        ips = sorted(l.split()[3].split("/")[0] for l in out.splitlines() if l.split()[1] != "lo")
        comms = set()
        for p in os.listdir("/proc"):
            try:
                comms.add(open("/proc/%s/comm" % p).read().strip())
            except OSError:
                pass
        rec = {{"procid": os.environ["SLURM_PROCID"], "nodename": os.environ["SLURMD_NODENAME"],
               "hostname": socket.gethostname(), "resolved": socket.gethostbyname(socket.gethostname()),
               "ips": ips, "marker": os.environ.get("MF_MARKER"),
               "init": open("/proc/1/cmdline").read().strip("\\0").split("\\0")[-1], "comms": sorted(comms)}}
        with open(os.path.join(sys.argv[1], "task-%s.json" % rec["procid"]), "w") as f:
            json.dump(rec, f)
        """))
    job = _script(tmp_path / "job.sh", f"""\
        echo "batch $(hostname) $SLURMD_NODENAME $SLURM_JOB_NUM_NODES $MF_MARKER" > {tmp_path}/batch.txt
        echo "hello from $(hostname)"
        srun --nodes=2 --ntasks=2 --ntasks-per-node=1 {PY} {where} {tmp_path}
        """)
    job_id = slurm.sbatch(["--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/%x-%j.out", str(job)],
                          env={"MF_MARKER": "passed-through"}, cwd=tmp_path)
    assert slurm.wait(job_id, timeout=120) == "COMPLETED", slurm.output(job_id)
    assert slurm.output(job_id) == "hello from n1\n"
    assert (tmp_path / f"job.sh-{job_id}.out").read_text() == "hello from n1\n"

    recs = [json.loads((tmp_path / f"task-{i}.json").read_text()) for i in range(2)]
    names = sorted(r["nodename"] for r in recs)
    assert names == slurm.node_names == ["n1", "n2"]
    for r in recs:
        assert r["hostname"] == r["nodename"]  # every node has its own hostname
        assert r["ips"] == [slurm.node_ip(r["nodename"])]  # and exactly its NodeAddr on its interface
        assert r["resolved"] == slurm.node_ip(r["nodename"])  # hostname -> its address (the nodes' hosts file)
        assert r["marker"] == "passed-through"  # the submitting environment reached the tasks
        # each node has its own process space: its own init, its slurmd, not the controller's slurmctld
        assert r["init"] == "slurmcluster-init"
        assert "slurmd" in r["comms"] and "slurmctld" not in r["comms"]
    assert len({r["ips"][0] for r in recs}) == 2
    assert (tmp_path / "batch.txt").read_text().split() == ["batch", "n1", "n1", "2", "passed-through"]
    info = slurm.job_info(job_id)
    assert info["NodeList"] == "n[1-2]" and info["ExitCode"] == "0:0"
    assert info["WorkDir"] == str(tmp_path)  # sbatch ran in cwd
    # the node addresses exist only inside the cluster's namespaces
    root = _root_ns_ipv4()
    assert not any(ip in root for ip in [slurm.controller_ip, *slurm.node_ips])


def test_run_and_popen_on_hosts(slurm):
    for host in slurm.hosts:
        r = slurm.run("echo $(hostname) $(hostname -i) $(cat /proc/1/comm)", node=host)
        assert r.stdout.split() == [host, slurm.node_ip(host), "python"]  # pid 1 there: the host's init
    p = slurm.popen(["sleep", "600"], node="n1", stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: ("n1", "sleep 600") in [(x["host"], x["cmdline"]) for x in slurm.leftover_processes()],
                   30, "the sleep on n1")
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=30)
    assert slurm.wait_no_leftovers(30) == []
    with pytest.raises(subprocess.CalledProcessError):
        slurm.run(["false"], node="n2")
    with pytest.raises(KeyError):
        slurm.run(["true"], node="n9")


def test_tcp_between_nodes(slurm, tmp_path):
    server_ip = slurm.node_ip("n1")
    server = tmp_path / "server.py"
    server.write_text(textwrap.dedent("""\
        import json, os, socket, sys
        ip, d = sys.argv[1], sys.argv[2]
        s = socket.socket()
        s.bind((ip, 0))
        s.listen(1)
        s.settimeout(60)
        with open(os.path.join(d, "port.tmp"), "w") as f:
            f.write(str(s.getsockname()[1]))
        os.rename(os.path.join(d, "port.tmp"), os.path.join(d, "port"))
        conn, peer = s.accept()
        conn.settimeout(30)
        msg = conn.recv(1024).decode()
        conn.sendall(("hello %s from %s" % (msg, socket.gethostname())).encode())
        conn.close()
        with open(os.path.join(d, "server.json"), "w") as f:
            json.dump({"peer": peer[0], "msg": msg, "host": socket.gethostname()}, f)
        """))
    client = tmp_path / "client.py"
    client.write_text(textwrap.dedent("""\
        import json, os, socket, sys, time
        ip, d = sys.argv[1], sys.argv[2]
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(d, "port")):
            assert time.monotonic() < deadline, "the server never wrote its port"
            time.sleep(0.1)
        port = int(open(os.path.join(d, "port")).read())
        try:  # the server is on n1's address, not on this node's loopback
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            loopback = "connected"
        except ConnectionRefusedError:
            loopback = "refused"
        with socket.create_connection((ip, port), timeout=30) as c:
            c.settimeout(30)
            c.sendall(socket.gethostname().encode())
            reply = c.recv(1024).decode()
        with open(os.path.join(d, "client.json"), "w") as f:
            json.dump({"reply": reply, "loopback": loopback, "host": socket.gethostname()}, f)
        """))
    job = _script(tmp_path / "job.sh", f"""\
        srun --nodes=1 --ntasks=1 --nodelist=n1 {PY} {server} {server_ip} {tmp_path} &
        srun --nodes=1 --ntasks=1 --nodelist=n2 {PY} {client} {server_ip} {tmp_path}
        wait
        """)
    job_id = slurm.sbatch(["--nodes=2", f"--output={tmp_path}/out.txt", str(job)])
    assert slurm.wait(job_id, timeout=120) == "COMPLETED", (tmp_path / "out.txt").read_text()
    srv = json.loads((tmp_path / "server.json").read_text())
    cli = json.loads((tmp_path / "client.json").read_text())
    assert srv == {"peer": slurm.node_ip("n2"), "msg": "n2", "host": "n1"}
    assert cli == {"reply": "hello n2 from n1", "loopback": "refused", "host": "n2"}


def test_scancel_leaves_no_process(slurm, tmp_path):
    task = _script(tmp_path / "task.sh", f"""\
        sleep 600 &
        echo $! > {tmp_path}/child-$SLURMD_NODENAME
        echo $$ > {tmp_path}/task-$SLURMD_NODENAME.tmp
        mv {tmp_path}/task-$SLURMD_NODENAME.tmp {tmp_path}/task-$SLURMD_NODENAME
        wait
        """)
    job = _script(tmp_path / "job.sh", f"""\
        sleep 600 &
        echo $! > {tmp_path}/batch-child
        srun --nodes=2 --ntasks=2 --ntasks-per-node=1 {task}
        """)
    job_id = slurm.sbatch(["--nodes=2", f"--output={tmp_path}/out.txt", str(job)])
    slurm.wait_state(job_id, "RUNNING", timeout=60)
    wait_until(lambda: all((tmp_path / f"task-{n}").exists() for n in slurm.node_names), 60, "both tasks")
    pids = {int((tmp_path / f).read_text()): host for f, host in
            [("batch-child", "n1"), ("task-n1", "n1"), ("child-n1", "n1"), ("task-n2", "n2"), ("child-n2", "n2")]}
    running = {(p["host"], p["nspid"]): p["pid"] for p in slurm.leftover_processes()}
    for nspid, host in pids.items():  # leftover_processes() sees the job's processes on both nodes
        assert (host, nspid) in running, (host, nspid, running)
    slurm.scancel(job_id)
    assert slurm.wait(job_id, timeout=60) == "CANCELLED"
    assert slurm.wait_no_leftovers(60) == []
    assert not any(_alive(p) for p in running.values())
    slurm.wait_idle(60)


def test_daemonized_job_process_is_found(slurm, tmp_path):
    """A process that left its job's process tree (double fork, like `ray start`) is not killed by
    Slurm's linuxproc tracking; leftover_processes() still finds it, on its node."""
    job = _script(tmp_path / "job.sh", f"""\
        ( sleep 600 & echo $! > {tmp_path}/daemon.pid )
        """)
    job_id = slurm.sbatch(["--nodes=1", "--nodelist=n2", str(job)], cwd=tmp_path)
    try:
        assert slurm.wait(job_id, timeout=60) == "COMPLETED"
        assert (tmp_path / f"slurm-{job_id}.out").exists()  # the default output, in sbatch's cwd
        nspid = int((tmp_path / "daemon.pid").read_text())
        # the job's slurmstepd goes away, the daemonized sleep stays (and is reported, on its node)
        wait_until(lambda: [p["nspid"] for p in slurm.leftover_processes()] == [nspid], 30, "only the daemon left")
        [left] = slurm.leftover_processes()
        assert (left["host"], left["nspid"], Path(left["cmdline"].split()[0]).name) == ("n2", nspid, "sleep")
        assert _alive(left["pid"])
        assert [p["pid"] for p in slurm.kill_leftovers()] == [left["pid"]]
        assert not _alive(left["pid"])
    finally:
        slurm.kill_leftovers()
    assert slurm.leftover_processes() == []


def test_requeue_reruns_the_job(slurm, tmp_path):
    job = _script(tmp_path / "job.sh", f"""\
        n=${{SLURM_RESTART_COUNT:-0}}
        echo "$n $(hostname)" > {tmp_path}/run-$n
        if [ "$n" = 0 ]; then exec sleep 600; fi
        """)
    job_id = slurm.sbatch(["--nodes=1", "--requeue", f"--output={tmp_path}/out.txt", str(job)])
    slurm.wait_state(job_id, "RUNNING", timeout=60)
    wait_until(lambda: (tmp_path / "run-0").exists(), 60, "the first run")
    slurm.requeue(job_id)
    assert slurm.wait(job_id, timeout=240) == "COMPLETED", slurm.job_info(job_id)
    assert (tmp_path / "run-1").read_text().split()[0] == "1"
    assert not (tmp_path / "run-2").exists()
    assert slurm.job_info(job_id)["Restarts"] == "1"
    assert slurm.wait_no_leftovers(60) == []  # the first run's sleep was killed by the requeue


def test_ray_head_and_worker_on_two_nodes(slurm, tmp_path):
    """What the cluster is for: a Ray head on the batch node, a worker on the other node (srun), joined
    over the node addresses, tasks run on both."""
    bindir = Path(sys.executable).parent
    ray_tmp = Path(tempfile.mkdtemp(prefix="mfr", dir="/tmp"))  # short: Ray's unix socket paths
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent("""\
        import json, socket, sys, time
        import ray
        ray.init(address=sys.argv[1])
        deadline = time.monotonic() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, "the worker node never joined"
            time.sleep(0.5)
        @ray.remote(num_cpus=1)
        def where():
            time.sleep(2)
            return socket.gethostname()
        hosts = ray.get([where.remote() for _ in range(4)], timeout=120)
        nodes = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
        with open(sys.argv[2], "w") as f:
            json.dump({"nodes": nodes, "hosts": sorted(set(hosts))}, f)
        """))
    job = _script(tmp_path / "job.sh", f"""\
        export RAY_AUTH_MODE=token
        head_ip=$(hostname -i)
        {bindir}/ray start --head --node-ip-address="$head_ip" --port=6379 --num-cpus=1 --temp-dir={ray_tmp} \\
            --include-dashboard=false --disable-usage-stats --block > {tmp_path}/head.log 2>&1 &
        head=$!
        srun --nodes=1 --ntasks=1 --nodelist=n2 sh -c '{bindir}/ray start --address='"$head_ip"':6379 \\
            --node-ip-address="$(hostname -i)" --num-cpus=1 --disable-usage-stats --block' \\
            > {tmp_path}/worker.log 2>&1 &
        worker=$!
        rc=0
        {PY} {driver} "$head_ip:6379" {tmp_path}/result.json || rc=$?
        kill -TERM $worker $head
        wait || true
        exit $rc
        """)
    try:
        job_id = slurm.sbatch(["--nodes=2", f"--output={tmp_path}/out.txt", str(job)])
        state = slurm.wait(job_id, timeout=240)
        logs = "".join((tmp_path / f).read_text()[-2000:] for f in ("out.txt", "head.log", "worker.log")
                       if (tmp_path / f).exists())
        assert state == "COMPLETED", logs
        result = json.loads((tmp_path / "result.json").read_text())
        assert result == {"nodes": slurm.node_ips, "hosts": ["n1", "n2"]}, logs
        assert slurm.wait_no_leftovers(60) == []  # the head's and worker's processes ended with the job
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements()))
def test_stop_leaves_nothing(tmp_path):
    """A second, own cluster (beside the session one): stop() kills daemons and job processes, deletes
    the namespaces and the temp dir."""
    cluster = SlurmCluster(nodes=2, cpus_per_node=1)
    t0 = time.monotonic()
    cluster.start()
    try:
        print(f"started in {time.monotonic() - t0:.1f}s")
        assert cluster.node_states() == {"n1": "idle", "n2": "idle"}
        job = _script(tmp_path / "job.sh", f"""\
            echo $$ > {tmp_path}/batch.pid
            srun --nodes=2 sleep 600
            """)
        job_id = cluster.sbatch(["--nodes=2", f"--output={tmp_path}/out.txt", str(job)])
        cluster.wait_state(job_id, "RUNNING", timeout=60)
        wait_until(lambda: sorted(p["host"] for p in cluster.leftover_processes()
                                  if Path(p["cmdline"].split()[0]).name == "sleep") == ["n1", "n2"],
                   60, "srun's sleep on both nodes")
        daemons = {name: p.pid for name, p in cluster._daemons.items()}
        inits = list(cluster._inits.values())
        job_pids = [p["pid"] for p in cluster.leftover_processes()]
        namespaces = [*cluster.netns.values(), cluster.switch_ns]
        tmpdir = cluster.tmpdir
        assert set(namespaces) <= set(SlurmCluster._list_netns())
    finally:
        t1 = time.monotonic()
        cluster.stop()  # raises if anything could not be cleaned up
        print(f"stopped in {time.monotonic() - t1:.1f}s")
    assert set(daemons) == {"munged", "slurmctld", "n1", "n2"}
    assert [p for p in [*daemons.values(), *inits, *job_pids] if _alive(p)] == []
    assert not set(namespaces) & set(SlurmCluster._list_netns())
    assert not tmpdir.exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=30).stdout
    assert str(tmpdir) not in ps
    assert not any(ip in _root_ns_ipv4() for ip in [cluster.controller_ip, *cluster.node_ips])


@pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements()))
def test_a_killed_owner_takes_its_cluster_along(tmp_path):
    """pytest killed before stop(): the daemons and the hosts' processes die with it, and the next
    cluster's start (cleanup_stale) removes the namespaces and the temp dir it left."""
    owner = subprocess.Popen([PY, "-c", textwrap.dedent(f"""\
        import json, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from slurmcluster import SlurmCluster
        c = SlurmCluster(nodes=1, cpus_per_node=1)
        c.start()
        p = c.popen(["sleep", "600"], node="n1")
        print(json.dumps({{"tmpdir": str(c.tmpdir), "netns": [*c.netns.values(), c.switch_ns],
                          "pids": [*(d.pid for d in c._daemons.values()), *c._inits.values(), p.pid]}}), flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        info = json.loads(owner.stdout.readline())
    finally:
        os.killpg(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)
    # everything it started dies with it (PR_SET_PDEATHSIG, then the hosts' inits take their hosts along)
    wait_until(lambda: not any(_alive(p) for p in info["pids"]), 30, "the dead owner's cluster to die")
    assert Path(info["tmpdir"]).exists() and set(info["netns"]) <= set(SlurmCluster._list_netns())
    removed = cleanup_stale()
    assert info["tmpdir"] in removed and set(info["netns"]) <= set(removed)
    assert not Path(info["tmpdir"]).exists() and not set(info["netns"]) & set(SlurmCluster._list_netns())

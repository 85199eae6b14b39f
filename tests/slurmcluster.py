"""A real multi-node Slurm cluster on this one machine, started and stopped by the tests (needs root).

Topology (nothing is added to the root network namespace)::

    netns mfsK-sw   : Linux bridge br0, one veth end per host
    netns mfsK-ctl  : host "ctl", 10.213.K.1   -> slurmctld
    netns mfsK-n1   : host "n1",  10.213.K.11  -> slurmd -N n1
    netns mfsK-n2   : host "n2",  10.213.K.12  -> slurmd -N n2  ...

K is random per cluster (one not used by another cluster's namespaces), so two clusters can run at
once.  Each host has its own network namespace, UTS namespace (``hostname`` says ``n1``), PID namespace
(its processes only; ``ps``, ``pkill`` or ``ray stop`` on a node touch that node only, as on a real
cluster) and mount namespace (its own /proc, and the cluster's hosts file bind-mounted on /etc/hosts:
``ctl``, ``n1``, ``n2``... resolve to their addresses on every host, ``localhost`` to 127.0.0.1).  Each
host's init (pid 1 there, a small Python reaper started as ``nsenter --net=/run/netns/X unshare --uts
--mount --pid --fork --mount-proc``; not ``ip netns exec``, whose fresh /sys hides /sys/fs/cgroup and
makes slurmd fail) owns these namespaces, adopts orphans as a node's init does, and takes every process
of its host along when it is killed; the daemons and everything ``run()`` starts enter a host with
``nsenter --target <init> --net --uts --mount --pid``.

The file system is shared with the root namespace: the "shared file system" is the disk (the venv, the
repo and pytest's ``tmp_path`` are visible on every node; so is ``/tmp``: all nodes share one /tmp and
/dev/shm, e.g. Ray's /tmp/ray, so give Ray a ``--temp-dir`` of the test's own, short: unix socket paths).
PIDs a job writes down are PIDs on its node (``leftover_processes()`` gives both).  One munged (own random
key and socket in the cluster's temp dir, ``AuthInfo=socket=...``) serves every host through that socket
file.  There is no default route in any namespace, so nothing leaves the test subnet; give Ray the node
address explicitly (``ray start --node-ip-address="$(hostname -i)"``: ``hostname -i`` works through the
hosts file).  The client environment sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` (tests/conftest.py sets 0 for the
tests' loopback Rays, which keeps a worker from joining a head); Ray 2.60 also needs
``RAY_AUTH_MODE=token`` in the job for drivers and workers to join a head on a node address.

Inside a job: the batch script runs on the first node of its allocation, in that node's namespaces, so
``127.0.0.1`` there is that node's own loopback and other nodes are reached by NodeAddr or by name
(``n2``).  ``srun`` works in the job (``SLURM_CONF`` is part of the exported environment).  Jobs run as
root.  Process tracking is ``proctrack/linuxproc``: on cancel/requeue/job end Slurm kills the processes
of the job's process trees, but NOT a process that left them (double fork, daemonized, e.g. ``ray start``
without ``--block``): such processes are what ``leftover_processes()`` reports.

Usage (pytest: the session fixture ``slurm_cluster``, or ``slurm``, which also cancels jobs and kills
leftovers after each test and fails a test that left any; both in tests/conftest.py)::

    with SlurmCluster(nodes=2, cpus_per_node=2) as c:          # or c.start() ... c.stop()
        job = c.sbatch(["--nodes=2", f"--output={tmp_path}/%j.out", "script.sh"],
                       env={"PATH": ..., "MIDIFORGE_VENV": ...}, cwd=tmp_path)
        state = c.wait(job, timeout=300)                      # "COMPLETED" / "FAILED" / "CANCELLED" / "TIMEOUT" ...
        info = c.job_info(job)                                # scontrol show job -o, as a dict
        c.run(["hostname", "-i"], node="n2").stdout           # any command on a node (or the controller)
        assert c.wait_no_leftovers(30) == []                  # no process of any job still running

API (every wait is bounded, every subprocess has a timeout):

* ``SlurmCluster(nodes=2, cpus_per_node=2, memory_mb=4000, partition="debug", extra_conf="",
  start_timeout=120, debug="info", cred_expire=15)``; ``start()``, ``stop()`` (raises RuntimeError if
  anything of ours is left), context manager.  ``extra_conf``: more slurm.conf lines.
* ``conf`` (slurm.conf path), ``tmpdir`` (the cluster's temp dir /tmp/mfsK-slurm: config, state, spool,
  logs; removed by stop()), ``jobdir`` (the default cwd of commands and sbatch).
* ``node_names`` (["n1", "n2"]), ``node_ips`` (["10.213.K.11", ...]), ``node_ip(name)``,
  ``controller_name`` ("ctl"), ``controller_ip``, ``hosts`` (["ctl", "n1", ...]),
  ``netns`` ({host: namespace}), ``subnet`` ("10.213.K.0/24").
* ``client_env(env=None) -> dict``: the environment of every command: os.environ without SLURM_*/SBATCH_*/
  SRUN_*/SALLOC_*..., plus SLURM_CONF and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, plus ``env`` (a None value
  removes a key).  sbatch exports it to the job (Slurm's default ``--export=ALL``), so PATH,
  MIDIFORGE_VENV... pass through ``env``.
* ``sbatch(args, env=None, cwd=None, timeout=60) -> int`` (adds ``--parsable``; ``cwd`` = the job's
  WorkDir and where ``slurm-%j.out`` goes by default; default ``jobdir``).
* ``wait(job_id, timeout=300, cancel_on_timeout=True) -> str``: the final state; on timeout the job is
  cancelled (unless told not to) and TimeoutError raised with its info and output tail.
* ``wait_state(job_id, states="RUNNING", timeout=120) -> str``: until the job is in one of ``states``
  (RuntimeError if it ends first).
* ``job_info(job_id) -> dict`` (``scontrol show job -o``: JobState, ExitCode, NodeList, Restarts, StdOut...;
  for a job slurmctld has purged (MinJobAge=120 s), its last jobcomp/filetxt record),
  ``state(job_id) -> str``, ``output(job_id) -> str`` (its StdOut file, "" if none yet).
* ``scancel(job_id, signal=None, batch=False)``, ``requeue(job_id)`` (``scontrol requeue``; the job may
  start again ``cred_expire`` + 1 s later: Slurm's requeue delay, 120 s by default, 15 s here).
* ``client(args, env=None, timeout=60, check=True, cwd=None) -> CompletedProcess``: a Slurm command
  (``["squeue"]``, ``["srun", "-N2", "hostname"]``) on the controller host.
* ``run(cmd, node=None, env=None, timeout=60, check=True, cwd=None) -> CompletedProcess``: a command (list,
  or str for ``sh -c``) on ``node`` ("n1"... or None for the controller); text output captured;
  CalledProcessError (with output) if ``check`` and it fails.  ``popen(cmd, node=None, env=None, **kw)``:
  the same without waiting (new session; the caller stops it with ``os.killpg(p.pid, sig)``: p is
  nsenter, waiting for ``cmd``, which is in its process group).
* ``node_states() -> {name: state}``, ``wait_idle(timeout=60)``.
* ``leftover_processes() -> [{"pid", "nspid", "host", "cmdline"}]`` (pid in the root PID namespace, pid
  on its host): every process in the cluster's namespaces except its daemons, slurmctld's helper and the
  hosts' inits (slurmstepd and whatever jobs started, daemonized ones too);
  ``wait_no_leftovers(timeout=30) -> list`` (polls until empty, returns what is left),
  ``kill_leftovers() -> list`` (SIGKILL them), ``reset(timeout=60) -> {"jobs", "processes"}`` (cancel
  every job, kill leftovers, restart a dead slurmd, wait for idle nodes; returns what it had to clean).
* ``kill_slurmd(node, sig=SIGKILL)`` / ``start_slurmd(node)`` (node failure tests), ``log(name)``
  ("slurmctld", "munged" or a node name) reads a daemon's log.
* module level: ``missing_requirements() -> str | None`` (why no cluster can run here: not root, missing
  binaries, no ``ip netns``), ``cleanup_stale() -> list`` (start() calls it: removes the namespaces and
  temp dir of clusters whose owner process died; the daemons died with it: every long-lived child is
  started with PR_SET_PDEATHSIG=SIGKILL, so start a cluster from a thread that lives as long as it),
  ``wait_until(cond, timeout, what)``, ``parse_kv(line)``.

slurm.conf essentials for Debian's 22.05.8 here: ``ProctrackType=proctrack/linuxproc``,
``TaskPlugin=task/none``, ``SelectType=select/cons_tres`` + ``CR_CPU``, ``SlurmdParameters=
config_overrides`` (nodes may declare more CPUs than the machine has), ``SlurmdSpoolDir``/pid/log files
with ``%n`` (several slurmd on one file system), ``ReturnToService=2``, ``KillWait=5``,
``AuthInfo=socket=...,cred_expire=15`` (a requeued job waits cred_expire+1 s: 120 s by default),
``SchedulerParameters=bf_interval=2,sched_interval=2`` (pending jobs start within seconds), no
accounting (``sacct`` does not work here), ``JobCompType=jobcomp/filetxt`` (final states of purged jobs).
"""
from __future__ import annotations

import functools
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT",
})
_CLIENT_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCONTROL_", "SACCT_")
REQUIRED_BINARIES = ("munged", "munge", "slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "scontrol",
                     "squeue", "sinfo", "scancel", "ip", "nsenter", "unshare")


_SEARCH_PATH = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _bin(name: str) -> str:
    """Absolute path of a system binary (sbin directories searched too, whatever PATH says)."""
    return shutil.which(name, path=_SEARCH_PATH) or name


@functools.lru_cache(maxsize=None)
def missing_requirements() -> str | None:
    """Why a SlurmCluster cannot run here (None if it can): root, binaries, network namespaces.  Cached."""
    if os.geteuid() != 0:
        return "the Slurm test cluster needs root (network namespaces, slurmd)"
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b, path=_SEARCH_PATH) is None]
    if missing:
        return f"missing binaries for the Slurm test cluster: {' '.join(missing)} (bash .ci/setup-cluster-deps.sh)"
    name = f"mfsprobe{os.getpid()}"
    try:
        r = subprocess.run([_bin("ip"), "netns", "add", name], capture_output=True, text=True, timeout=20)
        if r.returncode != 0:
            return f"`ip netns add` does not work here: {r.stderr.strip()}"
    finally:
        subprocess.run([_bin("ip"), "netns", "del", name], capture_output=True, timeout=20)
    return None


def wait_until(cond, timeout: float, what: str, interval: float = 0.25):
    """Poll ``cond()`` until it returns something truthy (returned); TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def parse_kv(line: str) -> dict:
    """``Key=value Key2=value with spaces ...`` (scontrol -o, jobcomp/filetxt) -> dict."""
    pattern = r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|\s*$)"
    return {m.group(1): m.group(2) for m in re.finditer(pattern, line)}


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the thread that started it dies (a killed pytest takes its
    cluster along: a host's `unshare` takes its init, and so every process of the host)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _owner_token(pid: int) -> str:
    """pid and start time of a process (a pid alone may be reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return ""


def cleanup_stale() -> list[str]:
    """Remove what clusters of dead processes left (a pytest killed before stop()): processes in their
    namespaces, the namespaces, their temp dirs.  Returns the names removed.  A cluster whose owner
    process still lives is never touched."""
    removed = []
    tmp = Path(tempfile.gettempdir())
    live_ks = set()
    for d in tmp.glob("mfs*-slurm"):
        m = re.fullmatch(r"mfs(\d+)-slurm", d.name)
        if not m:
            continue
        try:
            owner = (d / "owner").read_text()
        except OSError:
            owner = None
        if owner is None:
            # being created right now (no owner yet) or broken: leave it unless it is old
            try:
                if time.time() - d.stat().st_mtime < 600:
                    live_ks.add(int(m.group(1)))
                    continue
            except OSError:
                continue
        elif owner and _owner_token(int(owner.split()[0])) == owner:
            live_ks.add(int(m.group(1)))
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    stale_ns = [n for n in SlurmCluster._list_netns()
                if (m := re.match(r"mfs(\d+)-", n)) and int(m.group(1)) not in live_ks]
    if stale_ns:
        inodes = {_ns_inode(f"/run/netns/{n}") for n in stale_ns} - {None}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _ns_inode(f"/proc/{entry}/ns/net") in inodes:
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for n in stale_ns:
            subprocess.run([_bin("ip"), "netns", "del", n], capture_output=True, timeout=30)
            removed.append(n)
    return removed


# pid 1 of each host's PID namespace: sets the host's name and /etc/hosts, then reaps orphans
# (processes that left their job, e.g. daemonized ones, end up here, as on a real node)
_INIT = r"""
import os, signal, socket, subprocess, sys, time
subprocess.run([sys.argv[3], "--bind", sys.argv[1], "/etc/hosts"], check=True)
socket.sethostname(sys.argv[2])
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
print("ready", flush=True)
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        time.sleep(0.2)
"""


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class SlurmCluster:
    controller_name = "ctl"

    def __init__(self, nodes: int = 2, cpus_per_node: int = 2, memory_mb: int = 4000,
                 partition: str = "debug", extra_conf: str = "", start_timeout: float = 120.0,
                 debug: str = "info", cred_expire: int = 15) -> None:
        if not 1 <= nodes <= 50:
            raise ValueError("nodes must be between 1 and 50")
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.memory_mb = memory_mb
        self.partition = partition
        self.extra_conf = extra_conf
        self.start_timeout = start_timeout
        self.debug = debug
        self.cred_expire = cred_expire  # also the delay before a requeued job may start again (default 120)
        self.node_names = [f"n{i}" for i in range(1, nodes + 1)]
        self.hosts = [self.controller_name, *self.node_names]
        self.k: int | None = None
        self.tmpdir: Path | None = None
        self.netns: dict[str, str] = {}
        self.switch_ns: str | None = None
        self._created_ns: list[str] = []
        self._holders: dict[str, subprocess.Popen] = {}  # per host: `unshare` (parent of the host's init)
        self._inits: dict[str, int] = {}  # per host: pid (in the root PID namespace) of the host's init
        self._daemons: dict[str, subprocess.Popen] = {}  # "munged", "slurmctld", node names
        self._submitted: dict[int, dict] = {}
        self._last_info: dict[int, dict] = {}
        self.started = False

    # ------------------------------------------------------------------ addresses
    @property
    def subnet(self) -> str:
        return f"10.213.{self.k}.0/24"

    @property
    def controller_ip(self) -> str:
        return f"10.213.{self.k}.1"

    def node_ip(self, name: str) -> str:
        if name == self.controller_name:
            return self.controller_ip
        return f"10.213.{self.k}.{10 + self.node_names.index(name) + 1}"

    @property
    def node_ips(self) -> list[str]:
        return [self.node_ip(n) for n in self.node_names]

    @property
    def conf(self) -> str:
        return str(self.tmpdir / "slurm.conf")

    @property
    def jobdir(self) -> Path:
        return self.tmpdir / "jobs"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        try:
            self._start()
        except BaseException:
            try:
                self.stop()
            except Exception as stop_error:  # report the start failure, mention the cleanup one
                print(f"SlurmCluster: cleanup after failed start: {stop_error}")
            raise

    def _start(self) -> None:
        cleanup_stale()
        # K: the temp dir /tmp/mfsK-slurm is the reservation (mkdir is atomic), no namespace may use K
        used = {int(m.group(1)) for n in self._list_netns() if (m := re.match(r"mfs(\d+)-", n))}
        for k in random.sample(range(2, 254), 252):
            if k in used:
                continue
            try:
                (Path(tempfile.gettempdir()) / f"mfs{k}-slurm").mkdir()
            except FileExistsError:
                continue
            self.k = k
            break
        else:
            raise RuntimeError("no free 10.213.K.0/24 test subnet (252 Slurm test clusters exist?)")
        prefix = f"mfs{self.k}"
        self.netns = {h: f"{prefix}-{h}" for h in self.hosts}
        self.switch_ns = f"{prefix}-sw"
        self.tmpdir = Path(tempfile.gettempdir()) / f"{prefix}-slurm"
        t = self.tmpdir
        t.chmod(0o755)
        (t / "owner").write_text(_owner_token(os.getpid()))
        for d in ("state", "spool", "log", "run", "jobs"):
            (t / d).mkdir()
        for n in self.node_names:
            (t / "spool" / n).mkdir()
        (t / "munge").mkdir(mode=0o700)
        (t / "munge-sock").mkdir(mode=0o755)
        key = t / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        (t / "plugstack.conf").write_text("")
        (t / "hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
                                 + "".join(f"{self.node_ip(h)} {h}\n" for h in self.hosts))
        self._write_conf()

        # munged: own key and socket, in the root namespaces (the socket is a file every host sees)
        sock = t / "munge-sock" / "munge.socket"
        self._spawn("munged", [_bin("munged"), "-F", "--force", f"--socket={sock}", f"--key-file={key}",
                               f"--log-file={t / 'log' / 'munged.log'}", f"--pid-file={t / 'run' / 'munged.pid'}",
                               f"--seed-file={t / 'munge' / 'seed'}"])
        wait_until(lambda: self._alive("munged") and sock.exists() and subprocess.run(
            [_bin("munge"), "-n", "-S", str(sock)], capture_output=True, timeout=10).returncode == 0,
            30, "munged to answer")

        # network: a switch namespace with a bridge, one namespace + veth per host
        for ns in [self.switch_ns, *self.netns.values()]:
            self._ip("netns", "add", ns)
            self._created_ns.append(ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", self.switch_ns, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.switch_ns, "link", "set", "br0", "up")
        for h, ns in self.netns.items():
            port = f"p-{h}"[:15]
            self._ip("-n", self.switch_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip("-n", self.switch_ns, "link", "set", port, "master", "br0", "up")
            self._ip("-n", ns, "addr", "add", f"{self.node_ip(h)}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")

        # one init per host: pid 1 of the host's PID namespace, in its network namespace, with its own
        # hostname (UTS namespace) and /etc/hosts (mount namespace, where /proc shows the host's processes)
        for h, ns in self.netns.items():
            with open(t / "log" / f"init-{h}.log", "wb") as log:
                self._holders[h] = subprocess.Popen(
                    [_bin("nsenter"), f"--net=/run/netns/{ns}", "--", _bin("unshare"), "--uts", "--mount",
                     "--propagation=slave", "--pid", "--fork", "--mount-proc", "--kill-child", "--",
                     sys.executable, "-c", _INIT, str(t / "hosts"), h, _bin("mount"), "slurmcluster-init"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=_die_with_parent)
        for h in self.hosts:
            self._inits[h] = wait_until(lambda h=h: self._init_ready(h), 30, f"the init of {h}")

        # slurmctld, then one slurmd per node
        self._spawn("slurmctld", self._enter(self.controller_name,
                                             [_bin("slurmctld"), "-D", "-i", "-f", self.conf], self.tmpdir))
        wait_until(lambda: self._check_alive("slurmctld") and self.client(
            ["scontrol", "ping"], check=False, timeout=20).stdout.find("is UP") >= 0,
            self.start_timeout, "slurmctld to answer `scontrol ping`", interval=0.5)
        for n in self.node_names:
            self.start_slurmd(n, wait=False)
        self.wait_idle(self.start_timeout)

    def _write_conf(self) -> None:
        t = self.tmpdir
        nodes = "".join(
            f"NodeName={n} NodeAddr={self.node_ip(n)} NodeHostname={n} CPUs={self.cpus_per_node} "
            f"Boards=1 SocketsPerBoard=1 CoresPerSocket={self.cpus_per_node} ThreadsPerCore=1 "
            f"RealMemory={self.memory_mb} State=UNKNOWN\n" for n in self.node_names)
        Path(self.conf).write_text(f"""\
# written by tests/slurmcluster.py
ClusterName=mfs{self.k}
SlurmctldHost={self.controller_name}({self.controller_ip})
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={t / 'munge-sock' / 'munge.socket'},cred_expire={self.cred_expire}
StateSaveLocation={t / 'state'}
SlurmdSpoolDir={t / 'spool'}/%n
SlurmctldPidFile={t / 'run' / 'slurmctld.pid'}
SlurmdPidFile={t / 'run'}/slurmd-%n.pid
SlurmctldLogFile={t / 'log' / 'slurmctld.log'}
SlurmdLogFile={t / 'log'}/slurmd-%n.log
SlurmctldDebug={self.debug}
SlurmdDebug={self.debug}
PlugStackConfig={t / 'plugstack.conf'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
ReturnToService=2
KillWait=5
MinJobAge=120
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={t / 'jobcomp.txt'}
{self.extra_conf}
{nodes}PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def stop(self) -> None:
        """Stop every daemon and every process in our namespaces, delete the namespaces and the temp dir.
        Raises RuntimeError naming what could not be cleaned up."""
        if not self.started:
            return
        problems: list[str] = []
        # graceful stop of the daemons first (their logs end cleanly), then the hosts' inits (the kernel
        # kills every process of a PID namespace whose init dies), then anything else in our namespaces
        for name in ["slurmctld", *self.node_names]:
            self._terminate(name, signal.SIGTERM, 10)
        for pid in self._inits.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for host, proc in self._holders.items():  # `unshare` exits once it has reaped its init, and the
            if host not in self._inits:           # init dies once every process of its host is gone
                proc.kill()  # (start failed before the init was up: --kill-child takes the init along)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                problems.append(f"the init of {host} (pid {self._inits.get(host)}) did not end")
        for _ in range(3):
            pids = [p for p, _h in self._pids_in_namespaces()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for proc in [*self._holders.values(), *self._daemons.values()]:
                try:
                    proc.wait(timeout=0)
                except subprocess.TimeoutExpired:
                    pass
            try:
                wait_until(lambda: not self._pids_in_namespaces(), 15, "processes in the cluster's namespaces to die")
            except TimeoutError:
                pass
        left = self._pids_in_namespaces()
        if left:
            problems.append(f"processes still in the cluster's namespaces: {left}")
        self._terminate("munged", signal.SIGTERM, 10)
        for name, proc in self._daemons.items():
            if proc.poll() is None:
                problems.append(f"{name} (pid {proc.pid}) still running")
        for ns in reversed(self._created_ns):
            r = subprocess.run([_bin("ip"), "netns", "del", ns], capture_output=True, text=True, timeout=30)
            if r.returncode != 0 and ns in self._list_netns():
                problems.append(f"ip netns del {ns}: {r.stderr.strip()}")
        ours = [ns for ns in self._list_netns() if ns in self._created_ns]
        if ours:
            problems.append(f"network namespaces left: {ours}")
        self._created_ns = [ns for ns in self._created_ns if ns in ours]
        if self.tmpdir is not None and self.tmpdir.exists():
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            if self.tmpdir.exists():
                problems.append(f"could not remove {self.tmpdir}")
        self.started = False
        if problems:
            raise RuntimeError("SlurmCluster.stop: " + "; ".join(problems))

    # ------------------------------------------------------------------ daemons
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.tmpdir / "log" / f"{name}.out", "ab")
        try:
            self._daemons[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True, cwd=self.tmpdir,
                                                   preexec_fn=_die_with_parent)
        finally:
            log.close()

    def _alive(self, name: str) -> bool:
        proc = self._daemons.get(name)
        return proc is not None and proc.poll() is None

    def _check_alive(self, name: str) -> bool:
        if not self._alive(name):
            raise RuntimeError(f"{name} is not running:\n{self.log(name)[-3000:]}")
        return True

    def _terminate(self, name: str, sig: int, timeout: float) -> None:
        proc = self._daemons.get(name)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)

    def start_slurmd(self, node: str, wait: bool = True, timeout: float = 60) -> None:
        """(Re)start ``node``'s slurmd; with ``wait``, until the node is idle again."""
        if self._alive(node):
            raise RuntimeError(f"slurmd of {node} is already running")
        self._spawn(node, self._enter(node, [_bin("slurmd"), "-D", "-N", node, "-f", self.conf], self.tmpdir))
        if wait:
            wait_until(lambda: self._check_alive(node) and self.node_states().get(node) == "idle",
                       timeout, f"{node} to be idle", interval=0.5)

    def kill_slurmd(self, node: str, sig: int = signal.SIGKILL) -> None:
        """Kill ``node``'s slurmd (its running job steps stay, as on a real node)."""
        self._terminate(node, sig, 10)

    def log(self, name: str) -> str:
        """A daemon's log: "slurmctld", "munged" or a node name (slurmd), plus its stdout/stderr."""
        t = self.tmpdir / "log"
        files = {"slurmctld": ["slurmctld.log"], "munged": ["munged.log"]}.get(name, [f"slurmd-{name}.log"])
        files.append(f"{name}.out")
        return "".join(f"== {f}\n{(t / f).read_text(errors='replace')}" for f in files if (t / f).exists())

    # ------------------------------------------------------------------ namespaces and processes
    def _ip(self, *args: str) -> None:
        r = subprocess.run([_bin("ip"), *args], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    @staticmethod
    def _list_netns() -> list[str]:
        r = subprocess.run([_bin("ip"), "netns", "list"], capture_output=True, text=True, timeout=30)
        return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]

    def _init_ready(self, host: str) -> int | None:
        """The root-namespace pid of ``host``'s init once it is ready, else None."""
        proc = self._holders[host]
        log = self.tmpdir / "log" / f"init-{host}.log"
        if proc.poll() is not None:
            raise RuntimeError(f"the init of {host} exited: {log.read_text(errors='replace')}")
        if "ready" not in log.read_text(errors="replace"):
            return None
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if len(children) == 1 else None

    def _enter(self, host: str | None, cmd: list[str], cwd=None) -> list[str]:
        """``cmd`` run on ``host`` (its network, UTS, mount and PID namespaces), in ``cwd`` (entering a
        mount namespace resets the working directory, so it is passed explicitly).  nsenter forks for
        the PID namespace and waits: signals to its process group reach ``cmd``."""
        if host is None:
            host = self.controller_name
        if host not in self._inits:
            raise KeyError(f"no host {host!r} in this cluster (hosts: {self.hosts})")
        wd = os.path.abspath(cwd if cwd is not None else os.getcwd())
        return [_bin("nsenter"), f"--target={self._inits[host]}", "--net", "--uts", "--mount", "--pid", f"--wd={wd}",
                "--", *cmd]

    def _pids_in_namespaces(self) -> list[tuple[int, str]]:
        """(pid, host) of every process in one of our network namespaces (the switch's too)."""
        inodes = {}
        for host, ns in [*self.netns.items(), ("switch", self.switch_ns)]:
            ino = _ns_inode(f"/run/netns/{ns}")
            if ino is not None:
                inodes[ino] = host
        found = []
        if not inodes:
            return found
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            ino = _ns_inode(f"/proc/{entry}/ns/net")
            if ino in inodes:
                found.append((int(entry), inodes[ino]))
        return found

    def leftover_processes(self) -> list[dict]:
        """Every process in the cluster's namespaces other than its daemons, slurmctld's helper and the
        hosts' inits: slurmstepd and whatever jobs started (daemonized ones too).
        [{"pid": pid in the root PID namespace, "nspid": pid on its host, "host", "cmdline"}]"""
        procs = {}
        for pid, host in self._pids_in_namespaces():
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue  # gone meanwhile
            if "\nState:\tZ" in status:
                continue  # a zombie is no running process (its parent will reap it)
            ppid = int(re.search(r"\nPPid:\t(\d+)", status).group(1))
            nspid = re.search(r"\nNSpid:\t([\d\t ]+)", status)
            procs[pid] = {"pid": pid, "nspid": int(nspid.group(1).split()[-1]) if nspid else pid, "host": host,
                          "cmdline": raw.replace(b"\0", b" ").decode(errors="replace").strip(), "ppid": ppid}
        wrappers = {p.pid for p in self._daemons.values()}  # nsenter, waiting for its daemon
        daemons = {pid for pid, p in procs.items() if p["ppid"] in wrappers}
        ctld = self._daemons.get("slurmctld")
        ctld_real = {pid for pid in daemons if ctld is not None and procs[pid]["ppid"] == ctld.pid}
        ours = ({p.pid for p in self._holders.values()} | set(self._inits.values()) | wrappers | daemons
                | {pid for pid, p in procs.items() if p["ppid"] in ctld_real} | {os.getpid()})
        return [{k: v for k, v in p.items() if k != "ppid"} for pid, p in sorted(procs.items()) if pid not in ours]

    def kill_leftovers(self, timeout: float = 15) -> list[dict]:
        """SIGKILL every leftover process (see leftover_processes); returns what was killed."""
        left = self.leftover_processes()
        for p in left:
            try:
                os.kill(p["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        still = self.wait_no_leftovers(timeout)
        if still:
            raise RuntimeError(f"processes survived SIGKILL: {still}")
        return left

    def reset(self, timeout: float = 60) -> dict:
        """Back to an empty, idle cluster: cancel every job, wait for idle nodes, kill leftover processes.
        Returns {"jobs": [ids cancelled], "processes": [killed]} so a caller can report a test's mess."""
        r = self.client(["squeue", "-h", "-o", "%i"], timeout=30)
        jobs = [int(j) for j in r.stdout.split() if j.strip().isdigit()]
        if jobs:
            self.client(["scancel", *map(str, jobs)], timeout=30, check=False)
            for j in jobs:
                self.wait(j, timeout=timeout, cancel_on_timeout=False)
        killed = self.kill_leftovers()
        for n in self.node_names:
            if not self._alive(n):
                self.start_slurmd(n, wait=False)
        self.wait_idle(timeout)
        return {"jobs": jobs, "processes": killed}

    def wait_no_leftovers(self, timeout: float = 30) -> list[dict]:
        """Poll until no job process is left in the cluster; returns what is still there at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.leftover_processes()
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.25)

    # ------------------------------------------------------------------ commands
    def client_env(self, env: dict | None = None) -> dict:
        out = {k: v for k, v in os.environ.items() if not k.startswith(_CLIENT_ENV_PREFIXES)}
        out["SLURM_CONF"] = self.conf
        # tests/conftest.py sets it to 0 (a test's Ray stays on 127.0.0.1); on the cluster's nodes Ray
        # joins over the node addresses, which exist only inside the cluster's namespaces
        out["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
        for k, v in (env or {}).items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = str(v)
        return out

    def run(self, cmd, node: str | None = None, env: dict | None = None, timeout: float = 60,
            check: bool = True, cwd=None) -> subprocess.CompletedProcess:
        """Run ``cmd`` (list, or a str for ``sh -c``) on ``node`` (None: the controller host), with the
        cluster's client environment; raises CalledProcessError (with output) when ``check`` and it fails."""
        if isinstance(cmd, str):
            cmd = ["sh", "-c", cmd]
        cwd = cwd or self.jobdir
        r = subprocess.run(self._enter(node, [str(c) for c in cmd], cwd), env=self.client_env(env), cwd=cwd,
                           capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
        return r

    def popen(self, cmd, node: str | None = None, env: dict | None = None, **kwargs) -> subprocess.Popen:
        """Start ``cmd`` on ``node`` without waiting (the caller stops it); new session by default."""
        if isinstance(cmd, str):
            cmd = ["sh", "-c", cmd]
        kwargs.setdefault("start_new_session", True)
        kwargs.setdefault("cwd", self.jobdir)
        return subprocess.Popen(self._enter(node, [str(c) for c in cmd], kwargs["cwd"]), env=self.client_env(env),
                                **kwargs)

    def client(self, args: list[str], env: dict | None = None, timeout: float = 60, check: bool = True,
               cwd=None) -> subprocess.CompletedProcess:
        """A Slurm client command (squeue, scontrol, srun ...) on the controller host."""
        return self.run(args, node=None, env=env, timeout=timeout, check=check, cwd=cwd)

    def sbatch(self, args: list[str], env: dict | None = None, cwd=None, timeout: float = 60) -> int:
        """Submit a batch job; returns its id.  The job gets the client environment plus ``env``."""
        args = [str(a) for a in args]
        if "--parsable" not in args:
            args = ["--parsable", *args]
        try:
            r = self.client(["sbatch", *args], env=env, cwd=cwd, timeout=timeout)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({e.returncode}): {e.stderr.strip()}") from None
        job_id = int(r.stdout.strip().splitlines()[-1].split(";")[0])
        try:  # remembered for output(): StdOut stays known after slurmctld forgets the job
            self._submitted[job_id] = self.job_info(job_id)
        except (RuntimeError, KeyError, subprocess.TimeoutExpired):
            pass
        return job_id

    def _show_job(self, job_id: int) -> dict | None:
        r = self.client(["scontrol", "show", "job", "-o", str(job_id)], check=False, timeout=30)
        if r.returncode != 0:
            if "Invalid job id" in r.stderr:
                return None
            raise RuntimeError(f"scontrol show job {job_id}: {r.stderr.strip()}")
        lines = [line for line in r.stdout.splitlines() if line.startswith(f"JobId={job_id} ")]
        if not lines:
            return None
        info = parse_kv(lines[0])
        self._last_info[job_id] = info
        return info

    def _jobcomp(self, job_id: int) -> dict | None:
        path = self.tmpdir / "jobcomp.txt"
        if not path.exists():
            return None
        last = None
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(f"JobId={job_id} "):
                last = parse_kv(line)
        return last

    def job_info(self, job_id: int) -> dict:
        """``scontrol show job -o`` as a dict; for a job Slurm has forgotten, its last jobcomp record."""
        info = self._show_job(job_id)
        if info is None:
            info = self._jobcomp(job_id)
        if info is None:
            raise KeyError(f"job {job_id} is unknown to slurmctld and to the jobcomp log")
        return info

    def _info_until(self, job_id: int, deadline: float) -> dict:
        """job_info, retrying a slurmctld that does not answer (a loaded machine) until ``deadline``."""
        while True:
            try:
                return self.job_info(job_id)
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def state(self, job_id: int) -> str:
        return self.job_info(job_id)["JobState"].split()[0]

    def output(self, job_id: int) -> str:
        """The job's stdout file as text ("" if there is none yet)."""
        info = self._submitted.get(job_id) or self.job_info(job_id)
        path = info.get("StdOut")
        if not path:
            return ""
        try:
            return Path(path).read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, job_id: int, timeout: float = 300, cancel_on_timeout: bool = True) -> str:
        """Wait until the job has ended; returns its final state (COMPLETED, FAILED, CANCELLED, TIMEOUT...)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self._info_until(job_id, deadline)
            state = info["JobState"]
            if state in TERMINAL_STATES:
                return state
            if time.monotonic() > deadline:
                if cancel_on_timeout:
                    self.scancel(job_id)
                raise TimeoutError(f"job {job_id} still {state} after {timeout}s "
                                   f"({'cancelled' if cancel_on_timeout else 'left running'}); info: {info}\n"
                                   f"output:\n{self.output(job_id)[-3000:]}")
            time.sleep(0.5)

    def wait_state(self, job_id: int, states=("RUNNING",), timeout: float = 120) -> str:
        """Wait until the job is in one of ``states``; RuntimeError if it ends in another state first."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            info = self._info_until(job_id, deadline)
            state = info["JobState"]
            if state in states:
                return state
            if state in TERMINAL_STATES:
                raise RuntimeError(f"job {job_id} ended {state} while waiting for {sorted(states)}; "
                                   f"output:\n{self.output(job_id)[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout}s: {info}")
            time.sleep(0.25)

    def scancel(self, job_id: int, signal: str | None = None, batch: bool = False) -> None:
        args = ["scancel"]
        if signal:
            args.append(f"--signal={signal}")
        if batch:
            args.append("--batch")
        self.client([*args, str(job_id)], timeout=30)

    def requeue(self, job_id: int) -> None:
        self.client(["scontrol", "requeue", str(job_id)], timeout=30)

    def node_states(self) -> dict[str, str]:
        r = self.client(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=30)
        out = {}
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = parts[1]
        return out

    def wait_idle(self, timeout: float = 60) -> None:
        """Until every node is idle (after start, or after jobs were cancelled and nodes completed)."""
        deadline = time.monotonic() + timeout
        while True:
            for n in self.node_names:
                self._check_alive(n)
            states = self.node_states()
            if len(states) == len(self.node_names) and all(s == "idle" for s in states.values()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes not idle after {timeout}s: {states}\n{self.log('slurmctld')[-3000:]}")
            time.sleep(0.5)


if __name__ == "__main__":  # manual check: python tests/slurmcluster.py
    t0 = time.monotonic()
    with SlurmCluster() as c:
        print(f"up in {time.monotonic() - t0:.1f}s: {c.node_states()} {c.node_ips}")
        print(c.client(["srun", "-N2", "sh", "-c", "echo $(hostname) $(hostname -i) $SLURMD_NODENAME"]).stdout)
        t1 = time.monotonic()
    print(f"stopped in {time.monotonic() - t1:.1f}s")

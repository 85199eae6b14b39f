"""One Ray cluster across a Slurm allocation, for the length of one stage.

``midiforge preprocess ... --cluster slurm`` (and ``generate``), run as the batch script of
``sbatch --nodes=N``, does what Ray's Slurm guide does by hand, with the races and leaks taken out:

- the head runs on the batch script's node (the allocation's first), at the address Slurm gives that
  node (``NodeAddr``), on a port derived from the job id (two jobs sharing a node do not collide);
- one ``ray start --block`` worker per other node through a single ``srun`` step, told the head's
  address in its environment (no file on a shared file system to race on);
- a token made for the job (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``) in the environment of the head,
  the workers and the driver: nobody outside the job can use the cluster;
- each node offers the CPUs (and GPUs) Slurm allocated on it;
- the stage starts once every node has joined (bounded wait), and the cluster is stopped however the
  stage ends: success, an error, ``scancel`` or the time limit (SIGTERM), leaving no raylet behind.
  Every Ray process is a child of a ``ray start --block`` that is itself a process of the job's steps,
  so Slurm's process tracking covers them too.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from midiforge.errors import MidiforgeError
from midiforge.pipeline.ray_runtime import LOOPBACK_ENV, set_ray_environment

CLUSTERS = ("none", "slurm")
JOIN_TIMEOUT = 180.0   # seconds for every node to join
STOP_TIMEOUT = 30.0    # seconds for Ray to stop after SIGTERM before SIGKILL


def _expand(text: str) -> list[str]:
    from midiforge.pipeline.membership import expand_hostlist

    return expand_hostlist(text)


def _per_node(text: str) -> list[int]:
    from midiforge.pipeline.membership import expand_tasks_per_node

    return expand_tasks_per_node(text)


def node_address(name: str) -> str:
    """The IPv4 address of Slurm node ``name``: its ``NodeAddr`` (which defaults to the node name), resolved."""
    addr = name
    scontrol = shutil.which("scontrol")
    if scontrol:
        out = subprocess.run([scontrol, "show", "node", name, "-o"], capture_output=True, text=True, timeout=30)
        for field in out.stdout.split():
            if field.startswith("NodeAddr="):
                addr = field.split("=", 1)[1]
    try:
        return socket.getaddrinfo(addr, None, socket.AF_INET)[0][4][0]
    except OSError as exc:
        raise MidiforgeError(f"Slurm node {name}: cannot resolve its address {addr!r} ({exc})") from None


def job_port(job_id: int) -> int:
    """The head's GCS port for a job: 20000 + 8 * (job id mod 1500); the head's agents take the 7 ports after it.

    20000-31999 lies between Ray's worker ports (10002-19999) and Linux's ephemeral ports (32768 up), so
    two jobs that share a node, and the Ray workers of either, do not take each other's ports."""
    return 20000 + 8 * (int(job_id) % 1500)


def ray_executable() -> str:
    """``ray`` beside this Python (the venv's), else on PATH."""
    here = Path(sys.executable).with_name("ray")
    if here.exists():
        return str(here)
    found = shutil.which("ray")
    if not found:
        raise MidiforgeError("the `ray` command is not installed beside this Python nor on PATH")
    return found


class SlurmRayCluster:
    """Start with :meth:`start` (returns the address to join), end with :meth:`stop`; a context manager."""

    def __init__(self, env: Mapping[str, str] | None = None, *, join_timeout: float = JOIN_TIMEOUT,
                 log=print) -> None:
        env = dict(os.environ if env is None else env)
        need = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST")
        missing = [k for k in need if not env.get(k)]
        if missing:
            raise MidiforgeError(f"--cluster slurm: {', '.join(missing)} not set; run this inside an sbatch job "
                                 "(slurm/preprocess.sbatch, slurm/generate.sbatch)")
        self.env = env
        self.job_id = int(env["SLURM_JOB_ID"])
        self.nodes = _expand(env["SLURM_JOB_NODELIST"])
        self.head = env.get("SLURMD_NODENAME") or self.nodes[0]
        if self.head not in self.nodes:
            raise MidiforgeError(f"--cluster slurm: this node {self.head} is not in the job's nodes {self.nodes}")
        cpus = _per_node(env.get("SLURM_JOB_CPUS_PER_NODE") or ",".join("1" for _ in self.nodes))
        self.cpus = dict(zip(self.nodes, cpus)) if len(cpus) == len(self.nodes) else {n: cpus[0] for n in self.nodes}
        self.gpus = int(env.get("SLURM_GPUS_ON_NODE") or 0)
        self.join_timeout = join_timeout
        self.log = log
        self.port = job_port(self.job_id)
        self.head_ip = node_address(self.head)
        self.address = f"{self.head_ip}:{self.port}"
        self.token = secrets.token_hex(32)
        self.temp = Path(env.get("MIDIFORGE_RAY_TMP") or "/tmp") / f"mfray-{self.job_id}"
        self._head: subprocess.Popen | None = None
        self._workers: subprocess.Popen | None = None
        self._stopped = False

    # -- environment --------------------------------------------------------------------
    def ray_env(self) -> dict[str, str]:
        """The variables every process of this cluster (head, workers, driver) needs."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_ADDRESS": self.address,
                "RAY_USAGE_STATS_ENABLED": "0", "TF_USE_LEGACY_KERAS": "1",
                LOOPBACK_ENV: "1",  # a cluster of several nodes, on their own addresses
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # stopping is the end of the job: no 30 s drain

    def _head_cmd(self) -> list[str]:
        p = self.port
        return [ray_executable(), "start", "--head", "--block", f"--node-ip-address={self.head_ip}", f"--port={p}",
                f"--num-cpus={self.cpus[self.head]}", f"--num-gpus={self.gpus}",
                f"--temp-dir={self.temp}-{self.head}", "--include-dashboard=false", "--disable-usage-stats", "--log-color=false",
                f"--dashboard-agent-listen-port={p + 1}", f"--ray-client-server-port={p + 2}",
                f"--node-manager-port={p + 3}", f"--object-manager-port={p + 4}",
                f"--metrics-export-port={p + 5}", f"--dashboard-agent-grpc-port={p + 6}",
                f"--runtime-env-agent-port={p + 7}"]

    def _workers_cmd(self, others: list[str]) -> list[str]:
        srun = shutil.which("srun")
        if not srun:
            raise MidiforgeError("--cluster slurm: `srun` is not on PATH")
        per_task = min(self.cpus[n] for n in others)
        return [srun, f"--nodes={len(others)}", f"--ntasks={len(others)}", "--ntasks-per-node=1",
                f"--nodelist={','.join(others)}", f"--cpus-per-task={per_task}", "--kill-on-bad-exit=0",
                "--overlap", f"--job-name=ray-workers-{self.job_id}",
                *([f"--gpus-per-task={self.gpus}"] if self.gpus else []),
                sys.executable, "-m", "midiforge.pipeline.slurm_ray", "worker"]

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> str:
        env = {**self.env, **self.ray_env()}
        others = [n for n in self.nodes if n != self.head]
        self.log(f"midiforge: job {self.job_id}: Ray head on {self.head} ({self.address}), "
                 f"{len(others)} worker node(s) {' '.join(others) or '-'}; CPUs {self.cpus}, GPUs/node {self.gpus}")
        self._head = subprocess.Popen(self._head_cmd(), env=env, stdin=subprocess.DEVNULL)
        if others:
            env_w = {**env, "MIDIFORGE_RAY_HEAD": self.address, "MIDIFORGE_RAY_TEMP": str(self.temp)}
            self._workers = subprocess.Popen(self._workers_cmd(others), env=env_w, stdin=subprocess.DEVNULL)
        set_ray_environment(self.ray_env())  # this process is the stage's driver
        try:
            self._wait_joined(len(self.nodes))
        except BaseException:
            self.stop()
            raise
        return self.address

    def _wait_joined(self, expected: int) -> None:
        import ray

        from midiforge.pipeline.ray_runtime import check_reachable

        deadline = time.monotonic() + self.join_timeout
        while True:  # the head's GCS port first
            try:
                check_reachable(self.address, timeout=2.0)
                break
            except MidiforgeError:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise MidiforgeError(f"--cluster slurm: the Ray head did not start within "
                                         f"{self.join_timeout:.0f} s at {self.address}") from None
                time.sleep(0.5)
        while True:  # the GCS answers before the head's own raylet has registered: try again until it has
            try:
                ray.init(address=self.address, include_dashboard=False, logging_level="WARNING",
                         configure_logging=True, _node_ip_address=self.head_ip)
                break
            except (ConnectionError, RuntimeError) as exc:
                ray.shutdown()
                self._check_alive()
                if time.monotonic() > deadline:
                    raise MidiforgeError(f"--cluster slurm: cannot join the job's Ray head at {self.address}: "
                                         f"{str(exc).splitlines()[0]}") from None
                time.sleep(1.0)
        want_cpus = sum(self.cpus.values())
        while True:  # every node registered and offering its CPUs (a node registers before its resources show)
            alive = [n for n in ray.nodes() if n.get("Alive")]
            cpus = int(ray.available_resources().get("CPU", 0))
            if len(alive) >= expected and cpus >= want_cpus:
                self.log(f"midiforge: job {self.job_id}: {len(alive)} Ray nodes joined, {cpus} CPUs")
                return
            self._check_alive()
            if time.monotonic() > deadline:
                raise MidiforgeError(f"--cluster slurm: only {len(alive)} of {expected} nodes joined the Ray "
                                     f"cluster within {self.join_timeout:.0f} s")
            time.sleep(0.5)

    def _check_alive(self) -> None:
        if self._head is not None and self._head.poll() is not None:
            raise MidiforgeError(f"--cluster slurm: the Ray head exited (code {self._head.returncode})")
        if self._workers is not None and self._workers.poll() is not None:
            raise MidiforgeError(f"--cluster slurm: the Ray worker step exited (code {self._workers.returncode})")

    def stop(self) -> None:
        """Disconnect, then stop the workers' step and the head (SIGTERM, then SIGKILL after a bound)."""
        if self._stopped or (self._head is None and self._workers is None):
            return
        self._stopped = True
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001 - stopping must go on
            pass
        for p in (self._workers, self._head):  # the workers first, while the head can still hear them leave
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)  # srun forwards it to every `ray start --block`
            try:
                p.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for node in self.nodes:
            shutil.rmtree(f"{self.temp}-{node}", ignore_errors=True)
        self.log(f"midiforge: job {self.job_id}: Ray cluster stopped")

    def __enter__(self) -> "SlurmRayCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _Terminated(Exception):
    pass


def run_with_cluster(cluster: str, address: str | None, stage) -> object:
    """Run ``stage(address)``: as given (``cluster="none"``), or against a Ray cluster started across the
    Slurm allocation (``"slurm"``), stopped afterwards even on SIGTERM (scancel, time limit)."""
    if cluster == "none":
        return stage(address)
    if cluster != "slurm":
        raise MidiforgeError(f"--cluster {cluster!r}: use one of {', '.join(CLUSTERS)}")
    if address:
        raise MidiforgeError("--cluster slurm starts its own Ray cluster: do not pass --address too")

    def on_term(signum, _frame):
        raise _Terminated(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_term) for s in (signal.SIGTERM, signal.SIGUSR1)}
    c = SlurmRayCluster(log=lambda m: print(m, file=sys.stderr, flush=True))
    try:
        c.start()
        return stage(c.address)
    except _Terminated as exc:
        raise MidiforgeError(f"job {c.job_id}: stopped by {exc} (scancel or the time limit); "
                             "resubmit with --resume to continue") from None
    finally:
        for s in old:  # a second signal while stopping must not cut the stop short
            signal.signal(s, signal.SIG_IGN)
        c.stop()
        for s, h in old.items():
            signal.signal(s, h)


def _worker_main() -> int:
    """One node's ``ray start --block``, run by the workers' srun step (one task per node)."""
    env = os.environ
    head = env["MIDIFORGE_RAY_HEAD"]
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    cpus = env.get("SLURM_CPUS_ON_NODE") or env.get("SLURM_CPUS_PER_TASK") or "1"
    gpus = env.get("SLURM_GPUS_ON_NODE") or "0"
    ip = node_address(node)
    cmd = [ray_executable(), "start", "--block", f"--address={head}", f"--node-ip-address={ip}",
           f"--num-cpus={cpus}", f"--num-gpus={gpus}", f"--temp-dir={env['MIDIFORGE_RAY_TEMP']}-{node}",
           "--disable-usage-stats", "--log-color=false"]
    print(f"midiforge: job {env.get('SLURM_JOB_ID')}: Ray worker on {node} ({ip}) joining {head}", file=sys.stderr,
          flush=True)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    def forward(signum, _frame):
        proc.send_signal(signal.SIGTERM)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, forward)
    try:
        code = proc.wait()
    finally:
        shutil.rmtree(f"{env['MIDIFORGE_RAY_TEMP']}-{node}", ignore_errors=True)
    return 0 if code in (0, -signal.SIGTERM, 128 + signal.SIGTERM) else code


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        sys.exit(_worker_main())
    print("usage: python -m midiforge.pipeline.slurm_ray worker   (run by srun inside a job)", file=sys.stderr)
    sys.exit(2)

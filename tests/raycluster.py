"""A real Ray cluster on 127.0.0.1 for tests: `ray start --head --block` and, optionally, more nodes joining it
(`ray start --address ... --block`), each in its own process group, with a token made for the cluster."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


class _Proc:
    def __init__(self, cmd: list[str], env: dict, what: str, timeout: float = 120) -> None:
        self.log = Path(tempfile.mkdtemp(prefix="raynode-")) / f"{what}.log"
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray {what} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        try:  # the process group may hold Ray's children still (a reaper, a worker): none may outlive the test
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class RayHead:
    """``ray start --head`` on 127.0.0.1; ``dashboard=True`` also serves the job server on ``dashboard_url``."""

    def __init__(self, num_cpus: int = 2, dashboard: bool = False) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.token = secrets.token_hex(32)
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        # every `ray` and `midiforge` a job on this cluster runs comes from this venv, as cluster/start-head.sh does
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        cmd = [_ray(), "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", "--disable-usage-stats", "--block",
               f"--dashboard-agent-listen-port={free_port()}"]
        if dashboard:
            self.dashboard_port = free_port()
            self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
            cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            cmd += ["--include-dashboard=false"]
        self._head = _Proc(cmd, self.env, "head")
        self.log = self._head.log
        self.proc = self._head.proc
        self._nodes: list[_Proc] = []

    def add_node(self, num_cpus: int = 1) -> None:
        """A second (third, ...) Ray node on 127.0.0.1 joining this head."""
        cmd = [_ray(), "start", f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
               "--disable-usage-stats", "--block", f"--dashboard-agent-listen-port={free_port()}"]
        self._nodes.append(_Proc(cmd, self.env, f"node{len(self._nodes) + 1}"))

    def session_dir(self) -> Path:
        for line in re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text()).splitlines():
            if "Process exit logs will be saved to:" in line:
                return Path(line.split("saved to:", 1)[1].strip()).parents[1]
        raise RuntimeError("the head's log names no session directory")

    def driver_env(self) -> dict:
        """Environment of a driver joining this head: loopback, and Ray's token authentication."""
        return {**self.env, "RAY_ADDRESS": ""}

    def stop(self) -> None:
        for node in reversed(self._nodes):
            node.stop()
        self._head.stop()


def namespaces_missing() -> str | None:
    """Why this machine cannot make a network + PID namespace for a test cluster (None: it can)."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "--net", "--map-root-user", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, text=True, timeout=30)
    return None if probe.returncode == 0 else f"cannot create a network+PID namespace here: {probe.stderr.strip()}"

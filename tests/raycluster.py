"""A real Ray head (`ray start --head --block`) on 127.0.0.1 for tests that join a cluster by address."""
from __future__ import annotations

import os
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


class RayHead:
    def __init__(self, num_cpus: int = 2) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkdtemp(prefix="rayhead-")) / "head.log"
        ray = Path(sys.executable).with_name("ray")
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self.proc = subprocess.Popen(
            [str(ray), "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
             f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats", "--block"],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray head did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def session_dir(self) -> Path:
        for line in self.log.read_text().splitlines():
            if "Process exit logs will be saved to:" in line:
                return Path(line.split("saved to:", 1)[1].strip()).parents[1]
        raise RuntimeError("the head's log names no session directory")

    def driver_env(self) -> dict:
        """Environment of a driver joining this head: loopback, and Ray's token authentication."""
        return {**self.env, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": ""}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)

"""Stages joining a real Ray cluster started with `ray start --head` on 127.0.0.1."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from corpora import corpus
from raycluster import RayHead


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead(num_cpus=2)
    yield head
    head.stop()


def test_preprocess_joins_a_ray_head_by_address(tmp_path, ray_head):
    src = corpus("ff")
    proc = subprocess.Popen([sys.executable, "-m", "midiforge.cli", "preprocess", str(src), str(tmp_path / "d"),
                             "--address", ray_head.address, "--sample", "30", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ray_head.driver_env())
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["inputs"] == 30 == manifest["pieces"]
    # the CLI's driver joined the head's cluster (a driver logs into the session of the cluster it joins)
    session = ray_head.session_dir()
    assert list((session / "logs").glob(f"python-core-driver-*_{proc.pid}.log")), "the driver did not join the head"


def test_joining_without_the_auth_token_is_a_clear_error(tmp_path, ray_head):
    env = {**ray_head.driver_env()}
    env.pop("RAY_AUTH_MODE")
    out = subprocess.run([sys.executable, "-m", "midiforge.cli", "preprocess", str(corpus("ff")), str(tmp_path / "d"),
                          "--address", ray_head.address, "--no-progress"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2
    assert "cannot join the Ray cluster at 127.0.0.1" in out.stderr and "RAY_AUTH_MODE=token" in out.stderr
    assert "Traceback" not in out.stderr

"""How midiforge starts or joins Ray: a private Ray on loopback only, a clear error for an address that does not answer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path


from corpora import corpus
from raycluster import free_port

TESTS = Path(__file__).resolve().parent

# a driver that imports Ray first (as the stages do), starts midiforge's Ray, runs a task on it, and reports
# the listening sockets of every process below it while Ray is up
_PROBE = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {tests!r})
    import ray
    from sockets import descendants, listening
    from midiforge.pipeline.ray_runtime import start_ray
    start_ray(None, 1)
    ray.get(ray.remote(lambda: 1).remote())
    time.sleep(2)  # the dashboard agent and the runtime-env agent listen a moment after the node is up
    socks = listening(descendants(os.getpid()))
    print(json.dumps({{"sockets": socks, "node_ip": ray.util.get_node_ip_address(),
                      "auth": os.environ.get("RAY_AUTH_MODE")}}))
    ray.shutdown()
""")


def test_a_private_ray_listens_on_loopback_only_and_says_nothing_about_tokens():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # as a user's shell has it
    out = subprocess.run([sys.executable, "-c", _PROBE.format(tests=str(TESTS))], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    from sockets import is_loopback

    report = json.loads(out.stdout.strip().splitlines()[-1])
    socks = report["sockets"]
    assert len(socks) >= 4, socks  # gcs_server, raylet, the agents: this really looked at Ray's processes
    assert [s for s in socks if not is_loopback(s[1])] == [], f"Ray listens beyond loopback: {socks}"
    assert report["node_ip"] == "127.0.0.1" and report["auth"] == "token"
    assert "Token authentication" not in out.stderr and "auth_token" not in out.stderr, out.stderr[-2000:]


def test_an_address_where_nothing_answers_fails_in_seconds_and_leaves_dest_as_it_was(tmp_path):
    port = free_port()  # bound a moment ago, closed now: nothing listens there
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "midiforge.cli", "preprocess", str(corpus("ff")), str(tmp_path / "d"),
                          "--address", f"127.0.0.1:{port}", "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"cannot join the Ray cluster at 127.0.0.1:{port}: nothing answers there" in out.stderr
    assert "Traceback" not in out.stderr
    assert took < 60, took  # not Ray's minutes-long retry loop
    # nothing was started in DEST, so the same command with a good address needs no --resume
    assert not (tmp_path / "d" / "_work").exists() or not any((tmp_path / "d" / "_work").iterdir())


def test_a_malformed_address_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "midiforge.cli", "preprocess", str(corpus("ff")), str(tmp_path / "d"),
                          "--address", "head-without-port", "--no-progress"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "expected HOST:PORT" in out.stderr and "Traceback" not in out.stderr

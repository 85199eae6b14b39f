"""Shared pytest fixtures.

S3: ``s3_server`` (session) is a real S3 HTTP endpoint (moto's server) on 127.0.0.1.
Use it like this::

    def test_something(s3_server):
        uri = s3_server.new_bucket()                 # "s3://mf-<random>", a fresh empty bucket
        store = open_store(uri + "/run", s3_server.options())
        # or on the command line: ["--endpoint-url", s3_server.endpoint_url]

Fake credentials are in the environment while the fixture is alive (AWS_ACCESS_KEY_ID=
``s3_server.access_key``, AWS_SECRET_ACCESS_KEY=``s3_server.secret_key``), and the shared
AWS config files are pointed at nothing so nobody's real ~/.aws is used.  They are set in
``os.environ``, so Ray workers and subprocesses started during the test inherit them; the
endpoint is NOT put in the environment: pass ``s3_server.options()`` / ``--endpoint-url``.

``s3_server.stop()`` makes the endpoint really go away (listening socket closed, open
keep-alive connections cut: clients get "connection refused"), ``s3_server.start()``
brings it back on the same port with the same buckets and objects (moto keeps its state
in-process), ``s3_server.outage(seconds, after_requests=N)`` does both from a background
thread once N more requests were served (``s3_server.requests`` counts them).  A test
that stops the server must leave it running (use ``outage`` or try/finally).
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid

import pytest

# Every Ray a test starts (ray.init, `ray start --head`) listens on 127.0.0.1, not the machine's address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


class S3TestServer:
    """moto's S3 server on 127.0.0.1:<free port>, stoppable and restartable on that port."""

    access_key = "AKIAMIDIFORGETEST0001"
    secret_key = "midiforge-test-SECRET-never-in-messages"
    region = "us-east-1"

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.endpoint_url = f"http://{self.host}:{self.port}"
        self._server = None
        self._thread: threading.Thread | None = None
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.requests = 0  # HTTP requests served so far (all runs of the server)

    # -- lifecycle ---------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self, timeout: float = 10.0) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        if self._server is not None:
            return
        live, lock, owner = self._live, self._lock, self

        class Handler(MotoRequestHandler):  # remembers its connection so stop() can cut it
            def setup(self):
                super().setup()
                with lock:
                    live.add(self.connection)

            def run_wsgi(self):
                with lock:
                    owner.requests += 1
                return super().run_wsgi()

            def finish(self):
                with lock:
                    live.discard(self.connection)
                super().finish()

        deadline = time.monotonic() + timeout
        while True:  # the port may linger briefly after a stop
            try:
                server = make_server(self.host, self.port, DomainDispatcherApplication(create_backend_app),
                                     threaded=True, request_handler=Handler)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
        self._thread.start()
        _wait_port(self.host, self.port, timeout)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._live)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)

    def outage(self, seconds: float, after: float = 0.0, after_requests: int | None = None,
               timeout: float = 120.0) -> threading.Thread:
        """From a thread: stop the server ``after`` seconds from now (or once it has served
        ``after_requests`` more requests, waiting at most ``timeout`` s), start it again ``seconds`` later.
        ``join()`` the returned thread before the test ends; its ``stopped_at`` / ``restarted_at``
        (time.monotonic()) say when the outage really was."""
        target = None if after_requests is None else self.requests + after_requests

        def run():
            time.sleep(after)
            deadline = time.monotonic() + timeout
            while target is not None and self.requests < target and time.monotonic() < deadline:
                time.sleep(0.005)
            self.stop()
            thread.stopped_at = time.monotonic()
            time.sleep(seconds)
            self.start()
            thread.restarted_at = time.monotonic()

        thread = threading.Thread(target=run, name="s3-outage", daemon=True)
        thread.stopped_at = thread.restarted_at = None
        thread.start()
        return thread

    # -- helpers -----------------------------------------------------------------
    def client(self):
        """A plain boto3 client on this server (for setting up and inspecting tests)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def new_bucket(self, stem: str = "mf") -> str:
        """Create a fresh, uniquely named bucket; returns ``s3://<name>``."""
        return self.create_bucket(f"{stem}-{uuid.uuid4().hex[:12]}")

    def options(self, **overrides):
        """StorageOptions pointing at this server (keyword overrides for the other fields)."""
        from midiforge.storage import StorageOptions

        return StorageOptions(endpoint_url=self.endpoint_url, **overrides)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"S3 test server on {host}:{port} did not come up in {timeout}s")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on 127.0.0.1 with fake credentials in the environment (see module doc)."""
    env = {
        "AWS_ACCESS_KEY_ID": S3TestServer.access_key,
        "AWS_SECRET_ACCESS_KEY": S3TestServer.secret_key,
        "AWS_DEFAULT_REGION": S3TestServer.region,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    drop = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        for key in drop:
            mp.delenv(key, raising=False)
        server = S3TestServer()
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh empty bucket on ``s3_server``: ``s3://<name>``."""
    return s3_server.new_bucket()


# -- Slurm ----------------------------------------------------------------------------------------
# ``slurm_cluster`` (session): a real 2-node Slurm cluster (slurmctld + one slurmd per node, each host in
# its own network namespace on a private bridge), see tests/slurmcluster.py for the API.  Skips when not
# root or when slurm/munge/iproute2 are missing (bash .ci/setup-cluster-deps.sh installs them).
# ``slurm`` (per test): the same cluster, and after the test every job still queued or running is
# cancelled and every process a job left is killed; a test that left any fails at teardown.

@pytest.fixture(scope="session")
def slurm_cluster():
    """A real 2-node Slurm cluster for the whole session (started once, stopped at the end)."""
    from slurmcluster import SlurmCluster, missing_requirements

    why = missing_requirements()
    if why:
        pytest.skip(why)
    cluster = SlurmCluster(nodes=2, cpus_per_node=2)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm(slurm_cluster):
    """``slurm_cluster``, reset after the test; the test fails if it left jobs or processes behind."""
    yield slurm_cluster
    mess = slurm_cluster.reset()
    if mess["jobs"] or mess["processes"]:
        pytest.fail(f"the test left Slurm jobs {mess['jobs']} / processes {mess['processes']} (now cleaned up)")

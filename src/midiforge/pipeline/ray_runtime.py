"""Starting or joining Ray, the same way for every stage.

A Ray that midiforge starts for itself listens on 127.0.0.1 only and uses token authentication with a
token made for that run (no warning, nothing written to ``~/.ray``).  It leaves no process behind, however
the driver ends: the processes that start that Ray carry a marker of its own in their environment
(``MIDIFORGE_RAY_RUN``), and a small reaper process (its own session, so a signal to the driver's process
group does not reach it) notes them and every process they start while it waits on a pipe from the driver;
when the pipe closes (:func:`stop_ray`, a normal exit, an exception, SIGTERM, SIGKILL, the OOM killer) it
terminates all of them (SIGTERM, then SIGKILL) until none is left.  Ray's own clean-up alone leaves its agents and idle workers
alive, orphaned, for a minute or more after a SIGKILLed driver.  Joining a cluster by address checks
first that the address answers, so a wrong address fails in seconds with a clear message instead of
Ray's long retry loop.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import subprocess
import sys
import threading

from midiforge.errors import MidiforgeError

#: Ray rewrites 127.0.0.1 to the machine's network address unless this is "0" when Ray is imported.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: Seconds a driver waits for a cluster address to accept a TCP connection before giving up.
CONNECT_TIMEOUT = 10.0


#: in the environment of every process of a Ray that midiforge starts: one value per start
RUN_ENV = "MIDIFORGE_RAY_RUN"
#: seconds the reaper lets the processes it terminates exit before it kills them
REAP_GRACE = 3.0
#: the reaper gives up after this long (processes that ignore SIGKILL: stuck in the kernel)
REAP_LIMIT = 60.0

# The reaper.  Until its stdin reaches EOF (the driver ended or stopped its Ray) it notes, twice a second,
# every process whose environment holds RUN_ENV=<marker> and every process below one (Ray's agents and
# workers overwrite their environment's memory with their process title, so they are known by their
# parent: the raylet), each with its start time (a pid used again later is not taken for it).  Then it
# terminates every noted process still alive, and any new one, until three scans in a row find none (a
# raylet that is still dying may start a worker meanwhile): SIGTERM, SIGKILL after REAP_GRACE.  Plain
# Python, standard library only: it starts in ~50 ms and costs a few MB.
_REAPER = r"""
import os, select, signal, sys, time
marker = (sys.argv[1] + "=" + sys.argv[2]).encode()
grace, limit = float(sys.argv[3]), float(sys.argv[4])
me = os.getpid()
for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN)
known = {}      # pid -> start time: Ray's processes
checked = {}    # pid -> start time: environment already looked at
def table():
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            try:
                with open("/proc/" + name + "/stat", "rb") as fh:
                    f = fh.read().rsplit(b")", 1)[1].split()
                out[int(name)] = (int(f[1]), f[19], f[0])
            except (OSError, IndexError, ValueError):
                pass
    return out
def scan():
    procs = table()
    for pid, (ppid, start, state) in procs.items():
        if checked.get(pid) == start:
            continue
        checked[pid] = start
        try:
            with open("/proc/%d/environ" % pid, "rb") as fh:
                if marker in fh.read().split(b"\0"):
                    known[pid] = start
        except OSError:
            pass
    grew = True
    while grew:
        grew = False
        for pid, (ppid, start, state) in procs.items():
            if pid not in known and ppid in known and procs.get(ppid, (0, None))[1] == known[ppid]:
                known[pid] = start
                grew = True
    return [p for p, st in known.items() if p in procs and procs[p][1] == st and procs[p][2] != b"Z"]
while True:
    try:
        ready = select.select([0], [], [], 0.5)[0]
        if ready and not os.read(0, 4096):
            break
    except OSError:
        break
    scan()
start = time.monotonic()
quiet = 0
while quiet < 3 and time.monotonic() - start < limit:
    pids = scan()
    quiet = 0 if pids else quiet + 1
    sig = signal.SIGTERM if time.monotonic() - start < grace else signal.SIGKILL
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    time.sleep(0.2)
"""

_reaper: subprocess.Popen | None = None
_reaper_lock = threading.Lock()


def _start_reaper(marker: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != RUN_ENV}
    return subprocess.Popen([sys.executable, "-c", _REAPER, RUN_ENV, marker, str(REAP_GRACE), str(REAP_LIMIT)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True, env=env)


def stop_ray(timeout: float = REAP_LIMIT + 30) -> None:
    """Shut down the Ray that :func:`start_ray` started in this process (nothing when it joined a cluster or
    started none), and wait until none of its processes is left.  Idempotent; the CLI calls it at the end of
    every command, however the command ends."""
    global _reaper
    with _reaper_lock:
        reaper, _reaper = _reaper, None
    if reaper is None:
        return
    try:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    finally:
        try:
            reaper.stdin.close()
        except OSError:
            pass
        try:
            reaper.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _use_loopback() -> None:
    """Make this process's Ray treat 127.0.0.1 as the node address (and its children inherit it).

    Ray reads the variable once, when it is imported; a stage module may already have imported Ray,
    so the constant it was read into is set too."""
    os.environ[LOOPBACK_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def _private_token() -> None:
    """Token authentication with a token of this run's own (in the environment, inherited by Ray's
    processes): Ray's default would write ``~/.ray/auth_token`` and warn about it on every run."""
    set_ray_environment({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})


def set_ray_environment(values: dict[str, str]) -> None:
    """Put ``values`` in this process's environment (its Ray processes inherit them), and have a Ray that
    was already imported read its configuration again (Ray reads RAY_AUTH_MODE once, at import)."""
    os.environ.update(values)
    raylet = sys.modules.get("ray._raylet")
    if raylet is not None:
        raylet.Config.initialize("")


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (also ``ray://`` or ``http://`` prefixed) -> (host, port)."""
    bare = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = bare.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise MidiforgeError(f"Ray address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by default)")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        raise MidiforgeError(f"cannot join the Ray cluster at {address}: nothing answers there "
                             f"({exc.strerror or exc}); is the head running (`ray start --head`) and is that "
                             "its address and GCS port?") from None


def start_ray(address: str | None, num_cpus: int | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a private local Ray.

    A local Ray is started with ``address="local"`` (never silently joining a cluster that
    ``ray start`` left on the machine), listens on 127.0.0.1 only, and has a token of its own.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kw = {"include_dashboard": False, "logging_level": "WARNING", "configure_logging": True}
    if not address:
        _use_loopback()
        if not os.environ.get("RAY_AUTH_MODE"):
            _private_token()
        _init_local(ray, num_cpus, kw)
        return
    if address != "auto":
        host, _port = split_address(address)
        if _is_loopback(host):
            _use_loopback()  # a head on loopback: the driver's node is 127.0.0.1 too (else Ray hangs)
        check_reachable(address)
    try:
        ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError) as exc:
        hint = ""
        if not os.environ.get("RAY_AUTH_MODE"):
            hint = (" Ray 2.5x clusters use token authentication by default: set RAY_AUTH_MODE=token and "
                    "RAY_AUTH_TOKEN (or the head's ~/.ray/auth_token) for a driver joining with an address.")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MidiforgeError(f"cannot join the Ray cluster at {address}: {first}.{hint}") from None


def _init_local(ray, num_cpus: int | None, kw: dict) -> None:
    """``ray.init(address="local")`` with this start's marker in the environment of every Ray process (and
    not in this process's afterwards: subprocesses it starts later are not Ray's), watched by a reaper."""
    global _reaper
    stop_ray()  # a Ray this process started before and shut down without stop_ray: its reaper sweeps now
    marker = secrets.token_hex(12)
    reaper = _start_reaper(marker)
    with _reaper_lock:
        _reaper = reaper
    os.environ[RUN_ENV] = marker
    try:
        ray.init(address="local", num_cpus=num_cpus, **kw)
    except BaseException:
        os.environ.pop(RUN_ENV, None)
        stop_ray()
        raise
    os.environ.pop(RUN_ENV, None)

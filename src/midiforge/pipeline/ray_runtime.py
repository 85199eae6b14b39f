"""Starting or joining Ray, the same way for every stage.

A Ray that midiforge starts for itself listens on 127.0.0.1 only and uses token authentication with a
token made for that run (no warning, nothing written to ``~/.ray``).  Joining a cluster by address checks
first that the address answers, so a wrong address fails in seconds with a clear message instead of
Ray's long retry loop.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import sys

from midiforge.errors import MidiforgeError

#: Ray rewrites 127.0.0.1 to the machine's network address unless this is "0" when Ray is imported.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: Seconds a driver waits for a cluster address to accept a TCP connection before giving up.
CONNECT_TIMEOUT = 10.0


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
        ray.init(address="local", num_cpus=num_cpus, **kw)
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

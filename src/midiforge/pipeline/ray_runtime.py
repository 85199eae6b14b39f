"""Starting or joining Ray, the same way for every stage."""
from __future__ import annotations

import os

from midiforge.errors import MidiforgeError

#: Ray rewrites 127.0.0.1 to the machine's network address unless this is "0": a Ray that midiforge
#: starts for itself listens on loopback only.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_ray(address: str | None, num_cpus: int | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a private local Ray.

    A local Ray is started with ``address="local"`` (never silently joining a cluster that
    ``ray start`` left on the machine) and listens on 127.0.0.1 only.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kw = {"include_dashboard": False, "logging_level": "WARNING", "configure_logging": True}
    if not address:
        os.environ.setdefault(LOOPBACK_ENV, "0")
        ray.init(address="local", num_cpus=num_cpus, **kw)
        return
    try:
        ray.init(address=address, **kw)
    except ConnectionError as exc:
        hint = ""
        if not os.environ.get("RAY_AUTH_MODE"):
            hint = (" Ray 2.5x clusters use token authentication by default: set RAY_AUTH_MODE=token and "
                    "RAY_AUTH_TOKEN (or the head's ~/.ray/auth_token) for a driver joining with an address.")
        raise MidiforgeError(f"cannot join the Ray cluster at {address}: {exc}.{hint}") from None

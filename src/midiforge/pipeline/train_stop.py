"""Stopping ``midiforge train`` on a signal: SIGTERM or SIGUSR1 to any worker makes every worker
stop after the same step, back up that step and exit with :data:`STOP_EXIT_CODE`.

:class:`StopSignals` records the request (and a watchdog bounds the time to the exit);
:class:`midiforge.model.training.GracefulStop` acts on it; :class:`TrainingStopped` carries
where training stopped up to the CLI.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

from midiforge.errors import MidiforgeError

#: Exit status of a worker that stopped on SIGTERM/SIGUSR1 (after a backup when backups are
#: on): EX_TEMPFAIL of sysexits.h, "temporary failure, try again": run the same command again
#: (slurm/train.sbatch requeues the job on it).  Not 0 (the run is not finished), not 1/2
#: (errors), not 128+N (killed by signal N).
STOP_EXIT_CODE = 75
#: Seconds a worker may take from the first SIGTERM/SIGUSR1 to its exit (backup included)
#: before a watchdog ends it with STOP_EXIT_CODE anyway (a peer that hangs, a stuck write).
STOP_GRACE_SECONDS = 90.0
STOP_GRACE_ENV = "MIDIFORGE_STOP_GRACE"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

class TrainingStopped(Exception):
    """Training stopped on a signal; ``info``: signal, epoch (from 1), step, backup."""

    def __init__(self, info: dict) -> None:
        self.info = info
        name = signal.Signals(info["signal"]).name if info.get("signal") else "a stop request"
        where = f"epoch {info['epoch']}" + (f" after step {info['step']}" if info.get("step") else " start")
        super().__init__(f"stopped by {name} at {where}"
                         + (" with a backup" if info.get("backup") else " without a new backup"))


class StopSignals:
    """SIGTERM and SIGUSR1 ask this training process to stop (main thread only).

    The handler only records the request; :class:`midiforge.model.training.GracefulStop`
    acts on it at the next step end or epoch start.  TensorFlow installs a SIGTERM handler of
    its own when MultiWorkerMirroredStrategy starts its server (its preemption notifier, which
    nothing in Keras reads: SIGTERM was ignored), so :meth:`install` is called again after the
    strategy exists.  A watchdog thread, woken by Python's signal wakeup fd even while the main
    thread is blocked inside TensorFlow, ends the process with STOP_EXIT_CODE if it is still
    alive ``grace`` seconds after the first signal.  Further signals are only logged: under
    Slurm the same SIGTERM may arrive twice (from slurmstepd and forwarded by srun).
    """

    def __init__(self, grace: float | None = None) -> None:
        if grace is None:
            try:
                grace = float(os.environ.get(STOP_GRACE_ENV) or STOP_GRACE_SECONDS)
            except ValueError:
                raise MidiforgeError(f"{STOP_GRACE_ENV}={os.environ[STOP_GRACE_ENV]!r} is not a number of seconds") from None
        self.grace = grace
        self.signum: int | None = None
        self._previous: dict = {}
        self._fds: tuple[int, int] | None = None
        self._old_wakeup = -1
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._fds is not None

    def requested(self) -> int | None:
        return self.signum

    def install(self) -> bool:
        """(Re)install the handlers; False when not in the main thread (e.g. under Ray Train)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for s in STOP_SIGNALS:
            previous = signal.signal(s, self._handler)
            self._previous.setdefault(s, previous)
        if self._fds is None:
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self._fds = (r, w)
            self._thread = threading.Thread(target=self._watchdog, name="midiforge-stop-watchdog", daemon=True)
            self._thread.start()
        return True

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            print(f"midiforge train: {name}: stopping after the current step with a backup "
                  f"(exit {STOP_EXIT_CODE}; at the latest in {self.grace:g} s)", file=sys.stderr, flush=True)
        else:
            print(f"midiforge train: {name} again: already stopping", file=sys.stderr, flush=True)

    def _watchdog(self) -> None:
        r = self._fds[0]
        deadline = None
        while not self._closed.is_set():
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            try:
                ready, _, _ = select.select([r], [], [], wait)
                data = os.read(r, 64) if ready else b""
            except OSError:
                return
            if deadline is None and any(b in STOP_SIGNALS for b in data):
                deadline = time.monotonic() + self.grace
            if deadline is not None and time.monotonic() >= deadline and not self._closed.is_set():
                print(f"midiforge train: not stopped {self.grace:g} s after the signal (a peer worker lost or "
                      f"hanging?); exiting with {STOP_EXIT_CODE} now; the next run continues from the last "
                      f"backup", file=sys.stderr, flush=True)
                os._exit(STOP_EXIT_CODE)

    def uninstall(self) -> None:
        """Restore the previous handlers and stop the watchdog."""
        if threading.current_thread() is not threading.main_thread() or self._fds is None:
            return
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(self._old_wakeup)
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for fd in self._fds:
            os.close(fd)
        self._fds = None

"""The preprocess driver's side of Ray: batches sent as tasks (pinned to nodes on a cluster of several,
each reserving memory for its bytes), their results gathered, a batch whose worker died or ran out of
time cut down to the file at fault, and the progress bar."""
from __future__ import annotations

import functools
import math
import time

from midiforge.errors import MidiforgeError
from midiforge.pipeline.preprocess_batch import (
    PreprocessSettings,
    ProgressBoard,
    batch_summary,
    is_fast,
    process_batch,
)
from midiforge.pipeline.preprocess_inputs import InputRef
from midiforge.pipeline.preprocess_journal import (
    PARTS_PER_RUN,
    Journal,
    Outcome,
    write_journal,
)
from midiforge.pipeline.preprocess_plan import (
    FILE_TIMEOUT,
    MEMORY_BASE,
    MEMORY_FACTOR,
    batch_bytes,
    time_limit,
)
from midiforge.storage import StorageOptions

#: a lost batch (worker died, or out of time) is cut into this many batches, down to single files
SPLIT_WAYS = 8


@functools.cache
def _batch_task():
    """process_batch as a Ray task, made once per process: Ray exports a remote function to the
    cluster the first time it runs in a job (~30 ms here), not on every run_preprocess call."""
    import ray

    # no retries by Ray: the driver splits a batch whose worker died (see BatchRunner), which also
    # retries the files of a batch lost with its node
    return ray.remote(num_cpus=1, max_retries=0)(_process_packed)


def _pack(inputs: list[InputRef]) -> tuple[list[str], list[tuple[str, int, str, int]]]:
    """A batch's inputs as plain strings and tuples (to pickle and unpickle, ~3 us an InputRef, ~0.7 us as packed)."""
    roots: dict[str, int] = {}
    rows = [(r.source, roots.setdefault(r.root, len(roots)), r.key, r.size) for r in inputs]
    return list(roots), rows


def _process_packed(part: int, packed, dest_uri: str, storage: StorageOptions, settings: PreprocessSettings,
                    progress=None) -> dict:
    roots, rows = packed
    return process_batch(part, [InputRef(src, roots[i], key, size) for src, i, key, size in rows], dest_uri, storage,
                         settings, progress)


class _Job:
    """A batch sent (or to send) to Ray: its part number, files, deaths so far (single files), time limit."""

    __slots__ = ("batch", "limit", "part", "start", "tries")

    def __init__(self, part: int, batch: list, tries: int, limit: float) -> None:
        self.part, self.batch, self.tries, self.limit, self.start = part, batch, tries, limit, None


def _memory_cap(ray, resources: dict, nodes: int) -> int:
    """90% of the largest node's ``memory`` resource (a batch asking more could never start), 0 if unknown."""
    if nodes > 1:
        memory = max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    else:
        memory = resources.get("memory", 0)
    return int(0.9 * memory)


def failed_file(dest, part: int, ref: InputRef, reason: str, detail: str) -> dict:
    """The journal of a file given up on (parser_crash, timeout), written by the driver under a part number
    of its own, and its batch summary."""
    journal = Journal.of([Outcome.failure(ref.source, ref.source, reason, detail)])
    write_journal(dest, part, journal)
    return batch_summary(part, 1, journal, None, 0, 0.0)


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="file", desc="preprocess", disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)


class BatchRunner:
    """Runs a run's batches on Ray until each has a result: a summary from its task, or (a batch lost to a
    worker that died or ran out of time, cut down to the file at fault) the failure of that file.  A task
    that raises stops the run.  The progress bar counts files done."""

    def __init__(self, ray, dest, storage: StorageOptions, settings: PreprocessSettings, resources: dict,
                 workers: int | None, file_timeout: float | None) -> None:
        self.ray, self.dest, self.storage, self.settings = ray, dest, storage, settings
        cpus = int(resources.get("CPU", 1))
        nodes = sum(1 for k in resources if k.startswith("node:") and k != "node:__internal_head__")
        self.workers = workers = max(1, min(workers or cpus, cpus))
        self.task, self.in_flight = _batch_task(), workers * 2
        # Ray itself caps the tasks running at once by the CPUs they hold, so a second task per worker can
        # wait queued, ready to start the moment a batch ends.  With every CPU in use a task holds one; with
        # fewer workers than CPUs on one node, a task holds cpus/workers of them (so no more than `workers`
        # run).  On several nodes each node gets its share of the tasks out (by its CPUs), pinned to it: Ray's
        # own scheduling fills the driver's node first and leaves the others idle on short tasks
        self.base_options = {"num_cpus": cpus / workers} if workers < cpus and nodes == 1 else {}
        self.place = Placement.of_cluster(ray, workers if workers < cpus else 2 * cpus) if nodes > 1 else None
        self.memory_cap = _memory_cap(ray, resources, nodes)
        self.timeout = FILE_TIMEOUT if file_timeout is None else file_timeout
        self.queue: list[_Job] = []
        self.pending: list = []         # the refs of the tasks out, in the order they were sent
        self.jobs: dict = {}            # ref -> its _Job
        self.running: dict = {}         # ref -> (part, files)
        self.results: list[dict] = []
        self.failures = 0
        self.part_numbers = iter(())
        self.bar = self.board = None
        self.files_done = 0.0

    def run(self, batches: list[list[InputRef]], epoch: int, total: int, done: int, progress: bool) -> list[dict]:
        """The summaries of ``batches``, numbered from ``epoch`` (see PARTS_PER_RUN); the bar shows ``done``
        of ``total`` files at first."""
        self.part_numbers = iter(range(epoch * PARTS_PER_RUN, (epoch + 1) * PARTS_PER_RUN))
        self.bar = progress_bar(total, done, progress)
        self.files_done = float(self.bar.n)
        # music21's formats take ~1 s a unit: then the bar moves per file or tune, not per batch
        if progress and self.bar.disable is False and any(not is_fast(r.source, self.settings.read)
                                                          for b in batches for r in b):
            self.board = self.ray.remote(num_cpus=0)(ProgressBoard).remote()
        self.queue = [self._job(b) for b in batches]
        while self.queue or self.pending:
            self._send()
            now = time.monotonic()
            if self._kill_late(now) or not self.pending:
                continue
            ready = self._wait(now)
            if ready is not None:
                self._receive(ready)
        self.bar.refresh()
        self.bar.close()
        if self.board is not None:
            self.ray.kill(self.board)
        return self.results

    def _job(self, batch: list[InputRef], tries: int = 0) -> _Job:
        part = next(self.part_numbers, None)
        if part is None:
            raise MidiforgeError(f"more than {PARTS_PER_RUN} batches in one run; pass a larger --batch-files")
        return _Job(part, batch, tries, time_limit(batch, self.settings.read, self.timeout))

    def _send(self) -> None:
        """Batches from the queue out to Ray, while there is room."""
        max_bytes = self.settings.read.max_bytes
        while self.queue and (self.place.has_room() if self.place else len(self.pending) < self.in_flight):
            j = self.queue.pop(0)
            options = dict(self.base_options)
            if self.memory_cap:  # Ray starts a batch only where its memory is free (see MEMORY_FACTOR)
                options["memory"] = min(self.memory_cap, MEMORY_BASE + MEMORY_FACTOR * batch_bytes(j.batch, max_bytes))
            if self.place:
                options["scheduling_strategy"] = self.place.strategy()
            ref = self.task.options(**options).remote(j.part, _pack(j.batch), self.dest.uri, self.storage,
                                                      self.settings, self.board)
            self.pending.append(ref)
            self.jobs[ref] = j
            self.running[ref] = (j.part, len(j.batch))
            if self.place:
                self.place.started(ref)

    def _kill_late(self, now: float) -> bool:
        """Cuts every running batch that is out of time; whether there was one."""
        # a batch's time runs from when it may start: Ray runs the tasks out in the order they were sent,
        # so the first `workers` of them are running (the next starts when one of those ends)
        for ref in self.pending[:self.workers]:
            self.jobs[ref].start = self.jobs[ref].start or now
        late = [ref for ref in self.pending[:self.workers] if now > self.jobs[ref].start + self.jobs[ref].limit]
        for ref in late:  # a file hangs (native code no alarm interrupts): kill the worker, cut the batch
            self.ray.cancel(ref, force=True)
            j = self._forget(ref)
            self._lost(j, "timeout", f"no result within {j.limit:.0f} s (--file-timeout {self.timeout:g})")
        return bool(late)

    def _wait(self, now: float):
        """The ref of a batch that ended, or None (the first running batch's time is up, or the bar moves)."""
        wait = min(self.jobs[ref].start + self.jobs[ref].limit for ref in self.pending[:self.workers]) - now
        ready, _ = self.ray.wait(self.pending, num_returns=1,
                                 timeout=max(0.01, min(wait, 0.5) if self.board is not None else wait))
        if ready:
            return ready[0]
        if self.board is not None:  # the units parsed so far in the running batches
            fractions = self.ray.get(self.board.get.remote())
            self.bar.n = round(self.files_done + sum(min(fractions.get(p, 0.0), 0.95) * n
                                                     for p, n in self.running.values()), 1)
            self.bar.refresh()
        return None

    def _receive(self, ref) -> None:
        """The result of a batch that ended: its summary, or (its worker died) the batch lost."""
        ray = self.ray
        j = self._forget(ref)
        try:
            res = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # stop the rest; report the cause in one line
            for r in self.pending:
                ray.cancel(r, force=True)
            if isinstance(exc.cause, MidiforgeError):
                raise exc.cause from None
            raise
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError,
                ray.exceptions.NodeDiedError) as exc:  # the process died: a native crash, Ray's OOM killer, a lost node
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            self._lost(j, "parser_crash", f"{type(exc).__name__} (twice): {first}")
            return
        self.results.append(res)
        self._count(res["files"], res["failures"])

    def _count(self, files: int, failures: int) -> None:
        self.failures += failures
        self.files_done += files
        self.bar.update(self.files_done - self.bar.n)
        self.bar.set_postfix(failures=self.failures, refresh=False)

    def _lost(self, j: _Job, reason: str, detail: str) -> None:
        """A batch without a result (its worker died, or it ran out of time): the files that are fine must
        not pay for the one that is not.  Cut into SPLIT_WAYS batches down to single files; a single file
        whose worker died is read once more (a node can die under any file), then it is a failure."""
        if len(j.batch) > 1:
            step = math.ceil(len(j.batch) / SPLIT_WAYS)
            self.queue[0:0] = [self._job(j.batch[i:i + step]) for i in range(0, len(j.batch), step)]
        elif reason == "parser_crash" and j.tries == 0:
            self.queue.insert(0, self._job(j.batch, 1))
        else:
            self.results.append(failed_file(self.dest, self._job([]).part, j.batch[0], reason, detail))
            self._count(1, 1)

    def _forget(self, ref) -> _Job:
        self.pending.remove(ref)
        self.running.pop(ref, None)
        if self.place:
            self.place.done(ref)
        return self.jobs.pop(ref)


class Placement:
    """Which node the next batch goes to, on a cluster of several nodes: ``slots`` tasks out at once, shared
    among the nodes by their CPUs, each task pinned (softly: elsewhere if its node is lost) to the node with
    the most free slots for its size."""

    def __init__(self, nodes: dict[str, int], slots: int) -> None:
        total = sum(nodes.values())
        self.cap = {n: max(1, round(slots * c / total)) for n, c in nodes.items()}
        self.out = {n: 0 for n in nodes}
        self._where: dict = {}
        self._next: str | None = None

    @classmethod
    def of_cluster(cls, ray, slots: int) -> Placement:
        nodes = {n["NodeID"]: int(n["Resources"].get("CPU", 0)) for n in ray.nodes()
                 if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1}
        return cls(nodes, slots)

    def has_room(self) -> bool:
        node = max(self.cap, key=lambda n: ((self.cap[n] - self.out[n]) / self.cap[n], n))
        self._next = node if self.out[node] < self.cap[node] else None
        return self._next is not None

    def strategy(self):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(self._next, soft=True)

    def started(self, ref) -> None:
        self._where[ref] = self._next
        self.out[self._next] += 1

    def done(self, ref) -> None:
        self.out[self._where.pop(ref)] -= 1

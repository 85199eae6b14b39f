"""Who trains together: the ``TF_CONFIG`` of this worker, from nothing, the environment, Slurm or Ray.

MultiWorkerMirroredStrategy learns its cluster from ``TF_CONFIG``.  Launchers only have to
establish it; the training function is always the same:

* nothing: no ``TF_CONFIG`` -> one local worker (all local devices), the default.
* ``TF_CONFIG`` already set: by you, Kubernetes operators, or Ray (Ray Train's
  TensorflowTrainer sets it for each worker; ``midiforge train --launcher ray`` uses that).
* Slurm: under ``srun`` with more than one task, ``TF_CONFIG`` is built from ``SLURM_*``
  (step node list, tasks per node, task id).  Worker ``p`` (``SLURM_PROCID``) listens on
  ``<its node>:<port_base + SLURM_LOCALID>``.  Block (the default) and cyclic task
  distributions are supported.  (TensorFlow's SlurmClusterResolver needs GPUs to be
  configured, so the plain CPU path builds ``TF_CONFIG`` itself.)

Ports under Slurm: ``--port-base`` if given, else ``MIDIFORGE_PORT_BASE``, else derived from
the job id, ``20000 + (SLURM_JOB_ID * 8) % 12000`` (:func:`slurm_port_base`), so two jobs
sharing a node listen on different ports (jobs whose ids differ by a multiple of 1500 share a
base; each job has 8 ports, one per task on a node: tasks 8 and up of a node may collide with
the next job id's ports).  The range ends below 32768, where Linux's ephemeral ports begin.
TensorFlow's gRPC server binds every address of the machine (``0.0.0.0``/``[::]``) on its port,
whatever host ``TF_CONFIG`` names, even ``127.0.0.1``: the ports are reachable from the network.

The chief is task ``chief`` 0 when the cluster names one, else ``worker`` 0.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Mapping

from midiforge.errors import MidiforgeError

MODES = ("auto", "local", "tf_config", "slurm")
#: Port base without a Slurm job id (a step run outside a batch job).
DEFAULT_PORT_BASE = 28400
#: Ports derived from SLURM_JOB_ID: PORT_RANGE_START + (job id * PORTS_PER_JOB) % PORT_RANGE_SPAN.
PORT_RANGE_START = 20000
PORTS_PER_JOB = 8
PORT_RANGE_SPAN = 12000


@dataclass(frozen=True)
class Membership:
    source: str                      # "local", "tf_config" or "slurm"
    tf_config: dict | None           # None: a single local worker

    @property
    def task_type(self) -> str | None:
        return self.tf_config["task"]["type"] if self.tf_config else None

    @property
    def task_index(self) -> int:
        return int(self.tf_config["task"]["index"]) if self.tf_config else 0

    @property
    def num_workers(self) -> int:
        if not self.tf_config:
            return 1
        cluster = self.tf_config["cluster"]
        return sum(len(cluster.get(k, [])) for k in ("chief", "worker"))

    @property
    def worker_rank(self) -> int:
        """0 for the chief, then 1.. for the workers (the order TF shards input by)."""
        if not self.tf_config:
            return 0
        has_chief = bool(self.tf_config["cluster"].get("chief"))
        if self.task_type == "chief":
            return 0
        return self.task_index + (1 if has_chief else 0)

    @property
    def is_chief(self) -> bool:
        if not self.tf_config:
            return True
        if self.tf_config["cluster"].get("chief"):
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    def describe(self) -> str:
        if not self.tf_config:
            return "one local worker"
        return (f"{self.task_type} {self.task_index} of {self.num_workers} workers (from {self.source})"
                + (", chief" if self.is_chief else ""))


def tf_config_for(workers: list[str], index: int) -> dict:
    """The TF_CONFIG of worker ``index`` among ``workers`` ("host:port")."""
    if not 0 <= index < len(workers):
        raise MidiforgeError(f"worker index {index} is not in 0..{len(workers) - 1}")
    return {"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}}


def _check_tf_config(cfg: dict, where: str) -> dict:
    try:
        cluster, task = cfg["cluster"], cfg["task"]
        ttype, index = task["type"], int(task["index"])
        members = cluster[ttype]
    except (KeyError, TypeError, ValueError):
        raise MidiforgeError(f"{where}: needs cluster {{worker: [...]}} and task {{type, index}}") from None
    if ttype not in ("chief", "worker"):
        raise MidiforgeError(f"{where}: task type {ttype!r} is not supported (chief or worker; "
                             f"MultiWorkerMirroredStrategy has no parameter servers or evaluators)")
    if not 0 <= index < len(members):
        raise MidiforgeError(f"{where}: task index {index} is outside cluster.{ttype} ({len(members)} entries)")
    return cfg


def from_tf_config(env: Mapping[str, str]) -> Membership:
    text = env.get("TF_CONFIG", "")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MidiforgeError(f"TF_CONFIG is not valid JSON ({exc})") from None
    if not cfg or not cfg.get("cluster"):
        return Membership("local", None)
    return Membership("tf_config", _check_tf_config(cfg, "TF_CONFIG"))


# --- Slurm --------------------------------------------------------------------------------
def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list: ``node[01-03,07],gpu-a[1-2]x`` -> node01 node02 node03 node07 ..."""
    hosts: list[str] = []
    for item in _split_top(text.strip()):
        m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", item)
        if not m:
            if "[" in item or "]" in item:
                raise MidiforgeError(f"Slurm host list {text!r}: cannot read {item!r}")
            hosts.append(item)
            continue
        prefix, ranges, rest = m.groups()
        tails = expand_hostlist(rest) if rest else [""]
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                for n in range(int(lo), int(hi) + 1):
                    hosts.extend(f"{prefix}{n:0{width}d}{t}" for t in tails)
            else:
                hosts.extend(f"{prefix}{part}{t}" for t in tails)
    return hosts


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            if cur:
                out.append(cur)
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    if cur:
        out.append(cur)
    return out


def expand_tasks_per_node(text: str) -> list[int]:
    """``2(x3),1`` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise MidiforgeError(f"Slurm tasks per node {text!r}: cannot read {part!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def in_slurm_step(env: Mapping[str, str]) -> bool:
    """Inside an ``srun`` step with more than one task."""
    try:
        return "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1
    except ValueError:
        return False


def slurm_port_base(env: Mapping[str, str]) -> int:
    """The first worker port of this Slurm job: ``20000 + (SLURM_JOB_ID * 8) % 12000``.

    Jobs sharing a node get different bases (unless their ids differ by a multiple of 1500),
    a requeued job keeps its id and so its ports.  Without a job id: DEFAULT_PORT_BASE.
    """
    job = str(env.get("SLURM_JOB_ID", "")).strip()
    if not job.isdigit():
        return DEFAULT_PORT_BASE
    return PORT_RANGE_START + (int(job) * PORTS_PER_JOB) % PORT_RANGE_SPAN


def from_slurm(env: Mapping[str, str], port_base: int | None = None) -> Membership:
    """The TF_CONFIG of this ``srun`` task from SLURM_* variables."""
    need = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE")
    missing = [k for k in need if k not in env]
    if missing:
        raise MidiforgeError(f"Slurm membership: {', '.join(missing)} not set (run the workers with srun, "
                             f"one task per worker)")
    if not port_base and env.get("MIDIFORGE_PORT_BASE"):
        try:
            port_base = int(env["MIDIFORGE_PORT_BASE"])
        except ValueError:
            raise MidiforgeError(f"MIDIFORGE_PORT_BASE={env['MIDIFORGE_PORT_BASE']!r} is not a port number") from None
    port_base = int(port_base or slurm_port_base(env))
    nodes = expand_hostlist(env["SLURM_STEP_NODELIST"])
    per_node = expand_tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])
    ntasks, procid = int(env["SLURM_STEP_NUM_TASKS"]), int(env["SLURM_PROCID"])
    if len(per_node) != len(nodes) or sum(per_node) != ntasks:
        raise MidiforgeError(f"Slurm membership: {len(nodes)} nodes with tasks {per_node} do not add up to "
                             f"SLURM_STEP_NUM_TASKS={ntasks}")
    dist = env.get("SLURM_DISTRIBUTION", "block").split(":")[0].split(",")[0] or "block"
    slots: list[tuple[str, int]] = []  # (node, local id) in procid order
    if dist in ("block", "pack"):
        for node, n in zip(nodes, per_node):
            slots.extend((node, i) for i in range(n))
    elif dist == "cyclic":
        left = list(per_node)
        used = [0] * len(nodes)
        while len(slots) < ntasks:
            for k, node in enumerate(nodes):
                if left[k]:
                    slots.append((node, used[k]))
                    used[k] += 1
                    left[k] -= 1
    else:
        raise MidiforgeError(f"Slurm membership: task distribution {dist!r} is not supported (use block or cyclic)")
    local = env.get("SLURM_LOCALID")
    if local is not None and int(local) != slots[procid][1]:
        raise MidiforgeError(f"Slurm membership: task {procid} has SLURM_LOCALID={local}, expected "
                             f"{slots[procid][1]} for {dist} distribution")
    if port_base < 1 or port_base + max(i for _, i in slots) > 65535:
        raise MidiforgeError(f"Slurm membership: port base {port_base} with {max(per_node)} tasks on a node "
                             f"leaves the port range 1..65535")
    workers = [f"{node}:{port_base + i}" for node, i in slots]
    return Membership("slurm", tf_config_for(workers, procid))


def resolve(mode: str = "auto", env: Mapping[str, str] | None = None, port_base: int | None = None) -> Membership:
    """This process's membership.  ``auto``: TF_CONFIG if set, else Slurm under srun, else local."""
    env = os.environ if env is None else env
    if mode not in MODES:
        raise MidiforgeError(f"--membership {mode!r}: use one of {', '.join(MODES)}")
    if mode == "local":
        return Membership("local", None)
    if mode == "tf_config":
        if not env.get("TF_CONFIG"):
            raise MidiforgeError("--membership tf_config: TF_CONFIG is not set")
        return from_tf_config(env)
    if mode == "slurm":
        return from_slurm(env, port_base)
    if env.get("TF_CONFIG"):
        return from_tf_config(env)
    if in_slurm_step(env):
        return from_slurm(env, port_base)
    return Membership("local", None)


def apply(m: Membership, env: dict | None = None) -> None:
    """Make ``TF_CONFIG`` in ``env`` (os.environ) say ``m`` before the strategy is created."""
    env = os.environ if env is None else env
    if m.tf_config:
        env["TF_CONFIG"] = json.dumps(m.tf_config)
    else:
        env.pop("TF_CONFIG", None)

"""Small token shards in preprocess's output format, for the training tests.

Real tokenizers encode real notes (simple arpeggio and scale figures in random keys, so a
tiny model has something to learn); written through the format's owner (midiforge.pipeline.tokens:
its schema, shard paths and writer), tokenizer.json, manifest.json written last.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from midiforge.music.piece import Piece
from midiforge.music.tokenizers import make_tokenizer
from midiforge.storage import file_entry, open_store, write_manifest
from midiforge.pipeline import tokens
from midiforge.storage.shards import int_lists


def figure_piece(rng: np.random.Generator, n_notes: int) -> Piece:
    root = int(rng.integers(48, 66))
    figure = [[0, 4, 7, 12], [0, 2, 4, 5, 7, 9, 11, 12], [0, 3, 7, 10]][int(rng.integers(3))]
    pitch = [root + figure[i % len(figure)] for i in range(n_notes)]
    step = float(rng.choice([0.25, 0.5]))
    start = np.arange(n_notes) * step
    return Piece.from_columns(pitch, start, [step] * n_notes, [64 + 8 * (i % 4) for i in range(n_notes)],
                              [0] * n_notes, qpm=float(rng.choice([90.0, 120.0])))


def make_shards(dest: str, *, pieces: int = 40, files: int = 2, notes: tuple[int, int] = (40, 80),
                tokenizer: str = "events", seed: int = 0, options=None) -> dict:
    rng = np.random.default_rng(seed)
    tok = make_tokenizer(tokenizer)
    made = [figure_piece(rng, int(rng.integers(*notes))) for _ in range(pieces)]
    if tokenizer == "classic":
        tok = tok.with_vocab({t for p in made for t in tok.encode_text(p)})
    store = open_store(dest, options)
    shards, qpms = [], []
    for f in range(files):
        idx = list(range(f, pieces, files))
        ids = [tok.encode(made[i]) for i in idx]
        split = ["validation" if i % 5 == 4 else "train" for i in idx]
        ts_num, ts_den = tokens.time_signature_columns([made[i].time_signature for i in idx])
        t = tokens.rows_table({
            "piece_id": [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in idx],
            "source": [f"synthetic/{i}.mid" for i in idx],
            "split": split,
            "transpose": pa.array([0] * len(idx), pa.int8()),
            "tokens": int_lists(ids),
            "n_tokens": pa.array([len(x) for x in ids], pa.int32()),
            "n_notes": pa.array([len(made[i]) for i in idx], pa.int32()),
            "seconds": [made[i].end() * 60 / made[i].qpm for i in idx],
            "qpm": [made[i].qpm for i in idx],
            "tokenizer": [tok.id] * len(idx), "ts_numerator": ts_num, "ts_denominator": ts_den,
        })
        shards.append(tokens.write_shard(store, f, t))
        qpms += [made[i].qpm for i in idx]
    tok_bytes = tok.to_json().encode()
    store.write_bytes(tokens.TOKENIZER, tok_bytes)
    manifest = {"stage": "preprocess", "pieces": pieces, "tokenizer": tok.id, "vocab_size": tok.vocab_size,
                "qpm_median": float(np.median(qpms)), "shards": shards,
                "files": [file_entry(tokens.TOKENIZER, tok_bytes)]
                + [{k: s[k] for k in ("path", "bytes", "sha256")} for s in shards]}
    write_manifest(store, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# worker processes (``python -m midiforge.cli train``) for the end-to-end tests
# ---------------------------------------------------------------------------------------------
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

#: A tiny model and short epochs: every test trains in seconds per epoch.
SMALL = ["--seq-len", "32", "--batch-size", "8", "--lstm-units", "32", "--embedding-dim", "16",
         "--steps-per-epoch", "10", "--validation-steps", "4", "--progress", "epoch"]


def worker_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith("SLURM_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **extra)
    return env


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def consecutive_free_ports(n: int) -> int:
    for _ in range(50):
        base = free_ports(1)[0]
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no consecutive free ports")


def epochs_in(metrics_path: Path) -> list[int]:
    if not metrics_path.exists():
        return []
    return [json.loads(line)["epoch"] for line in metrics_path.read_text().splitlines() if line.strip()]


def metrics_in(metrics_path: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


class Workers:
    """``midiforge train`` worker processes, each in its own process group, logs in files.

    Use as a context manager: leaving it kills whatever is still running (also on failure)."""

    def __init__(self, log_dir: Path, name: str) -> None:
        self.log_dir = log_dir
        self.name = name
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self, argv: list[list[str]], envs: list[dict]) -> "Workers":
        """Worker i runs ``midiforge train *argv[i]`` with environment ``envs[i]``."""
        for i, (args, env) in enumerate(zip(argv, envs)):
            log = self.log_dir / f"{self.name}-worker{len(self.procs)}.log"
            with open(log, "w") as fh:
                self.procs.append(subprocess.Popen([sys.executable, "-m", "midiforge.cli", "train", *args],
                                                   env=env, stdout=fh, stderr=subprocess.STDOUT,
                                                   start_new_session=True))
            self.logs.append(log)
        return self

    def start_tf_config(self, argv: list[list[str]], **extra_env) -> "Workers":
        """One worker per entry of ``argv``, TF_CONFIG naming them all on 127.0.0.1 (free ports)."""
        workers = [f"127.0.0.1:{p}" for p in free_ports(len(argv))]
        return self.start(argv, [worker_env(TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                                                  "task": {"type": "worker", "index": i}}),
                                            **extra_env) for i in range(len(argv))])

    def log(self, i: int = 0) -> str:
        return self.logs[i].read_text()

    def alive(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def wait_for(self, condition, timeout: float) -> bool:
        """Poll ``condition()`` until true, every worker exited, or ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if not self.alive():
                return bool(condition())
            time.sleep(0.2)
        return False

    def wait(self, timeout: float) -> list[int | None]:
        """Exit codes; None for a worker still running after ``timeout`` s (then killed)."""
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        self.kill()
        return codes

    def signal(self, i: int, sig: int) -> None:
        self.procs[i].send_signal(sig)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

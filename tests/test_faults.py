"""Fault tests: a Ray that midiforge starts leaves no process behind however the CLI ends (SIGTERM, SIGKILL);
a generation actor SIGKILLed mid-run (every piece exactly once, the tokens of a clean run); the S3 endpoint
down for ~12 s during reads and during writes (the job waits and completes exactly, and says it waited; with
a budget shorter than the outage it stops with a one-line error and ``--resume`` completes it); a generate on
a MODEL_DIR that does not exist says so.

Everything runs for real: the CLI as a subprocess with its own local Ray, or in this process on a private
local Ray; moto's S3 server on 127.0.0.1 (``s3_server``), stopped and restarted on its port.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from corpora import corpus, midi_files
from midiforge.cli import main as cli_main
from midiforge.storage import open_store, read_manifest, verify_store

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from sockets import descendants  # noqa: E402

N_MIDI = 20
GARBAGE = {"garbage.mid": b"this is not a MIDI file at all" * 10, "sub/empty.mid": b""}
OUTAGE = 12.0  # seconds the S3 endpoint is down in the outage tests
GEN = ["--seed", "5", "--max-tokens", "24", "--top-k", "30", "--no-progress"]  # generate's sampling in these tests


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
def _weights_bytes(model) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.weights.h5")
        model.save_weights(path)
        return Path(path).read_bytes()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny MODEL_DIR (final bundle only) trained for one epoch on real tokens of the ``ff`` corpus."""
    from midiforge.pipeline.bundles import write_bundle
    from midiforge.model.lstm import ModelConfig, build_model, tf_keras
    from midiforge.music.readers import read_piece
    from midiforge.music.tokenizers import make_tokenizer

    _tf, keras = tf_keras()
    keras.utils.set_random_seed(3)
    tok = make_tokenizer("events")
    stream = np.concatenate([tok.encode(read_piece(f.name, f.read_bytes())) for f in midi_files("ff")[:3]])
    seq = 32
    n = (len(stream) - 1) // seq
    x, y = stream[:n * seq].reshape(n, seq), stream[1:n * seq + 1].reshape(n, seq)
    cfg = ModelConfig(vocab_size=tok.vocab_size, embedding_dim=16, lstm_units=(32,), dropout=0.0, tokenizer_id=tok.id)
    model = build_model(cfg)
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    root = tmp_path_factory.mktemp("model")
    write_bundle(open_store(str(root)), "bundle", config=cfg, tokenizer_json=tok.to_json(),
                 training={"qpm_median": 100.0, "epochs_done": 1}, weights=_weights_bytes(model))
    return str(root)


@pytest.fixture(scope="module")
def clean_tokens(model_dir, tmp_path_factory):
    """piece index -> tokens of a clean in-process run (no Ray) with GEN's settings, for N up to 400."""
    from midiforge.pipeline.generate import GenerateSettings, run_generate
    from midiforge.model.decode import Limits
    from midiforge.model.sampling import SamplingSettings

    dest = str(tmp_path_factory.mktemp("clean") / "g")
    settings = GenerateSettings(sampling=SamplingSettings(top_k=30), limits=Limits(24))
    run_generate(model_dir, dest, 400, settings, seed=5, batch_size=100, workers=0, progress=False)
    return _tokens(dest)


def _tokens(dest: str, storage=None) -> dict:
    from midiforge.pipeline import pieces

    t = pieces.read_pieces(dest, storage, columns=["index", "tokens"])
    return dict(zip(t["index"].to_pylist(), map(tuple, t["tokens"].to_pylist())))


# ---------------------------------------------------------------------------------------------
# processes: whatever ends the CLI, no process it started is left
# ---------------------------------------------------------------------------------------------
def _proc_info(pid: int) -> tuple[str, str] | None:
    """(start time, cmdline) of a live, non-zombie process, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, IndexError):
        return None
    return None if stat[0] == "Z" else (stat[19], cmd)


def _marked(tag: str) -> set[int]:
    """Processes whose (intact) environment holds the test's MF_FAULT_TEST=<tag>."""
    out = set()
    needle = f"MF_FAULT_TEST={tag}".encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    out.add(int(d.name))
            except OSError:
                pass
    return out


class Watched:
    """A CLI run as a subprocess in a session of its own, with every process below it (or carrying its
    environment tag) noted, with its start time, while it runs."""

    def __init__(self, argv: list[str], env: dict | None = None) -> None:
        self.tag = uuid.uuid4().hex
        env = {**(env or {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}),
               "MF_FAULT_TEST": self.tag}
        self.err_path = Path(tempfile.mkstemp(prefix="mf-fault-", suffix=".err")[1])
        self.proc = subprocess.Popen([sys.executable, "-m", "midiforge.cli", *argv], env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.err_path, "wb"),
                                     start_new_session=True)
        self.seen: dict[int, tuple[str, str]] = {}

    def note(self) -> None:
        for pid in descendants(self.proc.pid) | _marked(self.tag):
            info = _proc_info(pid)
            if info is not None:
                self.seen[pid] = (info[0], info[1] or self.seen.get(pid, ("", ""))[1])

    def wait_for(self, pred, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            self.note()
            if pred(self):
                return True
            time.sleep(0.1)
        return False

    def cmdlines(self) -> list[str]:
        return [cmd for _start, cmd in self.seen.values()]

    def left(self) -> dict[int, str]:
        """The noted processes (and any tagged one) still alive, other than the CLI itself."""
        out = {}
        for pid in set(self.seen) | _marked(self.tag):
            info = _proc_info(pid)
            if pid != self.proc.pid and info is not None and (pid not in self.seen or info[0] == self.seen[pid][0]):
                out[pid] = info[1]
        return out

    def wait_gone(self, timeout: float) -> dict[int, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = self.left()
            if not left:
                return {}
            time.sleep(0.25)
        return self.left()

    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def cleanup(self) -> None:
        """Whatever happened: the CLI's group and every noted process are killed (test hygiene)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for pid in self.left():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.err_path.unlink(missing_ok=True)


def _has_worker(name: str):
    return lambda w: any(c.startswith(f"ray::{name}") for c in w.cmdlines())


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("stage", ["preprocess", "generate"])
def test_the_cli_leaves_no_process_behind(stage, sig, tmp_path, request):
    """Signal the CLI process alone (not its group) while its Ray's workers are busy: within 30 s nothing it
    started is left (Ray's own clean-up leaves its agents and idle workers orphaned for minutes)."""
    if stage == "preprocess":
        argv = ["preprocess", str(corpus("nottingham")), str(tmp_path / "out"), "--batch-files", "2", "--no-progress"]
        busy = "_process"
    else:
        model = request.getfixturevalue("model_dir")
        argv = ["generate", model, str(tmp_path / "out"), "-n", "4000", "--batch-size", "8", "--workers", "2", *GEN]
        busy = "GenerateWorker"
    run = Watched(argv)
    try:
        assert run.wait_for(_has_worker(busy), timeout=240), \
            f"no ray::{busy} process came up: {run.cmdlines()}\n{run.err()[-3000:]}"
        time.sleep(1.0)
        run.note()
        assert run.proc.poll() is None, "the run ended before it could be signalled"
        assert any(c.startswith("ray::") for c in run.cmdlines()) and len(run.seen) >= 6, run.cmdlines()
        os.kill(run.proc.pid, getattr(signal, sig))
        code = run.proc.wait(timeout=90)
        assert code != 0
        left = run.wait_gone(timeout=30)
        assert not left, f"left behind 30 s after {sig}: {left}"
        if sig == "SIGTERM":
            assert "Traceback" not in run.err(), run.err()[-3000:]
    finally:
        run.cleanup()


def test_a_normal_end_leaves_no_process_behind(model_dir, tmp_path):
    run = Watched(["generate", model_dir, str(tmp_path / "out"), "-n", "40", "--batch-size", "4", *GEN])
    try:
        run.wait_for(lambda w: False, timeout=240)
        assert run.proc.wait(timeout=60) == 0, run.err()[-3000:]
        assert any(c.startswith("ray::GenerateWorker") for c in run.cmdlines()), run.cmdlines()
        # stop_ray waits for the reaper: nothing is left when the command returns
        assert not run.left(), run.left()
    finally:
        run.cleanup()


# ---------------------------------------------------------------------------------------------
# a generation actor killed mid-run
# ---------------------------------------------------------------------------------------------
def test_a_killed_generate_actor_is_replaced_and_every_piece_made_once(model_dir, clean_tokens, tmp_path):
    dest = tmp_path / "g"
    n = 400
    run = Watched(["generate", model_dir, str(dest), "-n", str(n), "--batch-size", "4", "--workers", "2", *GEN])
    shards = dest / "pieces" / "final"
    try:
        def two_actors_and_a_shard(w) -> bool:
            return sum(c.startswith("ray::GenerateWorker") for c in w.cmdlines()) >= 2 and \
                len(list(shards.glob("part-*.parquet"))) >= 2
        assert run.wait_for(two_actors_and_a_shard, timeout=240), run.err()[-3000:]
        actors = [pid for pid, (_s, c) in run.seen.items() if c.startswith("ray::GenerateWorker") and _proc_info(pid)]
        assert actors
        os.kill(actors[0], signal.SIGKILL)
        done_before = len(list(shards.glob("part-*.parquet")))
        code = run.proc.wait(timeout=300)
        assert code == 0, run.err()[-3000:]
        assert done_before < n // 4 // 2, "the actor was killed too late to matter"
    finally:
        run.cleanup()
    store = open_store(str(dest))
    manifest = read_manifest(store)
    assert manifest["pieces"] == n and verify_store(store).ok
    assert sum(s["rows"] for s in manifest["shards"]) == n  # every piece in exactly one shard
    tokens = _tokens(str(dest))
    assert sorted(tokens) == list(range(n))
    assert tokens == {i: clean_tokens[i] for i in range(n)}  # the same pieces as a clean run with that seed


# ---------------------------------------------------------------------------------------------
# the MODEL_DIR does not exist
# ---------------------------------------------------------------------------------------------
def test_generate_on_a_missing_model_dir_says_the_folder_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    code = cli_main(["generate", str(missing), str(tmp_path / "out"), "-n", "2", "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{missing}: MODEL_DIR does not exist" in err and "training has not finished" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    code = cli_main(["generate", str(tmp_path / "empty"), str(tmp_path / "out"), "-n", "2", "--workers", "0"])
    assert code == 2 and "empty folder" in capsys.readouterr().err


def test_generate_on_a_missing_s3_model_dir_says_so(s3_server, tmp_path, capsys):
    bucket = s3_server.new_bucket()
    code = cli_main(["generate", f"{bucket}/models/none", str(tmp_path / "out"), "-n", "2", "--workers", "0",
                     "--endpoint-url", s3_server.endpoint_url, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{bucket}/models/none: MODEL_DIR does not exist" in err, err


# ---------------------------------------------------------------------------------------------
# the S3 endpoint down for 12 s
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_s3(s3_server):
    """A private local Ray started while the S3 test credentials are in the environment (its workers need them)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _corpus_files() -> dict[str, bytes]:
    files = sorted(corpus("ff").glob("*.mid"))[:N_MIDI]
    return {**{f.name: f.read_bytes() for f in files}, **GARBAGE}


def _cli(argv: list[str], capsys, expect_waiting: bool = False) -> tuple[int, str, str]:
    code = cli_main(argv)
    got = capsys.readouterr()
    out, err = got.out, got.err
    deadline = time.monotonic() + 15  # Ray forwards its workers' stderr lines a moment later
    while expect_waiting and "retrying for up to" not in err and time.monotonic() < deadline:
        time.sleep(0.5)
        more = capsys.readouterr()
        out, err = out + more.out, err + more.err
    return code, out, err


def _no_manifest_lies(store) -> bool:
    """Wherever a manifest exists, every object it names is present and intact."""
    if not store.exists("manifest.json"):
        return False
    report = verify_store(store)
    assert report.ok, f"the manifest names missing {report.missing} / mismatched {report.mismatched}"
    return True


def _outage(s3_server, after_requests: int):
    return s3_server.outage(OUTAGE, after_requests=after_requests, timeout=120)


def _check_outage(outage, started: float, ended: float) -> None:
    outage.join(timeout=OUTAGE + 60)
    assert not outage.is_alive()
    assert outage.stopped_at is not None and started < outage.stopped_at < ended, "the outage missed the run"


def _check_preprocess(store) -> None:
    manifest = read_manifest(store)
    assert manifest["inputs"] == N_MIDI + len(GARBAGE)
    assert manifest["failures"] == len(GARBAGE), f"the outage cost inputs: {manifest['failure_reasons']}"
    assert manifest["pieces"] + manifest["duplicates"] == N_MIDI
    assert _no_manifest_lies(store)


def _waited(err: str, seconds: str = "120") -> None:
    assert f"retrying for up to {seconds} s" in err, err[-3000:]
    assert "Traceback" not in err


def test_preprocess_rides_out_an_outage_during_reads(s3_server, ray_s3, tmp_path, capsys):
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    for name, data in _corpus_files().items():
        client.put_object(Bucket=bucket[5:], Key=f"corpus/{name}", Body=data)
    dest = str(tmp_path / "out")   # local: every S3 request of the run is a read
    outage = _outage(s3_server, after_requests=4)
    started = time.monotonic()
    code, out, err = _cli(["preprocess", f"{bucket}/corpus/", dest, "--endpoint-url", s3_server.endpoint_url,
                           "--batch-files", "2", "--no-progress"], capsys, expect_waiting=True)
    _check_outage(outage, started, time.monotonic())
    assert code == 0, err[-3000:]
    _waited(err)
    _check_preprocess(open_store(dest))
    code, out, err = _cli(["verify", dest], capsys)
    assert code == 0 and "-> OK" in out


def _local_corpus(tmp_path) -> str:
    src = tmp_path / "corpus"
    for name, data in _corpus_files().items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    return str(src)


def test_preprocess_rides_out_an_outage_during_writes(s3_server, ray_s3, tmp_path, capsys):
    src = _local_corpus(tmp_path)
    dest = f"{s3_server.new_bucket()}/runs/w/"   # every S3 request of the run concerns DEST
    ep = ["--endpoint-url", s3_server.endpoint_url]
    outage = _outage(s3_server, after_requests=6)
    started = time.monotonic()
    code, out, err = _cli(["preprocess", src, dest, *ep, "--batch-files", "2", "--no-progress"], capsys,
                          expect_waiting=True)
    _check_outage(outage, started, time.monotonic())
    assert code == 0, err[-3000:]
    _waited(err)
    _check_preprocess(open_store(dest, s3_server.options()))
    code, out, err = _cli(["verify", dest, *ep], capsys)
    assert code == 0 and "-> OK" in out


def test_preprocess_budget_shorter_than_the_outage_stops_cleanly_then_resumes(s3_server, ray_s3, tmp_path, capsys):
    src = _local_corpus(tmp_path)
    dest = f"{s3_server.new_bucket()}/runs/short/"
    ep = ["--endpoint-url", s3_server.endpoint_url]
    store = open_store(dest, s3_server.options())
    outage = _outage(s3_server, after_requests=6)
    started = time.monotonic()
    # two boto3 attempts per request: one request's own retries cannot span the 12 s outage
    code, out, err = _cli(["preprocess", src, dest, *ep, "--batch-files", "2", "--no-progress",
                           "--s3-retry-seconds", "2", "--s3-max-attempts", "2"], capsys)
    ended = time.monotonic()
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("midiforge preprocess: error:")]
    assert len(lines) == 1 and "s3://" in lines[0] and "cannot reach the S3 endpoint" in lines[0], err[-3000:]
    assert "after retrying for 2 s" in lines[0] and "Traceback" not in err
    assert s3_server.secret_key not in err and s3_server.access_key not in err
    _check_outage(outage, started, ended)
    _no_manifest_lies(store)
    code, out, err = _cli(["preprocess", src, dest, *ep, "--no-progress", "--resume"], capsys)
    assert code == 0, err[-3000:]
    _check_preprocess(store)


def _generate_on_s3(s3_server, model_dir, dest, n, capsys, *extra, expect_waiting=False):
    return _cli(["generate", model_dir, dest, "-n", str(n), "--batch-size", "4", "--workers", "2",
                 "--endpoint-url", s3_server.endpoint_url, *GEN, *extra], capsys, expect_waiting=expect_waiting)


def _check_generate(s3_server, dest: str, n: int, clean_tokens: dict) -> None:
    store = open_store(dest, s3_server.options())
    manifest = read_manifest(store)
    assert manifest["pieces"] == n and sum(s["rows"] for s in manifest["shards"]) == n
    assert _no_manifest_lies(store)
    tokens = _tokens(dest, s3_server.options())
    assert tokens == {i: clean_tokens[i] for i in range(n)}


def test_generate_rides_out_an_outage_during_writes(s3_server, ray_s3, model_dir, clean_tokens, capsys):
    dest = f"{s3_server.new_bucket()}/gen/"
    n = 120
    outage = _outage(s3_server, after_requests=8)
    started = time.monotonic()
    code, out, err = _generate_on_s3(s3_server, model_dir, dest, n, capsys, expect_waiting=True)
    _check_outage(outage, started, time.monotonic())
    assert code == 0, err[-3000:]
    _waited(err)
    _check_generate(s3_server, dest, n, clean_tokens)


def test_generate_budget_shorter_than_the_outage_stops_cleanly_then_resumes(s3_server, ray_s3, model_dir,
                                                                             clean_tokens, capsys):
    dest = f"{s3_server.new_bucket()}/gen/"
    n = 120
    outage = _outage(s3_server, after_requests=8)
    started = time.monotonic()
    code, out, err = _generate_on_s3(s3_server, model_dir, dest, n, capsys, "--s3-retry-seconds", "2",
                                     "--s3-max-attempts", "2")
    ended = time.monotonic()
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("midiforge generate: error:")]
    assert len(lines) == 1 and "s3://" in lines[0] and "cannot reach the S3 endpoint" in lines[0], err[-3000:]
    assert "Traceback" not in err
    _check_outage(outage, started, ended)
    _no_manifest_lies(open_store(dest, s3_server.options()))
    code, out, err = _generate_on_s3(s3_server, model_dir, dest, n, capsys, "--resume")
    assert code == 0, err[-3000:]
    _check_generate(s3_server, dest, n, clean_tokens)

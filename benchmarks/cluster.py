"""Preprocess and generate on 1 node and on 2 nodes of the test Slurm cluster, through the real sbatch scripts.

    sudo .venv/bin/python benchmarks/cluster.py [--corpus ../shared/corpora/nottingham] [--copies 40]
                                                [--pieces 1024] [--max-tokens 512] [--cpus-per-node 1]

Starts the 2-node Slurm of the tests (tests/slurmcluster.py: each node a network namespace of this machine, so
root, slurm-wlm, munge and iproute2 are needed), submits ``slurm/preprocess.sbatch`` and ``slurm/generate.sbatch``
with ``--nodes=1`` and then ``--nodes=2`` on the same inputs, and prints one JSON object: per stage and node count the
job's wall time (submit to end), the stage's own seconds (its manifest), the seconds of its parallel phase (preprocess:
``timing.batches``; generate: ``run.generate_seconds``), the serial part of the run (the rest: listing, Ray start,
finalize, ...), the throughput, and the ratios 2 nodes / 1 node. Each node offers ``--cpus-per-node`` CPUs (default 1:
the two nodes share this machine's cores, so 2 nodes have twice the CPUs of one). The inputs are sized so that the
parallel phase is many times Ray's start-up: ``--copies 40`` makes 41,360 MIDI files of the nottingham tunes (each
tune and its transpositions), ``--pieces 1024 --max-tokens 512`` about 0.5 M generated tokens. It also checks that
both runs made the same output (same pieces, same tokens), and exits 1 if not.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _bench_preprocess():
    spec = importlib.util.spec_from_file_location("bench_preprocess", ROOT / "benchmarks" / "preprocess.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model(path: str, embedding_dim: int, units: str) -> str:
    """A bundle with the generate benchmark's model (random weights: the speed does not depend on them)."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from midiforge.pipeline.bundles import write_bundle
    from midiforge.model.lstm import ModelConfig, build_model, parse_units, tf_keras
    from midiforge.music.tokenizers import make_tokenizer
    from midiforge.storage import open_store

    _tf, keras = tf_keras()
    keras.utils.set_random_seed(0)
    tok = make_tokenizer("events")
    cfg = ModelConfig(vocab_size=tok.vocab_size, embedding_dim=embedding_dim, lstm_units=parse_units(units),
                      tokenizer_id=tok.id)
    model = build_model(cfg)
    h5 = os.path.join(path, "w.weights.h5")
    model.save_weights(h5)
    with open(h5, "rb") as fh:
        weights = fh.read()
    model_dir = os.path.join(path, "model")
    write_bundle(open_store(model_dir), "bundle", config=cfg, tokenizer_json=tok.to_json(),
                 training={"qpm_median": 120.0, "epochs_done": 0}, weights=weights)
    return model_dir


def _env() -> dict:
    venv = Path(sys.executable).parent.parent
    return {"MIDIFORGE_VENV": str(venv), "RAY_ADDRESS": None, "RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN": None}


def _run(cluster, nodes: int, script: str, args: list[str], out: Path) -> float:
    t0 = time.monotonic()
    job = cluster.sbatch([f"--nodes={nodes}", "--output", str(out / f"{script}-{nodes}-%j.out"),
                          str(ROOT / "slurm" / script), *args], env=_env(), cwd=str(out))
    state = cluster.wait(job, timeout=3600)
    wall = time.monotonic() - t0
    if state != "COMPLETED":
        raise SystemExit(f"{script} on {nodes} node(s): job {job} ended {state}:\n{cluster.output(job)[-3000:]}")
    left = cluster.wait_no_leftovers(60)
    if left:
        raise SystemExit(f"{script} on {nodes} node(s): processes outlived the job: {left}")
    return wall


def _row(wall: float, stage_seconds: float, parallel_seconds: float, amount: float, unit: str) -> dict:
    return {"job_wall_seconds": round(wall, 2), "stage_seconds": round(stage_seconds, 2),
            "parallel_seconds": round(parallel_seconds, 2),
            "serial_fraction": round(1 - parallel_seconds / stage_seconds, 3) if stage_seconds else None,
            f"{unit}_per_second_stage": round(amount / stage_seconds, 1) if stage_seconds else None,
            f"{unit}_per_second_parallel": round(amount / parallel_seconds, 1) if parallel_seconds else None}


def _ratios(one: dict, two: dict) -> dict:
    return {k: round(one[k] / two[k], 2) for k in ("job_wall_seconds", "stage_seconds", "parallel_seconds")
            if one.get(k) and two.get(k)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpora" / "nottingham"))
    p.add_argument("--copies", type=int, default=40, help="versions of every file (transpositions; default 40)")
    p.add_argument("--pieces", type=int, default=1024, help="pieces to generate (default 1024)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per piece (default 512)")
    p.add_argument("--cpus-per-node", type=int, default=1, help="CPUs each test node offers (default 1)")
    p.add_argument("--embedding-dim", type=int, default=128)
    p.add_argument("--lstm-units", default="256,256")
    args = p.parse_args(argv)

    from slurmcluster import SlurmCluster, missing_requirements

    why = missing_requirements()
    if why:
        print(f"benchmarks/cluster.py: cannot start the test Slurm cluster: {why}", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="mf-bench-cluster-", dir="/tmp"))
    corpus = _bench_preprocess().transposed_copies(args.corpus, str(scratch / "corpus"), args.copies)
    files = sum(1 for _ in Path(corpus).rglob("*.mid"))
    model_dir = _model(str(scratch), args.embedding_dim, args.lstm_units)
    result: dict = {"benchmark": "cluster", "machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()},
                    "cpus_per_node": args.cpus_per_node, "preprocess": {"files": files}, "generate": {
                        "pieces": args.pieces, "max_tokens": args.max_tokens}}
    problems = []
    with SlurmCluster(nodes=2, cpus_per_node=args.cpus_per_node) as cluster:
        tokens = {}
        for nodes in (1, 2):
            dest = scratch / f"tokens-{nodes}"
            wall = _run(cluster, nodes, "preprocess.sbatch", [corpus, str(dest)], scratch)
            m = json.loads((dest / "manifest.json").read_text())
            result["preprocess"][f"nodes_{nodes}"] = {
                **_row(wall, m["seconds"], m["timing"]["batches"], m["inputs"], "files"),
                "batch_hosts": m["timing"].get("batch_hosts")}
            tokens[nodes] = (m["inputs"], m["pieces"], m["tokens"], sorted(s["sha256"] for s in m["shards"]))
        result["preprocess"]["one_over_two"] = _ratios(result["preprocess"]["nodes_1"], result["preprocess"]["nodes_2"])
        if tokens[1][:3] != tokens[2][:3]:
            problems.append(f"preprocess: 1 node made {tokens[1][:3]}, 2 nodes {tokens[2][:3]} (inputs, pieces, tokens)")
        made = {}
        for nodes in (1, 2):
            dest = scratch / f"pieces-{nodes}"
            wall = _run(cluster, nodes, "generate.sbatch",
                        [model_dir, str(dest), "--num-pieces", str(args.pieces), "--seed", "1", "--max-tokens",
                         str(args.max_tokens), "--no-midi-files"], scratch)
            m = json.loads((dest / "manifest.json").read_text())
            result["generate"][f"nodes_{nodes}"] = {
                **_row(wall, m["seconds"], m["run"]["generate_seconds"], m["tokens"], "tokens"),
                "workers": m["run"]["workers"]}
            from midiforge.pipeline.pieces import read_pieces

            t = read_pieces(str(dest), columns=["index", "tokens"]).to_pydict()
            made[nodes] = sorted(zip(t["index"], map(tuple, t["tokens"])))
        result["generate"]["one_over_two"] = _ratios(result["generate"]["nodes_1"], result["generate"]["nodes_2"])
        if made[1] != made[2]:
            problems.append("generate: 1 node and 2 nodes made different pieces for the same seed")
    result["machine"]["load_after"] = os.getloadavg()
    result["same_output_on_1_and_2_nodes"] = not problems
    print(json.dumps(result, indent=1))
    for msg in problems:
        print(f"benchmarks/cluster.py: {msg}", file=sys.stderr)
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

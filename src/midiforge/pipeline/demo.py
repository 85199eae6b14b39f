"""The whole pipeline on the embedded demo corpus: Bach chorales from music21's bundled corpus,
exported to MIDI (no download), on a local Ray, with a local folder as the object store:
preprocess -> train (a small LSTM, a few minutes on 2 CPU cores) -> generate (MIDI files).
Running it again continues where it stopped and redoes nothing that is finished."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from midiforge.errors import MidiforgeError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="folder for everything the demo writes (default: demo-out)")
    p.add_argument("--chorales", type=int, default=120, help="how many Bach chorales to export (default: 120)")
    p.add_argument("--workers", type=int, help="Ray workers (default: every CPU)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default: 8)")
    p.add_argument("--pieces", type=int, default=16, help="pieces to generate (default: 16)")


def export_chorale(path: str, dest: str) -> str:
    """One bundled chorale to a MIDI file; returns its path (kept when it already exists)."""
    import warnings

    from music21 import corpus

    if not os.path.exists(dest):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            score = corpus.parse(path)
        tmp = dest + ".tmp"
        score.write("midi", fp=tmp)
        os.replace(tmp, dest)
    return dest


def build_corpus(out: Path, n: int, workers: int | None) -> Path:
    """``out/corpus/*.mid``: the first ``n`` Bach chorales of music21's corpus, exported on Ray."""
    import ray
    from music21 import corpus

    from midiforge.pipeline.ray_runtime import start_ray

    paths = sorted(str(p) for p in corpus.getComposer("bach") if Path(p).name.startswith("bwv"))[:n]
    if not paths:
        raise MidiforgeError("music21's bundled corpus has no Bach chorales (is music21 fully installed?)")
    folder = out / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(p, str(folder / (Path(p).name.rsplit(".", 1)[0] + ".mid"))) for p in paths]
    missing = [t for t in todo if not os.path.exists(t[1])]
    if missing:
        start_ray(None, workers)
        task = ray.remote(num_cpus=1)(export_chorale)
        ray.get([task.remote(p, d) for p, d in missing])
    print(f"demo corpus: {len(todo)} chorales in {folder}")
    return folder


def main(args) -> int:
    from midiforge.cli import main as cli

    out = Path(args.out).resolve()
    corpus_dir = build_corpus(out, args.chorales, args.workers)
    shards = out / "tokens"
    workers = ["--workers", str(args.workers)] if args.workers else []
    resume = ["--resume"] if (shards / "_work" / "settings.json").exists() else []
    code = cli(["preprocess", str(corpus_dir), str(shards), *workers, *resume])
    if code:
        return code
    manifest = json.loads((shards / "manifest.json").read_text())
    print(f"demo: {manifest['pieces']} pieces, {manifest['tokens']} tokens -> {shards}/shards/")

    model = out / "model"
    if (model / "manifest.json").exists():
        print(f"demo: the model in {model} is finished; delete it to train again")
    else:  # a fresh run, or the same command again after an interruption (it resumes from its backup)
        code = cli(["train", str(shards), str(model), "--epochs", str(args.epochs), "--lstm-units", "256",
                    "--embedding-dim", "64", "--batch-size", "32", "--seq-len", "128", "--progress", "epoch"])
        if code:
            return code

    pieces = out / "pieces"
    resume = ["--resume"] if (pieces / "_work" / "settings.json").exists() else []
    code = cli(["generate", str(model), str(pieces), "--num-pieces", str(args.pieces), "--seed", "0",
                "--max-tokens", "512", "--top-p", "0.95", "--piano-roll", *workers, *resume])
    if code:
        return code
    from midiforge.pipeline.pieces import read_pieces

    midi = read_pieces(str(pieces), columns=["midi_path"])["midi_path"].drop_null()
    print(f"demo: {len(midi)} MIDI files in {pieces}/midi/ (tokens and metrics in the Parquet shards of "
          f"{pieces}/pieces/: midiforge.pipeline.pieces.read_pieces); model bundle in {model}/bundle/")
    return 0

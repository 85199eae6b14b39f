"""The whole pipeline on the embedded demo corpus: Bach chorales from music21's bundled corpus,
exported to MIDI (no download), on a local Ray, with a local folder as the object store:
preprocess -> train (an LSTM, a few minutes on 2 CPU cores) -> generate (MIDI files) -> evaluate
and report (one static HTML page).  It ends by checking its pieces against its corpus (the figures
of the README's "make demo" section) and printing where the report is.  Running it again
continues where it stopped and redoes nothing that is finished."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from midiforge.errors import MidiforgeError

#: The demo's settings; each is a flag of ``midiforge demo`` (the test runs the same code path with
#: tiny values).  The model: one LSTM layer of 384 trained on 5.2 M targets (16 x 40 steps of 64 x 128
#: tokens), what 2 CPU cores do in several minutes; it beats the 5-gram on the held-out chorales from
#: about epoch 12, and its pieces stay in key (pitch-class entropy, scale consistency) from about
#: epoch 16.  The sampling: a primer from the held-out chorales (a key and a texture to continue),
#: nucleus sampling sharper than the model's distribution (at temperature 0.9, top-p 0.9 the pieces
#: wander through the keys).
DEFAULTS = {
    "chorales": 120,
    "split": "0.8,0.1,0.1",
    "transpose": "-3..3",
    "epochs": 16,
    "steps_per_epoch": 40,
    "lstm_units": "384",
    "embedding_dim": 64,
    "batch_size": 64,
    "seq_len": 128,
    "dropout": 0.1,
    "learning_rate": 0.003,
    "pieces": 16,
    "max_tokens": 512,
    "temperature": 0.7,
    "top_p": 0.8,
    "primer_length": 64,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--out", default="demo-out", help="folder for everything the demo writes (default: demo-out)")
    p.add_argument("--workers", type=int, help="Ray workers (default: every CPU)")
    c = p.add_argument_group("corpus")
    c.add_argument("--chorales", type=int, default=d["chorales"],
                   help="how many Bach chorales to export (default: %(default)s)")
    c.add_argument("--split", default=d["split"], metavar="TRAIN,VAL,TEST",
                   help="preprocess --split (default: %(default)s)")
    c.add_argument("--transpose", default=d["transpose"], metavar="A..B",
                   help="preprocess --transpose: transposed copies of the training chorales (default: %(default)s)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=d["epochs"], help="training epochs (default: %(default)s)")
    t.add_argument("--steps-per-epoch", type=int, default=d["steps_per_epoch"],
                   help="training steps per epoch (default: %(default)s)")
    t.add_argument("--lstm-units", default=d["lstm_units"], help="LSTM layer sizes (default: %(default)s)")
    t.add_argument("--embedding-dim", type=int, default=d["embedding_dim"],
                   help="token embedding size (default: %(default)s)")
    t.add_argument("--batch-size", type=int, default=d["batch_size"], help="training batch (default: %(default)s)")
    t.add_argument("--seq-len", type=int, default=d["seq_len"], help="training window (default: %(default)s)")
    t.add_argument("--dropout", type=float, default=d["dropout"], help="dropout after each LSTM (default: %(default)s)")
    t.add_argument("--learning-rate", type=float, default=d["learning_rate"],
                   help="Adam learning rate (default: %(default)s)")
    t.add_argument("--progress", choices=("auto", "bar", "epoch", "none"), default="auto",
                   help="training progress (default: auto, a bar of steps on a terminal)")
    g = p.add_argument_group("generation")
    g.add_argument("--pieces", type=int, default=d["pieces"], help="pieces to generate (default: %(default)s)")
    g.add_argument("--max-tokens", type=int, default=d["max_tokens"],
                   help="generated tokens per piece (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=d["temperature"], help="sampling temperature (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=d["top_p"], help="nucleus sampling (default: %(default)s)")
    g.add_argument("--primer-length", type=int, default=d["primer_length"],
                   help="tokens of a held-out (validation) chorale each piece starts from (default: %(default)s)")
    r = p.add_argument_group("report")
    r.add_argument("--no-audio", action="store_true", help="no audio in the report (default: audio when a "
                                                          "SoundFont and a renderer are found)")


# -------------------------------------------------------------------------------------------
# the corpus
# -------------------------------------------------------------------------------------------
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


def chorale_paths(n: int) -> list[str]:
    from music21 import corpus

    paths = sorted(str(p) for p in corpus.getComposer("bach") if Path(p).name.startswith("bwv"))[:n]
    if not paths:
        raise MidiforgeError("music21's bundled corpus has no Bach chorales (is music21 fully installed?)")
    return paths


def build_corpus(out: Path, n: int, workers: int | None, progress: bool = True) -> Path:
    """``out/corpus/*.mid``: the first ``n`` Bach chorales of music21's corpus, exported on Ray
    (a progress bar per chorale: music21 takes about a second for each)."""
    import ray
    from tqdm import tqdm

    from midiforge.pipeline.ray_runtime import start_ray

    paths = chorale_paths(n)
    folder = out / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(p, str(folder / (Path(p).name.rsplit(".", 1)[0] + ".mid"))) for p in paths]
    missing = [t for t in todo if not os.path.exists(t[1])]
    if missing:
        start_ray(None, workers)
        task = ray.remote(num_cpus=1)(export_chorale)
        pending = [task.remote(p, d) for p, d in missing]
        with tqdm(total=len(todo), initial=len(todo) - len(missing), unit="chorale", desc="demo corpus",
                  disable=not progress, mininterval=0.5) as bar:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                ray.get(ready)
                bar.update(len(ready))
    print(f"demo corpus: {len(todo)} chorales in {folder}")
    return folder


# -------------------------------------------------------------------------------------------
# the check against the corpus
# -------------------------------------------------------------------------------------------
def corpus_check(tokens: Path, pieces: Path, evaluation: dict) -> dict:
    """The demo's targets, measured: its pieces (``pieces``) against its whole corpus (every original
    chorale of ``tokens``, all splits): pitch-class entropy and scale consistency within one standard
    deviation of the corpus mean, every note inside the corpus's pitch range +/- 12, mean polyphony
    within 25%, no two identical pieces, and (from ``evaluation``, the report's evaluate result on the
    held-out split) the model's loss below the 5-gram's."""
    import numpy as np

    from midiforge.pipeline.evaluate import load_generated, load_token_set, set_values

    corpus, tokenizer = [], None
    for split in ("train", "validation", "test"):
        try:
            part, tokenizer = load_token_set(str(tokens), split)
        except MidiforgeError:  # a tiny corpus may have no piece in a split
            continue
        corpus.append(part)
    if not corpus:
        raise MidiforgeError(f"{tokens}: no pieces in any split")
    generated = load_generated(str(pieces), tokenizer)
    c_pieces = [p for part in corpus for p in part.pieces]
    c_values = [v for part in corpus for v in set_values(part)]
    g_values = set_values(generated)

    def stats(values, name):
        a = np.array([v[name] for v in values], dtype=np.float64)
        a = a[np.isfinite(a)]
        return (float(a.mean()), float(a.std())) if len(a) else (math.nan, math.nan)

    out: dict = {"corpus_pieces": len(c_pieces), "generated_pieces": len(generated), "targets": {}}
    for name in ("pitch_class_entropy", "scale_consistency"):
        (gm, gs), (cm, cs) = stats(g_values, name), stats(c_values, name)
        out["targets"][name] = {"generated": gm, "generated_std": gs, "corpus": cm, "corpus_std": cs,
                                "met": bool(abs(gm - cm) <= cs)}
    (gm, _), (cm, _) = stats(g_values, "polyphony"), stats(c_values, "polyphony")
    out["targets"]["polyphony"] = {"generated": gm, "corpus": cm, "relative_difference": abs(gm - cm) / cm,
                                   "met": bool(abs(gm - cm) <= 0.25 * cm)}
    low = min(int(p.pitch.min()) for p in c_pieces if len(p.pitch))
    high = max(int(p.pitch.max()) for p in c_pieces if len(p.pitch))
    outside = [name for name, p in zip(generated.names, generated.pieces)
               if len(p.pitch) and (int(p.pitch.min()) < low - 12 or int(p.pitch.max()) > high + 12)]
    g_low = min((int(p.pitch.min()) for p in generated.pieces if len(p.pitch)), default=None)
    g_high = max((int(p.pitch.max()) for p in generated.pieces if len(p.pitch)), default=None)
    out["targets"]["pitch_range"] = {"corpus": [low, high], "generated": [g_low, g_high],
                                     "pieces_outside": len(outside), "met": not outside}
    identical = int(evaluation.get("identical_pieces", {}).get("generated", 0))
    out["targets"]["identical_pieces"] = {"generated": identical, "met": identical == 0}
    loss = evaluation.get("loss")
    if loss:
        order = loss.get("ngram_order", 5)
        out["targets"]["held_out_loss"] = {"model": loss["model_nats_per_token"],
                                           f"ngram{order}": loss[f"ngram{order}_nats_per_token"],
                                           "split": evaluation.get("reference", {}).get("split"),
                                           "targets": loss["targets"], "met": bool(loss["model_beats_ngram"])}
    out["met"] = all(t["met"] for t in out["targets"].values())
    return out


def format_check(check: dict) -> str:
    t = check["targets"]
    yes = {True: "met", False: "NOT met"}
    lines = [f"demo: its {check['generated_pieces']} pieces against its {check['corpus_pieces']} chorales"]
    for name in ("pitch_class_entropy", "scale_consistency"):
        v = t[name]
        lines.append(f"  {name}: {v['generated']:.3f} vs corpus {v['corpus']:.3f} +/- {v['corpus_std']:.3f}"
                     f" ({yes[v['met']]})")
    v = t["pitch_range"]
    lines.append(f"  pitch range: {v['generated'][0]}-{v['generated'][1]} vs corpus {v['corpus'][0]}-{v['corpus'][1]}"
                 f", {v['pieces_outside']} pieces beyond it +/- 12 ({yes[v['met']]})")
    v = t["polyphony"]
    lines.append(f"  polyphony: {v['generated']:.2f} vs corpus {v['corpus']:.2f}, "
                 f"{100 * v['relative_difference']:.0f}% apart ({yes[v['met']]})")
    v = t["identical_pieces"]
    lines.append(f"  identical pieces: {v['generated']} ({yes[v['met']]})")
    if "held_out_loss" in t:
        v = t["held_out_loss"]
        ngram = next(k for k in v if k.startswith("ngram"))
        lines.append(f"  held-out loss ({v['split']} split, {v['targets']} tokens): model {v['model']:.3f} vs "
                     f"{ngram} {v[ngram]:.3f} nats/token ({yes[v['met']]})")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------
def _stage(name: str, argv: list[str]) -> int:
    """``midiforge NAME ARGV``: the stage module parses ``argv`` with its own arguments and runs; its
    error is printed as the CLI prints it (exit code 2).  (pipeline/ does not import the CLI above it.)"""
    import importlib

    module = importlib.import_module(f"midiforge.pipeline.{name}")
    parser = argparse.ArgumentParser(prog=f"midiforge {name}")
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(module.main(args) or 0)
    except MidiforgeError as exc:
        print(f"midiforge {name}: error: {exc}", file=sys.stderr)
        return 2


def main(args) -> int:
    out = Path(args.out).resolve()
    interactive = sys.stderr.isatty()
    corpus_dir = build_corpus(out, args.chorales, args.workers, progress=interactive)
    shards = out / "tokens"
    workers = ["--workers", str(args.workers)] if args.workers else []
    quiet = [] if interactive else ["--no-progress"]
    resume = ["--resume"] if (shards / "_work" / "settings.json").exists() else []
    code = _stage("preprocess", [str(corpus_dir), str(shards), "--split", args.split,
                                 f"--transpose={args.transpose}", *workers, *quiet, *resume])
    if code:
        return code
    manifest = json.loads((shards / "manifest.json").read_text())
    print(f"demo: {manifest['pieces']} chorales ({manifest['rows']} rows with the transposed copies), "
          f"{manifest['tokens']} tokens -> {shards}/shards/")

    model = out / "model"
    if (model / "manifest.json").exists():
        print(f"demo: the model in {model} is finished; delete it to train again")
    else:  # a fresh run, or the same command again after an interruption (it resumes from its backup)
        code = _stage("train", [
            str(shards), str(model), "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch),
            "--lstm-units", args.lstm_units, "--embedding-dim", str(args.embedding_dim),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--dropout", str(args.dropout),
            "--learning-rate", str(args.learning_rate), "--progress", args.progress])
        if code:
            return code

    pieces = out / "pieces"
    resume = ["--resume"] if (pieces / "_work" / "settings.json").exists() else []
    code = _stage("generate", [
        str(model), str(pieces), "--num-pieces", str(args.pieces), "--seed", "0", "--max-tokens", str(args.max_tokens),
        "--temperature", str(args.temperature), "--top-p", str(args.top_p), "--primer-shards", str(shards),
        "--primer-split", "validation", "--primer-length", str(args.primer_length), "--piano-roll",
        *workers, *quiet, *resume])
    if code:
        return code
    print(f"demo: {args.pieces} MIDI files in {pieces}/midi/final/ (tokens, metrics and MIDI bytes in the "
          f"Parquet shards {pieces}/pieces/final/: midiforge.pipeline.pieces.read_pieces); "
          f"model bundle in {model}/bundle/")

    from midiforge.pipeline.report import build_report

    summary = build_report(str(out), audio=not args.no_audio)
    evaluation = json.loads((out / "report" / "evaluate.json").read_text())
    check = corpus_check(shards, pieces, evaluation)
    (out / "report" / "demo-check.json").write_text(json.dumps(check, indent=1) + "\n")
    print(format_check(check))
    if summary.get("audio_note") and summary["audio_note"] != "off":
        print(f"demo: the report has no audio ({summary['audio_note']})")
    print(f"demo: open the report: {summary['index']}")
    return 0

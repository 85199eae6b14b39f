"""Compare generated pieces with a reference: their metrics side by side, loops, copies, and the
model's held-out loss next to an n-gram baseline.

``midiforge evaluate GENERATED REFERENCE [--model MODEL_DIR]``

* ``GENERATED``: a generate output (its pieces shards) or a folder of MIDI files.
* ``REFERENCE``: a folder of MIDI files, or a preprocess output (``DEST``), whose held-out split
  is used (``--split``, default: test if it has pieces, else validation).
* For every metric of :mod:`midiforge.music.metrics`: mean and spread of each set, and how far
  apart the two sets' distributions are (overlapping area and KL divergence of the kernel density
  estimates of the per-piece values, as mgeval).  Loops and copies: ``longest_repeat`` (any
  period), identical pieces in each set, and each piece's nearest training piece by n-gram overlap
  (memorisation; the reference's own overlap beside it says what is normal for real music).
* ``--model``: the model's loss on the reference's tokens (nats/token) beside an interpolated
  Kneser-Ney 5-gram trained on the training split of the same tokens: an LSTM that does not beat
  it has not learned more than local statistics.

Prints a table (or ``--format json``); ``--json FILE`` also writes the whole result as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from midiforge.errors import MidiforgeError
from midiforge.music import metrics as M
from midiforge.pipeline.piece_sets import (
    PieceSet,
    is_token_output,
    load_generated,
    load_reference,
    load_token_set,
    read_token_split,
)
from midiforge.storage import StorageOptions

TOKEN_METRICS = ("longest_repeat", "repeat_period", "distinct_4gram_ratio")
SIZE_METRICS = ("n_notes", "seconds")
#: every per-piece metric evaluate compares, in table order
METRICS = M.NOTE_METRICS + TOKEN_METRICS + SIZE_METRICS
DEFAULT_OVERLAP_N = 16
DEFAULT_ORDER = 5


# -------------------------------------------------------------------------------------------
# per-piece metrics
# -------------------------------------------------------------------------------------------
def _content(tokens: np.ndarray) -> np.ndarray:
    """Tokens without the special ids (PAD, BOS, EOS, UNK): what the piece says."""
    from midiforge.music.tokenizers import SPECIALS

    t = np.asarray(tokens, dtype=np.int64)
    return t[t >= len(SPECIALS)]


def piece_values(piece, tokens) -> dict[str, float]:
    """Every metric evaluate compares, for one piece."""
    content = _content(tokens)
    length, period = M.repeat_stretch(content)
    return {**M.piece_metrics(piece), "longest_repeat": float(length), "repeat_period": float(period),
            "distinct_4gram_ratio": M.distinct_4gram_ratio(content), "n_notes": float(len(piece)),
            "seconds": piece.end_seconds()}


def set_values(ps: PieceSet) -> list[dict[str, float]]:
    return [piece_values(p, t) for p, t in zip(ps.pieces, ps.tokens)]


# -------------------------------------------------------------------------------------------
# model loss and the n-gram baseline
# -------------------------------------------------------------------------------------------
def _cap(sequences: list[np.ndarray], max_targets: int | None) -> list[np.ndarray]:
    """The sequences, the last one cut, so that they hold at most ``max_targets`` targets."""
    out, left = [], max_targets if max_targets else None
    for s in sequences:
        if len(s) < 2:
            continue
        if left is not None:
            if left <= 0:
                break
            s = s[:left + 1]
            left -= len(s) - 1
        out.append(s)
    return out


def model_log_probs(bundle, sequences: list[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """Natural log-probability the model gives each target (every token but the first of each
    sequence, predicted from the tokens before it, the LSTM state carried from BOS), in sequence order."""
    from midiforge.model.decode import NumpyLSTM
    from midiforge.pipeline.generate import numpy_weights

    engine = NumpyLSTM(numpy_weights(bundle))
    out = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for a in range(0, len(order), batch_size):
        group = order[a:a + batch_size]
        lengths = np.array([len(sequences[i]) for i in group])
        mat = np.zeros((len(group), int(lengths.max())), dtype=np.int64)  # one row per piece, PAD after its end
        for r, i in enumerate(group):
            mat[r, :lengths[r]] = sequences[i]
        lp = np.zeros((len(group), int(lengths.max()) - 1))
        engine.begin(len(group))
        live = np.arange(len(group))
        for step in range(int(lengths.max()) - 1):
            keep = lengths[live] > step + 1       # rows with a target at step + 1
            if not keep.all():
                engine.keep(keep)
                live = live[keep]
            logits = engine.step(mat[live, step])
            logits = logits - logits.max(axis=1, keepdims=True)
            logz = np.log(np.exp(logits).sum(axis=1))
            lp[live, step] = logits[np.arange(len(live)), mat[live, step + 1]] - logz
        for r, i in enumerate(group):
            out[i] = lp[r, :lengths[r] - 1]
    return np.concatenate(out) if out else np.zeros(0)


def loss_comparison(bundle, reference_tokens: list[np.ndarray], train_tokens: list[np.ndarray], *,
                    order: int = DEFAULT_ORDER, max_targets: int | None = 200_000) -> dict:
    """The model's and an interpolated Kneser-Ney n-gram's loss (nats/token) on the same targets."""
    seqs = _cap(reference_tokens, max_targets)
    if not seqs:
        raise MidiforgeError("the reference has no piece of two tokens or more to score the model on")
    model_lp = model_log_probs(bundle, seqs)
    lm = M.KneserNey(train_tokens, bundle.config.vocab_size, order)
    ngram_lp = lm.log_probs(seqs)
    model_loss, ngram_loss = float(-model_lp.mean()), float(-ngram_lp.mean())
    return {"checkpoint": bundle.checkpoint, "bundle": bundle.uri, "tokenizer": bundle.tokenizer.id,
            "targets": len(model_lp), "pieces": len(seqs), "model_nats_per_token": model_loss,
            f"ngram{order}_nats_per_token": ngram_loss, "ngram_order": order,
            "train_tokens": int(sum(len(t) for t in train_tokens)),
            "uniform_nats_per_token": math.log(bundle.config.vocab_size),
            "model_beats_ngram": bool(model_loss < ngram_loss)}


# -------------------------------------------------------------------------------------------
# the evaluation
# -------------------------------------------------------------------------------------------
def _finite(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def _clean(obj):
    """JSON-safe: NaN and inf become null."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return _finite(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def compare(generated: PieceSet, reference: PieceSet, *, train: list[tuple[str, np.ndarray]] | None = None,
            overlap_n: int = DEFAULT_OVERLAP_N) -> dict:
    """Metrics of both sets side by side, distances, loops, copies and memorisation (no model)."""
    gv, rv = set_values(generated), set_values(reference)
    metrics = {}
    for name in METRICS:
        g = np.array([v[name] for v in gv], dtype=np.float64)
        r = np.array([v[name] for v in rv], dtype=np.float64)
        metrics[name] = {"generated": M.summary(g), "reference": M.summary(r), **M.distribution_distance(r, g)}
    g_keys = [M.sequence_key(_content(t)) for t in generated.tokens]
    r_keys = [M.sequence_key(_content(t)) for t in reference.tokens]
    result = {
        "generated": {"uri": generated.uri, "kind": generated.kind, "pieces": len(generated),
                      "checkpoint": generated.checkpoint,
                      "tokens_from": generated.tokens_from, "skipped": [list(s) for s in generated.skipped]},
        "reference": {"uri": reference.uri, "kind": reference.kind, "pieces": len(reference),
                      "split": reference.split, "tokens_from": reference.tokens_from,
                      "skipped": [list(s) for s in reference.skipped]},
        "metrics": metrics,
        "identical_pieces": {"generated": M.duplicate_count(g_keys), "reference": M.duplicate_count(r_keys)},
        "memorisation": None,
        "loss": None,
        "pieces": [{"name": n, **v} for n, v in zip(generated.names, gv)],
    }
    if train:
        index = M.NgramIndex([t for _s, t in train], overlap_n)
        train_keys = {M.sequence_key(_content(t)) for _s, t in train}
        g_near = [index.nearest(_content(t)) for t in generated.tokens]
        r_near = [index.nearest(_content(t)) for t in reference.tokens]
        for row, (frac, j) in zip(result["pieces"], g_near):
            row["train_overlap"] = frac
            row["nearest_train_piece"] = train[j][0] if j >= 0 else None
        result["memorisation"] = {
            "n": overlap_n, "train_pieces": len(train),
            "generated": M.summary([f for f, _ in g_near]), "reference": M.summary([f for f, _ in r_near]),
            **M.distribution_distance([f for f, _ in r_near], [f for f, _ in g_near]),
            "generated_copies_of_train": sum(k in train_keys for k in g_keys),
            "reference_copies_of_train": sum(k in train_keys for k in r_keys),
        }
    return result


def evaluate(generated_uri: str, reference_uri: str, *, model_dir: str | None = None, checkpoint: str = "final",
             train_uri: str | None = None, split: str | None = None, generated_checkpoint: str | None = None,
             overlap_n: int = DEFAULT_OVERLAP_N, order: int = DEFAULT_ORDER, max_loss_targets: int | None = 200_000,
             max_reference: int | None = None, storage: StorageOptions | None = None) -> dict:
    """The whole command: returns the result (see :func:`compare`, plus ``loss`` with ``model_dir``)."""
    return evaluate_sets(generated_uri, reference_uri, model_dir=model_dir, checkpoint=checkpoint,
                         train_uri=train_uri, split=split, generated_checkpoint=generated_checkpoint,
                         overlap_n=overlap_n, order=order, max_loss_targets=max_loss_targets,
                         max_reference=max_reference, storage=storage)[0]


def evaluate_sets(generated_uri: str, reference_uri: str, *, model_dir: str | None = None,
                  checkpoint: str = "final", train_uri: str | None = None, split: str | None = None,
                  generated_checkpoint: str | None = None, overlap_n: int = DEFAULT_OVERLAP_N,
                  order: int = DEFAULT_ORDER, max_loss_targets: int | None = 200_000,
                  max_reference: int | None = None,
                  storage: StorageOptions | None = None) -> tuple[dict, PieceSet, PieceSet]:
    """:func:`evaluate`, also returning the generated and reference :class:`PieceSet` (for the report)."""
    from midiforge.music.tokenizers import make_tokenizer

    storage = storage or StorageOptions()
    ref_is_tokens = is_token_output(reference_uri, storage)
    if train_uri is None and ref_is_tokens:
        train_uri = reference_uri
    bundle = None
    if model_dir:
        from midiforge.pipeline.bundles import load_bundle

        bundle = load_bundle(model_dir, checkpoint=checkpoint, options=storage)
        if train_uri is None:
            shards = bundle.training.get("shards")
            if shards and is_token_output(shards, storage):
                train_uri = shards
    train = None
    tokenizer = None
    if train_uri:
        if not is_token_output(train_uri, storage):
            raise MidiforgeError(f"{train_uri}: --train must be a preprocess output (manifest.json, tokenizer.json, shards)")
        tokenizer, _split, train = read_token_split(train_uri, "train", storage, originals_only=False)
    elif bundle is not None:
        tokenizer = bundle.tokenizer
    if ref_is_tokens:
        reference, ref_tok = load_token_set(reference_uri, split, storage, max_reference)
        if tokenizer is not None and ref_tok.id != tokenizer.id:
            raise MidiforgeError(f"{reference_uri}: tokenizer {ref_tok.id} differs from the training tokens' "
                                 f"{tokenizer.id} ({train_uri})")
        tokenizer = ref_tok
    else:
        tokenizer = tokenizer or make_tokenizer("events")
        reference = load_reference(reference_uri, tokenizer, split, storage, max_reference)
    generated = load_generated(generated_uri, tokenizer, storage, generated_checkpoint)
    result = compare(generated, reference, train=train, overlap_n=overlap_n)
    result["tokenizer"] = tokenizer.id
    result["train"] = train_uri
    if bundle is not None:
        if train is None:
            raise MidiforgeError("--model: the n-gram baseline needs the training tokens; pass --train TOKENS "
                                 "(a preprocess output made with the model's tokenizer)")
        bundle.check_tokenizer(tokenizer.id, train_uri or reference_uri)
        result["loss"] = loss_comparison(bundle, reference.tokens, [t for _s, t in train], order=order,
                                         max_targets=max_loss_targets)
    return _clean(result), generated, reference


# -------------------------------------------------------------------------------------------
# output
# -------------------------------------------------------------------------------------------
def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 100):
        return f"{int(x):,}"
    return f"{x:.{digits}f}"


def table_rows(result: dict) -> list[list[str]]:
    """[metric, generated mean ± std, reference mean ± std, overlap, KL] rows (header first)."""
    rows = [["metric", "generated mean ± sd", "reference mean ± sd", "overlap", "KL(ref||gen)"]]
    for name, m in result["metrics"].items():
        g, r = m["generated"], m["reference"]
        rows.append([name, f"{_fmt(g['mean'])} ± {_fmt(g['std'])}", f"{_fmt(r['mean'])} ± {_fmt(r['std'])}",
                     _fmt(m["overlap"]), _fmt(m["kl"])])
    mem = result.get("memorisation")
    if mem:
        g, r = mem["generated"], mem["reference"]
        rows.append([f"train_overlap ({mem['n']}-grams)", f"{_fmt(g['mean'])} ± {_fmt(g['std'])}",
                     f"{_fmt(r['mean'])} ± {_fmt(r['std'])}", _fmt(mem["overlap"]), _fmt(mem["kl"])])
    return rows


def format_table(result: dict) -> str:
    rows = table_rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    g, r = result["generated"], result["reference"]
    out = [f"generated: {g['pieces']} pieces from {g['uri']} (tokens: {g['tokens_from']})",
           f"reference: {r['pieces']} pieces from {r['uri']}" + (f" (split {r['split']})" if r["split"] else ""),
           ""] + lines + [""]
    ident = result["identical_pieces"]
    out.append(f"identical pieces: generated {ident['generated']}, reference {ident['reference']}")
    mem = result.get("memorisation")
    if mem:
        out.append(f"copies of a training piece: generated {mem['generated_copies_of_train']}, "
                   f"reference {mem['reference_copies_of_train']} ({mem['train_pieces']} training pieces)")
    loss = result.get("loss")
    if loss:
        order = loss["ngram_order"]
        verdict = "beats" if loss["model_beats_ngram"] else "does NOT beat"
        out.append(f"held-out loss ({loss['targets']:,} tokens): model {loss['model_nats_per_token']:.4f} nats/token, "
                   f"{order}-gram {loss[f'ngram{order}_nats_per_token']:.4f}, uniform "
                   f"{loss['uniform_nats_per_token']:.4f}: the model {verdict} the {order}-gram")
    return "\n".join(out)


# -------------------------------------------------------------------------------------------
# CLI
# -------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("generated", metavar="GENERATED",
                   help="a generate output (its pieces shards) or a folder of MIDI files: local, file:// or s3://")
    p.add_argument("reference", metavar="REFERENCE",
                   help="a folder of MIDI files, or a preprocess output (its held-out split, see --split)")
    p.add_argument("--model", metavar="MODEL_DIR", default=None,
                   help="a training output: also compare its loss on the reference tokens with an n-gram "
                        "baseline trained on the training split (default: no loss comparison)")
    p.add_argument("--checkpoint", default="final",
                   help="--model's bundle: final (default), best, latest or an epoch number")
    p.add_argument("--train", metavar="TOKENS", default=None,
                   help="preprocess output whose train split is the training data, for memorisation and the "
                        "n-gram baseline (default: REFERENCE when it is a preprocess output, else the shards "
                        "--model was trained on, when readable; without any, no memorisation figures)")
    p.add_argument("--split", choices=("test", "validation", "train"), default=None,
                   help="REFERENCE's split when it is a preprocess output (default: test if it has pieces, "
                        "else validation)")
    p.add_argument("--generated-checkpoint", metavar="LABEL", default=None,
                   help="which pieces of a generate output made with --checkpoint all (default: final if there, "
                        "else the last checkpoint)")
    p.add_argument("--overlap-n", type=int, default=DEFAULT_OVERLAP_N,
                   help=f"n-gram length (tokens) of the memorisation overlap (default {DEFAULT_OVERLAP_N})")
    p.add_argument("--ngram-order", type=int, default=DEFAULT_ORDER,
                   help=f"order of the Kneser-Ney baseline (default {DEFAULT_ORDER})")
    p.add_argument("--max-loss-tokens", type=int, default=200_000,
                   help="reference tokens the model and the n-gram are scored on, at most (default 200000)")
    p.add_argument("--max-reference", type=int, default=None,
                   help="use at most this many reference pieces (default: all)")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="what to print: the table (default) or the whole result as JSON")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write the whole result as JSON to FILE (default: not written)")
    from midiforge.storage.cli_options import add_storage_arguments

    add_storage_arguments(p)


def main(args) -> int:
    from midiforge.storage.cli_options import options_from_args

    for name in ("overlap_n", "ngram_order", "max_loss_tokens"):
        if getattr(args, name) < 1:
            raise MidiforgeError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    result = evaluate(args.generated, args.reference, model_dir=args.model, checkpoint=args.checkpoint,
                      train_uri=args.train, split=args.split, generated_checkpoint=args.generated_checkpoint,
                      overlap_n=args.overlap_n, order=args.ngram_order, max_loss_targets=args.max_loss_tokens,
                      max_reference=args.max_reference, storage=options_from_args(args))
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    print(text if args.format == "json" else format_table(result))
    sys.stdout.flush()
    return 0

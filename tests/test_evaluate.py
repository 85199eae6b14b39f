"""evaluate: known pieces give known values (a scale, one chord repeated, a two-token loop, two
identical pieces), equal sets are at distance zero, memorisation finds a copied training piece, and
``--model`` scores a tiny trained model on the held-out tokens beside a 5-gram (checked against a
plain Keras forward pass and the n-gram model trained on the same split)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from midiforge.cli import main as cli_main
from midiforge.music import metrics as M
from midiforge.music.midi_io import piece_to_midi
from midiforge.music.piece import Piece
from midiforge.music.tokenizers import BOS_ID, EOS_ID, make_tokenizer
from midiforge.pipeline.evaluate import evaluate
from midiforge.pipeline.piece_sets import read_token_split

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import make_shards

TOK = make_tokenizer("events")


def scale() -> Piece:
    """C major scale, one quarter a note, at 120 qpm."""
    return Piece.from_columns([60, 62, 64, 65, 67, 69, 71], range(7), [1] * 7, [80] * 7, [0] * 7, qpm=120.0)


def chord() -> Piece:
    """The C major triad, a quarter long, eight times."""
    return Piece.from_columns([60, 64, 67] * 8, [i for i in range(8) for _ in range(3)], [1] * 24, [80] * 24,
                              [0] * 24, qpm=120.0)


def loop_tokens(k: int = 16) -> np.ndarray:
    """A two-token loop as a model emits it: PITCH_60 TIME_SHIFT_1, k times (sixteenth notes)."""
    v = TOK.vocab
    body = [v.index("PITCH_60"), v.index("TIME_SHIFT_1")] * k
    return np.array([BOS_ID, v.index("TEMPO_19"), v.index("VELOCITY_4"), *body, EOS_ID], dtype=np.int64)


def _pieces_output(dest: Path, items: list[tuple[str, np.ndarray, Piece]]) -> None:
    """A finished generate output in the pieces format (one shard, manifest last), these pieces in it."""
    from midiforge.pipeline.pieces import (
        COLUMNS,
        file_entries,
        read_shard_info,
        rows_table,
        shard_entries,
        shard_rel,
        write_shard,
    )
    from midiforge.storage import file_entry, open_store, write_manifest

    store = open_store(str(dest))
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    for i, (name, tokens, piece) in enumerate(items):
        midi = piece_to_midi(piece)
        entry = file_entry(f"midi/final/{name}.mid", midi)
        values = {"piece_id": f"final-{name}", "checkpoint": "final", "seed": 0, "index": i, "tokens": tokens,
                  "n_tokens": len(tokens), "generated_tokens": len(tokens), "n_notes": len(piece),
                  "seconds": piece.end() * 0.5, "qpm": 120.0, "midi": midi, "midi_path": None,
                  "midi_bytes": entry["bytes"], "midi_sha256": entry["sha256"]}
        for c in COLUMNS:
            rows[c].append(values.get(c))
    write_shard(store, shard_rel(0), rows_table(rows))
    info = read_shard_info(store, shard_rel(0))
    write_manifest(store, {"stage": "generate", "bundles": [{"checkpoint": "final"}], "pieces": len(items),
                           "shards": shard_entries([info]), "files": file_entries([info])})


@pytest.fixture
def known(tmp_path):
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    gen.mkdir()
    ref.mkdir()
    lt = loop_tokens()
    items = [("scale", TOK.encode(scale()), scale()), ("chord", TOK.encode(chord()), chord()),
             ("loop", lt, TOK.decode(lt)), ("scale-again", TOK.encode(scale()), scale())]
    _pieces_output(gen, items)
    (ref / "scale.mid").write_bytes(piece_to_midi(scale()))
    (ref / "chord.mid").write_bytes(piece_to_midi(chord()))
    return gen, ref


def test_known_pieces_give_known_values(known, tmp_path, capsys):
    gen, ref = known
    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", str(gen), str(ref), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pitch_class_entropy" in printed and "identical pieces: generated 1, reference 0" in printed
    result = json.loads(out.read_text())
    assert result["generated"]["tokens_from"] == "the pieces table"   # the table's own tokens were kept
    assert result["generated"]["checkpoint"] == "final" and result["reference"]["kind"] == "midi"
    rows = {r["name"]: r for r in result["pieces"]}
    assert list(rows) == ["final-scale", "final-chord", "final-loop", "final-scale-again"]

    s = rows["final-scale"]
    assert s["pitch_class_entropy"] == pytest.approx(math.log2(7))
    assert s["scale_consistency"] == 1.0 and s["pitch_range"] == 11 and s["polyphony"] == 1.0
    assert s["empty_beat_rate"] == 0.0 and s["n_notes"] == 7 and s["seconds"] == pytest.approx(3.5)
    assert s["longest_repeat"] == 1 and s["repeat_period"] == 0      # nothing repeats in a scale
    assert s["distinct_4gram_ratio"] == 1.0

    c = rows["final-chord"]
    assert c["pitch_class_entropy"] == pytest.approx(math.log2(3))
    assert c["scale_consistency"] == 1.0 and c["pitch_range"] == 7 and c["polyphony"] == 3.0
    assert c["n_notes"] == 24 and c["seconds"] == pytest.approx(4.0)
    # events tokens: TEMPO VELOCITY, then 8 x (PITCH DURATION) x 3 with a TIME_SHIFT between chords:
    # one 7-token pattern from the first PITCH to the end, 6 + 7 * 7 = 55 tokens
    assert c["repeat_period"] == 7 and c["longest_repeat"] == 55
    assert c["distinct_4gram_ratio"] == pytest.approx(9 / 54)     # 2 with TEMPO/VELOCITY + the 7 phases

    lp = rows["final-loop"]
    assert lp["longest_repeat"] == 32 and lp["repeat_period"] == 2  # the two-token loop, all 16 times
    assert lp["distinct_4gram_ratio"] == pytest.approx(4 / 31)      # 2 at the start + the loop's 2 phases
    assert lp["pitch_class_entropy"] == 0.0 and lp["pitch_range"] == 0 and lp["polyphony"] == 1.0
    assert lp["n_notes"] == 16 and lp["empty_beat_rate"] == 0.0

    assert rows["final-scale-again"] == {**rows["final-scale"], "name": "final-scale-again"}
    assert result["identical_pieces"] == {"generated": 1, "reference": 0}
    m = result["metrics"]
    assert m["pitch_range"]["generated"]["mean"] == pytest.approx((11 + 7 + 0 + 11) / 4)
    assert m["pitch_range"]["reference"]["mean"] == pytest.approx(9.0)
    assert m["pitch_range"]["reference"]["std"] == pytest.approx(2.0)
    assert m["longest_repeat"]["reference"]["mean"] == pytest.approx((1 + 55) / 2)
    for name, v in m.items():
        assert 0.0 <= v["overlap"] <= 1.0 and v["kl"] >= 0.0, name
    assert result["memorisation"] is None and result["loss"] is None   # no training tokens, no model

    # --format json prints the same result
    assert cli_main(["evaluate", str(gen), str(ref), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["pieces"] == result["pieces"]


def test_tokens_match_through_the_tokenizer_interface():
    """A pieces table's tokens are kept when they decode to the notes of the piece's MIDI, whatever the
    tokenizer (only the Tokenizer interface is used); another tokenizer's ids are not."""
    from midiforge.music.readers import read_piece
    from midiforge.pipeline.piece_sets import _tokens_match

    piece = read_piece("scale.mid", piece_to_midi(scale()))
    assert _tokens_match(TOK, TOK.encode(scale()), piece)
    assert not _tokens_match(TOK, make_tokenizer("events", steps_per_quarter=12).encode(scale()), piece)
    classic = make_tokenizer("classic")
    classic = classic.with_vocab(sorted(set(classic.encode_text(scale()))))
    assert _tokens_match(classic, classic.encode(scale()), piece)
    assert not _tokens_match(classic, np.array([BOS_ID, 999, EOS_ID]), piece)


def test_a_set_against_itself_is_at_distance_zero(known):
    _gen, ref = known
    result = evaluate(str(ref), str(ref))
    for name, v in result["metrics"].items():
        assert v["overlap"] == pytest.approx(1.0, abs=1e-9) and v["kl"] == pytest.approx(0.0, abs=1e-9), name
        assert v["generated"] == v["reference"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic arpeggio/scale shards (events tokens) and a tiny LSTM trained on them by `midiforge train`."""
    root = tmp_path_factory.mktemp("evalmodel")
    shards = root / "tokens"
    make_shards(str(shards), pieces=60, files=2, seed=4)
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith("SLURM_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "midiforge.cli", "train", str(shards), str(root / "model"),
                           "--epochs", "2", "--steps-per-epoch", "30", "--validation-steps", "2", "--seq-len", "32",
                           "--batch-size", "16", "--lstm-units", "48", "--embedding-dim", "16", "--progress", "none",
                           "--learning-rate", "0.01"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_memorisation_finds_a_copied_training_piece_and_model_loss_beside_a_5gram(trained, tmp_path):
    from midiforge.model.lstm import tf_keras
    from midiforge.pipeline.bundles import load_bundle

    shards, model = trained / "tokens", trained / "model"
    tok, _split, train = read_token_split(str(shards), "train", originals_only=False)
    _tok, held_split, held = read_token_split(str(shards), None)
    assert held_split == "validation"  # make_shards writes no test split
    gen = tmp_path / "gen"
    gen.mkdir()
    copied_source, copied_tokens = train[3]
    (gen / "copy.mid").write_bytes(piece_to_midi(tok.decode(copied_tokens)))
    (gen / "scale.mid").write_bytes(piece_to_midi(scale()))

    result = evaluate(str(gen), str(shards), model_dir=str(model))
    assert result["reference"]["split"] == "validation" and result["reference"]["pieces"] == len(held)
    assert result["train"] == str(shards)
    rows = {r["name"]: r for r in result["pieces"]}
    assert rows["copy.mid"]["train_overlap"] == 1.0 and rows["copy.mid"]["nearest_train_piece"] == copied_source
    assert rows["scale.mid"]["train_overlap"] < 0.5
    mem = result["memorisation"]
    assert mem["generated_copies_of_train"] == 1 and mem["reference_copies_of_train"] == 0
    assert mem["train_pieces"] == len(train) and mem["n"] == 16

    loss = result["loss"]
    targets = sum(len(t) - 1 for _s, t in held)
    assert loss["targets"] == targets and loss["pieces"] == len(held)
    # the model's loss, recomputed with the Keras model over each whole piece at once
    bundle = load_bundle(str(model))
    _tf, _keras = tf_keras()
    net = bundle.build()
    nll = []
    for _s, t in held:
        logits = net.predict(np.asarray(t[:-1])[None, :], verbose=0)[0].astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        nll.append(logz - logits[np.arange(len(t) - 1), t[1:]])
    assert loss["model_nats_per_token"] == pytest.approx(float(np.concatenate(nll).mean()), abs=1e-4)
    lm = M.KneserNey([t for _s, t in train], tok.vocab_size, 5)
    assert loss["ngram5_nats_per_token"] == pytest.approx(lm.cross_entropy([t for _s, t in held]), rel=1e-12)
    assert loss["ngram5_nats_per_token"] < loss["uniform_nats_per_token"]
    assert loss["model_beats_ngram"] == (loss["model_nats_per_token"] < loss["ngram5_nats_per_token"])


def test_bad_input_is_one_clear_error(known, tmp_path, capsys):
    gen, ref = known
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["evaluate", str(gen), str(empty)]) == 2
    assert f"{empty}: no MIDI files" in capsys.readouterr().err
    (empty / "bad.mid").write_bytes(b"MThd not really")
    assert cli_main(["evaluate", str(empty), str(ref)]) == 2
    err = capsys.readouterr().err
    assert f"{empty}: none of its 1 MIDI files has notes" in err and err.count("\n") == 1
    assert cli_main(["evaluate", str(gen), str(ref), "--train", str(ref)]) == 2
    assert "--train must be a preprocess output" in capsys.readouterr().err
    assert cli_main(["evaluate", str(gen), str(ref), "--generated-checkpoint", "epoch-0009"]) == 2
    assert "no pieces of checkpoint 'epoch-0009'" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    (unfinished / "pieces" / "final").mkdir(parents=True)
    shard = next((gen / "pieces" / "final").glob("part-*.parquet"))
    (unfinished / "pieces" / "final" / shard.name).write_bytes(shard.read_bytes())
    assert cli_main(["evaluate", str(unfinished), str(ref)]) == 2
    assert f"{unfinished}: a generate output without manifest.json" in capsys.readouterr().err

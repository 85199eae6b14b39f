"""The tokenizer interface and its clock: decode() is feeding a clock, so the time a clock tells
is decode(ids so far).end() in every time signature; both agree with a plain reference decoder
written here from the rules; bars follow the time signature (the 3/4 case); tokenizer.json round
trips; generation's max_seconds stops at the token that reaches it in the primer's time signature.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from corpora import midi_files
from midiforge.errors import MidiforgeError
from midiforge.model.decode import Limits, LSTMWeights, NumpyLSTM, PieceJob, decode
from midiforge.model.sampling import SamplingSettings
from midiforge.music.piece import DEFAULT_QPM, Piece, PieceBatch, quarters_to_seconds
from midiforge.music.primer import encode_primer, start_primer
from midiforge.music.readers import read_piece
from midiforge.music.tokenizers import (
    BOS_ID, EOS_ID, SPECIALS, ClassicTokenizer, EventsConfig, EventsTokenizer, Tokenizer, load_tokenizer,
    make_tokenizer,
)

SIGNATURES = [(4, 4), (3, 4), (6, 8), (5, 4), (7, 8), (2, 2), (12, 8)]
EVENTS_CONFIGS = [
    EventsConfig(bars=True),
    EventsConfig(bars=True, programs=True, drums=True, velocity_bins=32, steps_per_quarter=12,
                 max_shift_steps=8, max_duration_steps=96),
    EventsConfig(bars=True, velocity_bins=0, tempo_bins=0, steps_per_quarter=3),
    EventsConfig(),
]


def _words(tok, words: list[str]) -> np.ndarray:
    index = {w: i for i, w in enumerate(tok.vocab)}
    return np.array([index[w] for w in words], dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# reference decoders, written from the rules (what EventsTokenizer.decode_quantized did before
# the clock existed, with the bar length taken from the time signature)
# ---------------------------------------------------------------------------------------------
def _reference_events(tok: EventsTokenizer, ids, time_signature) -> list[tuple]:
    c = tok.config
    bar = max(1, round(time_signature[0] * 4 * c.steps_per_quarter / max(time_signature[1], 1)))
    words = [tok.vocab[i] if 0 <= i < tok.vocab_size else "?" for i in (int(x) for x in ids)]
    t, prog, vel, started, notes, i = 0, 0, 0, False, [], 0
    while i < len(words):
        w = words[i]
        i += 1
        if w == "EOS":
            break
        if w == "BAR":
            t = (t // bar + 1) * bar if started else 0
            started = True
        elif w.startswith("TIME_SHIFT_"):
            t += int(w[11:])
        elif w.startswith("PROGRAM_") or w == "DRUM":
            prog = 128 if w == "DRUM" else int(w[8:])
        elif w.startswith("VELOCITY_"):
            vel = int(w[9:])
        elif w.startswith("PITCH_"):
            d = 1
            if i < len(words) and words[i].startswith("DURATION_"):
                d = int(words[i][9:])
                i += 1
            notes.append((t, d, int(w[6:]), vel, prog))
    return sorted(notes, key=lambda n: (n[0], n[4], n[2], n[1], n[3]))


def _reference_end(tok, ids, time_signature) -> float:
    """End of the last note in quarters, from the reference decoder."""
    if isinstance(tok, EventsTokenizer):
        spq = tok.config.steps_per_quarter
        return max((on / spq + d / spq for on, d, *_ in _reference_events(tok, ids, time_signature)), default=0.0)
    t, end = 0.0, 0.0
    for i in (int(x) for x in ids):
        if i == EOS_ID:
            break
        if len(SPECIALS) <= i < tok.vocab_size:
            end = max(end, t + tok.config.duration)
            t += tok.config.step
    return end


# ---------------------------------------------------------------------------------------------
# the 3/4 case, from first principles
# ---------------------------------------------------------------------------------------------
def test_bars_follow_the_time_signature():
    tok = EventsTokenizer(EventsConfig(bars=True, velocity_bins=0, tempo_bins=0))  # 4 steps a quarter
    # three full bars of 3/4, one dotted half note each: bar lines at quarters 0, 3, 6; the end at 9
    ids = _words(tok, ["BOS", "BAR", "PITCH_60", "DURATION_12", "BAR", "PITCH_62", "DURATION_12",
                       "BAR", "PITCH_64", "DURATION_12", "EOS"])
    piece = tok.decode(ids, (3, 4))
    assert piece.start.tolist() == [0.0, 3.0, 6.0] and piece.end() == 9.0
    clock = tok.clock((3, 4)).feed_all(ids)
    assert clock.quarters() == 9.0 and clock.seconds(DEFAULT_QPM) == 4.5 == piece.seconds
    # the case: three BARs, then a quarter note: it starts on the third bar line
    ids = _words(tok, ["BOS", "BAR", "BAR", "BAR", "PITCH_60", "DURATION_4"])
    assert tok.decode(ids, (3, 4)).end() == tok.clock((3, 4)).feed_all(ids).quarters() == 7.0
    assert tok.decode(ids, (4, 4)).end() == tok.clock((4, 4)).feed_all(ids).quarters() == 9.0
    assert tok.clock((6, 8)).feed_all(ids).quarters() == 7.0    # 6 eighths = 3 quarters
    assert tok.clock((7, 8)).feed_all(ids).quarters() == 8.0    # 3.5 quarters a bar
    assert tok.clock((2, 2)).feed_all(ids).quarters() == 9.0
    # a shift inside a bar, then BAR: the next bar line, not a bar's length later
    ids = _words(tok, ["BOS", "BAR", "TIME_SHIFT_5", "BAR", "PITCH_60", "DURATION_1"])
    assert tok.clock((3, 4)).feed_all(ids).quarters() == 3.25


def test_a_real_piece_in_three_four():
    path = next(p for p in midi_files("nottingham") if p.name == "ashover1.mid")
    piece = read_piece(path.name, path.read_bytes())
    assert piece.time_signature == (3, 4)
    tok = EventsTokenizer(EventsConfig(bars=True))
    ids = tok.encode(piece)
    expected = tok.quantize(piece)
    spq = tok.config.steps_per_quarter
    end = float(((expected.onset + expected.duration) / spq).max())
    assert tok.decode(ids, (3, 4)).end() == end == tok.clock((3, 4)).feed_all(ids).quarters()
    assert tok.decode_quantized(ids, (3, 4)).as_tuple() == expected.as_tuple()
    assert tok.decode(ids, (4, 4)).end() > end  # its bar lines read as 4/4 ones: later


# ---------------------------------------------------------------------------------------------
# clock == decode == reference, on many token streams from real files
# ---------------------------------------------------------------------------------------------
def _streams(tok: Tokenizer, pieces: list[Piece], rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Windows of real token sequences, some spliced with others or with random ids (generated
    sequences are not always well formed)."""
    real = [ids for ids in tok.encode_many(pieces) if len(ids) > 4]
    out = []
    for k in range(n):
        ids = real[int(rng.integers(len(real)))]
        a = int(rng.integers(0, max(1, len(ids) - 200)))
        s = ids[a:a + int(rng.integers(20, 300))].copy()
        if k % 3 == 1:
            other = real[int(rng.integers(len(real)))]
            s = np.concatenate([s[:len(s) // 2], other[:int(rng.integers(5, 80))]])
        elif k % 3 == 2:
            where = rng.integers(0, len(s), size=max(1, len(s) // 10))
            s[where] = rng.integers(0, tok.vocab_size, size=len(where))
        if k % 5 == 0:
            s = np.concatenate([[BOS_ID], s])
        out.append(s.astype(np.int32))
    return out


@pytest.fixture(scope="module")
def ff_pieces():
    return [read_piece(p.name, p.read_bytes()) for p in midi_files("ff")[:12]]


def _check_clock(tok: Tokenizer, stream: np.ndarray, ts, rng) -> None:
    clock = tok.clock(ts)
    cuts = set(rng.integers(0, len(stream) + 1, size=6).tolist()) | {len(stream)}
    for k in range(len(stream) + 1):
        if k in cuts:
            prefix = stream[:k]
            piece = tok.decode(prefix, ts)
            assert clock.quarters() == piece.end() == _reference_end(tok, prefix, ts), (tok.id, ts, k)
            assert clock.seconds() == piece.seconds == piece.end_seconds()
            assert piece.time_signature == ts
        if k < len(stream):
            clock.feed(int(stream[k]))


@pytest.mark.parametrize("config", EVENTS_CONFIGS, ids=lambda c: f"bars{int(c.bars)}-spq{c.steps_per_quarter}")
def test_events_clock_equals_decode_on_real_streams(config, ff_pieces):
    tok = EventsTokenizer(config)
    rng = np.random.default_rng(7)
    for n, stream in enumerate(_streams(tok, ff_pieces, rng, 60)):
        ts = SIGNATURES[n % len(SIGNATURES)]
        _check_clock(tok, stream, ts, rng)
        notes = tok.decode_quantized(stream, ts)
        got = sorted(zip(notes.onset.tolist(), notes.duration.tolist(), notes.pitch.tolist(),
                         notes.velocity.tolist(), notes.program.tolist()), key=lambda n: (n[0], n[4], n[2], n[1], n[3]))
        assert got == _reference_events(tok, stream, ts)


def test_classic_clock_equals_decode_on_real_streams(ff_pieces):
    tok = ClassicTokenizer()
    tok = tok.with_vocab({t for p in ff_pieces[:8] for t in tok.encode_text(p)})  # some tokens of the rest: UNK
    rng = np.random.default_rng(8)
    for n, stream in enumerate(_streams(tok, ff_pieces, rng, 60)):
        _check_clock(tok, stream, SIGNATURES[n % len(SIGNATURES)], rng)
    piece = tok.decode(tok.encode(ff_pieces[0]))
    assert piece.seconds == quarters_to_seconds(piece.end(), DEFAULT_QPM) > 0


def test_clock_ignores_what_follows_eos_and_foreign_ids():
    tok = EventsTokenizer()
    ids = _words(tok, ["BOS", "PITCH_60", "DURATION_4", "EOS", "TIME_SHIFT_4", "PITCH_62", "DURATION_4"])
    clock = tok.clock().feed_all(ids)
    assert clock.done and clock.quarters() == 1.0 == tok.decode(ids).end()
    assert tok.clock().feed_all([BOS_ID, -5, tok.vocab_size + 3, tok.pitch_base + 60]).quarters() == 0.25


# ---------------------------------------------------------------------------------------------
# the interface and tokenizer.json
# ---------------------------------------------------------------------------------------------
def _tokenizers(pieces) -> list[Tokenizer]:
    classic = ClassicTokenizer()
    return [EventsTokenizer(c) for c in EVENTS_CONFIGS] + [
        classic.with_vocab({t for p in pieces for t in classic.encode_text(p)})]


def test_json_round_trip_every_kind(ff_pieces):
    for tok in _tokenizers(ff_pieces[:4]):
        assert isinstance(tok, Tokenizer)
        again = load_tokenizer(tok.to_json())
        assert type(again) is type(tok) and again.id == tok.id and again.vocab == tok.vocab
        assert again.config == tok.config and again.to_json() == tok.to_json()
        assert load_tokenizer(tok.to_json().encode()).id == tok.id
        ids = tok.encode(ff_pieces[0])
        a, b = tok.decode(ids, (3, 4)), again.decode(ids, (3, 4))
        assert a.start.tolist() == b.start.tolist() and a.pitch.tolist() == b.pitch.tolist()
    d = json.loads(EventsTokenizer().to_json())
    with pytest.raises(MidiforgeError, match="unknown tokenizer kind"):
        load_tokenizer({**d, "kind": "remi"})
    with pytest.raises(MidiforgeError, match="does not match its content"):
        load_tokenizer({**d, "id": "events-0000000000"})
    with pytest.raises(MidiforgeError, match="unknown tokenizer 'remi'"):
        make_tokenizer("remi")


def test_encode_batch_equals_encode_for_every_kind(ff_pieces):
    batch = PieceBatch.from_pieces(ff_pieces[:5])
    for tok in _tokenizers(ff_pieces[:3]):
        ids, offsets = tok.encode_batch(batch)
        assert ids.dtype == np.int32 and len(offsets) == 6
        for i, p in enumerate(ff_pieces[:5]):
            assert np.array_equal(ids[offsets[i]:offsets[i + 1]], tok.encode(p))


def test_primer_methods():
    events = EventsTokenizer()
    assert start_primer(events, 100.0).tolist() == [BOS_ID, events.tempo_base + events.tempo_bin(100.0)]
    assert start_primer(events).tolist() == [BOS_ID]
    assert start_primer(EventsTokenizer(EventsConfig(tempo_bins=0)), 100.0).tolist() == [BOS_ID]
    ids = start_primer(events, 100.0)
    assert events.with_tempo(ids, 60.0).tolist() == [BOS_ID, events.tempo_base + events.tempo_bin(60.0)]
    assert events.with_tempo(np.array([BOS_ID, 50], np.int32), 60.0).tolist()[:2] == \
        [BOS_ID, events.tempo_base + events.tempo_bin(60.0)]
    classic = make_tokenizer("classic").with_vocab(["C4", "0.4.7"])
    assert start_primer(classic, 100.0).tolist() == [BOS_ID]
    piece = Piece.from_columns([61, 60, 64, 67], [0, 1, 1, 1], [1] * 4, [80] * 4, [0] * 4)
    ids, mapped = encode_primer(classic, piece, qpm=100.0)
    assert mapped == 1 and [classic.vocab[i] for i in ids] == ["BOS", "C4", "0.4.7"]


# ---------------------------------------------------------------------------------------------
# generation: max_seconds in the primer's time signature
# ---------------------------------------------------------------------------------------------
def _bar_heavy_weights(tok: EventsTokenizer, seed: int) -> LSTMWeights:
    """A small LSTM with random weights whose output bias favours BARs and notes and keeps EOS rare."""
    rng = np.random.default_rng(seed)
    v, e, u = tok.vocab_size, 8, 16
    bias = np.zeros(v)
    bias[tok.bar_id] = 3.5
    bias[tok.pitch_base + 55:tok.pitch_base + 80] = 1.0
    bias[tok.duration_base + 1:tok.duration_base + 13] = 1.5
    bias[EOS_ID] = -8.0
    return LSTMWeights(rng.normal(0, 0.5, (v, e)),
                       [(rng.normal(0, 0.3, (e, 4 * u)), rng.normal(0, 0.3, (u, 4 * u)), np.zeros(4 * u))],
                       rng.normal(0, 0.3, (u, v)), bias)


def test_max_seconds_counts_three_four_bars():
    tok = EventsTokenizer(EventsConfig(bars=True, tempo_bins=8))
    path = next(p for p in midi_files("nottingham") if p.name == "ashover1.mid")
    tune = read_piece(path.name, path.read_bytes())
    opening = tune.select(tune.start < 6.0)  # its first two 3/4 bars
    primer, _ = encode_primer(tok, opening, qpm=100.0)
    assert tok.bar_id in primer.tolist()
    jobs = [PieceJob(i, primer, 100.0, (3, 4)) for i in range(8)]
    engine = NumpyLSTM(_bar_heavy_weights(tok, 3))
    limits = Limits(600, 12.0)
    res = decode(engine, jobs, SamplingSettings(), 5, limits, 4, tok)
    assert {r.stop for r in res} == {"max_seconds"}

    def seconds(ids, ts):
        return tok.decode(ids, ts).end() * 60.0 / 100.0

    earlier_in_four_four = 0
    for r in res:
        assert seconds(r.tokens, (3, 4)) >= 12.0 > seconds(r.tokens[:-1], (3, 4))
        earlier_in_four_four += seconds(r.tokens[:-1], (4, 4)) >= 12.0
    assert earlier_in_four_four > 0  # read as 4/4 bars, the music would have reached 12 s sooner
    # the same seed gives the same tokens, whatever the batch size
    again = decode(engine, jobs, SamplingSettings(), 5, limits, 3, tok)
    assert [r.tokens.tolist() for r in again] == [r.tokens.tolist() for r in res]
    with pytest.raises(MidiforgeError, match="max-seconds"):
        decode(engine, jobs[:1], SamplingSettings(), 5, limits, 1)


def test_generate_max_seconds_with_a_three_four_midi_primer(tmp_path):
    """The stage: a MIDI primer in 3/4, --max-seconds: every piece stops at the token whose note
    makes it last that long, counted in 3/4 bars (a tiny Keras model with a bar-heavy output bias)."""
    from midiforge.pipeline.bundles import write_bundle
    from midiforge.model.lstm import ModelConfig, build_model, tf_keras
    from midiforge.music.midi_io import piece_to_midi
    from midiforge.pipeline import pieces
    from midiforge.pipeline.generate import GenerateSettings, run_generate
    from midiforge.storage import open_store

    tok = EventsTokenizer(EventsConfig(bars=True, tempo_bins=8))
    _tf, keras = tf_keras()
    keras.utils.set_random_seed(4)
    cfg = ModelConfig(vocab_size=tok.vocab_size, embedding_dim=8, lstm_units=(16,), dropout=0.0, tokenizer_id=tok.id)
    model = build_model(cfg)
    layer = model.get_layer("logits")
    layer.set_weights([layer.get_weights()[0], _bar_heavy_weights(tok, 0).dense_bias.astype(np.float32)])
    weights = tmp_path / "model.weights.h5"
    model.save_weights(str(weights))
    model_dir = tmp_path / "model"
    write_bundle(open_store(str(model_dir)), "bundle", config=cfg, tokenizer_json=tok.to_json(),
                 training={"qpm_median": 100.0, "epochs_done": 1}, weights=weights.read_bytes())
    keras.backend.clear_session()

    path = next(p for p in midi_files("nottingham") if p.name == "ashover1.mid")
    tune = read_piece(path.name, path.read_bytes())
    primer = tmp_path / "opening.mid"
    primer.write_bytes(piece_to_midi(tune.select(tune.start < 6.0)))
    assert read_piece(primer.name, primer.read_bytes()).time_signature == (3, 4)
    settings = GenerateSettings(sampling=SamplingSettings(), limits=Limits(600, 12.0), primer="midi",
                                primer_path=str(primer), qpm=100.0)
    dest = str(tmp_path / "out")
    run_generate(str(model_dir), dest, 6, settings, seed=5, batch_size=4, workers=0, progress=False)
    rows = pieces.read_pieces(dest).to_pylist()
    assert len(rows) == 6 and {r["stop_reason"] for r in rows} == {"max_seconds"}
    earlier_in_four_four = 0
    for r in rows:
        ids = np.asarray(r["tokens"], dtype=np.int32)
        piece = tok.decode(ids, (3, 4))
        assert r["seconds"] == piece.end() * 60.0 / 100.0 >= 12.0
        assert tok.decode(ids[:-1], (3, 4)).end() * 60.0 / 100.0 < 12.0
        earlier_in_four_four += tok.decode(ids[:-1], (4, 4)).end() * 60.0 / 100.0 >= 12.0
    assert earlier_in_four_four > 0

"""One static HTML page of a run: training curves, the evaluation against the reference, and a
gallery of pieces (piano roll with pitch and time axes, metrics, MIDI file, audio).

``midiforge report RUN_DIR`` reads the demo's layout, ``RUN_DIR/{tokens,model,pieces}`` (each
can be given with ``--tokens``/``--model``/``--pieces``; the reference is the held-out split of
the tokens unless ``--reference`` names another), and writes ``RUN_DIR/report/index.html`` with
its assets beside it (``assets/*.png``, ``*.mid``, ``*.wav``, ``evaluate.json``), all linked
relatively: the folder opens from disk and can be copied as is to a static bucket.  No server, no
script, nothing fetched from elsewhere.

Audio: each piece's first ``--audio-seconds`` rendered with a SoundFont (``--soundfont FILE``,
else a standard system location such as Debian's ``fluid-soundfont-gm``), by symusic's
synthesizer or, where that fails, the ``fluidsynth`` program; without either, the page says how
to get audio.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

from midiforge.errors import MidiforgeError
from midiforge.music.piece import quarters_to_seconds

#: where SoundFonts live on common systems, the first that exists is used
SOUNDFONT_PLACES = (
    "/usr/share/sounds/sf2/default-GM.sf2",       # Debian/Ubuntu alternatives link
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",       # Debian/Ubuntu fluid-soundfont-gm
    "/usr/share/sounds/sf2/TimGM6mb.sf2",         # Debian/Ubuntu timgm6mb-soundfont
    "/usr/share/sounds/sf3/default-GM.sf3",
    "/usr/share/sounds/sf3/MuseScore_General.sf3",
    "/usr/share/soundfonts/default.sf2",          # Fedora, Arch
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/soundfonts/FluidR3_GM2-2.sf2",
    "/usr/local/share/soundfonts/default.sf2",    # Homebrew and local installs
    "/opt/homebrew/share/soundfonts/default.sf2",
)
AUDIO_HELP = ("No audio: no SoundFont was found, or nothing here can render one. Install a General MIDI "
              "SoundFont and FluidSynth (Debian/Ubuntu: <code>apt install fluid-soundfont-gm fluidsynth</code>; "
              "Fedora: <code>dnf install fluid-soundfont-gm fluidsynth</code>; macOS: <code>brew install "
              "fluid-synth</code> and a .sf2 file), then run <code>midiforge report</code> again, with "
              "<code>--soundfont FILE.sf2</code> if the file is not in a standard place.")


# -------------------------------------------------------------------------------------------
# audio
# -------------------------------------------------------------------------------------------
def find_soundfont(explicit: str | None = None) -> str | None:
    """``explicit`` (must exist), else ``$MIDIFORGE_SOUNDFONT``, else the first standard place that exists."""
    if explicit:
        if not os.path.isfile(explicit):
            raise MidiforgeError(f"{explicit}: --soundfont: no such file")
        return explicit
    env = os.environ.get("MIDIFORGE_SOUNDFONT")
    if env and os.path.isfile(env):
        return env
    return next((p for p in SOUNDFONT_PLACES if os.path.isfile(p)), None)


def _clip_midi(midi: bytes, seconds: float) -> bytes:
    """The first ``seconds`` of a MIDI file (notes cut at the end), through symusic."""
    import symusic

    score = symusic.Score.from_midi(midi)
    clipped = score.to("second").clip(0, float(seconds), clip_end=True)
    return bytes(clipped.to("tick").dumps_midi())


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> float:
    """Mono 16-bit PCM; returns the duration in seconds."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(pcm.tobytes())
    return len(pcm) / rate


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(mono float samples, rate) of a 16-bit PCM WAV file."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise MidiforgeError(f"{path}: {8 * w.getsampwidth()}-bit WAV, expected 16-bit")
        rate, channels = w.getframerate(), w.getnchannels()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64) / 32768.0
    return data.reshape(-1, channels).mean(axis=1), rate


class AudioRenderer:
    """Renders MIDI bytes to a mono WAV file with a SoundFont: symusic's synthesizer when it works
    here, else the ``fluidsynth`` program.  ``available`` is False when neither can."""

    def __init__(self, soundfont: str | None, sample_rate: int = 22050, seconds: float = 30.0,
                 timeout: float = 120.0) -> None:
        self.soundfont, self.rate, self.seconds, self.timeout = soundfont, int(sample_rate), float(seconds), timeout
        self.engine: str | None = None
        self.why = "no SoundFont found" if soundfont is None else ""
        self._synth = None
        if soundfont is None:
            return
        try:  # symusic's synthesizer: check that it really returns samples (some builds cannot)
            import symusic

            synth = symusic.Synthesizer(soundfont, sample_rate=self.rate)
            probe = symusic.Score(480)
            track = symusic.Track(program=0)
            track.notes.append(symusic.Note(0, 240, 60, 80))
            probe.tracks.append(track)
            np.asarray(synth.render(probe, stereo=False))
            self._synth, self.engine = synth, "symusic"
            return
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next renderer
            self.why = f"symusic's synthesizer failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        exe = shutil.which("fluidsynth")
        if exe:
            self._fluidsynth, self.engine = exe, "fluidsynth"
        else:
            self.why += "; no fluidsynth program on PATH"

    @property
    def available(self) -> bool:
        return self.engine is not None

    def render(self, midi: bytes, dest: Path) -> float:
        """Write the first ``seconds`` of ``midi`` to ``dest`` (WAV); returns its duration (0: silent/empty)."""
        clipped = _clip_midi(midi, self.seconds)
        if self.engine == "symusic":
            import symusic

            audio = np.asarray(self._synth.render(symusic.Score.from_midi(clipped), stereo=False), dtype=np.float64)
            samples = audio.reshape(-1) if audio.ndim == 1 or 1 in audio.shape else audio.mean(axis=0)
        else:
            with tempfile.TemporaryDirectory(prefix="midiforge-audio-") as tmp:
                mid, wav = Path(tmp) / "piece.mid", Path(tmp) / "piece.wav"
                mid.write_bytes(clipped)
                cmd = [self._fluidsynth, "-ni", "-q", "-g", "0.6", "-r", str(self.rate), "-F", str(wav),
                       self.soundfont, str(mid)]
                try:
                    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    raise MidiforgeError(f"fluidsynth took over {self.timeout:.0f} s on {dest.name}") from None
                if proc.returncode != 0 or not wav.is_file():
                    raise MidiforgeError(f"fluidsynth failed on {dest.name} (exit {proc.returncode}): "
                                         f"{proc.stderr.decode(errors='replace').strip()[:200]}")
                samples, rate = _read_wav(wav)
                if rate != self.rate:
                    raise MidiforgeError(f"fluidsynth wrote {rate} Hz instead of {self.rate}")
        samples = samples[: int(self.rate * (self.seconds + 2.0))]  # the clip plus the last notes' release
        if len(samples) == 0:
            return 0.0
        peak = float(np.abs(samples).max())
        if peak > 0.99:
            samples = samples * (0.99 / peak)
        return _write_wav(dest, samples, self.rate)


# -------------------------------------------------------------------------------------------
# pictures
# -------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


def piano_roll_png(piece, path: Path, *, width: float = 9.0, height: float = 2.8, dpi: int = 100) -> None:
    """A piano roll with axes: time in seconds (at the piece's tempo) across, pitch up (C's named),
    one bar per note, shaded by velocity."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(width, height), dpi=dpi)
    try:
        pitched = ~piece.is_drum
        sec = float(quarters_to_seconds(1.0, piece.qpm))  # seconds a quarter
        if pitched.any():
            pitch = piece.pitch[pitched].astype(np.int64)
            start = piece.start[pitched] * sec
            dur = np.maximum(piece.duration[pitched] * sec, 1e-3)
            vel = np.clip(piece.velocity[pitched].astype(np.float64), 1, 127) / 127.0
            colors = plt.get_cmap("viridis")(0.25 + 0.7 * vel)
            ax.barh(pitch, dur, left=start, height=0.85, color=colors, edgecolor="none")
            lo, hi = int(pitch.min()) - 2, int(pitch.max()) + 2
            end = float((start + dur).max())
        else:
            lo, hi, end = 55, 79, 1.0
            ax.text(0.5, 0.5, "no pitched notes", transform=ax.transAxes, ha="center", va="center")
        ax.set_ylim(lo - 0.5, hi + 0.5)
        ax.set_xlim(0, max(end, 1e-3) * 1.01)
        span = hi - lo
        step = 12 if span > 30 else 6 if span > 14 else 2
        ticks = [p for p in range(lo, hi + 1) if p % step == 0]
        ax.set_yticks(ticks)
        ax.set_yticklabels([f"{NOTE_NAMES[p % 12]}{p // 12 - 1}" for p in ticks])
        ax.set_xlabel(f"time (s, at {float(piece.qpm or 120.0):.0f} quarter notes per minute)")
        ax.set_ylabel("pitch")
        ax.grid(axis="y", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def curves_png(records: list[dict], path: Path, *, dpi: int = 100) -> bool:
    """Loss and accuracy per epoch (training and validation) from metrics.jsonl records; False if none."""
    rows = sorted((r for r in records if isinstance(r.get("epoch"), (int, float))), key=lambda r: r["epoch"])
    if not rows:
        return False
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2), dpi=dpi)
    try:
        epochs = [r["epoch"] for r in rows]
        for ax, keys, label in ((a, ("loss", "val_loss"), "loss (nats/token)"),
                                (b, ("accuracy", "val_accuracy"), "accuracy")):
            for key, style in zip(keys, ("-o", "--s")):
                ys = [r.get(key) for r in rows]
                if any(isinstance(y, (int, float)) for y in ys):
                    ax.plot(epochs, [y if isinstance(y, (int, float)) else np.nan for y in ys], style,
                            label="validation" if key.startswith("val_") else "training", markersize=4)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.grid(color="#dddddd", linewidth=0.6)
            ax.legend()
            ax.xaxis.get_major_locator().set_params(integer=True)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return True


# -------------------------------------------------------------------------------------------
# the page
# -------------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f3f3; }
.piece { border: 1px solid #ddd; border-radius: 6px; padding: 0.8em; margin: 1em 0; }
.piece h3 { margin: 0 0 0.4em 0; font-size: 1.05em; }
.piece img, .curves { max-width: 100%; height: auto; display: block; }
.note { background: #fff7e0; border: 1px solid #e8d9a8; padding: 0.6em; border-radius: 4px; }
.good { color: #0a6b2d; } .bad { color: #a11; }
code { background: #f4f4f4; padding: 0 0.2em; }
audio { width: 100%; max-width: 600px; }
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float) and x.is_integer():
        return f"{int(x):,}"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def _table(rows: list[list[str]], header: bool = True) -> str:
    out = ["<table>"]
    if header:
        out.append("<thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in rows[0]) + "</tr></thead>")
        rows = rows[1:]
    out.append("<tbody>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _safe_name(name: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name.rsplit(".", 1)[0] if name.lower().endswith((".mid", ".midi")) else name)
    stem = stem.strip("._")[:80] or "piece"
    out, k = stem, 1
    while out in used:
        k += 1
        out = f"{stem}-{k}"
    used.add(out)
    return out


def _evaluation_html(result: dict) -> str:
    from midiforge.pipeline.evaluate import table_rows

    g, r = result["generated"], result["reference"]
    parts = [f"<p>Generated: {g['pieces']} pieces from <code>{_e(g['uri'])}</code>"
             + (f" (checkpoint {_e(g['checkpoint'])})" if g.get("checkpoint") else "")
             + f"; reference: {r['pieces']} pieces from <code>{_e(r['uri'])}</code>"
             + (f" (split {_e(r['split'])})" if r.get("split") else "")
             + f". Tokens: tokenizer <code>{_e(result.get('tokenizer'))}</code>. "
             "Overlap is the overlapping area of the two sets' kernel density estimates (1: the same "
             "distribution, 0: disjoint); KL is KL(reference || generated) in nats.</p>",
             _table(table_rows(result))]
    ident = result["identical_pieces"]
    items = [f"identical pieces: generated {ident['generated']}, reference {ident['reference']}"]
    mem = result.get("memorisation")
    if mem:
        items.append(f"copies of a training piece: generated {mem['generated_copies_of_train']}, reference "
                     f"{mem['reference_copies_of_train']} ({mem['train_pieces']} training pieces); "
                     f"train_overlap is the largest share of a piece's distinct {mem['n']}-token n-grams found "
                     f"in one training piece")
    loss = result.get("loss")
    if loss:
        order = loss["ngram_order"]
        ok = loss["model_beats_ngram"]
        items.append(f"held-out loss on {loss['targets']:,} reference tokens: model "
                     f"{loss['model_nats_per_token']:.4f} nats/token, Kneser-Ney {order}-gram "
                     f"{loss[f'ngram{order}_nats_per_token']:.4f}, uniform {loss['uniform_nats_per_token']:.4f}: "
                     f"<span class=\"{'good' if ok else 'bad'}\">the model "
                     f"{'beats' if ok else 'does not beat'} the {order}-gram</span>")
    parts.append("<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>")
    parts.append('<p><a href="evaluate.json">evaluate.json</a> has every figure and every piece\'s metrics.</p>')
    return "\n".join(parts)


PIECE_METRICS = ("n_notes", "seconds", "pitch_class_entropy", "scale_consistency", "pitch_range", "polyphony",
                 "empty_beat_rate", "longest_repeat", "repeat_period", "distinct_4gram_ratio", "train_overlap")


def build_report(run_dir: str | None, *, out: str | None = None, tokens: str | None = None,
                 model: str | None = None, pieces: str | None = None, reference: str | None = None,
                 soundfont: str | None = None, audio: bool = True, audio_seconds: float = 30.0,
                 sample_rate: int = 22050, max_pieces: int = 16, loss: bool = True, split: str | None = None,
                 storage=None) -> dict:
    """Write the page; returns a summary (paths, pieces, audio engine or why there is none)."""
    from midiforge.pipeline.evaluate import evaluate_sets
    from midiforge.storage import open_store

    started = time.time()
    base = Path(run_dir) if run_dir else None

    def part(given: str | None, name: str) -> str | None:
        if given:
            return given
        if base is not None and (base / name).exists():
            return str(base / name)
        return None

    tokens, model, pieces = part(tokens, "tokens"), part(model, "model"), part(pieces, "pieces")
    reference = reference or tokens
    if pieces is None:
        raise MidiforgeError(f"{run_dir}: no pieces/ folder; pass --pieces (a generate output or a MIDI folder)")
    if reference is None:
        raise MidiforgeError(f"{run_dir}: no tokens/ folder to take the reference from; pass --reference or --tokens")
    if out is None:
        if base is None:
            raise MidiforgeError("--out is needed without RUN_DIR")
        out = str(base / "report")
    if "://" in out and not out.startswith("file://"):
        raise MidiforgeError(f"{out}: the report is written to a local folder (copy it to a bucket afterwards)")
    out_dir = Path(out.removeprefix("file://"))
    assets = out_dir / "assets"
    assets.mkdir(parents=True, exist_ok=True)

    # training curves
    curves = None
    records: list[dict] = []
    if model:
        store = open_store(model, storage)
        if store.exists("metrics.jsonl"):
            for n, line in enumerate(store.read_bytes("metrics.jsonl").decode().splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise MidiforgeError(f"{store.url('metrics.jsonl')}: line {n} is not JSON") from None
            if curves_png(records, assets / "curves.png"):
                curves = "assets/curves.png"

    # the evaluation
    with_model = model if (loss and model and open_store(model, storage).exists("manifest.json")) else None
    result, generated, _ref = evaluate_sets(pieces, reference, model_dir=with_model, train_uri=tokens, split=split,
                                            storage=storage)
    (out_dir / "evaluate.json").write_text(json.dumps(result, indent=1) + "\n")

    # the gallery
    renderer = AudioRenderer(find_soundfont(soundfont), sample_rate, audio_seconds) if audio else None
    used: set[str] = set()
    cards = []
    rows = result["pieces"]
    shown = min(len(generated), max_pieces)
    audio_count = 0
    for i in range(shown):
        name = generated.names[i]
        stem = _safe_name(name, used)
        piano_roll_png(generated.pieces[i], assets / f"{stem}.png")
        links = []
        if generated.midi[i] is not None:
            (assets / f"{stem}.mid").write_bytes(generated.midi[i])
            links.append(f'<a href="assets/{_e(stem)}.mid" download>MIDI file</a>')
        player = ""
        if renderer is not None and renderer.available and generated.midi[i] is not None:
            seconds = renderer.render(generated.midi[i], assets / f"{stem}.wav")
            if seconds > 0:
                audio_count += 1
                player = (f'<audio controls preload="metadata" src="assets/{_e(stem)}.wav"></audio>'
                          f"<div><small>first {min(_piece_seconds(generated.pieces[i]), audio_seconds):.0f} s, "
                          f"rendered with {_e(renderer.engine)} and {_e(os.path.basename(renderer.soundfont))}"
                          f"</small></div>")
        values = rows[i]
        metric_rows = [["metric", "value"]] + [[k, _num(values.get(k))] for k in PIECE_METRICS if k in values]
        if values.get("nearest_train_piece"):
            metric_rows.append(["nearest training piece", str(values["nearest_train_piece"])])
        cards.append(
            f'<div class="piece"><h3>{_e(name)}</h3>'
            f'<img src="assets/{_e(stem)}.png" alt="piano roll of {_e(name)}">'
            f"{player}<div>{' · '.join(links)}</div>"
            f"<details><summary>metrics</summary>{_table(metric_rows)}</details></div>")

    # the page
    notes = []
    if renderer is None:
        notes.append("Audio was turned off (<code>--no-audio</code>).")
    elif not renderer.available:
        notes.append(AUDIO_HELP + f" <small>({_e(renderer.why)})</small>")
    title = f"midiforge report: {base.name if base is not None else out_dir.name}"
    curves_html = (f'<img class="curves" src="{curves}" alt="training curves">' if curves else
                   "<p>No training curves (no <code>metrics.jsonl</code> in the model folder).</p>")
    if records:
        keys = [k for k in ("epoch", "loss", "val_loss", "accuracy", "val_accuracy", "tokens_per_second", "seconds")
                if any(k in r for r in records)]
        curves_html += _table([keys] + [[_num(r.get(k), 4) for k in keys] for r in records])
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<link rel="icon" href="data:,">
<style>{CSS}</style>
</head>
<body>
<h1>{_e(title)}</h1>
<p>Written {_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}. Pieces: <code>{_e(pieces)}</code>; model:
<code>{_e(model or '-')}</code>; tokens: <code>{_e(tokens or '-')}</code>.</p>
<h2>Training</h2>
{curves_html}
<h2>Evaluation against the reference</h2>
{_evaluation_html(result)}
<h2>Pieces</h2>
<p>{shown} of {len(generated)} pieces{'' if shown == len(generated) else f' (--max-pieces {max_pieces})'}.</p>
{''.join(f'<p class="note">{n}</p>' for n in notes)}
{''.join(cards)}
</body>
</html>
"""
    index = out_dir / "index.html"
    tmp = index.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, index)
    return {"index": str(index), "pieces": shown, "audio": audio_count,
            "audio_engine": renderer.engine if renderer else None,
            "soundfont": renderer.soundfont if renderer else None,
            "audio_note": None if (renderer and renderer.available) else (renderer.why if renderer else "off"),
            "seconds": round(time.time() - started, 2)}


def _piece_seconds(piece) -> float:
    """The piece's length in seconds (at its tempo)."""
    return piece.end_seconds()


# -------------------------------------------------------------------------------------------
# CLI
# -------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", default=None,
                   help="a run folder with tokens/, model/ and pieces/ (the demo's layout, e.g. demo-out)")
    p.add_argument("--tokens", default=None, help="preprocess output (default: RUN_DIR/tokens)")
    p.add_argument("--model", default=None, help="training output (default: RUN_DIR/model)")
    p.add_argument("--pieces", default=None, help="generate output or MIDI folder (default: RUN_DIR/pieces)")
    p.add_argument("--reference", default=None,
                   help="what the pieces are compared with: a MIDI folder or a preprocess output "
                        "(default: the held-out split of --tokens)")
    p.add_argument("--split", choices=("test", "validation", "train"), default=None,
                   help="the reference's split when it is a preprocess output (default: test if it has pieces, "
                        "else validation)")
    p.add_argument("--out", default=None, help="folder for index.html and its assets (default: RUN_DIR/report)")
    p.add_argument("--max-pieces", type=int, default=16, help="pieces in the gallery (default 16)")
    p.add_argument("--soundfont", metavar="FILE", default=None,
                   help="SoundFont (.sf2/.sf3) for the audio (default: $MIDIFORGE_SOUNDFONT, else the first of "
                        "the standard places that exists, e.g. /usr/share/sounds/sf2/FluidR3_GM.sf2)")
    p.add_argument("--no-audio", action="store_true", help="no audio players (default: audio when a SoundFont "
                                                             "and a renderer are available)")
    p.add_argument("--audio-seconds", type=float, default=30.0,
                   help="seconds of each piece rendered to audio (default 30)")
    p.add_argument("--sample-rate", type=int, default=22050, help="audio sample rate in Hz (default 22050)")
    p.add_argument("--no-loss", action="store_true",
                   help="skip the model's held-out loss and the n-gram baseline (default: computed when the "
                        "model is finished)")
    from midiforge.storage.cli_options import add_storage_arguments

    add_storage_arguments(p)


def main(args) -> int:
    from midiforge.storage.cli_options import options_from_args

    if args.max_pieces < 0:
        raise MidiforgeError(f"--max-pieces {args.max_pieces}: must be >= 0")
    if not args.audio_seconds > 0 or args.sample_rate < 8000:
        raise MidiforgeError("--audio-seconds must be > 0 and --sample-rate at least 8000")
    if args.run_dir is None and not args.pieces:
        raise MidiforgeError("give RUN_DIR, or --pieces with --tokens or --reference and --out")
    summary = build_report(args.run_dir, out=args.out, tokens=args.tokens, model=args.model, pieces=args.pieces,
                           reference=args.reference, soundfont=args.soundfont, audio=not args.no_audio,
                           audio_seconds=args.audio_seconds, sample_rate=args.sample_rate,
                           max_pieces=args.max_pieces, loss=not args.no_loss, split=args.split,
                           storage=options_from_args(args))
    print(json.dumps(summary))
    if summary["audio_note"] and summary["audio_note"] != "off":
        print(f"report: no audio ({summary['audio_note']})")
    print(f"report: {summary['index']}")
    return 0

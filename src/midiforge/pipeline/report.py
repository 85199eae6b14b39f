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
import json
import os
import shutil
import subprocess
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

from midiforge.errors import MidiforgeError
from midiforge.pipeline.report_html import (
    audio_notes,
    card_html,
    curves_html,
    curves_png,
    midi_link,
    page_html,
    piano_roll_png,
    player_html,
    safe_name,
)

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
                    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=self.timeout,
                                          check=False)
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
# the report, step by step
# -------------------------------------------------------------------------------------------
def build_report(run_dir: str | None, *, out: str | None = None, tokens: str | None = None,
                 model: str | None = None, pieces: str | None = None, reference: str | None = None,
                 soundfont: str | None = None, audio: bool = True, audio_seconds: float = 30.0,
                 sample_rate: int = 22050, max_pieces: int = 16, loss: bool = True, split: str | None = None,
                 storage=None) -> dict:
    """Write the page; returns a summary (paths, pieces, audio engine or why there is none)."""
    started = time.time()
    base = Path(run_dir) if run_dir else None
    tokens, model, pieces, reference = _inputs(run_dir, base, tokens, model, pieces, reference)
    out_dir = _out_dir(out, base)
    assets = out_dir / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    records = _training_records(model, storage)
    curves = "assets/curves.png" if curves_png(records, assets / "curves.png") else None
    result, generated = _evaluation(out_dir, pieces, reference, tokens, model, loss, split, storage)
    renderer = AudioRenderer(find_soundfont(soundfont), sample_rate, audio_seconds) if audio else None
    shown = min(len(generated), max_pieces)
    cards, audio_count = _gallery(generated, result["pieces"], shown, assets, renderer, audio_seconds)
    title = f"midiforge report: {base.name if base is not None else out_dir.name}"
    page = page_html(title=title, pieces=pieces, model=model, tokens=tokens, training=curves_html(curves, records),
                     result=result, shown=shown, total=len(generated), max_pieces=max_pieces,
                     notes=audio_notes(renderer), cards=cards)
    index = _write_atomic(out_dir / "index.html", page)
    return {"index": str(index), "pieces": shown, "audio": audio_count,
            "audio_engine": renderer.engine if renderer else None,
            "soundfont": renderer.soundfont if renderer else None,
            "audio_note": None if (renderer and renderer.available) else (renderer.why if renderer else "off"),
            "seconds": round(time.time() - started, 2)}


def _inputs(run_dir: str | None, base: Path | None, tokens: str | None, model: str | None, pieces: str | None,
            reference: str | None) -> tuple[str | None, str | None, str, str]:
    """(tokens, model, pieces, reference): each as given, else its folder in RUN_DIR when it exists."""

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
    return tokens, model, pieces, reference


def _out_dir(out: str | None, base: Path | None) -> Path:
    """The local folder the page goes to (default RUN_DIR/report)."""
    if out is None:
        if base is None:
            raise MidiforgeError("--out is needed without RUN_DIR")
        out = str(base / "report")
    if "://" in out and not out.startswith("file://"):
        raise MidiforgeError(f"{out}: the report is written to a local folder (copy it to a bucket afterwards)")
    return Path(out.removeprefix("file://"))


def _training_records(model: str | None, storage) -> list[dict]:
    """The records of the model's metrics.jsonl (none without a model or the file)."""
    from midiforge.pipeline.train_state import read_metrics
    from midiforge.storage import open_store

    return read_metrics(open_store(model, storage)) if model else []


def _evaluation(out_dir: Path, pieces: str, reference: str, tokens: str | None, model: str | None, loss: bool,
                split: str | None, storage):
    """(evaluate's result, the generated PieceSet); the result is also written to ``evaluate.json``.
    The model's loss is compared when asked for and the model is finished (has its manifest)."""
    from midiforge.pipeline.evaluate import evaluate_sets
    from midiforge.storage import open_store

    with_model = model if (loss and model and open_store(model, storage).exists("manifest.json")) else None
    result, generated, _ref = evaluate_sets(pieces, reference, model_dir=with_model, train_uri=tokens, split=split,
                                            storage=storage)
    (out_dir / "evaluate.json").write_text(json.dumps(result, indent=1) + "\n")
    return result, generated


def _gallery(generated, rows: list[dict], shown: int, assets: Path, renderer: AudioRenderer | None,
             audio_seconds: float) -> tuple[list[str], int]:
    """(the cards of the first ``shown`` pieces, how many have audio); their files go to ``assets``."""
    used: set[str] = set()
    cards = []
    audio_count = 0
    for i in range(shown):
        name, midi, piece = generated.names[i], generated.midi[i], generated.pieces[i]
        stem = safe_name(name, used)
        piano_roll_png(piece, assets / f"{stem}.png")
        links = []
        if midi is not None:
            (assets / f"{stem}.mid").write_bytes(midi)
            links.append(midi_link(stem))
        player = ""
        if renderer is not None and renderer.available and midi is not None:
            seconds = renderer.render(midi, assets / f"{stem}.wav")
            if seconds > 0:
                audio_count += 1
                player = player_html(stem, min(_piece_seconds(piece), audio_seconds), renderer.engine,
                                     renderer.soundfont)
        cards.append(card_html(name, stem, rows[i], player, links))
    return cards, audio_count


def _write_atomic(index: Path, page: str) -> Path:
    tmp = index.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, index)
    return index


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

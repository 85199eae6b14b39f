"""The report's pictures and HTML (:mod:`midiforge.pipeline.report` decides what goes on the page):
piano rolls and training curves as PNG files (matplotlib, Agg), and the page itself: the training
section, the evaluation against the reference, one card per piece.  Every text is escaped; every
link is relative (``assets/...``, ``evaluate.json``).
"""
from __future__ import annotations

import html
import math
import os
import re
import time
from pathlib import Path

import numpy as np

from midiforge.music.piece import quarters_to_seconds

#: what the page says when there is no audio, and how to get it
AUDIO_HELP = ("No audio: no SoundFont was found, or nothing here can render one. Install a General MIDI "
              "SoundFont and FluidSynth (Debian/Ubuntu: <code>apt install fluid-soundfont-gm fluidsynth</code>; "
              "Fedora: <code>dnf install fluid-soundfont-gm fluidsynth</code>; macOS: <code>brew install "
              "fluid-synth</code> and a .sf2 file), then run <code>midiforge report</code> again, with "
              "<code>--soundfont FILE.sf2</code> if the file is not in a standard place.")


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


def safe_name(name: str, used: set[str]) -> str:
    """A file stem for piece ``name``: safe characters only, unique among ``used`` (which it joins)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name.rsplit(".", 1)[0] if name.lower().endswith((".mid", ".midi")) else name)
    stem = stem.strip("._")[:80] or "piece"
    out, k = stem, 1
    while out in used:
        k += 1
        out = f"{stem}-{k}"
    used.add(out)
    return out


def evaluation_html(result: dict) -> str:
    """The evaluation section: what was compared, the table of :func:`evaluate.table_rows`, copies and loss."""
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


def player_html(stem: str, seconds: float, engine: str, soundfont: str) -> str:
    """The audio player of a piece whose first ``seconds`` were rendered to ``assets/<stem>.wav``."""
    return (f'<audio controls preload="metadata" src="assets/{_e(stem)}.wav"></audio>'
            f"<div><small>first {seconds:.0f} s, "
            f"rendered with {_e(engine)} and {_e(os.path.basename(soundfont))}"
            f"</small></div>")


def card_html(name: str, stem: str, values: dict, player: str, links: list[str]) -> str:
    """One piece of the gallery: its piano roll, player, links and metrics (``values``: its row of evaluate)."""
    metric_rows = [["metric", "value"]] + [[k, _num(values.get(k))] for k in PIECE_METRICS if k in values]
    if values.get("nearest_train_piece"):
        metric_rows.append(["nearest training piece", str(values["nearest_train_piece"])])
    return (f'<div class="piece"><h3>{_e(name)}</h3>'
            f'<img src="assets/{_e(stem)}.png" alt="piano roll of {_e(name)}">'
            f"{player}<div>{' · '.join(links)}</div>"
            f"<details><summary>metrics</summary>{_table(metric_rows)}</details></div>")


def midi_link(stem: str) -> str:
    return f'<a href="assets/{_e(stem)}.mid" download>MIDI file</a>'


def audio_notes(renderer) -> list[str]:
    """What the page says about audio when there is none (``renderer``: None when it was turned off)."""
    if renderer is None:
        return ["Audio was turned off (<code>--no-audio</code>)."]
    if not renderer.available:
        return [AUDIO_HELP + f" <small>({_e(renderer.why)})</small>"]
    return []


def curves_html(curves: str | None, records: list[dict]) -> str:
    """The training section: the curves' picture (or why there is none) and the metrics.jsonl table."""
    out = (f'<img class="curves" src="{curves}" alt="training curves">' if curves else
           "<p>No training curves (no <code>metrics.jsonl</code> in the model folder).</p>")
    if records:
        keys = [k for k in ("epoch", "loss", "val_loss", "accuracy", "val_accuracy", "tokens_per_second", "seconds")
                if any(k in r for r in records)]
        out += _table([keys] + [[_num(r.get(k), 4) for k in keys] for r in records])
    return out


def page_html(*, title: str, pieces: str, model: str | None, tokens: str | None, training: str, result: dict,
              shown: int, total: int, max_pieces: int, notes: list[str], cards: list[str]) -> str:
    """The whole page (``training``: :func:`curves_html`; ``cards``: :func:`card_html` of each piece shown)."""
    return f"""<!DOCTYPE html>
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
{training}
<h2>Evaluation against the reference</h2>
{evaluation_html(result)}
<h2>Pieces</h2>
<p>{shown} of {total} pieces{'' if shown == total else f' (--max-pieces {max_pieces})'}.</p>
{''.join(f'<p class="note">{n}</p>' for n in notes)}
{''.join(cards)}
</body>
</html>
"""

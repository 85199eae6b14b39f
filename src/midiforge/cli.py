"""``midiforge``: one command, one sub-command per stage.

Each sub-command lives in its own module, which exposes ``add_arguments(parser)``
and ``main(args) -> int``.  Modules import their heavy dependencies (Ray,
TensorFlow) inside ``main`` so that ``midiforge --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
import threading

from midiforge.errors import MidiforgeError

COMMANDS: dict[str, tuple[str, str]] = {
    "preprocess": ("midiforge.pipeline.preprocess", "MIDI and score files -> Parquet token shards (Ray)"),
    "train": ("midiforge.pipeline.train", "token shards -> LSTM model bundle (tf.distribute)"),
    "generate": ("midiforge.pipeline.generate", "model bundle -> MIDI pieces from seeds, optionally continuing primers (Ray)"),
    "verify": ("midiforge.pipeline.verify", "check a stage's output against its manifest"),
    "evaluate": ("midiforge.pipeline.evaluate", "generated pieces against a reference: metrics, loops, copies, loss"),
    "report": ("midiforge.pipeline.report", "one static HTML page of a run: curves, evaluation, pieces"),
    "demo": ("midiforge.pipeline.demo", "the whole pipeline on the embedded demo corpus"),
}


def build_parser(available: dict[str, object]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="midiforge", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=f"midiforge {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in available.items():
        _, help_text = COMMANDS[name]
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().replace("``", ""))
        module.add_arguments(p)
    return parser


def version() -> str:
    """The installed distribution's version (pyproject.toml's), else "unknown" (a bare source tree)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("midiforge")
    except PackageNotFoundError:
        return "unknown"


def _modules() -> dict[str, object]:
    """Every stage's module: one that cannot be imported fails the command (never a stage left out quietly)."""
    return {name: importlib.import_module(modname) for name, (modname, _help) in COMMANDS.items()}


#: a value argparse would take for an option because it starts with "-": ``-3..3``, ``-2,0,2``
_NEGATIVE_VALUE = re.compile(r"-\d+(\.\.-?\d+|(,-?\d+)+)")


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--transpose -3..3`` -> ``--transpose=-3..3`` (argparse reads ``-3..3`` as an unknown option)."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_VALUE.fullmatch(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


_depth = 0  # main() calls in progress (the demo runs the other stages through main)


def _terminated(signum, _frame):  # SIGTERM: unwind like an error, so that the clean-up below runs
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    global _depth
    modules = _modules()
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    args = build_parser(modules).parse_args(argv)
    outermost = _depth == 0
    previous = None
    if outermost and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)
    _depth += 1
    try:
        return int(modules[args.command].main(args) or 0)
    except MidiforgeError as exc:
        print(f"midiforge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"midiforge {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _depth -= 1
        if outermost:
            # a Ray this command started stops with it, and leaves no process behind (however it ended)
            runtime = sys.modules.get("midiforge.pipeline.ray_runtime")
            if runtime is not None:
                runtime.stop_ray()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

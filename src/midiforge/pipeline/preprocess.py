"""Turn a corpus of MIDI and score files into Parquet token shards, in parallel on Ray.

Every input unit (a file, or one tune of a multi-tune ABC file) ends as exactly one piece,
duplicate or failure; manifest.json is written last and ``inputs == pieces + duplicates + failures``.
"""
# (this docstring is the stage's --help.)  This module is the stage's CLI and its driver (run_preprocess); the
# rest of the stage lives in preprocess_inputs (what SRC holds), preprocess_plan (the batches), preprocess_runner
# (running them on Ray), preprocess_batch (what one Ray task does), preprocess_journal (a batch's journal, and
# the runs' epochs) and preprocess_finalize (the outputs and the manifest).
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass, field

from midiforge.errors import MidiforgeError
from midiforge.music.readers import SUFFIXES, ReadOptions
from midiforge.music.tokenizers import EventsConfig
from midiforge.pipeline.preprocess_batch import PreprocessSettings, process_batch
from midiforge.pipeline.preprocess_finalize import Clock, finalize
from midiforge.pipeline.preprocess_inputs import (
    InputRef,
    list_inputs,
    sample_inputs,
    src_uri,
)
from midiforge.pipeline.preprocess_journal import (
    WORK,
    Journal,
    drop_journals_without_rows,
    journal_parts,
    next_epoch,
    read_journal,
    run_marker,
)
from midiforge.pipeline.preprocess_plan import FILE_TIMEOUT, cap_bytes, plan_batches
from midiforge.pipeline.preprocess_runner import BatchRunner
from midiforge.pipeline.ray_runtime import start_ray
from midiforge.storage import StorageOptions, open_store, read_manifest
from midiforge.storage.cli_options import positive_int

# what other modules, tests and benchmarks take from here
__all__ = ["InputRef", "PreprocessSettings", "add_arguments", "list_inputs", "main", "process_batch", "run_preprocess",
           "settings_from_args"]


def run_preprocess(src: str, dest_uri: str, settings: PreprocessSettings, *, resume: bool = False,
                   workers: int | None = None, batch_files: int | None = None, address: str | None = None,
                   storage: StorageOptions | None = None, progress: bool = True, add_inputs: bool = False,
                   allow_absolute_paths: bool = False, allow_empty: bool = False,
                   file_timeout: float | None = None) -> dict:
    """The whole stage; returns the manifest it wrote.

    ``resume`` continues the run in DEST from the same SRC (compared as a normalized URI, see
    :func:`src_uri`); ``add_inputs`` (implies ``resume``) adds another SRC's inputs to it deliberately,
    recorded in the manifest's ``sources``.  ``allow_absolute_paths``: a list file may name files outside
    its folder.  ``allow_empty``: an SRC without inputs makes an empty run instead of an error.
    """
    storage = storage or StorageOptions()
    started = time.time()
    clock = Clock()
    dest = open_store(dest_uri, storage)
    settings.make_tokenizer()  # bad tokenizer settings fail here, before any work
    if abs(sum(settings.splits) - 1.0) > 1e-6 or min(settings.splits) < 0:
        raise MidiforgeError(f"--split ratios must be >= 0 and sum to 1, got {settings.splits}")
    refs = sample_inputs(list_inputs(src, storage, allow_absolute_paths=allow_absolute_paths), settings.sample,
                         settings.seed)
    if not refs and not allow_empty:
        raise MidiforgeError(f"{src}: no input files (a folder is searched for {'/'.join(SUFFIXES)}; a list file "
                             f"names them); nothing to do. --allow-empty makes an empty run")
    clock.lap("listing")
    run = _Run.open(dest, src, settings, resume or add_inputs, add_inputs, started)
    todo = run.take_stock(refs)
    if not todo and dest.exists("manifest.json"):  # a finished run, nothing new in SRC: keep its result
        return read_manifest(dest)
    if todo:
        dest.delete("manifest.json")  # the stage is incomplete again until it finishes
    clock.lap("setup")
    if todo:
        results = _run_batches(run, todo, len(refs), storage, clock, address=address, workers=workers,
                               batch_files=batch_files, progress=progress, file_timeout=file_timeout)
        known = {r["part"]: r["table"] for r in results if r["table"] is not None}
        known_journals = {**run.earlier, **{r["part"]: Journal(**r["journal"]) for r in results}}
    else:
        known, known_journals = {}, run.earlier
    return finalize(dest, settings, src_count=len(refs), started=started, known=known, known_journals=known_journals,
                    clock=clock, expected_inputs={r.source for r in refs}, sources=run.sources)


@dataclass
class _Run:
    """The run in DEST that this start of the driver makes or continues: ``existing`` (DEST held one),
    ``saved`` (its settings.json), ``sources`` (the SRCs its inputs come from); after :meth:`take_stock`,
    the journals of the batches done (``journals``: part -> path, ``earlier``: part -> journal)."""

    dest: object
    src: str
    settings: PreprocessSettings
    started: float
    existing: bool
    saved: dict | None
    sources: list[dict]
    add_inputs: bool
    journals: dict[int, str] = field(default_factory=dict)
    earlier: dict[int, Journal] = field(default_factory=dict)

    @classmethod
    def open(cls, dest, src: str, settings: PreprocessSettings, resume: bool, add_inputs: bool,
             started: float) -> _Run:
        """The run, its settings checked against the saved ones (or saved, for a new run)."""
        this_src = src_uri(src)
        sources = [{"src": this_src, "added": _utc(started)}]  # the SRCs this run's inputs come from
        settings_doc = {"src": src, "settings": settings.identity(), "sources": sources}
        existing = dest.exists(f"{WORK}/settings.json") or dest.exists("manifest.json")
        if existing and not resume:
            raise MidiforgeError(f"{dest.uri}: already holds a preprocess run; pass --resume to continue it, or use a new DEST")
        saved = None
        if existing:
            saved = json.loads(dest.read_bytes(f"{WORK}/settings.json"))
            if saved["settings"] != settings_doc["settings"]:
                raise MidiforgeError(f"{dest.uri}: --resume with different settings than the run it continues "
                                     f"(was {saved['settings']})")
            # a run from before sources were recorded: its SRC as given (a relative path: from here)
            sources = saved.get("sources") or [{"src": src_uri(saved["src"]), "added": None}]
            if this_src not in {s["src"] for s in sources} and not add_inputs:
                raise MidiforgeError(f"{dest.uri}: --resume from SRC {this_src}, but this run's inputs come from "
                                     f"{', '.join(s['src'] for s in sources)}; resume with that SRC, use a new DEST, "
                                     f"or pass --add-inputs to add {this_src}'s inputs to this run deliberately")
        else:
            dest.write_bytes(f"{WORK}/settings.json", json.dumps(settings_doc, indent=1).encode())
        return cls(dest, src, settings, started, existing, saved, sources, add_inputs)

    def take_stock(self, refs: list[InputRef]) -> list[InputRef]:
        """The inputs of ``refs`` still to do: those no batch journal in DEST holds.  --add-inputs: SRC joins
        the run's sources."""
        dest = self.dest
        self.journals = journal_parts(dest)
        self.earlier = {p: read_journal(dest, rel) for p, rel in self.journals.items()}  # finalize reuses them
        drop_journals_without_rows(dest, self.journals, self.earlier, self.settings.make_tokenizer().vocab_from_data)
        done: set[str] = set()
        for journal in self.earlier.values():
            done.update(journal.input)
        this_src = src_uri(self.src)
        if this_src not in {s["src"] for s in self.sources}:  # --add-inputs: a new SRC joins the run
            clash = sorted(done.intersection(r.source for r in refs))
            if clash:  # sources are relative to their SRC: the same name would be taken for the same input
                raise MidiforgeError(f"{self.src}: --add-inputs: {len(clash)} inputs have the names of inputs already "
                                     f"in the run (for example {clash[:3]}); rename them or use a new DEST")
            self.sources = [*self.sources, {"src": this_src, "added": _utc(self.started)}]
            dest.write_bytes(f"{WORK}/settings.json", json.dumps({**self.saved, "sources": self.sources},
                                                                 indent=1).encode())
        # piece tables without a journal (leftovers of a killed batch: their inputs run again) are deleted by finalize
        return [r for r in refs if r.source not in done]

    def start_epoch(self) -> int:
        """This run's epoch (see PARTS_PER_RUN), its marker written before any batch: a later run takes a
        higher epoch even if this one leaves no journal."""
        epoch = next_epoch(self.dest, self.journals) if self.existing else 0
        if epoch:
            self.dest.write_bytes(run_marker(epoch), json.dumps({"epoch": epoch, "started": self.started,
                                                                 "pid": os.getpid(),
                                                                 "host": socket.gethostname()}).encode())
        return epoch


def _run_batches(run: _Run, todo: list[InputRef], total: int, storage: StorageOptions, clock: Clock, *,
                 address: str | None, workers: int | None, batch_files: int | None, progress: bool,
                 file_timeout: float | None) -> list[dict]:
    """The batches of ``todo`` run on Ray (started here); their summaries."""
    import ray

    try:
        start_ray(address, workers)
    except BaseException:
        if not run.existing and not run.journals:  # nothing was done: leave DEST as it was, so a retry needs no --resume
            run.dest.delete(f"{WORK}/settings.json")
        raise
    resources = ray.cluster_resources()
    clock.lap("ray_start")
    runner = BatchRunner(ray, run.dest, storage, run.settings, resources, workers, file_timeout)
    batches = cap_bytes(plan_batches(todo, runner.workers, batch_files), run.settings.read.max_bytes)
    results = runner.run(batches, run.start_epoch(), total, total - len(todo), progress)
    clock.lap("batches")
    clock.add("batch_busy", sum(r["seconds"] for r in results))
    clock.add("batch_count", len(results))
    hosts: dict[str, int] = {}
    for r in results:
        hosts[r["host"]] = hosts.get(r["host"], 0) + 1
    clock.add("batch_hosts", dict(sorted(hosts.items())))
    return results


def _utc(t: float) -> str:
    import datetime as _dt

    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="seconds")



# -------------------------------------------------------------------------------------------
# CLI
# -------------------------------------------------------------------------------------------
#: the events tokenizer's settings that are options, in --help's order: EventsConfig field -> its help (the
#: option is --field-name; its default, EventsConfig's; a bool field, off by default, is a switch)
EVENTS_OPTIONS = {
    "steps_per_quarter": "events: onset grid, steps per quarter note (default: %(default)s)",
    "max_shift_steps": "events: longest TIME_SHIFT in grid steps; longer rests chain several (default: %(default)s)",
    "max_duration_steps": "events: longest DURATION in grid steps; longer notes are clipped (default: %(default)s)",
    "velocity_bins": "events: velocity bins, 0 turns velocity off (default: %(default)s)",
    "tempo_bins": "events: tempo bins, 0 turns the tempo token off (default: %(default)s)",
    "programs": "events: keep instruments apart (PROGRAM tokens)",
    "bars": "events: BAR tokens",
    "drums": "keep drum tracks (dropped by default)",
}
#: the options of EVENTS_OPTIONS that the classic tokenizer takes too
CLASSIC_OPTIONS = ("drums",)


def _add_events_options(g) -> None:
    """An option per EVENTS_OPTIONS entry, from its EventsConfig field."""
    defaults = {f.name: f.default for f in dataclasses.fields(EventsConfig)}
    for name, text in EVENTS_OPTIONS.items():
        flag, default = "--" + name.replace("_", "-"), defaults[name]
        if isinstance(default, bool):
            assert default is False, f"EventsConfig.{name}: a switch turns a setting on"
            g.add_argument(flag, action="store_true", help=text)
        else:
            g.add_argument(flag, type=type(default), default=default, help=text)


def _int_range(text: str) -> tuple[int, ...]:
    try:
        if ".." in text:
            a, b = text.split("..")
            return tuple(range(int(a), int(b) + 1))
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a range like -3..3 or a list like -2,0,2") from None


def _ratios(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three ratios like 0.9,0.05,0.05")
    return parts  # type: ignore[return-value]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="folder or s3:// prefix (searched recursively), or a text file listing paths")
    p.add_argument("dest", metavar="DEST", help="output folder or s3:// prefix")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", choices=("events", "classic"), default="events",
                   help="events: note events, a vocabulary fixed by its settings; classic: the tutorial's one token "
                        "per onset, the vocabulary from the data (default: %(default)s)")
    _add_events_options(g)
    r = p.add_argument_group("reading")
    r.add_argument("--parser", choices=("symusic", "music21"), default="symusic", help="the reader of MIDI files (default: %(default)s; music21 is ~1,000x slower)")
    r.add_argument("--tracks", choices=("all", "first"), default="all",
                   help="all: merge all tracks (piano reduction); first: the first instrument, like the tutorial (default: %(default)s)")
    r.add_argument("--max-notes", type=int, default=ReadOptions.max_notes, help="files with more notes fail as too_long (default: %(default)s)")
    r.add_argument("--max-quarters", type=float, default=ReadOptions.max_quarters,
                   help="longer pieces (in quarter notes) fail as too_long (default: %(default)s)")
    r.add_argument("--max-bytes", type=int, default=ReadOptions.max_bytes,
                   help="larger files fail as too_long, unread (default: %(default)s)")
    s = p.add_argument_group("corpus")
    s.add_argument("--split", type=_ratios, default=(0.9, 0.05, 0.05), metavar="TRAIN,VAL,TEST",
                   help="shares of the train/validation/test splits, each piece's by its sha256 (default: 0.9,0.05,0.05)")
    s.add_argument("--transpose", type=_int_range, default=(), metavar="A..B",
                   help="also write train pieces transposed by each of these semitones, e.g. -3..3 (default: none)")
    s.add_argument("--sample", type=int, help="take a reproducible random subset of N files (default: all)")
    s.add_argument("--seed", type=int, default=0, help="the seed of --sample (default: %(default)s)")
    x = p.add_argument_group("execution")
    x.add_argument("--resume", action="store_true", help="continue a run in DEST, skipping inputs already done "
                                                           "(from the same SRC: another SRC is refused)")
    x.add_argument("--add-inputs", action="store_true",
                   help="add SRC's inputs to the run in DEST although it was made from another SRC (implies "
                        "--resume; the manifest's sources records each SRC and when it was added)")
    x.add_argument("--allow-absolute-paths", action="store_true",
                   help="a list file may name absolute paths, URIs and paths leading outside its folder")
    x.add_argument("--allow-empty", action="store_true", help="an SRC without input files makes an empty run "
                                                               "(default: an error)")
    x.add_argument("--address", help="Ray cluster address HEAD:PORT (default: RAY_ADDRESS, else a private local Ray "
                                      "on 127.0.0.1)")
    x.add_argument("--cluster", choices=("none", "slurm"), default="none",
                   help="slurm: start a Ray cluster across this Slurm job's nodes for the run and stop it after "
                        "(run inside sbatch: slurm/preprocess.sbatch); default none")
    x.add_argument("--workers", type=positive_int, help="parallel tasks (default: every CPU of the cluster)")
    x.add_argument("--batch-files", type=positive_int, help="files per Ray task (default: automatic)")
    x.add_argument("--file-timeout", type=float, default=FILE_TIMEOUT, metavar="SECONDS",
                   help="seconds one file may take beyond what its size predicts; a batch gets that plus 10x its "
                        "predicted time, then it is cut down to the file that hangs, which fails as timeout "
                        f"(default {FILE_TIMEOUT:g})")
    x.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on stderr)")
    from midiforge.storage.cli_options import add_storage_arguments

    add_storage_arguments(p)


def settings_from_args(args) -> PreprocessSettings:
    names = EVENTS_OPTIONS if args.tokenizer == "events" else CLASSIC_OPTIONS
    tk = {name: getattr(args, name) for name in names}
    read = ReadOptions(parser=args.parser, tracks=args.tracks, max_notes=args.max_notes,
                       max_quarters=args.max_quarters, max_bytes=args.max_bytes)
    return PreprocessSettings(args.tokenizer, tk, read, tuple(args.split), tuple(args.transpose),
                              args.sample, args.seed)


def main(args) -> int:
    from midiforge.pipeline.slurm_ray import run_with_cluster
    from midiforge.storage.cli_options import options_from_args

    settings = settings_from_args(args)
    manifest = run_with_cluster(args.cluster, args.address, lambda address: run_preprocess(
        args.src, args.dest, settings, resume=args.resume, workers=args.workers, batch_files=args.batch_files,
        address=address, storage=options_from_args(args), progress=not args.no_progress, add_inputs=args.add_inputs,
        allow_absolute_paths=args.allow_absolute_paths, allow_empty=args.allow_empty, file_timeout=args.file_timeout))
    shown = ("inputs", "pieces", "duplicates", "failures", "failure_reasons", "rows", "tokens", "tokenizer", "seconds",
             "files_per_second", "timing")  # timing: not in the manifest of a run from before it existed
    print(json.dumps({k: manifest[k] for k in shown if k in manifest}))
    if manifest.get("shards"):
        print(f"shards: {open_store(args.dest).url('shards/')}")
    else:  # no folder to name
        print(f"shards: none (no {'pieces' if manifest.get('inputs') else 'inputs'})")
    return 0

"""midiforge's one domain exception and the fixed set of failure reasons.

Every failure that concerns one input file is a :class:`PieceError` carrying a
``reason`` from :data:`FAILURE_REASONS`; it ends up as a row of
``failures.parquet`` and never stops a job.  Everything that concerns the job
as a whole (bad arguments, unreadable manifests, mismatching bundles) is a
:class:`MidiforgeError` that reaches the user as a one-line message.
"""
from __future__ import annotations

#: The documented reasons an input file can fail.  Keep README.md in step.
FAILURE_REASONS: dict[str, str] = {
    "empty": "the file has zero bytes",
    "not_midi": "the bytes are neither a Standard MIDI File nor a score format we read",
    "corrupt": "a MIDI header is present but the file is truncated or malformed",
    "no_notes": "the file parsed but holds no notes (after track selection)",
    "too_long": "more notes or ticks than --max-notes / --max-quarters allow",
    "unsupported": "a valid file using something midiforge does not read (e.g. SMPTE time division)",
    "parser_error": "the parser raised an unexpected error; the detail column has it",
    "read_error": "the file could not be read from storage",
    "not_regular": "a local path that is not a regular file (FIFO, device, socket, folder, link loop or to nothing); never read",
    "parser_crash": "the process reading the file died (a native crash, or killed for memory) each time it was read",
    "timeout": "reading the file took longer than --file-timeout seconds",
}


class MidiforgeError(Exception):
    """An error meant for the user: the message says what and where."""


class StorageUnavailableError(MidiforgeError):
    """The storage service cannot be reached, or refuses the credentials, even after retries.

    It concerns the whole job, not one object: a stage must stop (or retry the task),
    never record it as the failure of one input file.
    """


class PieceError(MidiforgeError):
    """One input could not become a piece; ``reason`` is one of FAILURE_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in FAILURE_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # crosses process boundaries (Ray, multiprocessing) intact
        return (PieceError, (self.reason, self.detail))

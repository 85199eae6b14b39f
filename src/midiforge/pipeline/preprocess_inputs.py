"""The inputs of a preprocess run: every file under SRC (a folder or prefix) or named by a list file, and a
reproducible sample of them."""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from midiforge.errors import MidiforgeError
from midiforge.music.readers import SUFFIXES
from midiforge.storage import StorageOptions, open_store, split_uri


class InputRef(NamedTuple):
    """One input file: ``source`` is its name relative to SRC; ``key`` its path in store ``root``;
    ``size`` its bytes as listed (-1: not known, e.g. from a list file).  A named tuple: a listing
    makes one per file."""

    source: str
    root: str
    key: str
    size: int = -1



def list_inputs(src: str, options: StorageOptions | None = None, *,
                allow_absolute_paths: bool = False) -> list[InputRef]:
    """Every input under SRC (a folder or prefix, searched recursively), or listed in a text file.

    A local folder's entries that are not regular files (FIFOs, devices, sockets, link loops) are
    listed too (size -1): the batch that reads them records the failure ``not_regular``.  A list
    file names files relative to its own folder, see :func:`_list_file`.
    """
    scheme, where = split_uri(src)
    if scheme == "file" and os.path.isfile(where):
        return _list_file(where, allow_absolute_paths)
    if scheme == "file" and not os.path.isdir(where):
        raise MidiforgeError(f"{src}: no such folder or list file")
    store = open_store(src, options)
    listed = store.list(special=True) if scheme == "file" else store.list()  # S3 objects are always regular
    refs = [InputRef(o.path, store.uri, o.path, o.size) for o in listed if o.path.lower().endswith(SUFFIXES)
            and not o.path.split("/")[-1].startswith(".")]
    return sorted(refs, key=lambda r: r.source)


def src_uri(src: str) -> str:
    """SRC as one comparable string: ``file://`` + the real path (links resolved, no trailing '/'), or the
    ``s3://bucket/prefix`` without a trailing '/'."""
    scheme, where = split_uri(src)
    if scheme == "file":
        return "file://" + os.path.realpath(where)
    return where.rstrip("/")



def _list_file(path: str, allow_absolute_paths: bool = False) -> list[InputRef]:
    """The inputs a list file names, one per line (blank lines and ``#`` comments skipped).

    Each is a path relative to the list's folder and must stay inside it once resolved (``..`` and
    symbolic links included); an absolute path, a ``file://`` or ``s3://`` URI, or an escape is refused
    with an error naming the line, unless ``allow_absolute_paths``.  Entries are read as resolved
    here (a link swapped afterwards cannot lead outside).
    """
    base = os.path.dirname(os.path.abspath(path))
    real_base = os.path.realpath(base)
    refs = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError as exc:
        raise MidiforgeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); a list file "
                             f"names one path per line") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\0" in line:
            raise MidiforgeError(f"{path}:{n}: a NUL character in {line!r}")
        absolute = "://" in line or os.path.isabs(line)
        if absolute and not allow_absolute_paths:
            raise MidiforgeError(f"{path}:{n}: {line!r} is an absolute path or URI; a list file names files "
                                 f"relative to its folder {base} (--allow-absolute-paths reads it anyway)")
        scheme, where = split_uri(line if absolute else os.path.join(base, line))
        if scheme == "file":
            if not allow_absolute_paths:
                where = os.path.realpath(where)
                if os.path.commonpath([where, real_base]) != real_base:
                    raise MidiforgeError(f"{path}:{n}: {line!r} leads outside the list's folder {base} (to {where}); "
                                         f"--allow-absolute-paths reads it anyway")
            refs.append(InputRef(line, os.path.dirname(where), os.path.basename(where)))
        else:
            bucket_prefix, _, key = where[len("s3://"):].rpartition("/")
            refs.append(InputRef(line, f"s3://{bucket_prefix}", key))
    seen = set()
    unique = [r for r in refs if not (r.source in seen or seen.add(r.source))]
    return sorted(unique, key=lambda r: r.source)


def sample_inputs(refs: list[InputRef], n: int | None, seed: int) -> list[InputRef]:
    if n is None or n >= len(refs):
        return refs
    if n <= 0:
        raise MidiforgeError("--sample must be positive")
    pick = np.random.default_rng(seed).choice(len(refs), size=n, replace=False)
    return [refs[i] for i in sorted(pick)]


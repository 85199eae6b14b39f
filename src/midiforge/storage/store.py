"""One way to address data: a :class:`Store` rooted at a local path, file:// or s3:// URI.

Paths inside a store are always relative, '/'-separated keys (``shards/part-00000.parquet``).
Writes are all-or-nothing: an object is visible only once it is complete.
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol, TypeVar
from urllib.parse import urlsplit

from midiforge.errors import MidiforgeError, PieceError, StorageUnavailableError  # noqa: F401 (re-exported)
from midiforge.storage.manifest import check_entry, check_file


class NotRegularFileError(PieceError):
    """A local path that is not a regular file (a FIFO, a device, a socket, a folder, a loop of symbolic
    links or a link to nothing): refused without reading it.  Preprocess records it as the failure
    ``not_regular`` of that input; anywhere else it is a one-line error."""

    def __init__(self, detail: str) -> None:
        super().__init__("not_regular", detail)

    def __str__(self) -> str:
        return self.detail

    def __reduce__(self):
        return (NotRegularFileError, (self.detail,))


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str) -> int:
    """A read-only descriptor of ``path`` if it is (or a symbolic link resolves to) a regular file.

    Anything else is never opened (opening a FIFO blocks until a writer comes, a device may act on
    its open, /dev/zero never ends): :class:`NotRegularFileError` naming the path and what it is.
    The descriptor is checked again after the open, so a file swapped in between is refused too.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise NotRegularFileError(f"{path}: a symbolic link to nothing ({os.readlink(path)})") from None
        raise MidiforgeError(f"{path}: no such file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFileError(f"{path}: a loop of symbolic links") from None
        raise
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(f"{path}: {_kind(st.st_mode)}, not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: a FIFO swapped in cannot block
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"{path}: {_kind(mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage; plain values, so it travels to Ray workers."""

    endpoint_url: str | None = None      # default: AWS_ENDPOINT_URL, else AWS
    max_attempts: int = 8                # boto3 "standard" retry mode attempts (per request)
    retry_seconds: float = 120.0         # how long an operation keeps retrying an unreachable/5xx endpoint
    checksum: str = "when_supported"     # or "when_required" for stores that reject 1.36+ checksums
    multipart_threshold: int = 16 * 1024 * 1024
    multipart_chunksize: int = 16 * 1024 * 1024
    max_concurrency: int = 8


class ObjectInfo(NamedTuple):
    """One object of a listing (a named tuple: a listing makes one per file, ~5x faster than a frozen dataclass)."""

    path: str   # relative to the store's root
    size: int


class Store(Protocol):
    """What every stage may do with its input or output location."""

    uri: str
    #: how many transfers at once pay off (for map_parallel): one on a local disk, where a small write
    #: takes less time than starting a thread; several over a network, where most of it is waiting
    transfers: int

    def url(self, rel: str) -> str: ...
    def read_bytes(self, rel: str) -> bytes: ...
    def write_bytes(self, rel: str, data: bytes) -> None: ...
    def exists(self, rel: str) -> bool: ...
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def delete(self, rel: str) -> None: ...
    def put_file(self, local_path: str | os.PathLike, rel: str) -> None: ...
    def get_file(self, rel: str, local_path: str | os.PathLike) -> None: ...
    # verified reads: raise MidiforgeError naming the object when size/sha256 differ from the entry
    def read_verified(self, rel: str, entry: dict) -> bytes: ...
    def get_file_verified(self, rel: str, local_path: str | os.PathLike, entry: dict) -> None: ...


def split_uri(uri: str) -> tuple[str, str]:
    """('file', '/abs/path') or ('s3', 'bucket/prefix') for a path or URI."""
    uri = str(uri)
    parts = urlsplit(uri)
    if parts.scheme in ("", "file") or (len(parts.scheme) == 1 and os.name == "nt"):
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise MidiforgeError(f"{uri}: file:// URIs must name a local path (file:///path)")
            return "file", os.path.abspath(parts.path)
        return "file", os.path.abspath(uri)
    if parts.scheme == "s3":
        return "s3", uri
    shown = f"{parts.scheme}://{parts.hostname or ''}{parts.path}"  # never echo user:secret@ or a query
    raise MidiforgeError(f"{shown}: unsupported scheme {parts.scheme!r} (use a path, file:// or s3://)")


def open_store(uri: str, options: StorageOptions | None = None) -> Store:
    """The store for a local path, ``file://`` URI or ``s3://bucket/prefix``."""
    scheme, where = split_uri(uri)
    if scheme == "file":
        return LocalStore(where)
    from midiforge.storage.s3 import S3Store  # boto3 only where it is needed

    return S3Store(where, options or StorageOptions())


def check_rel(rel: str) -> str:
    """A store-relative key: '/'-separated, no leading '/', never leaving the store."""
    rel = str(rel).replace("\\", "/").lstrip("/")
    if ".." in rel and ".." in rel.split("/"):
        raise MidiforgeError(f"{rel}: path leaves the store")
    return rel



def map_parallel(fn: Callable[[T], R], items: Iterable[T], max_workers: int = 8) -> list[R]:
    """``[fn(x) for x in items]`` on a thread pool (for many small transfers), in order.

    The first exception is re-raised after the pool has drained.
    """
    items = list(items)
    if max_workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
        return list(pool.map(fn, items))


class VerifiedReads:
    """Downloads checked against a manifest entry, for any store with read_bytes/get_file/url."""

    def read_verified(self, rel: str, entry: dict) -> bytes:
        """``read_bytes`` checked against a manifest entry; a mismatch is a MidiforgeError naming the object."""
        data = self.read_bytes(rel)
        check_entry(self.url(rel), data, entry)
        return data

    def get_file_verified(self, rel: str, local_path: str | os.PathLike, entry: dict) -> None:
        """``get_file`` checked against a manifest entry; on mismatch the local copy is removed."""
        self.get_file(rel, local_path)
        check_file(self.url(rel), local_path, entry)


class LocalStore(VerifiedReads):
    """A directory on a local (or shared, e.g. NFS) file system."""

    transfers = 1

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    def __reduce__(self):  # travels to Ray workers as its root only
        return (LocalStore, (str(self.root),))

    def path(self, rel: str) -> Path:
        return self.root / check_rel(rel)

    def url(self, rel: str) -> str:
        return str(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        # the preprocess stage's per-file read: plain strings and os.read (no pathlib, no file object;
        # 7 us a small file here against 11 for open().read())
        # regular files only (open_regular: one stat more, ~1 us)
        fd = open_regular(os.path.join(self.uri, check_rel(rel)))
        try:
            chunks = [os.read(fd, os.fstat(fd).st_size + 1)]  # one read, unless the file grew
            while chunks[-1]:
                chunks.append(os.read(fd, 1 << 20))
        finally:
            os.close(fd)
        return chunks[0] if len(chunks) == 2 else b"".join(chunks)

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def exists(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def list(self, prefix: str = "", *, special: bool = False) -> list[ObjectInfo]:
        """Every regular file below ``prefix`` (links followed; a link back to a folder above it is not
        followed again).  ``special``: also every entry that is not a regular file (FIFO, device, socket,
        a link loop or to nothing), with size -1, so that the caller can report it."""
        base = self.path(prefix) if prefix else self.root
        if base.is_file():
            return [ObjectInfo(check_rel(prefix), base.stat().st_size)]
        cut = len(os.path.join(str(self.root), ""))  # every path below starts with the root and a separator
        try:
            top = os.stat(base)
        except OSError:
            return []
        out = [ObjectInfo(path[cut:].replace(os.sep, "/"), size)
               for path, size in _scan(str(base), {(top.st_dev, top.st_ino)}, special)]
        return sorted(out, key=lambda o: o.path)

    def delete(self, rel: str) -> None:
        try:
            self.path(rel).unlink()
        except FileNotFoundError:
            pass

    def put_file(self, local_path: str | os.PathLike, rel: str) -> None:
        target = self.path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with open(local_path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(8 * 1024 * 1024):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_file(self, rel: str, local_path: str | os.PathLike) -> None:
        src = self.path(rel)
        if not src.is_file():
            raise MidiforgeError(f"{src}: no such file")
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(src, "rb") as s, open(tmp, "wb") as d:
                while chunk := s.read(8 * 1024 * 1024):
                    d.write(chunk)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _scan(base: str, above: set, special: bool) -> Iterator[tuple[str, int]]:
    """(path, size) of every file below ``base`` (os.scandir: no stat call beyond the entry's own, and
    one per folder), leaving out the temporary files of writes in progress.  ``above``: the (device,
    inode) of the folders from the root down to ``base``; a link to one of them is a loop, not followed.
    ``special``: entries that are neither folders nor regular files too, with size -1."""
    try:
        entries = list(os.scandir(base))
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        raise MidiforgeError(f"{base}: cannot list the folder ({exc.strerror or exc})") from None
    for entry in entries:
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
            is_file = not is_dir and entry.is_file(follow_symlinks=True)
        except OSError:  # a loop of links (ELOOP), a name too long to resolve: not a file we read
            is_dir = is_file = False
        if is_dir:
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in above:  # a link back up: the folder is being listed already
                continue
            above.add(key)
            try:
                yield from _scan(entry.path, above, special)
            finally:
                above.discard(key)
        elif is_file:
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                continue
            yield entry.path, entry.stat().st_size
        elif special:
            yield entry.path, -1

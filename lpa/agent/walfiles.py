"""The write-ahead log's record format and file layer, apart from the log's logic.

A segment holds one record per line: ``"<crc32 of the JSON, 8 hex> <JSON>\\n"`` (JSON never holds
a raw newline).  :func:`decode_segment` returns the good records and the bad stretches (a torn
last line, or a line whose checksum or JSON is wrong), so recovery keeps the good ones.

:class:`IWalFiles` is the handful of file operations the log performs, so tests can count
``fdatasync`` calls and lose what was not synced; :class:`OsWalFiles` is the real one.
:data:`BlockingRunner` runs the writer's calls off the reactor: :class:`ThreadRunner` (one
thread, calls in order) in production, :func:`synchronous_runner` in tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import attr
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import Interface, implementer

_log = Logger()

T = TypeVar("T")
#: runs a blocking callable off the reactor thread, in submission order; fires with its result
BlockingRunner = Callable[[Callable[[], Any]], "Deferred[Any]"]

SEGMENT_PATTERN = re.compile(r"^wal-(\d{12})\.log$")
CHECKPOINT = "checkpoint"


def segment_name(number: int) -> str:
    return f"wal-{number:012d}.log"


#: ASCII-only JSON: any text (even a lone surrogate) round-trips, and encoding is one C call
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def encode_record(record: Any) -> bytes:
    """One log line for a JSON-able record, or for ``bytes`` already holding its JSON text:
    checksum, space, the JSON, newline (JSON never holds a raw newline)."""
    payload = record if isinstance(record, bytes) else _ENCODER.encode(record).encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Damage:
    """A bad stretch of one segment: ``[start, end)`` in bytes; ``torn`` if it ends the log."""

    segment: int
    start: int
    end: int
    torn: bool


def decode_segment(number: int, data: bytes, last: bool) -> tuple[list[Any], list[Damage]]:
    """The good records of one segment and its bad stretches (adjacent bad lines merged)."""
    records: list[Any] = []
    damage: list[Damage] = []
    bad_start: int | None = None
    position = 0
    size = len(data)
    while position < size:
        newline = data.find(b"\n", position)
        end = size if newline < 0 else newline + 1
        record = _decode_line(data[position:end]) if newline >= 0 else _BAD
        if record is _BAD:
            if bad_start is None:
                bad_start = position
        else:
            if bad_start is not None:
                damage.append(Damage(number, bad_start, position, False))
                bad_start = None
            records.append(record)
        position = end
    if bad_start is not None:
        damage.append(Damage(number, bad_start, size, last))
    return records, damage


_BAD = object()


def _decode_line(line: bytes) -> Any:
    if len(line) < 11 or line[8:9] != b" ":
        return _BAD
    payload = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return _BAD
        return json.loads(payload)
    except ValueError:
        return _BAD


# -- the file layer ------------------------------------------------------------------------------


class IWalFiles(Interface):
    """The few file operations the log needs; tests inject one that can lose unsynced data."""

    def list_names(directory: str) -> list[str]:
        """Names in ``directory`` (created, mode 0700, when missing)."""

    def read(path: str) -> bytes:
        """The whole file."""

    def create(path: str) -> object:
        """Create a new file (mode 0600, must not exist) for appending; return a handle."""

    def append(handle: object, data: bytes) -> None:
        """Write all of ``data`` at the end."""

    def sync(handle: object) -> None:
        """``fdatasync``: the data and the size are durable when this returns."""

    def close(handle: object) -> None:
        """Close the handle."""

    def replace(path: str, data: bytes) -> None:
        """Atomically make ``path`` hold ``data`` (temporary file, sync, rename, sync dir)."""

    def truncate(path: str, size: int) -> None:
        """Cut the file to ``size`` bytes, durably."""

    def remove(path: str) -> None:
        """Unlink; a missing file is fine."""

    def sync_directory(directory: str) -> None:
        """Make created, renamed and removed names in ``directory`` durable."""


@implementer(IWalFiles)
class OsWalFiles:
    """The real thing: ``os.open``/``os.write``/``os.fdatasync``."""

    def list_names(self, directory: str) -> list[str]:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        return os.listdir(directory)

    def read(self, path: str) -> bytes:
        with open(path, "rb") as stream:
            return stream.read()

    def create(self, path: str) -> object:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)

    def append(self, handle: object, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(handle, view)  # type: ignore[arg-type]
            view = view[written:]

    def sync(self, handle: object) -> None:
        os.fdatasync(handle)  # type: ignore[arg-type]

    def close(self, handle: object) -> None:
        os.close(handle)  # type: ignore[arg-type]

    def replace(self, path: str, data: bytes) -> None:
        temporary = f"{path}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self.append(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        self.sync_directory(os.path.dirname(path))

    def truncate(self, path: str, size: int) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def sync_directory(self, directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def synchronous_runner(call: Callable[[], T]) -> Deferred[T]:
    """A :data:`BlockingRunner` that runs on the caller's thread (tests, and benches' peers)."""
    return maybeDeferred(call)


class ThreadRunner:
    """A :data:`BlockingRunner` on one thread of its own (calls run one at a time, in order).

    The thread starts with the first call and stops with :meth:`stop` or the reactor.
    """

    def __init__(self, reactor: Any, name: str) -> None:
        self._reactor = reactor
        self._name = name
        self._pool: Any = None
        self._trigger: Any = None

    def __call__(self, call: Callable[[], T]) -> Deferred[T]:
        from twisted.internet.threads import deferToThreadPool
        from twisted.python.threadpool import ThreadPool

        if self._pool is None:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name=self._name)
            self._pool.start()
            self._trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return deferToThreadPool(self._reactor, self._pool, call)

    def stop(self) -> None:
        """Finish what was asked, then end the thread (a later call starts a new one)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
        trigger, self._trigger = self._trigger, None
        if trigger is not None:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self._reactor.removeSystemEventTrigger(trigger)


# -- reading the log back ---------------------------------------------------------------------


def read_log(
    files: IWalFiles, directory: str, now: Callable[[], float]
) -> tuple[list[Any], int]:
    """The records of the segments after the checkpoint marker, oldest first, and the number
    of the next (new) segment.  Damaged stretches are set aside (``<segment>.bad-<unix
    time>``) and cut out of their segment; bad content never raises, I/O errors do."""
    names = files.list_names(directory)
    through = _checkpoint_marker(files, directory, names)
    numbers = sorted(int(m.group(1)) for m in map(SEGMENT_PATTERN.match, names) if m)
    records: list[Any] = []
    for index, number in enumerate(numbers):
        if number <= through:
            continue  # covered by the job store: its removal was interrupted
        path = os.path.join(directory, segment_name(number))
        data = files.read(path)
        found, damage = decode_segment(number, data, last=index == len(numbers) - 1)
        if damage:
            _set_aside(files, path, data, damage, now)
        records.extend(r for r in found if not (isinstance(r, list) and r[:1] == ["h"]))
    return records, max([*numbers, through]) + 1


def _checkpoint_marker(files: IWalFiles, directory: str, names: Iterable[str]) -> int:
    if CHECKPOINT not in names:
        return 0
    path = os.path.join(directory, CHECKPOINT)
    try:
        through = json.loads(files.read(path))["through"]
        if not isinstance(through, int) or through < 0:
            raise ValueError("not a segment number")
        return through
    except (ValueError, TypeError, KeyError) as error:
        # the segments are replayed instead (idempotently): nothing is lost
        _log.error(
            "job event log checkpoint marker {path} is unreadable ({reason}); replaying "
            "every segment",
            path=path,
            reason=str(error),
        )
        return 0


def _set_aside(
    files: IWalFiles, path: str, data: bytes, damage: list[Damage], now: Callable[[], float]
) -> None:
    aside = f"{path}.bad-{int(now())}"
    bad = b"".join(data[d.start : d.end] for d in damage)
    files.replace(aside, bad)
    if len(damage) == 1 and damage[0].torn:
        files.truncate(path, damage[0].start)
        _log.warn(
            "job event log {path}: the last record was torn (the host stopped mid-write); "
            "cut {size} bytes, copied to {aside}",
            path=path,
            size=len(bad),
            aside=aside,
        )
        return
    good = bytearray()
    position = 0
    for d in damage:
        good += data[position : d.start]
        position = d.end
    good += data[position:]
    files.replace(path, bytes(good))
    _log.error(
        "job event log {path} is damaged: {count} bad stretches ({size} bytes) dropped and "
        "copied to {aside}; the records around them are kept",
        path=path,
        count=len(damage),
        size=len(bad),
        aside=aside,
    )

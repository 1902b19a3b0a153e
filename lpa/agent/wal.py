"""The agent's write-ahead event log: an event is published only once it is on disk.

One log per agent (not per job): the jobs that run at once share one file and one
``fdatasync`` per batch, and the order of records across jobs is the order they happened in::

    engine ──append(record, token)──▶ pending ──(end of this reactor turn)──▶ writer thread
                                                                              write, fdatasync
    listener([token, …]) ◀── reactor, in append order ◀──────────────── batch durable ─┘

Group commit: every record appended while no batch is in flight goes out at the end of the
reactor turn; records appended while a batch is being synced wait for it and go out together as
the next batch.  A chatty package manager therefore costs one sync per batch, not per line, and
the reactor never waits for the disk (the writer is one thread of its own).

Files (``directory``)::

    wal-000000000007.log   segments, append-only, one record per line:
                           "<crc32 of the JSON, 8 hex> <JSON>\\n"
    checkpoint             {"through": 6}: segments up to 6 are covered by the job store

:meth:`WriteAheadLog.recover` reads the segments after the checkpoint at start-up.  A torn last
record (power lost mid-write: no newline, or a bad checksum at the very end) is cut off with a
warning; a bad record elsewhere is an error, dropped while the records around it are kept.
Either way the bad bytes are copied aside (``<segment>.bad-<unix time>``) and the segment is
rewritten without them, so the agent always starts.  Each start writes to a new segment.

A failed write or sync (disk full, I/O error) keeps the batch: nothing in it is published, an
error says so once, and the batch is written again, into a new segment, after a back-off.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lpa.agent.interfaces import IEventJournal
from lpa.agent.walfiles import (
    CHECKPOINT,
    SEGMENT_PATTERN,
    BlockingRunner,
    IWalFiles,
    OsWalFiles,
    ThreadRunner,
    encode_record,
    read_log,
    segment_name,
    synchronous_runner,
)

__all__ = [
    "BlockingRunner",
    "IWalFiles",
    "OsWalFiles",
    "ThreadRunner",
    "VolatileJournal",
    "WriteAheadLog",
    "synchronous_runner",
]
#: seconds between attempts to write a batch that failed (the last one repeats)
RETRY_DELAYS: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

_log = Logger()


# -- the log ------------------------------------------------------------------------------------


class _Writer:
    """The writer thread's side: the open segment.  Only ever called through the runner."""

    def __init__(self, files: IWalFiles, directory: str, sync: bool) -> None:
        self.files = files
        self.directory = directory
        self.sync_enabled = sync
        self.handle: object | None = None
        self.segment: int | None = None
        self.syncs = 0

    def write(self, segment: int, header: bytes, data: bytes) -> None:
        try:
            if self.segment != segment:
                self._close()
                self.handle = self.files.create(os.path.join(self.directory, segment_name(segment)))
                self.segment = segment
                self.files.append(self.handle, header)
                if self.sync_enabled:
                    self.files.sync_directory(self.directory)
            assert self.handle is not None
            self.files.append(self.handle, data)
            if self.sync_enabled:
                self.files.sync(self.handle)
                self.syncs += 1
        except BaseException:
            # never append after a failed write: the retry goes to a fresh segment
            self._close()
            raise

    def drop_through(self, through: int) -> None:
        """Record that segments up to ``through`` are checkpointed, then delete them."""
        self.files.replace(
            os.path.join(self.directory, CHECKPOINT), json.dumps({"through": through}).encode()
        )
        for name in self.files.list_names(self.directory):
            match = SEGMENT_PATTERN.match(name)
            if match and int(match.group(1)) <= through and int(match.group(1)) != self.segment:
                self.files.remove(os.path.join(self.directory, name))

    def close(self) -> None:
        self._close()

    def _close(self) -> None:
        handle, self.handle, self.segment = self.handle, None, None
        if handle is not None:
            with contextlib.suppress(OSError):
                self.files.close(handle)


@implementer(IEventJournal)
class WriteAheadLog:
    """Append-only, group-synced, checksummed records; see the module docstring.

    :param directory: where the segments live (created, mode 0700).
    :param clock: for the end-of-turn hand-off and the retry back-off.
    :param files: the file layer (tests inject one that counts syncs and loses unsynced data).
    :param run_blocking: runs the writer's calls off the reactor, in order; default: a
        :class:`ThreadRunner` of its own (stopped by :meth:`close`).
    :param sync: ``False`` skips ``fdatasync`` (benchmarks only: nothing is durable then).
    :param now: wall clock for naming bad bytes set aside.
    """

    def __init__(
        self,
        directory: str,
        *,
        clock: IReactorTime,
        files: IWalFiles | None = None,
        run_blocking: BlockingRunner | None = None,
        sync: bool = True,
        now: Callable[[], float] = time.time,
        retry_delays: Sequence[float] = RETRY_DELAYS,
    ) -> None:
        self.directory = directory
        self._clock = clock
        self._files = files if files is not None else OsWalFiles()
        self._own_runner: ThreadRunner | None = None
        if run_blocking is None:
            self._own_runner = ThreadRunner(clock, "lpa-wal")
            run_blocking = self._own_runner
        self._run = run_blocking
        self._now = now
        self._retry_delays = tuple(retry_delays)
        self._writer = _Writer(self._files, directory, sync)
        self._listener: Callable[[list[Any]], None] = lambda tokens: None

        self._segment = 0
        self._header = b""
        self._pending: list[bytes] = []
        self._tokens: list[Any] = []
        self._in_flight = False
        self._handoff_call: IDelayedCall | None = None
        self._retry_call: IDelayedCall | None = None
        self._failures = 0
        self._appended = 0
        self._durable = 0
        self._waiters: list[tuple[int, Deferred[None]]] = []
        self._closed = False
        self._stopped = False
        self._abandoned = 0
        #: bytes appended since the last :meth:`rotate` (what a checkpoint would retire)
        self.size = 0

    # -- IEventJournal ---------------------------------------------------------------------

    def set_listener(self, listener: Callable[[list[Any]], None]) -> None:
        self._listener = listener

    @property
    def syncs(self) -> int:
        """fdatasync calls so far (for tests and benchmarks)."""
        return self._writer.syncs

    @property
    def pending(self) -> int:
        """Records appended and not yet durable."""
        return self._appended - self._durable

    def recover(self, incarnation: str = "") -> list[Any]:
        """Read what the last run left (after its checkpoint); the next segment is new.

        Call once, before the first :meth:`append`.  Damaged stretches are handled as the
        module docstring says; this never raises for bad content (it does for I/O errors).
        """
        records, self._segment = read_log(self._files, self.directory, self._now)
        self._header = encode_record(["h", {"v": 1, "incarnation": incarnation}])
        return records

    def append(self, record: Any, token: Any) -> None:
        """Queue one record; ``token`` is handed to the listener once the record is durable."""
        if self._closed:
            raise RuntimeError("the event log is closed")
        line = encode_record(record)
        self._pending.append(line)
        self._tokens.append(token)
        self._appended += 1
        self.size += len(line)
        self._schedule_handoff()

    def rotate(self) -> int:
        """Start a new segment with the next batch; return the last segment before it.

        Everything appended before this call lies in segments up to the returned number.
        """
        finished = self._segment
        self._segment += 1
        self.size = 0
        return finished

    def drop_through(self, through: int) -> Deferred[None]:
        """Segments up to ``through`` are covered by a durable checkpoint: delete them."""
        return self._run(lambda: self._writer.drop_through(through))

    def drain(self) -> Deferred[None]:
        """Fire once every record appended so far is durable."""
        if self._durable >= self._appended:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append((self._appended, waiter))
        return waiter

    def close(self, grace: float = 10.0) -> Deferred[int]:
        """Stop taking records, write what is pending, close the segment and the thread.

        Fires with the number of records given up on: those still not durable after ``grace``
        seconds (a failing disk), never published.
        """
        self._closed = True
        result: Deferred[int] = Deferred()
        timer = self._clock.callLater(grace, self.abandon)

        def finish(_: object) -> None:
            if timer.active():
                timer.cancel()
            self._stopped = True
            for call in (self._handoff_call, self._retry_call):
                if call is not None and call.active():
                    call.cancel()
            self._handoff_call = self._retry_call = None
            self._run(self._writer.close).addErrback(lambda f: None)
            if self._own_runner is not None:
                self._own_runner.stop()
            result.callback(self._abandoned)

        self.drain().addCallback(finish)
        return result

    def abandon(self) -> int:
        """Give up on records not yet durable (shutdown on a failing disk); return how many."""
        lost = self._appended - self._durable
        self._abandoned += lost
        self._pending.clear()
        self._tokens.clear()
        self._durable = self._appended
        waiters, self._waiters = self._waiters, []
        for _, waiter in waiters:
            waiter.callback(None)
        return lost

    # -- batches ---------------------------------------------------------------------------

    def _schedule_handoff(self) -> None:
        if self._in_flight or self._retry_call is not None or self._handoff_call is not None:
            return
        if self._pending:
            self._handoff_call = self._clock.callLater(0, self._handoff)

    def _handoff(self) -> None:
        self._handoff_call = None
        if self._in_flight or not self._pending:
            return
        data = b"".join(self._pending)
        tokens = self._tokens
        lines = self._pending
        self._pending, self._tokens = [], []
        self._in_flight = True
        segment, header = self._segment, self._header
        d = self._run(lambda: self._writer.write(segment, header, data))
        d.addCallbacks(
            self._written, self._failed, callbackArgs=(tokens,), errbackArgs=(lines, tokens)
        )

    def _written(self, _: object, tokens: list[Any]) -> None:
        self._in_flight = False
        if self._stopped:
            return
        if self._failures:
            _log.info("the job event log is written again; held events are published")
            self._failures = 0
        self._durable += len(tokens)
        try:
            self._listener(tokens)
        except Exception:
            _log.failure("publishing durable job events failed")
        while self._waiters and self._waiters[0][0] <= self._durable:
            self._waiters.pop(0)[1].callback(None)
        self._schedule_handoff()

    def _failed(self, failure: Failure, lines: list[bytes], tokens: list[Any]) -> None:
        self._in_flight = False
        if self._stopped:
            return
        self._pending[:0] = lines
        self._tokens[:0] = tokens
        self._segment += 1  # never append after a torn write
        delay = self._retry_delays[min(self._failures, len(self._retry_delays) - 1)]
        if self._failures == 0:
            if failure.check(OSError):
                _log.error(
                    "cannot write the job event log in {directory} ({reason}); {count} events "
                    "are held, unpublished, and written again every few seconds: free space or "
                    "fix the disk under state_dir",
                    directory=self.directory,
                    reason=_reason(failure.value),
                    count=len(self._tokens),
                )
            else:
                _log.failure("writing the job event log failed", failure)
        self._failures += 1
        self._retry_call = self._clock.callLater(delay, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        self._schedule_handoff()


def _reason(error: BaseException | None) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        return f"{errno.errorcode.get(error.errno, error.errno)}: {error.strerror}"
    return str(error)


@implementer(IEventJournal)
class VolatileJournal:
    """Records are "durable" at once and kept nowhere: an engine without a state directory
    (tests of other parts, benchmarks' upper bound).  The listener runs inside ``append``."""

    size = 0
    syncs = 0
    pending = 0

    def __init__(self) -> None:
        self._listener: Callable[[list[Any]], None] = lambda tokens: None

    def set_listener(self, listener: Callable[[list[Any]], None]) -> None:
        self._listener = listener

    def recover(self, incarnation: str = "") -> list[Any]:
        return []

    def append(self, record: Any, token: Any) -> None:
        self._listener([token])

    def rotate(self) -> int:
        return 0

    def drop_through(self, through: int) -> Deferred[None]:
        return succeed(None)

    def drain(self) -> Deferred[None]:
        return succeed(None)

    def close(self, grace: float = 10.0) -> Deferred[int]:
        return succeed(0)

    def abandon(self) -> int:
        return 0

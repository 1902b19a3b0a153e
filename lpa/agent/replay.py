"""Recovery: the write-ahead log's records folded onto the jobs read from the job store.

Records are JSON arrays, tagged by their first member::

    ["j", {...Job...}]                                      a job's whole state
    ["e", job_id, seq, kind, status, progress, message,     one event, by position (cheaper to
          timestamp, event, error, error_code, incarnation   encode than a wire object)
          (, [command, fd, end])]                           made from an output line: where the
                                                            line ends in the command's file
    ["d", job_id]                                           the job was deleted or pruned

Records are replayed in order.  A job record replaces the job unless it is older than what is
known (its ``seq``: a segment whose removal after a checkpoint was interrupted); an event at or
below the job's last seq is a duplicate and skipped, one that jumps ahead drops the older kept
events (a reader from before the jump then gets a snapshot, never a silent gap); a delete
forgets the job.  Events move their job's status,
progress, seq, ``updated_at``, error and, for output lines, its logs and the offsets up to which
its commands' output is events (``job.offsets``).
"""

from __future__ import annotations

from collections.abc import Iterable
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from twisted.logger import Logger

from lpa.agent.joblines import append_log
from lpa.agent.model import Job
from lpa.agent.store import job_from_dict
from lpa.events import EVENT_JOB_COMPLETE, KIND_OUTPUT, JobEvent

#: lines kept in ``job.logs``: every output line as it comes plus the engine's own lines,
#: the newest MAX_LOG_LINES of them, the first line then counting what was dropped (the original
#: kept only up to 200 lines of failure output)
MAX_LOG_LINES = 500

_log = Logger()


def _text(value: str | None) -> str:
    return "null" if value is None else _quote(value)


def event_record(event: JobEvent, source: tuple[int, int, int] | None = None) -> bytes:
    """An event as a log record's JSON text (see the module docstring).

    Written by hand from the C string quoter: this runs for every output line, and it costs
    about a third of ``json.dumps`` of the same array.
    """
    tail = "]" if source is None else f",[{source[0]:d},{source[1]:d},{source[2]:d}]]"
    return (
        f'["e",{_quote(event.job_id)},{event.seq or 0:d},{_quote(event.kind)},'
        f"{_quote(event.status)},{event.progress:d},{_quote(event.message)},"
        f"{_quote(event.timestamp)},{_quote(event.event)},{_text(event.error)},"
        f"{_text(event.error_code)},{_text(event.incarnation)}{tail}"
    ).encode("ascii")


def event_from_record(record: list[Any]) -> JobEvent:
    """Inverse of :func:`event_record`; raises ValueError/TypeError on a malformed record."""
    if len(record) not in (12, 13) or not isinstance(record[2], int):
        raise ValueError(f"not an event record of 12 or 13 members: {str(record)[:80]}")
    return JobEvent(
        job_id=record[1],
        seq=record[2],
        kind=record[3],
        status=record[4],
        progress=record[5],
        message=record[6],
        timestamp=record[7],
        event=record[8],
        error=record[9],
        error_code=record[10],
        incarnation=record[11],
    )


class Replay:
    """Folds the log's records onto the jobs read from the store (see the module docstring).

    :param stored: each job's stored events (a list, or a callable decoding them); the jobs
        the log touches get a decoded list here.
    """

    def __init__(self, jobs: dict[str, Job], stored: dict[str, Any]) -> None:
        self.jobs = jobs
        self.stored = stored
        self.touched: set[str] = set()
        self.removed: set[str] = set()
        self._orphans = 0
        self._gaps: set[str] = set()

    def run(self, records: Iterable[Any]) -> Replay:
        for record in records:
            try:
                tag = record[0]
                if tag == "e":
                    self._event(event_from_record(record), record_source(record))
                elif tag == "j":
                    self._job(job_from_dict(record[1]))
                elif tag == "d":
                    self._delete(str(record[1]))
            except (TypeError, ValueError, KeyError, AttributeError) as error:
                _log.error("skipped an unreadable event log record ({reason})", reason=str(error))
        if self._orphans:
            _log.error(
                "{count} event log records belong to no known job (their job's record was "
                "lost); skipped",
                count=self._orphans,
            )
        for job_id in sorted(self._gaps):
            _log.error(
                "job {job_id}: events are missing from the event log; the older ones are no "
                "longer offered (readers get a snapshot)",
                job_id=job_id,
            )
        return self

    def _events_of(self, job_id: str) -> list[JobEvent]:
        stored = self.stored.get(job_id)
        if not isinstance(stored, list):
            stored = self.stored[job_id] = list(stored()) if callable(stored) else []
        return stored

    def _job(self, job: Job) -> None:
        known = self.jobs.get(job.id)
        if known is not None and job.seq < known.seq:
            return  # older than the checkpoint (a segment whose removal was interrupted)
        self.removed.discard(job.id)
        self.jobs[job.id] = job
        self.touched.add(job.id)
        if known is None:
            self.stored.setdefault(job.id, [])

    def _delete(self, job_id: str) -> None:
        if self.jobs.pop(job_id, None) is not None:
            self.stored.pop(job_id, None)
            self.removed.add(job_id)
        self.touched.discard(job_id)

    def _event(self, event: JobEvent, source: tuple[int, int, int] | None) -> None:
        job = self.jobs.get(event.job_id)
        if job is None:
            self._orphans += 1
            return
        seq = event.seq or 0
        if seq <= job.seq and job.id not in self.touched and job.id not in self._gaps:
            return  # covered by the checkpoint
        events = self._events_of(job.id)
        last = (events[-1].seq or 0) if events else 0
        if seq <= last:
            return
        if seq != last + 1 and (events or seq > job.seq + 1):
            self._gaps.add(job.id)
            events.clear()
        events.append(event)
        self.touched.add(job.id)
        _fold(job, event)
        if source is not None:
            note_offset(job, source)


def record_source(record: list[Any]) -> tuple[int, int, int] | None:
    """The ``[command, fd, end]`` an event record carries, if any."""
    if len(record) < 13 or record[12] is None:
        return None
    number, fd, end = record[12]
    if not all(isinstance(v, int) for v in (number, fd, end)):
        raise ValueError(f"bad line position in an event record: {record[12]!r}")
    return number, fd, end


def note_offset(job: Job, source: tuple[int, int, int]) -> None:
    """The job's command ``source[0]`` has its fd ``source[1]`` output evented up to
    ``source[2]``."""
    number, fd, end = source
    key = f"{number}:{fd}"
    if end > job.offsets.get(key, 0):
        job.offsets[key] = end


def _fold(job: Job, event: JobEvent) -> None:
    """What an event tells about its job's state."""
    job.seq = max(job.seq, event.seq or 0)
    job.status = event.status
    job.progress = event.progress
    job.updated_at = event.timestamp
    if event.kind == KIND_OUTPUT:
        append_log(job, event.message, MAX_LOG_LINES)
    elif event.event != EVENT_JOB_COMPLETE:
        job.message = event.message
    if event.terminal:
        job.error = event.error
        job.error_code = event.error_code
        job.completed_at = job.completed_at or event.timestamp

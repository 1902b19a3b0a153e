"""Durable job history: one JSON file holding every kept job with its kept events.

Writes are atomic (temporary file in the same directory, fsync, rename, fsync of the directory)
and the file is mode 0600, since job logs can name what a host runs.  A file that cannot be parsed
is moved aside as ``<name>.corrupt-<unix time>`` and the history starts empty, with an error
logged: losing history must never stop the agent from starting.

File layout::

    {"version": 1, "jobs": [{"job": {...Job...}, "events": [{...JobEvent wire...}, ...]}, ...]}
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import attr
from twisted.logger import Logger
from zope.interface import implementer

from lpa.agent.interfaces import IJobStore
from lpa.agent.model import Job, JobRequest, PackageSpec
from lpa.events import JobEvent

FORMAT_VERSION = 1
DEFAULT_FILENAME = "jobs_history.json"

_log = Logger()


def job_to_dict(job: Job) -> dict[str, Any]:
    """A Job (with its request) as plain JSON data."""
    data = attr.asdict(job, recurse=False)
    request = job.request
    data["request"] = {
        **attr.asdict(request, recurse=False),
        "packages": None
        if request.packages is None
        else [{"name": p.name, "version": p.version} for p in request.packages],
    }
    data["logs"] = list(job.logs)
    data["changes"] = [dict(c) for c in job.changes]
    data["reboot_packages"] = list(job.reboot_packages)
    return data


def job_from_dict(data: dict[str, Any]) -> Job:
    """Inverse of :func:`job_to_dict`; raises ValueError/TypeError/KeyError on bad data."""
    data = dict(data)
    request_data = dict(data.pop("request"))
    packages = request_data.pop("packages", None)
    request = JobRequest(
        **request_data,
        packages=None
        if packages is None
        else tuple(PackageSpec(p["name"], p.get("version")) for p in packages),
    )
    return Job(**data, request=request)


def _fragment_key(job: Job, events: list) -> tuple[Any, ...]:
    """Changes whenever the job or its kept events may have changed.

    The engine keeps one Job object per job for its life (``id(job)``).  Events are
    immutable and numbered, so (count, first seq, last seq) names a kept window;
    the engine changes a job only together with a new event (``seq``), except log lines,
    which are append-only with a drop counter in the first line: (length, first, last) moves.
    """
    logs = job.logs
    return (
        id(job),
        job.seq,
        job.status,
        job.progress,
        job.message,
        job.updated_at,
        job.completed_at,
        job.error_code,
        len(logs),
        logs[0] if logs else None,
        logs[-1] if logs else None,
        len(events),
        events[0].seq if events else None,
        events[-1].seq if events else None,
    )


def event_from_dict(data: dict[str, Any]) -> JobEvent:
    return JobEvent(**data)


@implementer(IJobStore)
class JsonJobStore:
    """Job history in one JSON file, replaced atomically on every save.

    :param path: the file, e.g. ``state_dir / "jobs_history.json"``; its directory is created
        (mode 0700) when missing.
    :param now: wall clock for naming a corrupt file aside (injectable for tests).
    :param background: write on a helper thread.  ``save`` then encodes on the caller's thread
        (only jobs that changed) and returns; the thread writes the newest document, skipping
        superseded ones.  A large history is ~100 MB and takes seconds to write and fsync,
        which must not stall the reactor.  ``flush()`` waits for the last save to be on disk
        (``JobManager.stop`` calls it); a failed background write is raised by the next
        ``save`` or ``flush``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        now: Callable[[], float] = time.time,
        *,
        background: bool = False,
    ) -> None:
        self.path = Path(path)
        self._now = now
        self._writer = _BackgroundWriter(self._write) if background else None
        #: job id -> (change key, serialised entry): a history of 500 ended jobs with their
        #: events is ~100 MB of JSON; only jobs that changed since the last save are re-encoded
        self._fragments: dict[str, tuple[tuple[Any, ...], bytes]] = {}

    def load(self) -> list:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            document = json.loads(raw)
            if not isinstance(document, dict) or not isinstance(document.get("jobs"), list):
                raise ValueError("not a job history document")
            entries = []
            fragments = {}
            for item in document["jobs"]:
                job = job_from_dict(item["job"])
                events = [event_from_dict(e) for e in item.get("events", [])]
                entries.append((job, events))
                # seed the encoding cache now, not during the first job after start-up
                fragments[job.id] = (
                    _fragment_key(job, events),
                    json.dumps(item, separators=(",", ":")).encode("utf-8"),
                )
            self._fragments = fragments
            return entries
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(self._now())}")
            os.replace(self.path, aside)
            _log.error(
                "job history {path} is unreadable ({reason}); moved aside to {aside}, "
                "starting with an empty history",
                path=str(self.path),
                reason=str(error),
                aside=str(aside),
            )
            return []

    def save(self, entries: list) -> None:
        fragments: dict[str, tuple[tuple[Any, ...], bytes]] = {}
        parts = []
        for job, events in entries:
            key = _fragment_key(job, events)
            cached = self._fragments.get(job.id)
            if cached is None or cached[0] != key:
                text = json.dumps(
                    {"job": job_to_dict(job), "events": [attr.asdict(e) for e in events]},
                    separators=(",", ":"),
                ).encode("utf-8")
                cached = (key, text)
            fragments[job.id] = cached
            parts.append(cached[1])
        payload: list[bytes] = [b'{"version":%d,"jobs":[' % FORMAT_VERSION]
        for index, part in enumerate(parts):
            if index:
                payload.append(b",")
            payload.append(part)  # cached bytes, never copied on the caller's thread
        payload.append(b"]}")
        self._fragments = fragments
        if self._writer is None:
            self._write(payload)
        else:
            self._writer.submit(payload)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the last saved history is on disk (no-op for direct writes)."""
        if self._writer is not None:
            self._writer.flush(timeout)

    def close(self) -> None:
        """Flush and stop the writer thread."""
        if self._writer is not None:
            self._writer.close()

    def _write(self, payload: list[bytes]) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = directory / f".{self.path.name}.{os.getpid()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as stream:
                stream.writelines(payload)
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class _BackgroundWriter:
    """One daemon thread writing the newest submitted payload; older pending ones are dropped."""

    def __init__(self, write: Callable[[list[bytes]], None]) -> None:
        self._write = write
        self._condition = threading.Condition()
        self._pending: list[bytes] | None = None
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, payload: list[bytes]) -> None:
        with self._condition:
            self._raise_error()
            if self._closed:
                raise RuntimeError("job store is closed")
            self._pending = payload
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="lpa-job-store", daemon=True
                )
                self._thread.start()
            self._condition.notify_all()

    def flush(self, timeout: float | None = None) -> None:
        with self._condition:
            self._condition.wait_for(
                lambda: self._pending is None and not self._busy, timeout=timeout
            )
            self._raise_error()

    def close(self) -> None:
        self.flush()
        with self._condition:
            self._closed = True
            self._condition.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _loop(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                payload, self._pending = self._pending, None
                self._busy = True
            try:
                self._write(payload)
            except BaseException as error:  # reported on the reactor thread by save/flush
                with self._condition:
                    self._error = error
            finally:
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()

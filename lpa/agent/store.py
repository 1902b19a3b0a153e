"""Durable job history: one file per job, the checkpoint of the write-ahead event log.

::

    state_dir/jobs/<job id>.json     line 1: {"v": 2, "job": {...Job...}}
                                     line 2: [{...JobEvent wire...}, ...]   (the kept events)

A job's file is written when a checkpoint finds the job changed since the last one (a finished
job therefore about once), atomically (temporary file, fsync, rename; one fsync of the directory
per checkpoint), mode 0600 since job logs can name what a host runs.  Loading reads every file
but decodes only the job line: a job's events stay bytes until someone asks for them, so a full
history (500 jobs of 1000 events) loads in a fraction of what one JSON document took.

A file that cannot be parsed is moved aside as ``<name>.corrupt-<unix time>`` with an error
logged; losing one job's history never stops the agent from starting.  The single-document
history of earlier versions (``jobs_history.json``, format 1) is read once, rewritten as one file
per job, and renamed ``jobs_history.json.v1-migrated``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import attr
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from lpa.agent import eventlog
from lpa.agent.interfaces import IJobStore
from lpa.agent.model import Job, JobRequest, PackageSpec
from lpa.agent.wal import BlockingRunner, synchronous_runner
from lpa.events import JobEvent

FORMAT_VERSION = 2
LEGACY_FILENAME = "jobs_history.json"
_JOB_FILE = re.compile(r"^[0-9a-fA-F-]{1,64}\.json$")

_log = Logger()


def job_to_dict(job: Job) -> dict[str, Any]:
    """A Job (with its request) as plain JSON data; what only lives in memory is left out."""
    data = attr.asdict(job, recurse=False, filter=lambda a, _: a.metadata.get("persist", True))
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


def event_from_dict(data: dict[str, Any]) -> JobEvent:
    """An event as stored (its wire form, or the attrs form of format 1)."""
    return JobEvent(**data)


def events_to_bytes(events: Sequence[JobEvent]) -> bytes:
    return json.dumps([e.to_wire() for e in events], separators=(",", ":")).encode("utf-8")


class StoredEvents:
    """A job's kept events as read from its file, decoded on the first call."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    def __call__(self) -> list[JobEvent]:
        return [event_from_dict(e) for e in json.loads(self._raw)]


@implementer(IJobStore)
class JobFileStore:
    """Job history as one file per job; see the module docstring.

    :param directory: e.g. ``state_dir / "jobs"``; created (mode 0700) when missing.
    :param legacy_path: a format-1 history to migrate once (``state_dir/jobs_history.json``).
    :param run_blocking: runs the writes off the reactor (a ``ThreadRunner``); the default runs
        them on the caller's thread.
    :param now: wall clock for naming a corrupt file aside.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        legacy_path: str | os.PathLike[str] | None = None,
        run_blocking: BlockingRunner = synchronous_runner,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.directory = os.fspath(directory)
        self._legacy = os.fspath(legacy_path) if legacy_path is not None else None
        self._run = run_blocking
        self._now = now

    # -- reading ---------------------------------------------------------------------------

    def load(self) -> list[tuple[Job, eventlog.StoredEvents]]:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        names = sorted(os.listdir(self.directory))
        for name in names:
            if name.endswith(".tmp"):
                os.unlink(os.path.join(self.directory, name))  # a write the host never finished
        entries: list[tuple[Job, eventlog.StoredEvents]] = [
            e for e in map(self._read_job, filter(_JOB_FILE.match, names)) if e
        ]
        if not entries and self._legacy is not None and os.path.exists(self._legacy):
            entries = self._migrate(self._legacy)
        # oldest first: what the engine's FIFO listing and retention expect
        entries.sort(key=lambda entry: (entry[0].created_at, entry[0].id))
        return entries

    def _read_job(self, name: str) -> tuple[Job, StoredEvents] | None:
        path = os.path.join(self.directory, name)
        try:
            with open(path, "rb") as stream:
                raw = stream.read()
            head, _, tail = raw.partition(b"\n")
            document = json.loads(head)
            if not isinstance(document, dict) or document.get("v") != FORMAT_VERSION:
                raise ValueError("not a job history file of format 2")
            job = job_from_dict(document["job"])
            events = tail.rstrip(b"\n")
            if not events.startswith(b"[") or not events.endswith(b"]"):
                raise ValueError("the events line is missing or cut")
            return job, StoredEvents(events)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            aside = f"{path}.corrupt-{int(self._now())}"
            os.replace(path, aside)
            _log.error(
                "job history file {path} is unreadable ({reason}); moved aside to {aside}",
                path=path,
                reason=str(error),
                aside=aside,
            )
            return None

    def _migrate(self, legacy: str) -> list[tuple[Job, eventlog.StoredEvents]]:
        entries = read_v1_history(legacy, self._now)
        if entries:
            self._write({job.id: self._encode(job, events) for job, events in entries}, ())
            _log.info(
                "job history {path} (format 1) rewritten as {count} files in {directory}",
                path=legacy,
                count=len(entries),
                directory=self.directory,
            )
        if os.path.exists(legacy):
            os.replace(legacy, legacy + ".v1-migrated")
        return [(job, list(events)) for job, events in entries]

    # -- writing ---------------------------------------------------------------------------

    def save(
        self, changed: list[tuple[Job, Sequence[JobEvent]]], removed: Sequence[str] = ()
    ) -> Deferred[None]:
        """Encode now (on the caller's thread: the state as of this call), write off-thread."""
        encoded = {job.id: self._encode(job, events) for job, events in changed}
        gone = tuple(removed)
        return self._run(lambda: self._write(encoded, gone))

    def close(self) -> None:
        stop = getattr(self._run, "stop", None)
        if stop is not None:
            stop()

    @staticmethod
    def _encode(job: Job, events: Sequence[JobEvent]) -> bytes:
        head = json.dumps(
            {"v": FORMAT_VERSION, "job": job_to_dict(job)}, separators=(",", ":")
        ).encode("utf-8")
        return head + b"\n" + events_to_bytes(events) + b"\n"

    def _write(self, encoded: dict[str, bytes], removed: Sequence[str]) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        for job_id, data in encoded.items():
            path = os.path.join(self.directory, f"{job_id}.json")
            temporary = path + ".tmp"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(temporary)
                raise
            os.close(fd)
            os.replace(temporary, path)
        for job_id in removed:
            if job_id not in encoded:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, f"{job_id}.json"))
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_v1_history(
    path: str, now: Callable[[], float] = time.time
) -> list[tuple[Job, list[JobEvent]]]:
    """The jobs of a format-1 document ``{"version": 1, "jobs": [{"job", "events"}]}``.

    An unparsable document is moved aside (``.corrupt-<unix time>``) and reads as empty.
    """
    try:
        with open(path, "rb") as stream:
            document = json.loads(stream.read())
        if not isinstance(document, dict) or not isinstance(document.get("jobs"), list):
            raise ValueError("not a job history document")
        return [
            (job_from_dict(item["job"]), [event_from_dict(e) for e in item.get("events", [])])
            for item in document["jobs"]
        ]
    except FileNotFoundError:
        return []
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        aside = f"{path}.corrupt-{int(now())}"
        os.replace(path, aside)
        _log.error(
            "job history {path} is unreadable ({reason}); moved aside to {aside}, "
            "starting with an empty history",
            path=path,
            reason=str(error),
            aside=aside,
        )
        return []

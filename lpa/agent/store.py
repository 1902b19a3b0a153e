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


def event_from_dict(data: dict[str, Any]) -> JobEvent:
    return JobEvent(**data)


@implementer(IJobStore)
class JsonJobStore:
    """Job history in one JSON file, replaced atomically on every save.

    :param path: the file, e.g. ``state_dir / "jobs_history.json"``; its directory is created
        (mode 0700) when missing.
    :param now: wall clock for naming a corrupt file aside (injectable for tests).
    """

    def __init__(self, path: str | os.PathLike[str], now: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._now = now

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
            for item in document["jobs"]:
                job = job_from_dict(item["job"])
                events = [event_from_dict(e) for e in item.get("events", [])]
                entries.append((job, events))
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
        document = {
            "version": FORMAT_VERSION,
            "jobs": [
                {"job": job_to_dict(job), "events": [attr.asdict(e) for e in events]}
                for job, events in entries
            ],
        }
        payload = json.dumps(document, separators=(",", ":")).encode("utf-8")
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = directory / f".{self.path.name}.{os.getpid()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as stream:
                stream.write(payload)
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

"""A job engine stand-in for the REST API tests: records submissions, never runs anything.

:class:`FakeJobManager` keeps jobs in memory and numbers their events through the real
:class:`~lpa.agent.eventlog.EventLog`, so the events endpoint reads the same objects the WebSocket
would.  Tests drive a job with :meth:`FakeJobManager.emit` and :meth:`FakeJobManager.finish`, and
make admission fail by setting ``refuse_with``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from lpa.agent.eventlog import EventLog
from lpa.agent.interfaces import IJobManager
from lpa.agent.model import Job, JobRequest
from lpa.errors import (
    CancelNotAllowedError,
    DeleteNotAllowedError,
    JobNotFoundError,
    ValidationError,
)
from lpa.events import (
    CANCELLED,
    EVENT_JOB_COMPLETE,
    KIND_OUTPUT,
    PENDING,
    normalise_status,
    rfc3339_from_epoch,
)


@implementer(IJobManager)
class FakeJobManager:
    """In-memory jobs; ``submitted`` lists every admitted ``JobRequest``."""

    def __init__(
        self,
        clock: IReactorTime,
        max_events_per_job: int = 1000,
        uuid_factory: Callable[[], uuid.UUID] = uuid.uuid4,
    ) -> None:
        self._clock = clock
        self._uuid_factory = uuid_factory
        self.incarnation = "boot-1:1"
        self.events = EventLog(clock, max_events_per_job, incarnation=self.incarnation)
        self.jobs: dict[str, Job] = {}
        self.submitted: list[JobRequest] = []
        #: when set, ``submit`` raises it
        self.refuse_with: Exception | None = None
        self.mutating = False

    def submit(self, request: Any) -> Job:
        if self.refuse_with is not None:
            raise self.refuse_with
        packages = request.packages
        if packages is not None and len(packages) == 0 and request.operation != "patch_apply":
            raise ValidationError("packages must not be empty")
        self.submitted.append(request)
        now = rfc3339_from_epoch(self._clock.seconds())
        job = Job(
            id=str(self._uuid_factory()),
            operation=request.operation,
            status=PENDING,
            created_at=now,
            updated_at=now,
            request=request,
            incarnation=self.incarnation,
        )
        self.jobs[job.id] = job
        self.emit(job.id, "Job created")
        return job

    def emit(
        self, job_id: str, message: str, *, status: str | None = None, kind: str = "status"
    ) -> None:
        """Append one event to the job (and move it to ``status`` when given)."""
        job = self.jobs[job_id]
        if status is not None:
            job.status = status
        event = self.events.append(
            job_id, status=job.status, progress=job.progress, message=message, kind=kind
        )
        job.seq = event.seq  # type: ignore[assignment]

    def output(self, job_id: str, *lines: str) -> None:
        for line in lines:
            self.emit(job_id, line, kind=KIND_OUTPUT)

    def finish(self, job_id: str, status: str, message: str = "done") -> None:
        job = self.jobs[job_id]
        job.progress = 100
        job.completed_at = rfc3339_from_epoch(self._clock.seconds())
        self.emit(job_id, message, status=status)
        event = self.events.append(
            job_id,
            status=status,
            progress=100,
            message=message,
            event=EVENT_JOB_COMPLETE,
        )
        job.seq = event.seq  # type: ignore[assignment]

    def get(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise JobNotFoundError(f"Job not found: {job_id}") from None

    def list_jobs(self, status: str | None = None, limit: int = 50) -> list:
        wanted = normalise_status(status) if status is not None else None
        found = [j for j in reversed(list(self.jobs.values())) if wanted in (None, j.status)]
        return found[:limit]

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.terminal:
            raise CancelNotAllowedError(f"Job {job_id} has ended", {"status": job.status})
        self.finish(job_id, CANCELLED, "Job cancelled")
        return job

    def delete(self, job_id: str) -> None:
        job = self.get(job_id)
        if not job.terminal:
            raise DeleteNotAllowedError(f"Job {job_id} has not ended", {"status": job.status})
        del self.jobs[job_id]
        self.events.forget(job_id)

    def mutation_in_progress(self) -> bool:
        return self.mutating

    def active_count(self) -> int:
        return sum(1 for j in self.jobs.values() if not j.terminal)

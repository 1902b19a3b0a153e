"""The job engine and a job stream's channel as the REST API and the WebSocket see them.

:class:`FakeJobManager` (``IJobManager``) keeps jobs in memory and numbers their events through
the real :class:`~lpa.agent.eventlog.EventLog`, so the events endpoint and the WebSocket read the
same objects as with the real engine; it never runs anything.  Tests drive a job with
:meth:`~FakeJobManager.step` (or :meth:`~FakeJobManager.emit`, :meth:`~FakeJobManager.output`)
and :meth:`~FakeJobManager.finish`, and make admission fail by setting ``refuse_with``.

:class:`RecordingChannel` (``IStreamChannel``) keeps what a stream session sends.

``tests.test_fakes`` runs ``verifyObject`` on both and on the production classes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from lpa.agent.eventlog import EventLog
from lpa.agent.interfaces import IJobManager, IStreamChannel
from lpa.agent.model import Job, JobRequest
from lpa.errors import (
    CancelNotAllowedError,
    DeleteNotAllowedError,
    JobNotFoundError,
    ValidationError,
)
from lpa.events import (
    CANCELLED,
    COMPLETED,
    EVENT_JOB_COMPLETE,
    KIND_OUTPUT,
    KIND_STATUS,
    PENDING,
    JobEvent,
    normalise_status,
    rfc3339_from_epoch,
)


def _seq(event: JobEvent) -> int:
    """The number the EventLog gave ``event`` (it numbers every event it appends)."""
    assert event.seq is not None, event
    return event.seq


@implementer(IJobManager)
class FakeJobManager:
    """In-memory jobs; ``submitted`` lists every admitted ``JobRequest``.

    :param events: the EventLog to number events in (default: a new one of
        ``max_events_per_job`` per job, carrying this manager's incarnation).
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_events_per_job: int = 1000,
        uuid_factory: Callable[[], uuid.UUID] = uuid.uuid4,
        *,
        events: EventLog | None = None,
    ) -> None:
        self._clock = clock
        self._uuid_factory = uuid_factory
        self.incarnation = "boot-1:1"
        if events is None:
            events = EventLog(clock, max_events_per_job, incarnation=self.incarnation)
        self.events = events
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

    # -- driving a job ---------------------------------------------------------------------

    def emit(
        self, job_id: str, message: str, *, status: str | None = None, kind: str = KIND_STATUS
    ) -> None:
        """Append one event to the job (and move it to ``status`` when given)."""
        job = self.jobs[job_id]
        if status is not None:
            job.status = status
        event = self.events.append(
            job_id, status=job.status, progress=job.progress, message=message, kind=kind
        )
        job.seq = _seq(event)

    def output(self, job_id: str, *lines: str) -> None:
        """One ``output`` event per line."""
        for line in lines:
            self.emit(job_id, line, kind=KIND_OUTPUT)

    def step(self, job_id: str, status: str, progress: int, message: str, **kw: Any) -> None:
        """Move the job to ``status``/``progress``/``message`` with one event (``kw``: its kind,
        event name…), as the engine does."""
        job = self.jobs[job_id]
        job.status, job.progress, job.message = status, progress, message
        event = self.events.append(
            job_id, status=status, progress=progress, message=message, **kw
        )
        job.seq = _seq(event)

    def finish(self, job_id: str, status: str = COMPLETED, message: str | None = None) -> None:
        """The terminal ``job_status``, then the single ``job_complete`` (message: ``Job
        <status>`` unless given)."""
        text = f"Job {status}" if message is None else message
        self.jobs[job_id].completed_at = rfc3339_from_epoch(self._clock.seconds())
        self.step(job_id, status, 100, text)
        self.step(job_id, status, 100, text, event=EVENT_JOB_COMPLETE)

    # -- IJobManager -----------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise JobNotFoundError(f"Job not found: {job_id}") from None

    def list_jobs(self, status: str | None = None, limit: int = 50) -> list[Job]:
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


def new_job(jobs: FakeJobManager) -> str:
    """Submit a dry-run patch_apply; return its id."""
    return jobs.submit(JobRequest(operation="patch_apply", dry_run=True)).id


@implementer(IStreamChannel)
class RecordingChannel:
    """Keeps every frame sent, parsed, and each close (``closed_with``: the last one);
    ``on_send`` runs a hook per frame."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closes: list[tuple[int, str]] = []
        self.closed_with: tuple[int, str] | None = None
        self.on_send: Callable[[dict[str, Any]], object] | None = None

    def send_text(self, text: str) -> None:
        frame = json.loads(text)
        self.frames.append(frame)
        if self.on_send is not None:
            self.on_send(frame)

    def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)
        self.closes.append(self.closed_with)

    def take(self) -> list[dict[str, Any]]:
        """The frames sent since the last call."""
        frames, self.frames = self.frames, []
        return frames

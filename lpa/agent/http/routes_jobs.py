"""The agent's job endpoints: list, show, delete, cancel, and a job's numbered events."""

from __future__ import annotations

from twisted.web.iweb import IRequest

from lpa import validation
from lpa.agent.eventlog import EventsExpiredError
from lpa.agent.http import inputs as read
from lpa.agent.http.envelope import Answer
from lpa.agent.http.routing import Routes, as_job, route
from lpa.errors import EventsAheadError, EventsGoneError, ValidationError
from lpa.events import TERMINAL_STATUSES, normalise_status


class JobRoutes(Routes):
    """``/api/v1/jobs…``."""

    @route("/api/v1/jobs", "GET")
    async def list_jobs(self, request: IRequest) -> Answer:
        status = read.query(request, "status")
        if status is not None:
            try:
                status = normalise_status(status)
            except ValueError:
                raise ValidationError(
                    f"unknown job status {status!r}", {"field": "status"}
                ) from None
        limit = read.query_int(request, "limit", 50, 1, 1000)
        jobs = self._jobs.list_jobs(status=status, limit=limit)
        return Answer({"jobs": [job.to_summary() for job in jobs], "total": len(jobs)})

    @route("/api/v1/jobs/<string:job_id>", "GET")
    async def get_job(self, request: IRequest, job_id: str) -> Answer:
        return Answer(as_job(self._jobs.get(validation.job_id(job_id))).to_detail())

    @route("/api/v1/jobs/<string:job_id>", "DELETE")
    async def delete_job(self, request: IRequest, job_id: str) -> Answer:
        job_id = validation.job_id(job_id)
        self._jobs.delete(job_id)
        return Answer({"deleted": True, "job_id": job_id})

    @route("/api/v1/jobs/<string:job_id>/cancel", "POST")
    async def cancel_job(self, request: IRequest, job_id: str) -> Answer:
        job = as_job(self._jobs.cancel(validation.job_id(job_id)))
        return Answer(job.to_detail())

    @route("/api/v1/jobs/<string:job_id>/events", "GET")
    async def job_events(self, request: IRequest, job_id: str) -> Answer:
        job_id = validation.job_id(job_id)
        after = read.query_int(request, "after", 0, 0, 2**63 - 1)
        job = as_job(self._jobs.get(job_id))
        last_seq = self._jobs.events.last_seq(job_id)
        incarnation = self._jobs.incarnation
        if after > last_seq:
            raise EventsAheadError(
                f"Job {job_id} has no event after seq {after}: its last is {last_seq} "
                f"(agent incarnation {incarnation}); the agent lost or renumbered events, "
                "take the job from details.job",
                {"last_seq": last_seq, "incarnation": incarnation, "job": job.to_detail()},
            )
        try:
            events = self._jobs.events.after(job_id, after)
        except EventsExpiredError as expired:
            raise EventsGoneError(
                f"Events of job {job_id} after seq {after} are no longer kept (oldest kept: "
                f"{expired.oldest_kept}); details hold the job to resync from",
                job.to_detail(),
            ) from None
        detail = job.to_detail()
        return Answer(
            {
                "job_id": job_id,
                "events": [event.to_wire() for event in events],
                "last_seq": last_seq,
                "status": detail["status"],
                "terminal": detail["status"] in TERMINAL_STATUSES,
                "incarnation": incarnation,
            }
        )

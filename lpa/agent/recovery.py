"""What a starting engine does with each job the previous process left unfinished.

::

    running, its last command outlived the old process ── still running or finished ──▶ resume
    (IJobCommands.last_run)                           └─ vanished, never started ─────▶ finalise
    running or pending otherwise ───────────────────────────────────────────────────▶ finalise
    rebooting, or a reboot job after a reboot ──────────────────────────────────────▶ completed

Finalised means ``failed`` with ``AGENT_RESTARTED`` (same boot id) or ``AGENT_REBOOTED`` (another
one): "outcome unknown", never a guess.  Reboot jobs are never resumed (their one command asks
the host to go down; the reboot itself says how it ended).
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.logger import Logger

from lpa.agent import classify
from lpa.agent.interfaces import IJobCommands
from lpa.agent.model import Job
from lpa.events import COMPLETED, FAILED, OP_REBOOT, PENDING, REBOOTING, RUNNING

#: states of a job's last command in which the job can go on
RESUMABLE = ("running", "finished")

_log = Logger()


def resumable(job: Job, commands: IJobCommands) -> tuple[int, str] | None:
    """``(number, state)`` of the last command of ``job`` if the job can be resumed."""
    last = commands.last_run(job.id)
    if job.status != RUNNING or job.operation == OP_REBOOT or last is None:
        return None
    number, state = last
    if state not in RESUMABLE:
        _log.warn(
            "job {job_id}: its command {number} is {state}; the job cannot be resumed",
            job_id=job.id,
            number=number,
            state=state,
        )
        return None
    _log.info(
        "job {job_id} resumed: its command {number} is {state}",
        job_id=job.id,
        number=number,
        state=state,
    )
    return number, state


def finalisation(job: Job, boot_id: str) -> tuple[str, str, str | None, str | None]:
    """``(status, message, error, error_code)`` ending a job that cannot be resumed."""
    rebooted = bool(job.boot_id and boot_id and job.boot_id != boot_id)
    if job.status == REBOOTING or (job.operation == OP_REBOOT and rebooted):
        return COMPLETED, "Host rebooted; job completed", None, None
    when = "before the job ran" if job.status == PENDING else "during job execution"
    what = "rebooted" if rebooted else "restarted"
    error = f"Agent {'host reboot' if rebooted else 'process restart'} {when}; " + (
        "the job never ran"
        if job.status == PENDING
        else "the package manager may have finished, the outcome is unknown"
    )
    code = classify.AGENT_REBOOTED if rebooted else classify.AGENT_RESTARTED
    return FAILED, f"Agent {what} {when}", error, code


def discard_stale_runs(commands: IJobCommands, jobs: Mapping[str, Job]) -> None:
    """Forget the commands of jobs that ended or are gone (a crash before their clean-up)."""
    job_ids = getattr(commands, "job_ids", None)
    for job_id in job_ids() if job_ids is not None else ():
        job = jobs.get(job_id)
        if job is None or job.terminal:
            commands.discard(job_id)
